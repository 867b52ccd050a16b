"""The ``mergelab`` command line: parse, call one function, print.

Heavy libraries (torch, transformers) are imported inside commands so that
``mergelab --help`` answers at once.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional, TypeVar

import typer

app = typer.Typer(
    name="mergelab",
    help="Make better language models out of existing ones: merge checkpoints tensor by tensor, merge and bake "
    "LoRA adapters, evaluate honestly, and try it all offline on the built-in model zoo.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")
_state = {"verbose": False, "quiet": False}


def _configure_logging(verbose: bool, quiet: bool, first: bool = False) -> None:
    """Set the log level; ``first``: the flags before the subcommand (the later ones add to them)."""
    if (verbose and quiet) or (not first and ((verbose and _state["quiet"]) or (quiet and _state["verbose"]))):
        raise typer.BadParameter("--verbose and --quiet contradict each other; give one of them.")
    _state["verbose"] = verbose
    _state["quiet"] = quiet
    if quiet:  # transformers' and the Hub's progress bars (read when they are first imported)
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(level)  # basicConfig does nothing once a handler exists (flags after a subcommand)
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.NOTSET if verbose else logging.WARNING)


@app.callback()
def _global(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logs, and full tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
) -> None:
    _configure_logging(verbose, quiet, first=True)


def _show(progress: bool) -> bool:
    """Progress bars unless --no-progress or -q."""
    return progress and not _state["quiet"]


def _verbose_after_command(given: bool) -> None:
    if given:
        _configure_logging(True, False)


def _quiet_after_command(given: bool) -> None:
    if given:
        _configure_logging(False, True)


# The same two flags after a subcommand (`mergelab merge r.yml out -v`): every command declares
# them; their callbacks act only when the flag is given, so they never undo one given before
# the subcommand.
VERBOSE = typer.Option(False, "--verbose", "-v", help="Debug logs, and full tracebacks on errors.",
                       callback=_verbose_after_command, expose_value=False)
QUIET = typer.Option(False, "--quiet", "-q", help="Only warnings and errors.", callback=_quiet_after_command,
                     expose_value=False)


def _guard(action: Callable[[], T]) -> T:
    """Run ``action``; a MergelabError becomes a message and exit code 2 (traceback with --verbose)."""
    from mergelab.errors import MergelabError

    try:
        return action()
    except MergelabError as exc:
        if _state["verbose"]:
            raise
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.secho("interrupted; nothing was written.", err=True, fg=typer.colors.RED)
        raise typer.Exit(130) from None


@app.command()
def merge(
    config: Path = typer.Argument(..., help="Merge recipe (mergekit-compatible YAML)."),
    out_dir: Path = typer.Argument(..., help="Output model directory (must not exist unless --force)."),
    device: str = typer.Option("cpu", help="Where the math runs: cpu or cuda (inputs stream from disk)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for tensor math (default: all cores)."),
    out_shard_size: str = typer.Option("5GB", help="Largest output shard, e.g. 5GB, 500MB, 2GiB."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan and peak memory; write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace OUT_DIR if it exists."),
    seed: Optional[int] = typer.Option(None, help="Seed for random methods (DARE, DELLA); same seed, same merge."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    allow_crimes: bool = typer.Option(False, "--allow-crimes", help="Allow inputs of different architectures (as mergekit's flag)."),
    verbose: bool = VERBOSE, quiet: bool = QUIET,
) -> None:
    """Merge checkpoints as CONFIG says and write a Hugging Face model to OUT_DIR.

    The recipe is a mergekit YAML (models: or slices:, base_model, merge_method,
    parameters, dtype, out_dtype, tokenizer_source). Tensors stream one at a time, so
    memory stays bounded by the largest tensor whatever the model size. The output is
    written under a temporary name and appears only when complete.
    """
    from mergelab import merge as merging

    options = merging.MergeOptions(
        device=device, threads=threads, out_shard_size=out_shard_size, force=force, seed=seed, progress=_show(progress),
        allow_crimes=allow_crimes,
    )
    if dry_run:
        typer.echo(_guard(lambda: merging.dry_run(config, options, out_dir)))
        return
    result = _guard(lambda: merging.run_merge(config, out_dir, options))
    typer.echo(f"merged {result.tensors} tensors in {result.seconds:.1f} s -> {result.out_dir}")
    _done()


# ---- mergelab lora ------------------------------------------------------------------------

lora_app = typer.Typer(
    help="LoRA adapters: merge them exactly in ΔW space, bake them into a base, extract them from a fine-tune.",
    no_args_is_help=True,
)
app.add_typer(lora_app, name="lora")


def _lora_options(device: str, threads: Optional[int], force: bool, seed: Optional[int], progress: bool,
                  out_shard_size: str = "5GB"):
    """The options of a lora command, checked (device, threads, shard size) before anything else, dry runs included."""
    from mergelab import engine
    from mergelab.lora.output import LoraOptions

    options = LoraOptions(device=device, threads=threads, force=force, seed=seed, progress=_show(progress),
                          out_shard_size=out_shard_size)
    _guard(lambda: engine.check_options(options))
    return options


def _lora_report(result) -> None:
    for line in result.summary():
        typer.echo(line)


@lora_app.command("merge")
def lora_merge(
    config: Path = typer.Argument(..., help="LoRA merge recipe (YAML: adapters, merge_method, parameters, rank or energy)."),
    out_dir: Path = typer.Argument(..., help="Output adapter directory (must not exist unless --force)."),
    device: str = typer.Option("cpu", help="Where the math runs: cpu or cuda."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for tensor math (default: all cores)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan per module; write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace OUT_DIR if it exists."),
    seed: Optional[int] = typer.Option(None, help="Seed for random methods (DARE); same seed, same merge."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    verbose: bool = VERBOSE, quiet: bool = QUIET,
) -> None:
    """Merge PEFT LoRA adapters as CONFIG says and write one PEFT adapter to OUT_DIR.

    Each module is merged on the weight updates ΔW_i = scaling_i·B_i·A_i (no cross terms)
    with any merge method (or `cat`, which stacks ranks exactly), then re-factorised by
    truncated SVD to `rank` (default: the largest input rank) or, per module, to the
    smallest rank keeping `energy` of the spectrum. Prints the relative reconstruction
    error and warns about modules above `error_threshold`.
    """
    from mergelab.lora import merge as lora_merging
    from mergelab.lora.output import dry_run as checked_plan

    options = _lora_options(device, threads, force, seed, progress)
    if dry_run:
        typer.echo(_guard(lambda: checked_plan(out_dir, force, lambda: lora_merging.load_and_plan(config, seed)[0],
                                               lora_merging.describe_lora_plan, inputs=[config])))
        return
    result = _guard(lambda: lora_merging.run_lora_merge(config, out_dir, options))
    typer.echo(f"merged {len(result.report['modules'])} LoRA modules in {result.seconds:.1f} s -> {result.out_dir}")
    _done()
    _lora_report(result)


@lora_app.command("bake")
def lora_bake(
    paths: list[str] = typer.Argument(..., metavar="BASE ADAPTER [ADAPTER ...] OUT_DIR",
                                      help="The base model, one or more PEFT adapters, and the output directory."),
    weights: Optional[list[str]] = typer.Option(
        None, "--weights", "-w", help="One weight per adapter: --weights 1,0.5 or repeated --weights (default 1)."
    ),
    device: str = typer.Option("cpu", help="Where the math runs: cpu or cuda (tensors stream from disk)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for tensor math (default: all cores)."),
    out_shard_size: str = typer.Option("5GB", help="Largest output shard, e.g. 5GB, 500MB, 2GiB."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print which tensors change; write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace OUT_DIR if it exists."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    verbose: bool = VERBOSE, quiet: bool = QUIET,
) -> None:
    """Write BASE + Σ w_i·ΔW_i as a full Hugging Face model to OUT_DIR.

    The same result as PEFT's merge_and_unload (weights 1), streamed tensor by tensor so
    memory stays bounded by one module. modules_to_save copies replace the base's tensors.
    """
    from mergelab.errors import ConfigError
    from mergelab.lora import bake as baking
    from mergelab.lora.output import dry_run as checked_plan
    from mergelab.lora.output import parse_weights

    def prepare():
        if len(paths) < 3:
            raise ConfigError("give BASE, at least one ADAPTER and OUT_DIR (e.g. mergelab lora bake base adapter out).")
        return paths[0], paths[1:-1], parse_weights(weights, len(paths) - 2)

    base, adapters, adapter_weights = _guard(prepare)
    options = _lora_options(device, threads, force, None, progress, out_shard_size)
    if dry_run:
        typer.echo(_guard(lambda: checked_plan(paths[-1], force, lambda: baking.plan_bake(base, adapters, adapter_weights),
                                               baking.describe_bake_plan)))
        return
    result = _guard(lambda: baking.run_bake(base, adapters, paths[-1], adapter_weights, options))
    typer.echo(f"baked {len(adapters)} adapter(s) into {result.tensors} tensors in {result.seconds:.1f} s "
               f"-> {result.out_dir}")
    _done()


@lora_app.command("extract")
def lora_extract(
    base: str = typer.Argument(..., help="The base model the fine-tune started from."),
    finetuned: str = typer.Argument(..., help="The fully fine-tuned model."),
    out_dir: Path = typer.Argument(..., help="Output adapter directory (must not exist unless --force)."),
    rank: Optional[int] = typer.Option(None, "--rank", "-r", help="Rank of every extracted module."),
    energy: Optional[float] = typer.Option(
        None, "--energy", help="Instead of --rank: per module, the smallest rank keeping this fraction of Σσ²."
    ),
    out_dtype: Optional[str] = typer.Option(None, help="dtype of the stored adapter (default: the fine-tune's)."),
    error_threshold: Optional[float] = typer.Option(
        None, help="Warn about modules with a larger relative error (default 0.1, or √(1−energy))."
    ),
    device: str = typer.Option("cpu", help="Where the math runs: cpu or cuda."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for tensor math (default: all cores)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the modules and ranks; write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace OUT_DIR if it exists."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    verbose: bool = VERBOSE, quiet: bool = QUIET,
) -> None:
    """Extract a PEFT LoRA adapter from FINETUNED by truncated SVD of FINETUNED − BASE.

    Linear weights become LoRA modules (rank --rank R, or per module by --energy F);
    embeddings, the output head and norms are saved in full (modules_to_save), as
    mergekit-extract-lora does. Reports the relative reconstruction error per module.
    """
    from mergelab.lora import extract as extracting
    from mergelab.lora.output import dry_run as checked_plan

    options = _lora_options(device, threads, force, None, progress)
    if dry_run:
        plan_of = lambda: extracting.plan_extract(  # noqa: E731
            base, finetuned, rank=rank, energy=energy, out_dtype=out_dtype, error_threshold=error_threshold)
        typer.echo(_guard(lambda: checked_plan(out_dir, force, plan_of, extracting.describe_extract_plan)))
        return
    result = _guard(lambda: extracting.run_extract(base, finetuned, out_dir, rank=rank, energy=energy,
                                                   out_dtype=out_dtype, error_threshold=error_threshold,
                                                   options=options))
    typer.echo(f"extracted {len(result.report['modules'])} LoRA modules in {result.seconds:.1f} s -> {result.out_dir}")
    _done()
    _lora_report(result)


@app.command("eval")
def eval_command(
    model: Optional[str] = typer.Argument(None, help="Model directory (or org/name on the Hub); omit with --samples or --compare."),
    task: list[str] = typer.Option(
        [], "--task", "-t",
        help="Task spec, repeatable: NAME, NAME:DATA, NAME:DATA,key=value,... or NAME:key=value,... Tasks: perplexity, choice, humaneval, "
             "refusal, generate, judge (aliases: mmlu, beavertails). E.g. choice:data=mmlu.jsonl,dev=dev.jsonl",
    ),
    adapter: list[Path] = typer.Option([], "--adapter", help="PEFT adapter directory, repeatable; merged into the weights in order."),
    limit: Optional[int] = typer.Option(None, help="Evaluate only the first N items of each task."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="Few-shot examples (choice, generate)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Sequences per forward pass."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", help="Weights dtype: auto (as saved), float32, bfloat16, float16."),
    seed: int = typer.Option(0, help="Seed for sampling and bootstrap intervals; same seed, same results."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the results JSON here (atomically; must not exist unless --force)."),
    force: bool = typer.Option(False, "--force", help="Replace the --out file if it exists."),
    samples: Optional[Path] = typer.Option(None, "--samples", help="Score these HumanEval completions (task_id, completion per line) without a model."),
    compare: Optional[tuple[Path, Path]] = typer.Option(None, "--compare", help="Compare two results files: --compare a.json b.json."),
    judge_url: Optional[str] = typer.Option(None, "--judge-url", help="OpenAI-compatible endpoint for LLM judges, e.g. https://api.openai.com/v1."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="Model name the judge endpoint should use."),
    judge_key_env: str = typer.Option("OPENAI_API_KEY", "--judge-key-env", help="Environment variable holding the judge's API key."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Result cache directory (default: $MERGELAB_CACHE_DIR or ~/.cache/mergelab/eval)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the result cache."),
    items: bool = typer.Option(True, "--items/--no-items", help="Keep per-item records in the results JSON."),
    verbose: bool = VERBOSE, quiet: bool = QUIET,
) -> None:
    """Evaluate MODEL on one or more tasks; print the metrics and write a results JSON.

    Answers are cached by (model fingerprint, request): a rerun is served from the cache
    without loading the model, and an interrupted run (Ctrl-C) resumes where it stopped.
    See the README section "Evaluating models" for tasks, data formats and judges.
    """
    from mergelab import evaluate as evaluation

    if compare is not None:
        if model is not None or task or adapter or samples is not None or out is not None:
            typer.secho("error: --compare A.json B.json compares two results files and evaluates nothing; "
                        "give it without MODEL, --task, --adapter, --samples or --out.", err=True, fg=typer.colors.RED)
            raise typer.Exit(2)
        first, second = compare
        rows = _guard(lambda: evaluation.compare_results(evaluation.read_results(first), evaluation.read_results(second)))
        typer.echo(evaluation.format_comparison(rows, str(first), str(second)))
        return
    judge = evaluation.JudgeSettings(url=judge_url, model=judge_model, key_env=judge_key_env)
    cache = False if no_cache else (cache_dir if cache_dir is not None else True)

    def run() -> dict:
        results = evaluation.evaluate_directory(
            model, task, adapters=[str(a) for a in adapter], limit=limit, num_fewshot=num_fewshot,
            batch_size=batch_size, device=device, dtype=dtype, seed=seed, cache=cache, judge=judge,
            samples=str(samples) if samples else None, keep_items=items, out=out, overwrite=force,
        )
        return results

    try:
        results = _guard(run)
    except typer.Exit as stop:
        if stop.exit_code == 130 and not no_cache:
            typer.secho("answers computed so far are kept in the result cache; rerun the same command to resume.",
                        err=True, fg=typer.colors.RED)
        raise
    typer.echo(evaluation.format_results(results))
    if out is not None:
        typer.echo(f"results -> {out}")


zoo_app = typer.Typer(
    help="The built-in model zoo: tiny Llamas trained on synthetic skills, to try everything offline.",
    no_args_is_help=True,
)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("build")
def zoo_build(
    size: str = typer.Option("tiny", help="pico (4 skills, about a minute) or tiny (21 skills, about ten minutes on 2 cores)."),
    out: Optional[Path] = typer.Option(None, help="Build here instead of the cache (~/.cache/mergelab/zoo or $MERGELAB_ZOO_DIR)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if a finished build exists."),
    workers: Optional[int] = typer.Option(None, help="Training processes (default: up to 2)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar per stage."),
    verbose: bool = VERBOSE, quiet: bool = QUIET,
) -> None:
    """Train the zoo (deterministic from its seed, CPU only) and measure every model.

    Writes a tokenizer, a base model, a full fine-tune and a LoRA adapter per skill, a
    safety-tuned model and adapter, the datasets (skill splits, BeaverTails-style safety
    sets, MMLU-style and HumanEval-style sets) and manifest.json with every measurement.
    A finished build is cached by content hash and returned at once.
    """
    from mergelab.zoo.build import build

    directory = _guard(lambda: build(size, out, force=force, progress=_show(progress), workers=workers))
    typer.echo(f"zoo '{size}' ready at {directory}")


@zoo_app.command("list")
def zoo_list(
    size: str = typer.Option("tiny", help="Which zoo size to list."),
    verbose: bool = VERBOSE, quiet: bool = QUIET,
) -> None:
    """List the zoo's models, adapters and datasets with their measured quality."""
    from mergelab.zoo.catalog import describe

    typer.echo(_guard(lambda: describe(size)))


@zoo_app.command("path")
def zoo_path(
    name: str = typer.Argument(..., help="A zoo name, e.g. zoo:tiny/expert-caesar3 or tiny/caesar3:test."),
    verbose: bool = VERBOSE, quiet: bool = QUIET,
) -> None:
    """Print the local path of a zoo model, adapter or dataset split."""
    from mergelab.zoo.catalog import resolve_any

    typer.echo(str(_guard(lambda: resolve_any(name))))


@app.command()
def demo(
    size: str = typer.Option("tiny", help="Zoo size to use (built and cached on first use)."),
    out: Path = typer.Option(Path("demo-results"), help="Where to write results.json, accuracy.png and report.md."),
    skill: Optional[list[str]] = typer.Option(
        None, "--skill", help="Skill whose expert to merge (repeat; default: caesar3, upper, reverse, sort, capital; "
                              "for pico, its four skills)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    verbose: bool = VERBOSE, quiet: bool = QUIET,
) -> None:
    """Merge zoo experts with task arithmetic, TIES and DARE-TIES, and measure what survives.

    Builds the zoo if needed, merges a handful of skill experts three ways, evaluates the
    base, the experts and the merges on every skill's test split, and writes a JSON file,
    a bar chart and a markdown report whose numbers all come from the run.
    """
    from mergelab.experiments.demo import run_demo

    directory = _guard(lambda: run_demo(size, out, skills=skill, force=force, progress=_show(progress)))
    typer.echo(f"demo results in {directory}: report.md, accuracy.png, results.json")


# Set by a command whose work is complete, with every file it wrote closed and renamed into
# place: the process then ends without the interpreter's teardown, which once torch is loaded
# takes 0.3-0.8 s and does nothing for such a command (see main).
_finished = False


def _done() -> None:
    global _finished
    _finished = True


def main() -> None:
    # OpenMP threads that spin-wait between parallel regions starve each other when the
    # CPU is shared (2-core laptops, CI); sleeping costs little when it is not. It must be
    # set before torch loads OpenMP, and a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    global _finished
    _finished = False
    try:
        app()
    except SystemExit as stop:
        if not (_finished and stop.code in (0, None)):
            raise
    else:
        if not _finished:
            return
    if sys.gettrace() is not None or sys.getprofile() is not None:
        return  # a profiler or coverage tool runs us: it writes its data at the normal exit
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be shown
            pass
    os._exit(0)


if __name__ == "__main__":
    main()

"""The ``mergelab`` command line: parse, call one function, print.

Heavy libraries (torch, transformers) are imported inside commands so that
``mergelab --help`` answers at once.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable, Optional, TypeVar

import typer

app = typer.Typer(
    name="mergelab",
    help="Make better language models out of existing ones: merge checkpoints tensor by tensor.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")
_state = {"verbose": False}


@app.callback()
def _global(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logs, and full tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
) -> None:
    _state["verbose"] = verbose
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not verbose:
        for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


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
    seed: Optional[int] = typer.Option(None, help="Seed for random methods (DARE); same seed, same merge."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Merge checkpoints as CONFIG says and write a Hugging Face model to OUT_DIR.

    The recipe is a mergekit YAML (models: or slices:, base_model, merge_method,
    parameters, dtype, out_dtype, tokenizer_source). Tensors stream one at a time, so
    memory stays bounded by the largest tensor whatever the model size. The output is
    written under a temporary name and appears only when complete.
    """
    from mergelab import merge as merging

    if dry_run:
        plan, _ = _guard(lambda: merging.load_and_plan(config, seed))
        typer.echo(merging.describe_plan(plan))
        return
    options = merging.MergeOptions(
        device=device, threads=threads, out_shard_size=out_shard_size, force=force, seed=seed, progress=progress
    )
    result = _guard(lambda: merging.run_merge(config, out_dir, options))
    typer.echo(f"merged {result.tensors} tensors in {result.seconds:.1f} s -> {result.out_dir}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

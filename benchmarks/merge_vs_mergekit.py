"""mergelab vs mergekit on the same recipes and inputs: wall time and peak RSS.

    python benchmarks/merge_vs_mergekit.py                 # the ~130M set, 3 runs per tool and method
    python benchmarks/merge_vs_mergekit.py --size 780m --methods linear task_arithmetic --runs 2 --write
    python benchmarks/merge_vs_mergekit.py --size 780m --device cuda   # on a GPU machine (mergekit --cuda)

Builds once (cached in benchmarks/.cache/) a base and three fine-tuned variants of a
Llama in float32, then for each method runs mergekit (`mergekit-yaml`) and mergelab
(`mergelab merge`) alternately, each in its own process, and reports the median wall
time and the peak resident memory of each process (from wait4's rusage), their ratios,
and the I/O floor: a process that imports torch, reads every input tensor once (plain
reads into its memory) and writes an output of the same size. mergelab maps its inputs
instead of reading them into memory, so it can finish under this floor. The
floor runs once to warm up, then takes its turn with the two tools in every round, each
process starting from a page cache warmed with every input file, so all three are
measured alike. The table is printed and written into
benchmarks/RESULTS.md, one section per size (and device); a run of some methods only
(`--methods`) is printed but written only with `--write`, since it replaces the section.

Targets (2-core CPU): every method at most 0.5x mergekit's wall time and peak RSS,
ties at most 0.2x, linear/task_arithmetic within 1.5x of the I/O floor on the larger set.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from results_file import RESULTS, write_results  # benchmarks/ is on sys.path when a script runs

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
VENV_BIN = Path(sys.executable).parent
# Both tools' OpenMP threads sleep instead of spinning when idle: on a shared machine spinning
# threads steal cores from whichever process runs beside them.
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}

SIZES = {
    # ~134M parameters: hidden 768, 12 layers, intermediate 2048, vocab 32000
    "130m": dict(hidden=768, layers=12, intermediate=2048, heads=12, kv_heads=12, vocab=32000),
    # ~780M parameters
    "780m": dict(hidden=1536, layers=24, intermediate=4096, heads=16, kv_heads=16, vocab=32000),
}

METHODS = (
    "linear", "task_arithmetic", "ties", "dare_ties", "slerp",
    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "nuslerp", "nuslerp_row_wise",
    "multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl",
)
TARGET_TIME = {"ties": 0.2}  # others: 0.5
# Benchmark entries that are one method with particular settings.
VARIANTS = {"nuslerp_row_wise": ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True})}
# Per-model parameters of the task-vector family (weight is always given).
SPARSITY = {
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "breadcrumbs": {"density": 0.5, "gamma": 0.01},
    "breadcrumbs_ties": {"density": 0.5, "gamma": 0.01},
    "della": {"density": 0.5, "epsilon": 0.1},
    "della_linear": {"density": 0.5, "epsilon": 0.1},
}
TARGET_RSS = 0.5
# On the larger set, these methods (a weighted sum: nothing to compute but the reads and
# the write) must stay within this factor of the I/O floor.
TARGET_FLOOR = {"linear": 1.5, "task_arithmetic": 1.5}
LARGER_SETS = ("780m",)


BUILD = r"""
import sys, json
from pathlib import Path
from mergelab.zoo.random_models import make_model, make_variant
root, sizes = Path(sys.argv[1]), json.loads(sys.argv[2])
make_model(root / "base", "llama", seed=0, tokenizer=False, **sizes)
for index in (1, 2, 3):
    make_variant(root / "base", root / f"ft{index}", seed=index, scale=0.05, sparsity=0.3)
"""


def build_models(size: str) -> Path:
    """The model set, built once in a subprocess (this process stays small: a forked child's
    peak RSS counts the parent's memory at fork time)."""
    import json

    root = CACHE / f"llama-{size}"
    done = root / ".complete"
    if done.exists():
        return root
    print(f"building the {size} model set in {root} (once)...", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    subprocess.run([sys.executable, "-c", BUILD, str(root), json.dumps(SIZES[size])], check=True)
    done.write_text("ok\n")
    return root


def recipe(entry: str, root: Path) -> dict:
    base, ft = str(root / "base"), [str(root / f"ft{i}") for i in (1, 2, 3)]
    method, shared = VARIANTS.get(entry, (entry, {}))
    weighted = lambda models, weights: [  # noqa: E731
        {"model": m, "parameters": {"weight": w}} for m, w in zip(models, weights)
    ]
    if method == "nuslerp":
        return {"models": weighted(ft[:2], (0.4, 0.6)), "base_model": base, "merge_method": method,
                "parameters": shared, "dtype": "float32"}
    if method == "multislerp":
        return {"models": weighted(ft, (0.5, 0.3, 0.2)), "base_model": base, "merge_method": method,
                "dtype": "float32"}
    if method == "karcher":
        return {"models": [{"model": m} for m in ft], "merge_method": method, "dtype": "float32"}
    if method in ("model_stock", "sce", "ram", "ramplus_tl"):
        parameters = {"select_topk": 0.5} if method == "sce" else {}
        return {"models": [{"model": m} for m in ft], "base_model": base, "merge_method": method,
                "parameters": parameters, "dtype": "float32"}
    if method in ("nearswap", "arcee_fusion"):
        parameters = {"t": 0.001} if method == "nearswap" else {}
        return {"models": [{"model": ft[0]}], "base_model": base, "merge_method": method,
                "parameters": parameters, "dtype": "float32"}
    if method == "slerp":
        return {
            "models": [{"model": base}, {"model": ft[0]}],
            "base_model": base,
            "merge_method": "slerp",
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"value": 0.5}]},
            "dtype": "float32",
        }
    if method == "linear":
        return {
            "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip([base] + ft, (0.4, 0.2, 0.2, 0.2))],
            "merge_method": "linear",
            "dtype": "float32",
        }
    models = [
        {"model": model, "parameters": {"weight": weight, **SPARSITY.get(method, {})}}
        for model, weight in zip(ft, (1.0, 0.5, 0.7))
    ]
    return {"models": models, "base_model": base, "merge_method": method, "dtype": "float32"}


def measure(command: list[str]) -> tuple[float, float, float]:
    """Run ``command``; return (wall seconds, peak RSS in MB, CPU seconds) of that process alone.

    CPU seconds (user + system) are reported beside wall time because the machine may be
    shared: other jobs stretch wall time but hardly change the CPU time a tool needs.
    """
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{stderr[-3000:]}")
    return wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def warm_page_cache(models: list[str]) -> None:
    """Read every input file once, so that each measured process starts from a warm page cache.

    On the larger set mergekit's resident memory (about 16 GB) evicts part of the inputs
    from the page cache, and whichever process ran next would read them from disk: every
    measured run starts from the same state instead.
    """
    buffer = bytearray(64 << 20)
    for model in models:
        for file in sorted(Path(model).glob("*.safetensors")):
            with open(file, "rb", buffering=0) as handle:
                while handle.readinto(buffer):
                    pass


# Plain positioned reads of every tensor into process memory (what loading a tensor
# means to most tools), then the output written as mergelab writes it.
IO_FLOOR = r"""
import os, sys
from mergelab.io import Checkpoint, OutputTensor, ShardedWriter
from mergelab.io.checkpoint import read_tensor
inputs = [Checkpoint(p) for p in sys.argv[2:]]
reference = inputs[0]
fds = {}
def read(checkpoint, name):
    info = checkpoint.info(name)
    path = checkpoint.path / info.file
    if path not in fds:
        fds[path] = os.open(path, os.O_RDONLY)
    return read_tensor(fds[path], info, path)
for checkpoint in inputs:
    for name in checkpoint.tensors:
        tensor = read(checkpoint, name)
        del tensor
layout = [OutputTensor(n, reference.info(n).shape, reference.info(n).dtype) for n in reference.tensors]
writer = ShardedWriter(sys.argv[1], layout)
for name in reference.tensors:
    writer.write(name, read(reference, name))
writer.close()
"""


def io_floor(root: Path, scratch: Path, models: list[str]) -> tuple[float, float, float]:
    out = scratch / "floor"
    out.mkdir()
    try:
        return measure([sys.executable, "-c", IO_FLOOR, str(out)] + models)
    finally:
        shutil.rmtree(out)


def run_method(method: str, root: Path, scratch: Path, runs: int, seed: int, device: str = "cpu") -> dict:
    config = recipe(method, root)
    config_path = scratch / f"{method}.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    inputs = [m for m in dict.fromkeys([config.get("base_model")] + [e["model"] for e in config["models"]]) if m]
    ours_cmd = [str(VENV_BIN / "mergelab"), "-q", "merge", str(config_path), str(scratch / "ours"),
                "--no-progress", "--seed", str(seed)]
    theirs_cmd = [str(VENV_BIN / "mergekit-yaml"), str(config_path), str(scratch / "theirs"),
                  "--quiet", "--random-seed", str(seed)]
    if device != "cpu":
        ours_cmd += ["--device", device]
        theirs_cmd += ["--cuda"]
    io_floor(root, scratch, inputs)  # a warm-up run (imports, page cache); not counted
    ours, theirs, floors = [], [], []
    for _ in range(runs):  # alternate the three so drift affects all alike
        warm_page_cache(inputs)
        floors.append(io_floor(root, scratch, inputs))
        for command, sink, out in ((theirs_cmd, theirs, "theirs"), (ours_cmd, ours, "ours")):
            warm_page_cache(inputs)
            sink.append(measure(command))
            shutil.rmtree(scratch / out)
    median = lambda values, i: statistics.median(v[i] for v in values)  # noqa: E731
    return {
        "method": method,
        "ours_s": median(ours, 0), "ours_mb": median(ours, 1), "ours_cpu": median(ours, 2),
        "theirs_s": median(theirs, 0), "theirs_mb": median(theirs, 1), "theirs_cpu": median(theirs, 2),
        "floor_s": median(floors, 0),
        "inputs": len(inputs),
    }


def help_latency() -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([str(VENV_BIN / "mergelab"), "--help"], stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def table(rows: list[dict], size: str, runs: int, help_s: float) -> str:
    lines = [
        f"### {size} set ({SIZES[size]['layers']} layers, hidden {SIZES[size]['hidden']}, float32; "
        f"median of {runs} runs, tools alternated)",
        "",
        "| method | mergelab s | mergekit s | time ratio (target) | mergelab peak RSS MB | mergekit peak RSS MB | "
        "RSS ratio (target ≤ 0.5) | mergelab CPU s | mergekit CPU s | CPU ratio | I/O floor s | mergelab / floor "
        + ("(target) |" if size in LARGER_SETS else "|"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        time_ratio = row["ours_s"] / row["theirs_s"]
        rss_ratio = row["ours_mb"] / row["theirs_mb"]
        target = TARGET_TIME.get(row["method"], 0.5)
        time_ok = "ok" if time_ratio <= target else "MISSED"
        rss_ok = "ok" if rss_ratio <= TARGET_RSS else "MISSED"
        floor_ratio = row["ours_s"] / row["floor_s"]
        floor_target = TARGET_FLOOR.get(row["method"]) if size in LARGER_SETS else None
        floor_verdict = ""
        if floor_target is not None:
            floor_verdict = f" (≤ {floor_target}, {'ok' if floor_ratio <= floor_target else 'MISSED'})"
        lines.append(
            f"| {row['method']} | {row['ours_s']:.2f} | {row['theirs_s']:.2f} | {time_ratio:.3f} (≤ {target}, {time_ok}) | "
            f"{row['ours_mb']:.0f} | {row['theirs_mb']:.0f} | {rss_ratio:.3f} ({rss_ok}) | "
            f"{row['ours_cpu']:.1f} | {row['theirs_cpu']:.1f} | {row['ours_cpu'] / row['theirs_cpu']:.3f} | "
            f"{row['floor_s']:.2f} | {floor_ratio:.2f}{floor_verdict} |"
        )
    lines += ["", f"`mergelab --help`: {help_s:.2f} s (target < 1 s)."]
    return "\n".join(lines)


def gpu_name() -> str:
    """The CUDA device's name, asked of a child process (this one stays free of torch)."""
    code = "import torch; print(torch.cuda.get_device_name(0))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return result.stdout.strip()



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), nargs="+", default=["130m"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    writing = parser.add_mutually_exclusive_group()
    writing.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    writing.add_argument("--write", action="store_true",
                         help="write RESULTS.md even for a run of some methods only (it replaces the size's section)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where both tools compute (mergelab --device cuda, mergekit --cuda)")
    args = parser.parse_args()

    help_s = help_latency()
    partial = set(args.methods) != set(METHODS)
    for size in args.size:
        root = build_models(size)
        load_before = os.getloadavg()[0]
        rows = []
        with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
            for method in args.methods:
                row = run_method(method, root, Path(scratch), args.runs, args.seed, args.device)
                rows.append(row)
                print(
                    f"{size} {method}: mergelab {row['ours_s']:.2f} s / {row['ours_mb']:.0f} MB, "
                    f"mergekit {row['theirs_s']:.2f} s / {row['theirs_mb']:.0f} MB, "
                    f"ratio {row['ours_s'] / row['theirs_s']:.3f} time, {row['ours_mb'] / row['theirs_mb']:.3f} RSS, "
                    f"{row['ours_cpu'] / row['theirs_cpu']:.3f} CPU; "
                    f"I/O floor {row['floor_s']:.2f} s",
                    flush=True,
                )
        cpu = platform.processor() or platform.machine()
        device = f"GPU: {gpu_name()} (both tools compute on it)" if args.device == "cuda" else "CPU only"
        header = (
            f"## Merging, {size} set: mergelab vs mergekit 0.1.5" + (" on CUDA" if args.device == "cuda" else "")
            + "\n\n"
            f"Machine: {os.cpu_count()} CPU cores ({cpu}), {platform.system()}; {device}; written by "
            "`benchmarks/merge_vs_mergekit.py` on " + time.strftime("%Y-%m-%d") + ". Wall time and peak RSS are per "
            "process (start-up included); the I/O floor is a process that imports torch, reads every input tensor once "
            "(plain reads into its memory; mergelab maps its inputs instead, so it can finish under the floor) "
            "and writes the output, run in turn with the two tools after one warm-up run; every process starts with the "
            "inputs in the page cache. Both tools run with "
            "OMP_WAIT_POLICY=PASSIVE. The machine is shared: its 1-minute load "
            f"average was {load_before:.1f} before and {os.getloadavg()[0]:.1f} after the runs.\n"
        )
        report = header + "\n" + table(rows, size, args.runs, help_s)
        print("\n" + report)
        if args.no_write or (partial and not args.write):
            print("\nnot written to RESULTS.md" + (" (a run of some methods only: pass --write)" if partial else ""))
            continue
        write_results(report, f"merge_vs_mergekit_{size}" + ("_cuda" if args.device == "cuda" else ""))
        print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()

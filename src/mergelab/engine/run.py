"""The streaming engine: read inputs lazily, compute each output, hand it to a sink.

While task i computes, the inputs of tasks i+1 … i+prefetch are being read on a reader
thread and the result of task i−1 is being written on a writer thread. Inputs are
dropped as soon as their task is done, so resident memory is bounded by the inputs of
the largest task times the prefetch window, never by the size of the model.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from mergelab.engine.task import TaskOutput, TensorSource, TensorTask
from mergelab.errors import ComputeError, ConfigError, InputError
from mergelab.io.writer import TensorSink

log = logging.getLogger(__name__)


@dataclass
class RunStats:
    tasks: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # task name -> its op's metrics


@dataclass(frozen=True)
class RunOptions:
    """How a command runs the engine (``mergelab merge``, the ``lora`` commands and any later one)."""

    device: str = "cpu"
    threads: Optional[int] = None  # torch compute threads; None: torch's default (all cores)
    out_shard_size: str = "5GB"  # full checkpoints only: adapters are always one file
    force: bool = False  # replace an existing output directory
    seed: Optional[int] = None  # for random methods (DARE, DELLA); None: drawn and recorded
    prefetch: int = 2  # tasks whose inputs are read ahead of the one computing
    progress: bool = True


def check_threads(threads: int | None) -> None:
    """Refuse a thread count torch cannot use (None means torch's default: all cores)."""
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads}: give a positive number of CPU threads, or leave it out to use all cores.")


def check_options(options: RunOptions) -> int:
    """Refuse a device, thread count or shard size that cannot be used, before any input is read.

    Returns the shard size in bytes.
    """
    from mergelab.io import parse_size

    resolve_device(options.device)
    check_threads(options.threads)
    return parse_size(options.out_shard_size)


def apply_threads(threads: int | None) -> None:
    """Use ``threads`` torch threads for computing (None: leave torch's default)."""
    check_threads(threads)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def resolve_device(device: str) -> Any:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} was requested but CUDA is not available on this machine; use --device cpu.")
    try:
        target = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device '{device}'; mergelab computes on cpu or cuda (cuda:N).") from None
    if target.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device}: mergelab computes on cpu or cuda (cuda:N); use one of those.")
    if target.type == "cuda" and target.index is not None and target.index >= torch.cuda.device_count():
        raise InputError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0; "
            "use --device cuda or a number below that."
        )
    return target


def _load(task: TensorTask, sources: Mapping[str, TensorSource], device: Any) -> tuple[list[Any], int]:
    import torch

    tensors = []
    size = 0
    for ref in task.inputs:
        tensor = sources[ref.source].get_tensor(ref.name)
        size += tensor.numel() * tensor.element_size()
        if device.type != "cpu":
            tensor = tensor.to(device, non_blocking=True)
        tensors.append(tensor)
    if not tensors:
        return tensors, 0
    if task.work_dtype is not None:
        work = getattr(torch, task.work_dtype)
    else:
        work = tensors[0].dtype
        for tensor in tensors[1:]:
            work = torch.promote_types(work, tensor.dtype)
    if work.is_floating_point:
        tensors = [t if t.dtype == work or not t.is_floating_point() else t.to(work) for t in tensors]
    return tensors, size


def run(
    tasks: Sequence[TensorTask],
    sources: Mapping[str, TensorSource],
    sink: TensorSink,
    *,
    device: str = "cpu",
    prefetch: int = 2,
    progress: bool = True,
    description: str = "merging",
) -> RunStats:
    """Execute ``tasks`` in order, streaming results into ``sink``: closed on success, aborted on
    any failure (after the writer thread has stopped, so nothing writes into an aborted sink)."""
    import torch

    target = resolve_device(device)
    stats = RunStats()
    start = time.perf_counter()
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-read")
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-write")
    pending_loads: deque[Future] = deque()
    pending_write: Future | None = None
    bar = _progress(progress, description, len(tasks))
    debug = log.isEnabledFor(logging.DEBUG)
    finished = False
    try:
        for index in range(min(prefetch, len(tasks))):
            pending_loads.append(reader.submit(_load, tasks[index], sources, target))
        for index, task in enumerate(tasks):
            inputs, size = pending_loads.popleft().result()
            stats.bytes_read += size
            following = index + prefetch
            if following < len(tasks):
                pending_loads.append(reader.submit(_load, tasks[following], sources, target))
            began = time.perf_counter()
            with torch.no_grad():
                results = _finish(task, task.op(inputs), stats)
                del inputs
            if debug:  # with --verbose: what each output came from, how, and how long it took
                log.debug("%s <- %s by %r in %.3f s", task.name,
                          ", ".join(f"{ref.source}:{ref.name}" for ref in task.inputs), task.op,
                          time.perf_counter() - began)
            if pending_write is not None:
                pending_write.result()
            pending_write = writer.submit(_write_all, sink, task, results)
            stats.bytes_written += sum(result.numel() * result.element_size() for result in results)
            stats.tasks += 1
            del results
            if bar is not None:
                bar[0].advance(bar[1])
        if pending_write is not None:
            pending_write.result()
        sink.close()
        finished = True
    finally:
        for future in pending_loads:
            future.cancel()
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)
        if not finished:
            sink.abort()
        if bar is not None:
            bar[0].stop()
    stats.seconds = time.perf_counter() - start
    log.info(
        "%s: %d tensors, %.1f MB read, %.1f MB written in %.2f s",
        description,
        stats.tasks,
        stats.bytes_read / 1e6,
        stats.bytes_written / 1e6,
        stats.seconds,
    )
    return stats


def _finish(task: TensorTask, produced: Any, stats: RunStats) -> list[Any]:
    """Check and convert an op's result: one CPU tensor per planned output, in its dtype."""
    import torch

    if isinstance(produced, TaskOutput):
        if produced.metrics:
            stats.metrics[task.name] = dict(produced.metrics)
        produced = produced.tensors
    tensors = list(produced) if isinstance(produced, (tuple, list)) else [produced]
    if len(tensors) != len(task.outputs):
        raise ComputeError(f"task for '{task.name}' produced {len(tensors)} tensors, planned {len(task.outputs)}.")
    results = []
    for output, tensor in zip(task.outputs, tensors):
        if tuple(tensor.shape) != output.shape:
            raise ComputeError(f"output tensor '{output.name}' has shape {tuple(tensor.shape)}, planned {output.shape}.")
        # Checked after the cast to the stored dtype (on the compute device, before the copy to
        # the CPU): finite float32 values can still overflow float16's range of ±65504.
        stored = tensor.to(dtype=getattr(torch, output.dtype))
        if stored.is_floating_point() and not _all_finite(stored):
            overflow = tensor.dtype != stored.dtype and _all_finite(tensor)
            raise ComputeError(
                f"output tensor '{output.name}' contains NaN or infinite values"
                + (f": its values overflow {output.dtype}; choose a wider out_dtype (e.g. float32 or bfloat16) "
                   "or smaller weights." if overflow else
                   ". Check the inputs of this tensor for non-finite values and the method's weights "
                   "(e.g. weights summing to zero).")
            )
        results.append(stored.cpu())
    return results


def _all_finite(tensor: Any) -> bool:
    """No NaN or infinite entry, in one pass that allocates nothing.

    float16/bfloat16: the minimum and maximum are finite (NaN propagates through both; a sum
    would first copy the tensor to float32). Otherwise: a finite float32/float64 sum means
    every entry is finite, since NaN and ±inf propagate; only a non-finite sum, which may
    also be an overflow of finite values, needs the entry-wise check.
    """
    import math

    import torch

    if tensor.numel() == 0:
        return True
    if tensor.dtype in (torch.float16, torch.bfloat16):
        low, high = torch.aminmax(tensor)
        return math.isfinite(float(low)) and math.isfinite(float(high))
    wide = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if math.isfinite(float(tensor.sum(dtype=wide))):
        return True
    return bool(torch.isfinite(tensor).all())


def _write_all(sink: TensorSink, task: TensorTask, results: list[Any]) -> None:
    for output, tensor in zip(task.outputs, results):
        sink.write(output.name, tensor)


def _progress(enabled: bool, description: str, total: int) -> tuple[Any, Any] | None:
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
        console=Console(stderr=True),  # stdout keeps the command's own output, e.g. for a pipe
    )
    bar.start()
    return bar, bar.add_task(description, total=total)

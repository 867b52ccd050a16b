"""Shared numerics for merge methods: working precision, chunked passes, Gram matrices.

Whole-tensor temporaries are expensive on large tensors: every fresh allocation faults in
new pages. Methods therefore walk tensors in chunks of ``CHUNK_ELEMENTS``, in scratch
buffers kept from one tensor to the next (:func:`workspace`), and methods that only need
inner products of whole tensors (norms, cosines, angles) take them from one Gram matrix
accumulated in float64, then combine the inputs once with the resulting coefficients.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterator, Sequence

import torch

# About 4 MB of float32 per row: a chunk of every input stays in the L3 cache while it is
# combined. Few, large operations matter because with 2+ intra-op threads and
# OMP_WAIT_POLICY=PASSIVE (the CLI's default) every parallel operation first wakes the
# sleeping workers, some 40 µs each: on 2^18-entry chunks that cost as much as the arithmetic.
CHUNK_ELEMENTS = 1 << 20
# Blocks of whole rows (for per-row work) hold about 1 MB of float32.
ROW_BLOCK_ELEMENTS = 1 << 18


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for half-precision (and float32) inputs, float64 for float64.

    Methods that take norms, dot products, angles or softmaxes compute in at least
    float32 and round once at the end: a float16 norm of a large tensor overflows, and
    bfloat16 angles lose most of their digits.
    """
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def flat_chunks(numel: int, size: int = CHUNK_ELEMENTS) -> Iterator[slice]:
    """Consecutive slices covering ``range(numel)``."""
    for start in range(0, numel, size):
        yield slice(start, min(start + size, numel))


# Inner products of task vectors are summed over blocks of this many entries in float32
# (as accurate as one float32 reduction of the whole tensor), then across blocks in float64.
DOT_BLOCK = 4096
# Gram sums run in float64 over groups of this many entries, then across groups in order: this
# grouping is part of the result's rounding, so it stays fixed whatever the chunk size.
GRAM_GROUP = 1 << 18


_WORKSPACE = threading.local()


def workspace(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat scratch buffer of ``numel`` entries, kept for this thread from one call to the next.

    Every tensor of a merge runs the same chunked passes, and a fresh buffer of a few MB
    faults its pages in again (about 1 ns per byte, as much as the arithmetic on them);
    kept buffers grow to the largest chunk and stay. ``name`` identifies the user: one
    buffer per name is live at a time, and its contents never leave the pass that wrote them.
    """
    buffers = _WORKSPACE.__dict__.setdefault("buffers", {})
    key = (name, dtype, torch.device(device))
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


def chunk_stack(
    name: str, count: int, numel: int, dtype: torch.dtype, device: torch.device
) -> Callable[[slice], torch.Tensor]:
    """A [count, chunk] :func:`workspace` buffer: ``stack(part)`` is a contiguous [count, len(part)] view of it.

    One buffer serves every chunk of a pass, and the last, shorter chunk is contiguous too,
    so no operation copies it.
    """
    buffer = workspace(name, count * min(numel, CHUNK_ELEMENTS), dtype, device)
    return lambda part: buffer[: count * (part.stop - part.start)].view(count, part.stop - part.start)


def task_vector_chunks(
    tensors: Sequence[torch.Tensor], origin: torch.Tensor, dtype: torch.dtype, name: str = "task vectors"
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(part, δ[:, part]) for δ_i = θ_i − ``origin`` flattened, a chunk at a time; δ[:, part] is [N, len(part)].

    The stack, in ``dtype``, is the :func:`chunk_stack` named ``name``, overwritten by the next chunk.
    Inputs in another dtype (half precision) are converted first and subtract in ``dtype``.
    """
    flats = [tensor.reshape(-1) for tensor in tensors]
    start = origin.reshape(-1)
    stack = chunk_stack(name, len(flats), start.numel(), dtype, start.device)
    for part in flat_chunks(start.numel()):
        deltas = stack(part)
        for row, flat in zip(deltas, flats):
            if flat.dtype == dtype:
                torch.sub(flat[part], start[part], out=row)
            else:
                row.copy_(flat[part]).sub_(start[part])
        yield part, deltas


def gram(tensors: Sequence[torch.Tensor], origin: torch.Tensor | None = None) -> torch.Tensor:
    """G_ij = ⟨x_i, x_j⟩ with x_i = θ_i (− ``origin``) flattened; an [N, N] float64 tensor.

    Without an origin the models themselves are nearly parallel, and the small angles
    between them survive only if the products are summed in float64. Task vectors
    (with an origin) are far from parallel: their products are summed in float32 (float64
    for float64 inputs) over blocks of 4096 entries and in float64 across blocks, which is
    both fast and as accurate as a float32 reduction over the whole tensor.
    """
    flats = [tensor.reshape(-1) for tensor in tensors]
    start = origin.reshape(-1) if origin is not None else None
    numel = flats[0].numel()
    device = flats[0].device
    count = len(flats)
    result = torch.zeros(count, count, dtype=torch.float64, device=device)
    if start is None:
        # float64 buffers reused for every chunk: copying into them converts without new allocations
        stack = chunk_stack("gram", count, numel, torch.float64, device)
        for part in flat_chunks(numel):
            block = stack(part)
            for row, flat in zip(block, flats):
                row.copy_(flat[part])
            for group in flat_chunks(block.shape[1], GRAM_GROUP):
                piece = block[:, group]
                result += piece @ piece.T
        return result
    for _, block in task_vector_chunks(flats, start, compute_dtype(flats[0]), "gram"):
        whole = (block.shape[1] // DOT_BLOCK) * DOT_BLOCK
        if whole:
            pieces = block[:, :whole].reshape(count, -1, DOT_BLOCK).transpose(0, 1)  # [blocks, N, 4096]
            products = torch.bmm(pieces, pieces.transpose(1, 2))
            for group in flat_chunks(whole, GRAM_GROUP):
                result += products[group.start // DOT_BLOCK : group.stop // DOT_BLOCK].sum(dim=0, dtype=torch.float64)
        if whole < block.shape[1]:  # the tail of the last group
            rest = block[:, whole:].to(torch.float64)
            result += rest @ rest.T
    return result


def row_blocks(rows: int, row_length: int) -> Iterator[slice]:
    """Consecutive blocks of whole rows of about ``ROW_BLOCK_ELEMENTS`` entries each."""
    return flat_chunks(rows, max(1, ROW_BLOCK_ELEMENTS // max(1, row_length)))


def combine(
    tensors: Sequence[torch.Tensor], coefficients: Sequence[float], dtype: torch.dtype, divisor: float | None = None
) -> torch.Tensor:
    """Σ_i c_i θ_i (÷ ``divisor`` if given), computed chunk by chunk in ``dtype``; shaped like the inputs.

    The division runs on each chunk while it is in cache (no second pass over the output),
    and rounds exactly as dividing the whole sum afterwards would.
    """
    shape = tensors[0].shape
    terms = [(tensor.reshape(-1), float(c)) for tensor, c in zip(tensors, coefficients) if c != 0]
    out = torch.empty(tensors[0].numel(), dtype=dtype, device=tensors[0].device)
    if not terms:
        return out.zero_().view(shape)
    (first, scale), rest = terms[0], terms[1:]
    for part in flat_chunks(out.numel()):
        target = out[part]
        torch.mul(first[part].to(dtype), scale, out=target)
        for flat, coefficient in rest:
            target.add_(flat[part].to(dtype), alpha=coefficient)
        if divisor is not None:
            target.div_(divisor)
    return out.view(shape)

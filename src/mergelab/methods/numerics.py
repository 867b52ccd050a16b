"""Shared numerics for merge methods: working precision, chunked passes, Gram matrices.

Whole-tensor temporaries are expensive on large tensors: every fresh allocation faults in
new pages. Methods therefore walk tensors in chunks of ``CHUNK_ELEMENTS`` (the allocator
reuses chunk-sized buffers), and methods that only need inner products of whole tensors
(norms, cosines, angles) take them from one Gram matrix accumulated in float64, then
combine the inputs once with the resulting coefficients.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

# About 1 MB of float32 per row: a chunk of every input stays in cache while it is combined.
CHUNK_ELEMENTS = 1 << 18


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
        buffer = torch.empty(count, min(numel, CHUNK_ELEMENTS), dtype=torch.float64, device=device)
        for part in flat_chunks(numel):
            block = buffer[:, : part.stop - part.start]
            for row, flat in zip(block, flats):
                row.copy_(flat[part])
            result += block @ block.T
        return result
    dtype = compute_dtype(flats[0])
    buffer = torch.empty(count, min(numel, CHUNK_ELEMENTS), dtype=dtype, device=device)
    for part in flat_chunks(numel):
        block = buffer[:, : part.stop - part.start]
        for row, flat in zip(block, flats):
            if flat.dtype == dtype:
                torch.sub(flat[part], start[part], out=row)
            else:  # half precision: subtract in the buffer's precision
                row.copy_(flat[part]).sub_(start[part])
        whole = (block.shape[1] // DOT_BLOCK) * DOT_BLOCK
        if whole:
            pieces = block[:, :whole].reshape(count, -1, DOT_BLOCK).transpose(0, 1)  # [blocks, N, 4096]
            result += torch.bmm(pieces, pieces.transpose(1, 2)).sum(dim=0, dtype=torch.float64)
        if whole < block.shape[1]:
            rest = block[:, whole:].to(torch.float64)
            result += rest @ rest.T
    return result


def row_blocks(rows: int, row_length: int) -> Iterator[slice]:
    """Consecutive blocks of whole rows of about ``CHUNK_ELEMENTS`` entries each."""
    return flat_chunks(rows, max(1, CHUNK_ELEMENTS // max(1, row_length)))


def combine(tensors: Sequence[torch.Tensor], coefficients: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
    """Σ_i c_i θ_i, computed chunk by chunk in ``dtype``; shaped like the inputs."""
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
    return out.view(shape)

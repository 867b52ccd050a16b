"""Sinks the engine writes finished tensors to.

``ShardedWriter`` streams tensors straight into pre-laid-out safetensors shards: the
planner knows every output's name, shape and dtype before any work, so each shard's
header is written first and each tensor's bytes go to their final offset the moment it
is computed. Nothing is buffered, nothing is copied twice, and peak memory does not
depend on the shard size.

``LiveModelSink`` copies tensors into a loaded ``torch.nn.Module`` instead (used where a
disk round-trip per candidate would be wasteful, e.g. inside an optimisation loop).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

from mergelab.errors import ConfigError, InputError
from mergelab.io.checkpoint import DTYPE_BYTES, INDEX_FILE, SAFETENSORS_DTYPES, SINGLE_FILE

TORCH_TO_SAFETENSORS = {torch_name: tag for tag, (torch_name, _) in SAFETENSORS_DTYPES.items()}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str | int, option: str = "--out-shard-size") -> int:
    """Parse '5GB', '500MB', '2GiB', '1e9' or an int into bytes (KB/MB/GB are powers of 1000); at least 1.

    ``option`` names the setting in error messages.
    """
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE_RE.match(str(text))
        if match:
            number, unit, binary = match.groups()
            base = 1024 if binary else 1000
            power = " kmgt".index(unit.lower() or " ")
            size = int(float(number) * base**power)
        else:
            try:
                size = int(float(text))
            except (ValueError, OverflowError):
                raise ConfigError(f"{option}: cannot read size '{text}'; write it like 5GB, 500MB or 2GiB.") from None
    if size < 1:
        raise ConfigError(f"{option} '{text}' is not a positive size; write it like 5GB, 500MB or 2GiB.")
    return size


@dataclass(frozen=True)
class OutputTensor:
    """Name, shape and dtype (torch name) of a tensor a sink will receive."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * DTYPE_BYTES[self.dtype]


class TensorSink(Protocol):
    def write(self, name: str, tensor: Any) -> None: ...

    def close(self) -> None: ...  # every planned tensor was written: finish the output

    def abort(self) -> None: ...  # the run failed: release what the sink holds, finish nothing


def _tensor_bytes(tensor: Any) -> memoryview:
    """A zero-copy byte view of a CPU tensor (any dtype, bfloat16 included)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(_uint8()).numpy()).cast("B")


def _uint8() -> Any:
    import torch

    return torch.uint8


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


@dataclass
class _Shard:
    file_name: str
    header_size: int
    entries: dict[str, tuple[int, int]]  # tensor name -> (begin, end) relative to data start


class ShardedWriter:
    """Writes a planned set of tensors into safetensors shards plus an index.

    ``layout`` fixes the order, shapes and dtypes; shards are cut greedily in that order
    at ``max_shard_bytes`` (a tensor larger than that gets a shard of its own). One shard
    is written as ``file_name`` (``model.safetensors``; a PEFT adapter uses
    ``adapter_model.safetensors``); several as ``model-0000i-of-0000N.safetensors`` with
    ``model.safetensors.index.json`` (the stem follows ``file_name``).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        layout: Sequence[OutputTensor],
        max_shard_bytes: int = 5 * 1000**3,
        metadata: dict[str, str] | None = None,
        file_name: str = SINGLE_FILE,
    ):
        self.directory = Path(directory)
        self.file_name = file_name
        self.layout = {t.name: t for t in layout}
        if len(self.layout) != len(layout):
            raise ValueError("output layout names a tensor twice")
        self._written: set[str] = set()
        groups: list[list[OutputTensor]] = [[]]
        size = 0
        for tensor in layout:
            if groups[-1] and size + tensor.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(tensor)
            size += tensor.nbytes
        count = len(groups)
        self._shards: list[_Shard] = []
        self._fds: list[int] = []
        self._where: dict[str, tuple[int, int]] = {}  # name -> (shard index, absolute offset)
        header_metadata = {"format": "pt", **(metadata or {})}
        for index, group in enumerate(groups):
            stem = self.file_name.removesuffix(".safetensors")
            file_name = self.file_name if count == 1 else f"{stem}-{index + 1:05d}-of-{count:05d}.safetensors"
            header: dict[str, Any] = {"__metadata__": header_metadata}
            entries = {}
            offset = 0
            for tensor in group:
                entries[tensor.name] = (offset, offset + tensor.nbytes)
                header[tensor.name] = {
                    "dtype": TORCH_TO_SAFETENSORS[tensor.dtype],
                    "shape": list(tensor.shape),
                    "data_offsets": [offset, offset + tensor.nbytes],
                }
                offset += tensor.nbytes
            header_bytes = json.dumps(header, separators=(",", ":")).encode()
            header_bytes += b" " * (-len(header_bytes) % 8)  # keep data 8-byte aligned
            fd = os.open(self.directory / file_name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, len(header_bytes).to_bytes(8, "little") + header_bytes, 0)
            data_start = 8 + len(header_bytes)
            os.ftruncate(fd, data_start + offset)
            for name, (begin, _) in entries.items():
                self._where[name] = (index, data_start + begin)
            self._shards.append(_Shard(file_name, len(header_bytes), entries))

    def write(self, name: str, tensor: Any) -> None:
        expected = self.layout.get(name)
        if expected is None:
            raise ValueError(f"tensor '{name}' is not part of the planned output")
        if tuple(tensor.shape) != expected.shape or str(tensor.dtype).removeprefix("torch.") != expected.dtype:
            raise ValueError(
                f"tensor '{name}': got {tuple(tensor.shape)} {tensor.dtype}, planned {expected.shape} {expected.dtype}"
            )
        shard_index, offset = self._where[name]
        _pwrite_all(self._fds[shard_index], _tensor_bytes(tensor.cpu()), offset)
        self._written.add(name)

    def close(self) -> None:
        missing = [name for name in self.layout if name not in self._written]
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if missing:
            raise RuntimeError(f"output incomplete: {len(missing)} planned tensors never written (first: {missing[0]})")
        if len(self._shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for t in self.layout.values())},
                "weight_map": {
                    name: shard.file_name for shard in self._shards for name in shard.entries
                },
            }
            index_file = INDEX_FILE if self.file_name == SINGLE_FILE else f"{self.file_name}.index.json"
            (self.directory / index_file).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


# The attribute a model loaded from disk carries to say what it was loaded from (a directory,
# adapters, their identity fingerprint); writing other weights into it drops the record.
LOADED_FROM = "mergelab_loaded_from"


class LiveModelSink:
    """Copies finished tensors into the parameters/buffers of an in-memory module."""

    def __init__(self, module: Any):
        self.module = module
        self._targets = dict(module.state_dict(keep_vars=True))
        self.written: set[str] = set()
        module.__dict__.pop(LOADED_FROM, None)  # its weights will no longer be the ones it was loaded with

    def write(self, name: str, tensor: Any) -> None:
        import torch

        target = self._targets.get(name)
        if target is None:
            raise InputError(f"the in-memory model has no parameter or buffer '{name}'.")
        if tuple(target.shape) != tuple(tensor.shape):
            raise InputError(
                f"tensor '{name}': shape {tuple(tensor.shape)} does not fit the in-memory model's {tuple(target.shape)}."
            )
        with torch.no_grad():
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
        self.written.add(name)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass  # tensors already copied stay in the module: the caller decides whether to keep it


class OutputDirectory:
    """Build a directory under a temporary name beside its destination; rename when complete.

    ``with OutputDirectory(out, force=False, inputs=[...]) as tmp:`` — write into ``tmp``; on
    success the destination appears atomically (an existing directory is replaced only with
    ``force``); on any error the temporary directory is removed and the destination is
    untouched. ``inputs`` are the files and directories the run reads: a destination that is
    or contains one of them is refused even with ``force``, since replacing it would delete
    the inputs. Make it before planning (an existing output is refused before any input is
    fetched) and :meth:`protect` the inputs the plan found.
    """

    def __init__(self, destination: str | os.PathLike[str], force: bool = False,
                 inputs: Iterable[str | os.PathLike[str]] = ()):
        self.destination = Path(destination).expanduser().resolve()
        self.force = force
        self.inputs = [Path(path).expanduser().resolve() for path in inputs]
        self.temporary: Path | None = None
        self.check()
        # Find out now, not after the work, whether the output can be made there; create nothing yet.
        os.rmdir(self._make_temporary(self._existing_ancestor()))

    def protect(self, inputs: Iterable[str | os.PathLike[str]]) -> None:
        """Refuse the destination if it is or contains one of ``inputs`` too."""
        self.inputs += [Path(path).expanduser().resolve() for path in inputs]
        self.check()

    def check(self) -> None:
        destination = self.destination
        for path in self.inputs:
            if path == destination or destination in path.parents:
                what = "is" if path == destination else "contains"
                raise ConfigError(
                    f"output directory '{destination}' {what} the input '{path}'; writing there would delete "
                    "that input. Choose an output path outside every input."
                )
        if destination.exists() and not destination.is_dir():
            raise ConfigError(
                f"output '{destination}' is a file, not a directory; choose another path (--force replaces only "
                "directories)."
            )
        if destination.exists() and not self.force:
            raise ConfigError(
                f"output directory '{destination}' already exists; choose another path or pass --force to replace it."
            )
        ancestor = self._existing_ancestor()
        if not ancestor.is_dir():
            raise ConfigError(f"output '{destination}': '{ancestor}' is a file, not a directory; choose another path.")

    def _existing_ancestor(self) -> Path:
        """The output's nearest existing parent: missing ones are made when the work starts (as mergekit does)."""
        ancestor = self.destination.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        return ancestor

    def _make_temporary(self, where: Path) -> Path:
        try:
            where.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=f".{self.destination.name}.tmp-", dir=where))
        except OSError as exc:
            raise InputError(
                f"cannot create the output '{self.destination}': {exc.strerror or exc} in "
                f"'{where}'; choose a writable place for the output."
            ) from None

    def __enter__(self) -> Path:
        self.check()
        self.temporary = self._make_temporary(self.destination.parent)
        return self.temporary

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.temporary is not None
        if exc_type is not None:
            shutil.rmtree(self.temporary, ignore_errors=True)
            return
        os.chmod(self.temporary, 0o755)
        if self.destination.exists():
            # --force: move the old output aside first so a failure never leaves neither.
            trash = Path(tempfile.mkdtemp(prefix=f".{self.destination.name}.old-", dir=self.destination.parent))
            old = trash / "old"
            os.replace(self.destination, old)
            os.replace(self.temporary, self.destination)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.temporary, self.destination)

"""Read a Hugging Face model directory lazily: config, (sharded) safetensors, tokenizer files.

Only headers are read when a ``Checkpoint`` is opened, so validating many large inputs
costs milliseconds. Tensors are read one at a time, when the engine asks for them: each
is mapped from the file (copy-on-write) and its pages are populated from the page cache
on the reading thread, so that no tensor is copied, and no fresh memory is faulted in,
merely to be read once.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mergelab.errors import InputError

# safetensors dtype tag -> (torch dtype name, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}

DTYPE_BYTES: dict[str, int] = {name: size for name, size in SAFETENSORS_DTYPES.values()}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Files a tokenizer (and generation defaults) may consist of; copied beside merged weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@dataclass(frozen=True)
class TensorInfo:
    """Header facts about one stored tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "float32"
    file: str  # shard file name inside the model directory
    offset: int = 0  # absolute byte offset of the data in that file

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]

    @property
    def is_floating_point(self) -> bool:
        return self.dtype.startswith(("float", "bfloat"))


MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Names, shapes, dtypes and byte offsets of every tensor in a safetensors file.

    Reads only the header (8-byte little-endian length, then JSON), validating that the
    data offsets are consistent with the file size.
    """
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 0 < length <= MAX_HEADER_BYTES:
                raise ValueError(f"header length {length} is invalid")
            header = json.loads(handle.read(length))
        file_size = path.stat().st_size
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({exc}). Re-download or re-save the model.") from exc
    data_start = 8 + length
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            tag, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: malformed header entry for tensor '{name}'.") from None
        if tag not in SAFETENSORS_DTYPES:
            raise InputError(f"{path}: tensor '{name}' has unsupported dtype {tag}.")
        info = TensorInfo(name, shape, SAFETENSORS_DTYPES[tag][0], path.name, data_start + begin)
        if end - begin != info.nbytes or data_start + end > file_size:
            raise InputError(f"{path}: tensor '{name}' has inconsistent data offsets; the file may be truncated.")
        infos[name] = info
    return infos


def read_tensor(fd: int, info: TensorInfo, path: Path):
    """Read the tensor ``info`` from the open safetensors file ``fd`` into a fresh CPU tensor.

    Plain positioned reads into a preallocated tensor (thread-safe on a shared descriptor).
    """
    import torch

    tensor = torch.empty(info.shape, dtype=getattr(torch, info.dtype))
    if info.nbytes:
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")
        done = 0
        while done < info.nbytes:
            count = os.preadv(fd, [buffer[done:]], info.offset + done)
            if count == 0:
                raise InputError(f"{path}: unexpected end of file reading '{info.name}'.")
            done += count
    return tensor


MADV_POPULATE_READ = 22  # Linux >= 5.14: fault the pages of a range in, readable, now


def _libc_madvise() -> Any:
    """libc's madvise through ctypes (which releases the GIL while the kernel reads), or None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _libc_madvise()


def map_tensor(fd: int, info: TensorInfo, path: Path):
    """The tensor ``info`` of the open safetensors file ``fd``, mapped copy-on-write.

    No copy is made: the tensor's storage is a private mapping of the file's pages
    (writing to it changes this process's copy only, never the file), and the mapping is
    unmapped when the tensor is dropped. Its pages are faulted in here, on the reading
    thread, with the GIL released, so the thread that computes finds them resident.
    Tensors whose data is not aligned to their element size, and empty ones, are read
    by :func:`read_tensor` instead.
    """
    import torch

    element = DTYPE_BYTES[info.dtype]
    if not info.nbytes or info.offset % element:
        return read_tensor(fd, info, path)
    start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
    lead = info.offset - start
    try:
        mapping = mmap.mmap(fd, lead + info.nbytes, access=mmap.ACCESS_COPY, offset=start)
    except ValueError:  # the file is shorter than its header says
        raise InputError(f"{path}: unexpected end of file reading '{info.name}'.") from None
    tensor = torch.frombuffer(mapping, dtype=getattr(torch, info.dtype), count=info.numel, offset=lead)
    if _MADVISE is not None:
        _MADVISE(tensor.data_ptr() - lead, lead + info.nbytes, MADV_POPULATE_READ)  # a hint: failure is harmless
    return tensor.view(info.shape)


def _refuse_pickles(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise InputError(
            f"{directory}: weights are stored as pickle files ({', '.join(pickles[:3])}), which "
            "mergelab refuses to load because unpickling can run arbitrary code. Convert the model "
            "to safetensors once, in an environment you trust: "
            "AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)."
        )
    raise InputError(
        f"{directory}: no '{SINGLE_FILE}' or '{INDEX_FILE}' found; is this a Hugging Face model directory?"
    )


def looks_like_hub_name(reference: str) -> bool:
    """``org/name`` (a Hugging Face Hub repository: letters, digits, ``-``, ``_``, ``.``), as opposed to a
    local path such as ``./model``, ``models/`` or ``~/m``."""
    return _HUB_NAME.fullmatch(reference) is not None and ".." not in reference


_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9_][\w.-]*")


def resolve_model_dir(reference: str, kind: str = "model") -> Path:
    """Turn a model reference into a local directory.

    A local path is used as it is; ``zoo:SIZE/NAME`` names a model of the built-in zoo;
    an ``org/name`` that is not a local path is fetched from the Hugging Face Hub
    (safetensors, JSON and tokenizer files only) when the hub is reachable.
    """
    if reference.startswith("zoo:"):
        # A name lookup in the zoo's manifest, imported by name so that io does not
        # depend on the zoo package (the zoo depends on io).
        import importlib

        return importlib.import_module("mergelab.zoo.catalog").resolve_artifact(reference)
    path = Path(reference).expanduser()
    if path.exists():
        return path
    if not looks_like_hub_name(reference):
        where = "" if path.is_absolute() else f" (looked for {path.resolve()}: relative paths start from the working directory)"
        raise InputError(f"{kind} path '{reference}' does not exist{where}; check the path.")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            reference,
            allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as exc:
        raise InputError(
            f"{kind} '{reference}' is not a local directory (no {path.resolve()}; relative paths start from the "
            f"working directory) and could not be fetched from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            f"Give the local path, or download the {kind} first."
        ) from exc
    return Path(local)


class Checkpoint:
    """A Hugging Face causal-LM directory with safetensors weights, read lazily.

    Opening validates the directory and reads every shard's header; ``get_tensor``
    maps one tensor from its file. Safe to call from several threads.
    """

    def __init__(self, reference: str | os.PathLike[str]):
        self.reference = str(reference)
        self.path = resolve_model_dir(self.reference)
        if not self.path.is_dir():
            raise InputError(f"model path '{self.path}' is a file, not a model directory.")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            if (self.path / "adapter_config.json").is_file():
                raise InputError(
                    f"{self.path} is a PEFT adapter, not a model: give its base model here, or apply the adapter "
                    "to it (BASE+ADAPTER in a recipe, --adapter in mergelab eval)."
                )
            raise InputError(
                f"{self.path}: no config.json, so this is not a Hugging Face model directory."
            )
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{config_path}: invalid JSON ({exc}).") from exc
        self.tensors: dict[str, TensorInfo] = self._read_headers()
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _read_headers(self) -> dict[str, TensorInfo]:
        index_path = self.path / INDEX_FILE
        single_path = self.path / SINGLE_FILE
        if index_path.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise InputError(f"{index_path}: malformed index ({exc}); expected a 'weight_map'.") from exc
            infos: dict[str, TensorInfo] = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = self.path / shard
                if not shard_path.is_file():
                    raise InputError(f"{index_path}: lists shard '{shard}', which is missing from {self.path}.")
                infos.update(read_safetensors_header(shard_path))
            missing = sorted(set(weight_map) - set(infos))
            if missing:
                raise InputError(
                    f"{index_path}: tensor '{missing[0]}' is listed in the index but absent from its shard "
                    f"({len(missing)} such tensors)."
                )
            return {name: infos[name] for name in weight_map}
        if single_path.is_file():
            return read_safetensors_header(single_path)
        shards = sorted(self.path.glob("*.safetensors"))
        if shards:
            infos = {}
            for shard in shards:
                infos.update(read_safetensors_header(shard))
            return infos
        _refuse_pickles(self.path)
        raise AssertionError("unreachable")

    # ---- facts -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.reference

    @property
    def num_layers(self) -> int | None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            value = self.config.get(key)
            if isinstance(value, int):
                return value
        text_config = self.config.get("text_config")
        if isinstance(text_config, dict) and isinstance(text_config.get("num_hidden_layers"), int):
            return text_config["num_hidden_layers"]
        return None

    @property
    def tokenizer_files(self) -> list[Path]:
        return [self.path / name for name in TOKENIZER_FILES if (self.path / name).is_file()]

    def __contains__(self, tensor_name: str) -> bool:
        return tensor_name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def info(self, tensor_name: str) -> TensorInfo:
        try:
            return self.tensors[tensor_name]
        except KeyError:
            raise InputError(f"{self.path}: has no tensor '{tensor_name}'.") from None

    # ---- data --------------------------------------------------------------------------
    def _fd(self, file: str) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = os.open(self.path / file, os.O_RDONLY)
                self._fds[file] = fd
            return fd

    def get_tensor(self, tensor_name: str):
        """One tensor, as a CPU tensor the caller owns (:func:`map_tensor`: a private
        mapping of the file, unmapped when the tensor is dropped)."""
        info = self.info(tensor_name)
        return map_tensor(self._fd(info.file), info, self.path / info.file)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"Checkpoint({self.reference!r}, {len(self.tensors)} tensors)"

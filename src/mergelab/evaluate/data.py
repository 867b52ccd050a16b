"""Dataset loaders: local JSONL / JSON / CSV / parquet / text files, ``zoo:`` names, Hugging Face datasets.

Every loader returns a list of :class:`Row` — the row's fields plus *where* it came from
(``file:line`` for text formats, ``file:row N`` for parquet, ``dataset[split] row N`` for
Hugging Face), so that a task that finds a missing or malformed field can say exactly
which row to fix. Loading is separate from scoring: tasks call :func:`load_rows` and then
validate the fields they need with :meth:`Row.require`.

Source strings
--------------
- a local path: ``.jsonl`` (one JSON object per line; blank lines skipped), ``.json``
  (a list of objects, or JSON lines), ``.csv`` (header row), ``.parquet``, ``.txt``
  (the whole file is one row with a ``text`` field); ``.gz`` variants of jsonl/json/csv/txt.
  Text is UTF-8 (a leading byte-order mark is dropped); a file that is not (or a broken
  ``.gz``) is an error naming the file.
- ``zoo:NAME:SPLIT`` (e.g. ``zoo:tiny/caesar3:test``): a dataset of the built-in zoo,
  resolved by a function registered with :func:`register_zoo_resolver`.
- ``hf:ORG/NAME`` or ``ORG/NAME`` (when no such local path exists): a Hugging Face
  dataset, loaded with ``datasets.load_dataset(name, config, split=split)`` when the hub
  is reachable; offline, the error names the local file to provide instead.
"""

from __future__ import annotations

import csv
import gzip
import importlib
import io
import json
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TextIO

from mergelab.errors import InputError
from mergelab.io.checkpoint import looks_like_hub_name

ZOO_PREFIX = "zoo:"
HF_PREFIX = "hf:"
CSV_FIELD_LIMIT = 256 * 1024 * 1024  # characters in one CSV field

# A zoo resolver maps (dataset name, split) to a local file; it raises InputError when unknown.
ZooResolver = Callable[[str, str], Path]
_zoo_resolvers: list[ZooResolver] = []


@dataclass(frozen=True)
class Row:
    """One record of a dataset and where it came from (for error messages)."""

    fields: dict[str, Any]
    where: str
    index: int = 0

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)

    def has(self, name: str) -> bool:
        return name in self.fields and self.fields[name] is not None

    def require(self, name: str, kind: type | tuple[type, ...] = str, hint: str = "") -> Any:
        """The field ``name``, checked to be a ``kind``; otherwise an InputError naming the row and the field."""
        if name not in self.fields or self.fields[name] is None:
            present = ", ".join(sorted(self.fields)) or "none"
            raise InputError(
                f"{self.where}: missing field '{name}' (fields present: {present}). {hint}".rstrip()
            )
        value = self.fields[name]
        if kind is int and isinstance(value, bool):
            value = "bool"
        if not isinstance(value, kind):
            names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise InputError(
                f"{self.where}: field '{name}' should be {names}, got {type(value).__name__} "
                f"{str(value)[:60]!r}. {hint}".rstrip()
            )
        return value


@dataclass
class Dataset:
    """Rows from one source, with a human-readable description of the source."""

    source: str
    rows: list[Row] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)


# ---- zoo names ---------------------------------------------------------------------------
def register_zoo_resolver(resolver: ZooResolver) -> None:
    """Let the zoo package resolve ``zoo:NAME:SPLIT`` names to local files.

    ``resolver(name, split)`` returns the path of a JSONL file, or raises InputError for a
    name it does not know. The most recently registered resolver is asked first.
    """
    if resolver not in _zoo_resolvers:
        _zoo_resolvers.insert(0, resolver)


def parse_zoo_name(source: str) -> tuple[str, str]:
    """``zoo:tiny/caesar3:test`` -> (``tiny/caesar3``, ``test``); the split defaults to ``test``."""
    body = source[len(ZOO_PREFIX):]
    name, _, split = body.partition(":")
    if not name:
        raise InputError(f"zoo dataset name '{source}' is empty; write it like zoo:tiny/caesar3:test.")
    return name, split or "test"


def resolve_zoo(source: str) -> Path:
    """The local file behind a ``zoo:`` name, or a clear error when the zoo cannot provide it."""
    name, split = parse_zoo_name(source)
    if not _zoo_resolvers:
        # The built-in zoo's resolver, imported by name so that this module does not depend on
        # the zoo (the zoo depends on evaluation); other resolvers may be registered too.
        importlib.import_module("mergelab.zoo.catalog").register()
    errors = []
    for resolver in _zoo_resolvers:
        try:
            return Path(resolver(name, split))
        except InputError as exc:
            errors.append(str(exc))
    if errors:  # the resolvers say what is wrong (not built, no such dataset or split) and what to do
        raise InputError(f"zoo dataset '{source}': {'; '.join(errors)}")
    raise InputError(f"unknown zoo dataset '{source}': build the zoo with `mergelab zoo build`, "
                     "or give a local JSONL file instead.")


# ---- local files ---------------------------------------------------------------------------
@contextmanager
def _open_text(path: Path, newline: Optional[str] = None) -> Iterator[TextIO]:
    """The one way data files are opened: UTF-8 text, gunzipped for ``.gz``; decoding errors name the file.

    A leading byte-order mark (as Excel and Notepad write UTF-8) is dropped, so it does not
    end up in the first column's name or break the first JSON line.
    """
    raw = gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")
    try:
        with io.TextIOWrapper(raw, encoding="utf-8-sig", newline=newline) as handle:
            yield handle
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start} of a read block); "
            "save the file as UTF-8."
        ) from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: not a readable gzip file ({exc}); recompress it or give the plain file.") from None


def _base_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(
                    f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}). "
                    "Each line must be one JSON object; fix or remove this line."
                ) from None
            if not isinstance(value, dict):
                raise InputError(
                    f"{path}:{number}: expected a JSON object per line, got {type(value).__name__}."
                )
            rows.append(Row(value, f"{path}:{number}", len(rows)))
    return rows


def _read_json(path: Path) -> list[Row]:
    with _open_text(path) as handle:
        text = handle.read()
    stripped = text.lstrip()
    if not stripped.startswith("["):
        return _read_jsonl(path)
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}).") from None
    rows = []
    for number, value in enumerate(values):
        if not isinstance(value, dict):
            raise InputError(f"{path}: item {number} of the list is {type(value).__name__}, expected an object.")
        rows.append(Row(value, f"{path} item {number}", number))
    return rows


def _read_csv(path: Path) -> list[Row]:
    rows = []
    # A document for perplexity may be far longer than the csv module's default field limit (128 KiB).
    previous_limit = csv.field_size_limit(CSV_FIELD_LIMIT)
    with _open_text(path, newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            if not reader.fieldnames:
                raise InputError(f"{path}: empty CSV file; the first line must name the columns.")
            for record in reader:
                line = reader.line_num
                if None in record:
                    raise InputError(
                        f"{path}:{line}: this row has more values than the header has columns "
                        f"({len(reader.fieldnames)}); quote values that contain commas."
                    )
                missing = [name for name, value in record.items() if value is None]
                if missing:
                    raise InputError(f"{path}:{line}: this row has fewer values than the header (no '{missing[0]}').")
                rows.append(Row(dict(record), f"{path}:{line}", len(rows)))
        except csv.Error as exc:  # e.g. a field over CSV_FIELD_LIMIT
            # DictReader.line_num is updated only after a row parses; its inner reader's counts the failing line.
            raise InputError(f"{path}:{reader.reader.line_num}: not a readable CSV row ({exc}).") from None
        finally:
            csv.field_size_limit(previous_limit)
    return rows


def _read_parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow).") from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for bad files
        raise InputError(f"{path}: not a readable parquet file ({exc}).") from exc
    return [Row(record, f"{path} row {number}", number) for number, record in enumerate(table.to_pylist())]


def _read_text(path: Path) -> list[Row]:
    with _open_text(path) as handle:
        return [Row({"text": handle.read()}, str(path), 0)]


READERS: dict[str, Callable[[Path], list[Row]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
    ".txt": _read_text,
}


def read_file(path: str | Path) -> Dataset:
    """Rows of a local data file, chosen by its extension (see the module docstring)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"data file '{path}' does not exist.")
    reader = READERS.get(_base_suffix(path))
    if reader is None:
        raise InputError(
            f"{path}: unknown data format '{''.join(path.suffixes)}'; use .jsonl, .json, .csv, .parquet or .txt."
        )
    return Dataset(str(path), reader(path))


# ---- Hugging Face datasets --------------------------------------------------------------------
def load_hf(name: str, config: Optional[str] = None, split: str = "test") -> Dataset:
    """A split of a Hugging Face dataset; a clear error when the hub cannot be reached."""
    label = f"{name}" + (f" ({config})" if config else "") + f"[{split}]"
    try:
        import datasets
    except ImportError as exc:
        raise InputError(f"loading the Hugging Face dataset {label} needs `datasets` (pip install datasets).") from exc
    try:
        loaded = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, auth, missing split: all end the same way for the user
        raise InputError(
            f"could not load the Hugging Face dataset {label} ({type(exc).__name__}: {str(exc)[:300]}). "
            f"If the hub is unreachable, export the split elsewhere with "
            f"`datasets.load_dataset({name!r}, {config!r}, split={split!r}).to_json('{Path(name).name}-{split}.jsonl')` "
            "and pass that local .jsonl file instead."
        ) from exc
    return Dataset(f"hf:{label}", [Row(dict(r), f"{label} row {i}", i) for i, r in enumerate(loaded)])


# ---- the one entry point ------------------------------------------------------------------------
def load_rows(source: str | Path, *, split: str = "test", hf_config: Optional[str] = None) -> Dataset:
    """Load ``source`` (a local file, ``zoo:NAME:SPLIT``, or a Hugging Face dataset name).

    ``split`` and ``hf_config`` only apply to Hugging Face datasets.
    """
    text = str(source)
    if text.startswith(ZOO_PREFIX):
        return read_file(resolve_zoo(text))
    if text.startswith(HF_PREFIX):
        return load_hf(text[len(HF_PREFIX):], hf_config, split)
    path = Path(text).expanduser()
    if path.exists():
        return read_file(path)
    if looks_like_hub_name(text) and not path.suffix:
        return load_hf(text, hf_config, split)
    raise InputError(f"data file '{text}' does not exist (nor is it a zoo: or Hugging Face dataset name).")

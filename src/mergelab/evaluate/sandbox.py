"""Run untrusted (model-generated) Python in an isolated process, and only there.

``Sandbox().run(program)`` executes ``program`` and reports whether it ran to the end
(``passed``), raised or was killed (``failed``), or hit a time limit (``timed_out``). The
program runs under these guarantees:

- **separate process tree in fresh namespaces** (``unshare``: pid, mount, network, IPC,
  UTS). When the run ends, pid 1 of its pid namespace exits and the kernel kills every
  process the program started — forks, daemons and ``setsid`` escapes included.
- **no privileges**: no capabilities (empty bounding and ambient sets) and
  ``PR_SET_NO_NEW_PRIVS``, so setuid-root binaries and file capabilities grant nothing
  (every mount is also nosuid). Started as root, the program runs as a dedicated
  unprivileged uid/gid (one per concurrent run, from a range no account uses) with no
  supplementary groups; started as another user, as uid 1000 of a user namespace nested
  inside the one that owns its mounts, so it cannot unmount or remount anything.
- **limits**: wall time (killed ``wall_seconds`` after the interpreter has started), CPU
  time (``RLIMIT_CPU``), address space (``RLIMIT_AS``), processes (``RLIMIT_NPROC``,
  counted for this run alone: per sandbox uid as root, per user namespace otherwise —
  Linux >= 5.15), file size (``RLIMIT_FSIZE``), open files, no core dumps.
- **file system**: every host mount is read-only, nosuid and nodev; only the system's own
  top-level directories stay visible (/usr, /bin, /sbin, /lib*, /etc, /proc, /sys, /dev, and
  the Nix/Guix stores /nix, /gnu):
  every other one (/tmp, /root, /home, /run, /var, /srv, /opt, /mnt, wherever a checkout
  lives) is empty and read-only, so neither its files nor the unix sockets there can be
  reached (the Python installation alone is re-exposed, read-only, where it lies below one);
  /dev holds only null, zero, random and urandom (plus fd links), no block devices; the
  only writable place is the working directory /tmp/work, a fresh size-limited tmpfs that
  vanishes with the run. Writing or deleting anything outside it fails.
- **no network** (a new network namespace has only a down loopback), a scrubbed
  environment (``PATH``, ``HOME``, ``LANG`` only — no secrets), no inherited file
  descriptors beyond stdin (/dev/null), stdout and stderr, and only the sandbox's own
  processes are visible in /proc.
- **bounded output**: at most ``output_bytes`` of stdout/stderr are kept.
- **the standard library only**: the program runs on the harness's own interpreter with
  ``python -I -S`` (no site-packages), as HumanEval's problems need.

"Passed" means the program's last act was the runner printing a per-run random token, so
``sys.exit(0)`` or ``os._exit(0)`` half-way does not pass. (The sandbox protects the host;
it does not try to stop code deliberately written to fool the scoring.)

Requirements: Linux with ``unshare`` (util-linux) and permission to create namespaces
(root, or unprivileged user namespaces). :meth:`Sandbox.check` verifies this once and
raises :class:`SandboxError` with the reason otherwise — code is never run unsandboxed.
A sandbox that fails to set itself up for one run (the init reports it on a pipe the
program cannot reach) also raises :class:`SandboxError`: that is never scored as a wrong
answer, while a program that itself exits with any status is an ordinary failure.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from mergelab.errors import ConfigError, MergelabError

INIT_SCRIPT = Path(__file__).with_name("_sandbox_init.py")
STARTUP_GRACE = 20.0  # as in _sandbox_init: how long the interpreter may take to start
UID_BASE = 1_500_000_000  # far above any account's uid, below 2**31; one uid per (harness process, slot)
SLOTS = 64
WALL_TIMEOUT = 124


class SandboxError(MergelabError):
    """The sandbox cannot be set up (so no untrusted code runs, and nothing is scored)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits for one run."""

    wall_seconds: float = 3.0
    cpu_seconds: Optional[int] = None  # default: wall time rounded up, + 1
    memory_mb: int = 1024
    processes: int = 16
    file_size_mb: int = 16
    open_files: int = 64
    tmpfs_mb: int = 64
    output_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        if not self.wall_seconds > 0:
            raise ConfigError(f"sandbox wall_seconds must be positive, got {self.wall_seconds}.")
        for name in ("memory_mb", "processes", "file_size_mb", "open_files", "tmpfs_mb", "output_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sandbox {name} must be at least 1, got {getattr(self, name)}.")
        if self.cpu_seconds is not None and self.cpu_seconds < 1:
            raise ConfigError(f"sandbox cpu_seconds must be at least 1, got {self.cpu_seconds}.")

    def resolved(self) -> dict:
        values = asdict(self)
        if values["cpu_seconds"] is None:
            values["cpu_seconds"] = int(math.ceil(self.wall_seconds)) + 1
        return values


@dataclass(frozen=True)
class Outcome:
    """How one run ended: ``status`` is passed, failed or timed_out; ``detail`` says why."""

    status: str
    detail: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


class _Slots:
    """Hands out distinct slot numbers to concurrent runs (each slot is its own uid)."""

    def __init__(self, count: int):
        self._free = list(range(count))
        self._available = threading.Condition()

    def acquire(self) -> int:
        with self._available:
            while not self._free:
                self._available.wait()
            return self._free.pop()

    def release(self, slot: int) -> None:
        with self._available:
            self._free.append(slot)
            self._available.notify()


_slots = _Slots(SLOTS)
_checked: dict[tuple, Optional[str]] = {}
_check_lock = threading.Lock()


def _interpreter() -> tuple[str, str]:
    """The real Python executable (not a venv link) and the prefix directory it needs."""
    python = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    if not python.startswith(prefix + os.sep):
        prefix = os.path.dirname(os.path.dirname(python))
    return python, prefix


def sandbox_uid(slot: int) -> Optional[int]:
    """The uid a run in ``slot`` uses (None when not root: a user namespace maps the caller instead)."""
    if os.geteuid() != 0:
        return None
    return UID_BASE + (os.getpid() % 4_194_304) * SLOTS + slot


class Sandbox:
    """Runs programs in isolation with :class:`Limits`; see the module docstring for the guarantees."""

    def __init__(self, limits: Limits = Limits()):
        self.limits = limits
        self.unshare = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin") or shutil.which("unshare")

    def _command(self, config: dict) -> list[str]:
        command = [self.unshare, "--fork", "--pid", "--mount-proc", "--kill-child", "--mount", "--net", "--ipc", "--uts"]
        if os.geteuid() != 0:
            command[1:1] = ["--user", "--map-root-user"]
        python, _ = _interpreter()
        return command + ["--", python, "-I", "-S", "-B", str(INIT_SCRIPT), json.dumps(config)]

    def check(self) -> None:
        """Raise SandboxError unless isolated runs work here (tested once per process)."""
        key = (os.geteuid(), self.unshare)
        with _check_lock:
            if key not in _checked:
                _checked[key] = self._probe()
        problem = _checked[key]
        if problem:
            raise SandboxError(problem)

    def _probe(self) -> Optional[str]:
        if sys.platform != "linux":
            return f"the code sandbox needs Linux namespaces; this is {sys.platform}. Score code on a Linux machine."
        if not self.unshare:
            return "the code sandbox needs `unshare` (util-linux); install it, e.g. `apt-get install util-linux`."
        how = "run as root, or enable unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1)"
        try:
            outcome = self._run("print('ready')", Limits(wall_seconds=10.0))
        except SandboxError as exc:
            return f"{exc} It needs permission to create namespaces: {how}. Generated code is never run unsandboxed."
        if outcome.passed and "ready" in outcome.stdout:
            return None
        return (
            f"the code sandbox cannot start here ({outcome.detail}; {outcome.stderr.strip()[-400:]}). "
            f"It needs permission to create namespaces: {how}. Generated code is never run unsandboxed."
        )

    def run(self, program: str) -> Outcome:
        """Run ``program`` (Python source) in a fresh sandbox and report how it ended."""
        self.check()
        return self._run(program, self.limits)

    def run_many(self, programs: Sequence[str], workers: Optional[int] = None) -> list[Outcome]:
        """Run programs concurrently (default: one per CPU core), results in input order."""
        self.check()
        workers = max(1, min(workers or os.cpu_count() or 1, SLOTS, len(programs) or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda p: self._run(p, self.limits), programs))

    def _run(self, program: str, limits: Limits) -> Outcome:
        slot = _slots.acquire()
        try:
            return self._run_in_slot(program, limits, slot)
        finally:
            _slots.release(slot)

    def _run_in_slot(self, program: str, limits: Limits, slot: int) -> Outcome:
        python, prefix = _interpreter()
        resolved = limits.resolved()
        status_read, status_write = os.pipe()
        config = {"uid": sandbox_uid(slot), "limits": resolved, "tmpfs_mb": limits.tmpfs_mb,
                  "python": python, "python_prefix": prefix, "status_fd": status_write}
        started = time.monotonic()
        try:
            process = subprocess.Popen(
                self._command(config), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                close_fds=True, pass_fds=(status_write,), start_new_session=True, cwd="/",
                env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"},
            )
        except BaseException:
            os.close(status_read)
            raise
        finally:
            os.close(status_write)
        # The init enforces the wall limit itself; this outer deadline only guards against a stuck setup.
        stdout, stderr, status, killed = _communicate(process, program.encode("utf-8"), status_read,
                                                      limits.wall_seconds + STARTUP_GRACE + 20.0, limits.output_bytes)
        seconds = time.monotonic() - started
        code = process.returncode
        out_text = stdout.decode("utf-8", "replace")
        err_text = stderr.decode("utf-8", "replace")
        _check_setup(status.decode("utf-8", "replace"), code, killed, err_text)
        nonce, _, body = out_text.partition("\n")
        finished = code == 0 and bool(nonce) and body.rstrip("\n").endswith(nonce)
        if finished:
            body = body.rstrip("\n")[: -len(nonce)].rstrip("\n")
            return Outcome("passed", "passed", code, body, err_text, seconds)
        if killed or code == WALL_TIMEOUT:
            return Outcome("timed_out", f"timed out after {limits.wall_seconds:g} s wall time", code, body, err_text, seconds)
        if code == 128 + signal.SIGXCPU or code == -signal.SIGXCPU:
            return Outcome("timed_out", f"CPU time limit of {resolved['cpu_seconds']} s reached", code, body, err_text, seconds)
        last = err_text.strip().splitlines()[-1] if err_text.strip() else f"exit status {code}"
        if code == 0:
            last = "the program ended without reaching its end (exit during the run)"
        elif code > 128:
            last = f"killed by signal {code - 128} ({_signal_name(code - 128)})"
        return Outcome("failed", f"failed: {last}", code, body, err_text, seconds)


def _check_setup(status: str, code: Optional[int], killed: bool, stderr: str) -> None:
    """Raise SandboxError unless the init reported a finished setup on its status pipe (the program cannot write there)."""
    lines = status.splitlines()
    failure = next((line[len("fail "):] for line in lines if line.startswith("fail ")), None)
    if failure is not None:
        raise SandboxError(f"the code sandbox could not be set up: {failure}.")
    if "ok" not in lines:
        why = "its setup did not finish in time" if killed else f"exit status {code}"
        detail = stderr.strip()[-400:]
        raise SandboxError(f"the code sandbox did not start ({why}{'; ' + detail if detail else ''}).")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown"


def _communicate(process: subprocess.Popen, data: bytes, status_fd: int, timeout: float,
                 cap: int) -> tuple[bytes, bytes, bytes, bool]:
    """Feed stdin; read stdout/stderr (at most ``cap`` bytes of each, head and tail) and the status pipe, until exit or timeout."""
    kept = {"stdout": bytearray(), "stderr": bytearray()}
    tails = {"stdout": bytearray(), "stderr": bytearray()}
    status = bytearray()
    selector = selectors.DefaultSelector()
    assert process.stdin and process.stdout and process.stderr
    selector.register(process.stdout, selectors.EVENT_READ, "stdout")
    selector.register(process.stderr, selectors.EVENT_READ, "stderr")
    selector.register(status_fd, selectors.EVENT_READ, "status")
    view = memoryview(data)
    if view:
        selector.register(process.stdin, selectors.EVENT_WRITE, "stdin")
    else:
        process.stdin.close()
    deadline = time.monotonic() + timeout
    killed = False
    half = cap // 2
    try:
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _kill(process)
                killed = True
                break
            for key, _ in selector.select(timeout=min(remaining, 0.5)):
                if key.data == "stdin":
                    try:
                        written = os.write(key.fd, view[:65536])
                    except BrokenPipeError:
                        written = len(view)
                    view = view[written:]
                    if not view:
                        selector.unregister(key.fileobj)
                        process.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                if key.data == "status":
                    status += chunk[: max(0, 4096 - len(status))]
                    continue
                head = kept[key.data]
                if len(head) < half:
                    take = chunk[: half - len(head)]
                    head += take
                    chunk = chunk[len(take):]
                if chunk:
                    tail = tails[key.data]
                    tail += chunk
                    if len(tail) > half:
                        del tail[: len(tail) - half]
    finally:
        selector.close()
        os.close(status_fd)
    for stream in (process.stdin, process.stdout, process.stderr):
        try:
            stream.close()
        except OSError:
            pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        _kill(process)
        process.wait()
    out = bytes(kept["stdout"] + tails["stdout"])
    err = bytes(kept["stderr"] + tails["stderr"])
    return out, err, bytes(status), killed


def _kill(process: subprocess.Popen) -> None:
    """Kill the sandbox's outer process group; ``unshare --kill-child`` then takes the namespace down."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass

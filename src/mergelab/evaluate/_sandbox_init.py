"""The first process inside a sandbox (see ``sandbox.py``); runs as root of fresh namespaces, stdlib only.

Invoked as ``unshare [--user --map-root-user] --fork --pid --mount-proc --kill-child --mount --net
--ipc --uts -- python -I -S -B _sandbox_init.py CONFIG_JSON`` with the program on stdin and a
*status* pipe (``config["status_fd"]``) on which it reports ``ok`` once the sandbox is set up, or
``fail REASON`` when it cannot be (the program never sees that pipe, so it cannot fake either). It:

1. makes every existing mount read-only, nosuid and nodev (the host file system cannot be
   changed, and setuid/setgid bits and device nodes on it mean nothing);
2. hides every top-level entry of / except the system's own (``KEPT``: /usr, /bin, /sbin,
   /lib*, /etc, /proc, /sys, /dev, and the Nix/Guix stores): an empty tmpfs over each directory (temporary files, home
   directories, /run with its sockets, /var, /srv, /opt, /mnt, and wherever a checkout or
   data set happens to live), an empty file over each top-level file; re-exposes the Python
   installation read-only if it lives under a hidden directory; mounts a minimal /dev (a tmpfs
   holding only null, zero, random and urandom) and a small writable tmpfs at /tmp/work, the
   program's working directory; then makes those tmpfs read-only too. An allow-list, not a
   deny-list: a directory nobody thought of (a CI checkout under /check, say) is hidden too;
3. forks the worker, which sets the resource limits, gives up every privilege, and execs
   Python on a tiny runner that executes the program:

   - started as real root: drops the capability bounding set and the ambient set, sets
     ``PR_SET_NO_NEW_PRIVS`` and switches to a dedicated unprivileged uid/gid (one per
     concurrent run), so the process limit counts this run's processes only;
   - started inside a user namespace (the caller is not root): moves into a nested user
     namespace in which it is uid/gid ``INNER_ID`` (not 0), so it has no capability over
     the mount namespace (the mounts above cannot be undone), drops the bounding set and
     sets ``PR_SET_NO_NEW_PRIVS``; the kernel counts ``RLIMIT_NPROC`` per user namespace
     (Linux >= 5.15), so the process limit again counts this run's processes only;

4. waits at most the wall-time limit — counted from the moment the runner reports that
   the interpreter has started, so a slow start on a busy machine is not charged to the
   program — kills the worker if needed, and exits; with pid 1 of the namespace gone, the
   kernel kills every process the program left behind.

Exit status: the worker's (0 = ran to the end), 124 on the wall-time limit, 125 when the
sandbox itself could not be set up (then the status pipe says ``fail REASON``).
"""

import ctypes
import fcntl
import json
import os
import resource
import select
import signal
import sys
import time

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_MOVE, MS_REC = 32, 1024, 2048, 4096, 8192, 16384
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
LOCKED_DOWN = MS_RDONLY | MS_NOSUID | MS_NODEV
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 38, 47, 4
CLONE_NEWUSER = 0x10000000
# The top-level entries a program may see (read-only); everything else at / is covered. The interpreter
# needs /usr and /lib*, programs need /etc (locale, passwd); /proc is the namespace's own; on Nix and
# Guix systems the interpreter's libraries live in the (world-readable) store under /nix or /gnu.
KEPT = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "proc", "sys", "dev", "nix", "gnu")
DEVICES = ("null", "zero", "random", "urandom")
WORK = "/tmp/work"
INNER_ID = 1000  # the program's uid and gid in its own user namespace (the non-root path)
STARTUP_GRACE = 20.0  # seconds the interpreter may take to start before the wall clock runs anyway
NONCE_FD, STARTED_FD = 3, 4  # what the runner finds open: the pass token, and where to say "started"

RUNNER = r"""
import os, sys, traceback
def _run_program():
    nonce = os.read(3, 64).decode()
    os.close(3)
    os.write(4, b"s")  # the interpreter is up: the wall clock starts now
    os.close(4)
    source = open("program.py", encoding="utf-8").read()
    try:
        code = compile(source, "program.py", "exec")
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException:
        traceback.print_exc(limit=8)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(1)
    sys.stdout.write("\n" + nonce + "\n")
    sys.stdout.flush()
    os._exit(0)
_run_program()
"""

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
libc.unshare.argtypes = [ctypes.c_int]


class SetupError(Exception):
    """The sandbox cannot be set up; reported on the status pipe."""


def report(status_fd, line):
    try:
        os.write(status_fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


def fail(status_fd, message):
    report(status_fd, "fail " + message)
    sys.stderr.write("sandbox setup failed: " + message + "\n")
    sys.stderr.flush()
    os._exit(125)


def check(result, what):
    if result != 0:
        error = ctypes.get_errno()
        raise SetupError("%s: %s" % (what, os.strerror(error)))


def mount(source, target, fstype, flags, data=None):
    encode = lambda value: value.encode() if value is not None else None
    check(libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)),
          "mount %s on %s" % (source or fstype or "(remount)", target))


def prctl(option, argument=0, extra=0):
    check(libc.prctl(option, argument, extra, 0, 0), "prctl(%d, %d)" % (option, argument))


def mount_points():
    points = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")
            options = fields[5].split(",")
            points.append((point, options))
    return points


def make_read_only():
    """Remount every mount read-only, nosuid and nodev, keeping the flags the kernel may have locked."""
    kept = {"noexec": MS_NOEXEC, "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME,
            "strictatime": MS_STRICTATIME}
    problems = []
    for point, options in mount_points():
        if point == "/proc" or point.startswith("/proc/"):
            continue
        flags = MS_REMOUNT | MS_BIND | LOCKED_DOWN
        for name, value in kept.items():
            if name in options:
                flags |= value
        try:
            mount(None, point, None, flags)
        except SetupError as exc:
            # /sys and the host's /dev are covered or refuse writes from an unprivileged uid anyway.
            if not point.startswith(("/sys", "/dev")):
                problems.append(str(exc))
    if problems:
        raise SetupError("; ".join(problems))


def fd_path(descriptor):
    return "/proc/self/fd/%d" % descriptor


def build_dev(devices):
    """A fresh /dev with only the harmless character devices (bind-mounted from the host's) and fd links."""
    # nodev on the tmpfs itself: the four device nodes are bind mounts of their own, which keep working.
    mount("sandbox-dev", "/dev", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=755")
    for name, descriptor in devices.items():
        target = "/dev/" + name
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o666))
        mount(fd_path(descriptor), target, None, MS_BIND)
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
        os.close(descriptor)
    os.mkdir("/dev/shm")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, "/dev/" + name)
    mount(None, "/dev", None, MS_REMOUNT | MS_BIND | LOCKED_DOWN | MS_NOEXEC)


def setup(config, program):
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    make_read_only()
    # Descriptors of what must stay reachable once covered: bind mounts can be made from them.
    prefix = config["python_prefix"]
    try:
        prefix_fd = os.open(prefix, os.O_PATH | os.O_DIRECTORY)
    except OSError as exc:
        raise SetupError("the Python installation %s: %s" % (prefix, exc.strerror))
    devices = {name: os.open("/dev/" + name, os.O_PATH) for name in DEVICES}
    covered, files = [], []
    for entry in sorted(os.listdir("/")):
        if entry in KEPT or os.path.islink("/" + entry):  # a link leads to a kept or a covered place
            continue
        place = "/" + entry
        if os.path.isdir(place):
            mount("sandbox", place, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  "size=%s,mode=755" % ("4m" if place == "/tmp" else "1m"))
            covered.append(place)
        else:
            files.append(place)
    if "/tmp" not in covered:
        raise SetupError("/ has no /tmp directory to hold the working directory")
    if files:
        empty = "/tmp/.empty"
        os.close(os.open(empty, os.O_WRONLY | os.O_CREAT, 0o444))
        for place in files:
            mount(empty, place, None, MS_BIND)
            mount(None, place, None, MS_REMOUNT | MS_BIND | LOCKED_DOWN | MS_NOEXEC)
    if any(prefix == place or prefix.startswith(place + "/") for place in covered):
        os.makedirs(prefix, exist_ok=True)
        mount(fd_path(prefix_fd), prefix, None, MS_BIND | MS_REC)
        mount(None, prefix, None, MS_REMOUNT | MS_BIND | LOCKED_DOWN)
    os.close(prefix_fd)
    build_dev(devices)
    os.mkdir(WORK)
    owner = config["uid"] if config["uid"] is not None else 0
    mount("sandbox", WORK, "tmpfs", MS_NOSUID | MS_NODEV,
          "size=%dm,mode=700,uid=%d,gid=%d" % (config["tmpfs_mb"], owner, owner))
    with open(os.path.join(WORK, "program.py"), "w", encoding="utf-8") as handle:
        handle.write(program)
    os.chmod(os.path.join(WORK, "program.py"), 0o644)
    for place in covered:
        mount(None, place, None, MS_REMOUNT | MS_BIND | LOCKED_DOWN | MS_NOEXEC)


def limit(which, value):
    resource.setrlimit(which, (value, value))


def drop_capabilities():
    """Empty the capability bounding and ambient sets and forbid gaining privileges (setuid, file caps) on exec."""
    with open("/proc/sys/kernel/cap_last_cap") as handle:
        last = int(handle.read())
    for capability in range(last + 1):
        prctl(PR_CAPBSET_DROP, capability)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def enter_inner_user_namespace():
    """Become uid/gid INNER_ID of a new, nested user namespace: no capability over the mounts made above."""
    uid, gid = os.geteuid(), os.getegid()
    check(libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
    for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (INNER_ID, uid)),
                       ("gid_map", "%d %d 1" % (INNER_ID, gid))):
        with open("/proc/self/" + name, "w") as handle:
            handle.write(text)


def move_fd(descriptor, number):
    """Put ``descriptor`` at ``number`` (inheritable), whatever numbers are in use."""
    high = fcntl.fcntl(descriptor, fcntl.F_DUPFD, 64)
    os.close(descriptor)
    os.dup2(high, number)
    os.close(high)


def start_worker(config, nonce, status_fd):
    nonce_read, nonce_write = os.pipe()
    os.write(nonce_write, nonce.encode())
    os.close(nonce_write)
    started_read, started_write = os.pipe()
    pid = os.fork()
    if pid:
        os.close(nonce_read)
        os.close(started_write)
        return pid, started_read
    try:
        os.close(started_read)
        move_fd(nonce_read, NONCE_FD)
        move_fd(started_write, STARTED_FD)
        limits = config["limits"]
        limit(resource.RLIMIT_CPU, limits["cpu_seconds"])
        limit(resource.RLIMIT_AS, limits["memory_mb"] * 1024 * 1024)
        limit(resource.RLIMIT_FSIZE, limits["file_size_mb"] * 1024 * 1024)
        limit(resource.RLIMIT_NOFILE, limits["open_files"])
        limit(resource.RLIMIT_CORE, 0)
        user = config["uid"]
        if user is None:
            enter_inner_user_namespace()
            # Set after the nested namespace exists, so that it counts only this run's processes.
            limit(resource.RLIMIT_NPROC, limits["processes"])
            drop_capabilities()
        else:
            limit(resource.RLIMIT_NPROC, limits["processes"])
            drop_capabilities()  # needs CAP_SETPCAP, so before giving up root
            os.setgroups([])
            os.setgid(user)
            os.setuid(user)
        os.chdir(WORK)
        os.umask(0o077)
        environment = {"PATH": "/usr/bin:/bin", "HOME": WORK, "TMPDIR": WORK, "LANG": "C.UTF-8",
                       "PYTHONIOENCODING": "utf-8", "PYTHONHASHSEED": "0"}
        python = config["python"]
        os.execve(python, [python, "-I", "-S", "-B", "-c", RUNNER], environment)
    except BaseException as exc:  # never return into the init's code in the child
        report(status_fd, "fail the sandbox worker could not start: %r" % (exc,))
        sys.stderr.write("sandbox worker failed to start: %r\n" % (exc,))
        sys.stderr.flush()
        os._exit(125)


def main():
    config = json.loads(sys.argv[1])
    # The status pipe: kept above the low numbers the worker uses, and closed on exec.
    status_fd = fcntl.fcntl(config["status_fd"], fcntl.F_DUPFD_CLOEXEC, 64)
    os.close(config["status_fd"])
    program = sys.stdin.read()
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        setup(config, program)
    except (OSError, SetupError) as exc:
        fail(status_fd, str(exc))
    report(status_fd, "ok")
    nonce = os.urandom(16).hex()
    sys.stdout.write(nonce + "\n")  # first line of stdout: the nonce the parent will look for
    sys.stdout.flush()
    worker, started = start_worker(config, nonce, status_fd)
    os.close(status_fd)
    wall = config["limits"]["wall_seconds"]
    deadline = time.monotonic() + wall + STARTUP_GRACE
    waiting_for_start = True
    status = None
    while status is None:
        while True:  # reap the worker and any orphans the program reparented to us
            try:
                pid, code = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid, code = 0, 0
                break
            if pid == 0:
                break
            if pid == worker:
                status = code
        if status is not None:
            break
        if time.monotonic() >= deadline:
            os.kill(worker, signal.SIGKILL)
            sys.stderr.write("\nsandbox: wall time limit of %.1f s reached\n" % wall)
            sys.stderr.flush()
            os._exit(124)
        if waiting_for_start:
            ready, _, _ = select.select([started], [], [], 0.002)
            if ready:  # the runner's byte, or end of file if the worker is gone
                os.read(started, 1)
                os.close(started)
                waiting_for_start = False
                deadline = time.monotonic() + wall
        else:
            time.sleep(0.002)
    if os.WIFEXITED(status):
        os._exit(os.WEXITSTATUS(status))
    os._exit(128 + os.WTERMSIG(status))


main()

"""The code sandbox contains hostile programs: they fail, and the host and the harness are untouched.

Each hostile program is written so that it would *pass* only if its attack worked; the
tests check that it is scored as a failure and that, on the host, nothing it aimed at
changed and none of its processes survive.
"""

from __future__ import annotations

import gzip
import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from mergelab.evaluate import sandbox as sandbox_module
from mergelab.evaluate import evaluate
from mergelab.evaluate.sandbox import UID_BASE, Limits, Sandbox, SandboxError
from mergelab.evaluate.tasks.humaneval import bundled_problems_path

REPO = Path(__file__).resolve().parents[2]
FAST = Limits(wall_seconds=1.5, memory_mb=256, processes=8)


def sandboxed_processes() -> list[int]:
    """Host pids running under any sandbox uid."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        if uid >= UID_BASE:
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def box():
    sandbox = Sandbox(FAST)
    sandbox.check()
    yield sandbox
    assert sandboxed_processes() == []  # nothing a program started outlives its run
    assert sandbox.run("print('still here')").stdout == "still here"  # the harness and sandbox keep working


def test_an_ordinary_program_passes_and_sees_a_fresh_private_directory(box):
    outcome = box.run("import os\nprint(os.getcwd(), sorted(os.listdir('.')), os.getuid() != 0)")
    assert outcome.passed, outcome.stderr
    assert outcome.stdout == "/tmp/work ['program.py'] True"


def test_infinite_loop_times_out(box):
    started = time.monotonic()
    outcome = box.run("while True:\n    pass")
    assert outcome.status == "timed_out"
    assert time.monotonic() - started < 10


def test_fork_bomb_is_contained(box):
    program = (
        "import os\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        pass\n"
    )
    started = time.monotonic()
    outcome = box.run(program)
    assert not outcome.passed
    assert time.monotonic() - started < 10


def test_escaped_daemons_are_killed_when_the_run_ends(box):
    program = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    time.sleep(600)\n"
    )
    outcome = box.run(program)
    assert outcome.passed  # the program itself finished; the fixture checks its daemon is gone


def test_memory_bomb_fails(box):
    for program in ("blob = bytearray(8 * 1024 ** 3)", "chunks = []\nwhile True:\n    chunks.append(bytearray(32 * 1024 ** 2))"):
        outcome = box.run(program)
        assert outcome.status == "failed"
        assert "MemoryError" in outcome.stderr


def test_writes_outside_the_working_directory_fail(box):
    marker = f"sandbox-escape-{uuid.uuid4().hex}"
    targets = [f"/tmp/{marker}", str(REPO / marker), f"/var/tmp/{marker}", f"/dev/shm/{marker}", f"../{marker}",
               os.path.expanduser(f"~/{marker}")]
    for target in targets:
        outcome = box.run(f"open({target!r}, 'w').write('owned')\nprint('wrote')")
        assert outcome.status == "failed", target
        assert not Path(target.replace("..", "/tmp")).exists()
    assert not (REPO / marker).exists() and not Path("/tmp", marker).exists()


def test_deleting_host_files_fails(box, tmp_path):
    victims = [tmp_path / "victim.txt", REPO / f".sandbox-victim-{uuid.uuid4().hex}"]
    try:
        for victim in victims:
            victim.write_text("keep me")
            outcome = box.run(f"import os\nos.remove({str(victim)!r})")
            assert outcome.status == "failed"
            assert victim.read_text() == "keep me"
        outcome = box.run(f"import shutil\nshutil.rmtree({str(REPO / 'src')!r})")
        assert outcome.status == "failed"
        assert (REPO / "src" / "mergelab" / "__init__.py").is_file()
    finally:
        victims[1].unlink(missing_ok=True)


def test_environment_secrets_are_not_readable(box, monkeypatch):
    secret = f"hunter2-{uuid.uuid4().hex}"
    monkeypatch.setenv("MERGELAB_TEST_API_KEY", secret)
    program = (
        "import os\n"
        f"secret = {secret[:8]!r} + {secret[8:]!r}\n"
        "found = [k for k, v in os.environ.items() if secret in v]\n"
        "for pid in os.listdir('/proc'):\n"
        "    if pid.isdigit():\n"
        "        for name in ('environ', 'cmdline'):\n"
        "            try:\n"
        "                if secret.encode() in open(f'/proc/{pid}/{name}', 'rb').read():\n"
        "                    found.append(pid)\n"
        "            except OSError:\n"
        "                pass\n"
        "assert found, 'no secret found'\n"
    )
    outcome = box.run(program)
    assert outcome.status == "failed"
    assert "no secret found" in outcome.stderr


def test_no_network_and_no_inherited_descriptors(box):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    inheritable = os.open(__file__, os.O_RDONLY)
    os.set_inheritable(inheritable, True)
    try:
        port = server.getsockname()[1]
        outcome = box.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
        assert outcome.status == "failed"
        outcome = box.run("import os\nprint(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))")
        assert outcome.passed
        assert outcome.stdout == "[0, 1, 2, 3]"  # stdin, stdout, stderr, and the listing's own descriptor
    finally:
        os.close(inheritable)
        server.close()


def test_exiting_early_is_not_a_pass(box):
    for program in ("import sys\nsys.exit(0)\nassert False", "import os\nos._exit(0)\nassert False"):
        assert box.run(program).status == "failed"


def test_output_is_bounded(box):
    outcome = box.run("while True:\n    print('x' * 10000)")
    assert outcome.status == "timed_out"
    assert len(outcome.stdout) <= FAST.output_bytes


def test_many_programs_run_concurrently_in_order(box):
    outcomes = box.run_many([f"print({i})" for i in range(6)] + ["raise ValueError('boom')"], workers=3)
    assert [o.stdout for o in outcomes[:6]] == [str(i) for i in range(6)]
    assert outcomes[6].status == "failed" and "boom" in outcomes[6].detail


def test_a_machine_without_namespaces_gets_a_clear_error(monkeypatch):
    monkeypatch.setattr(sandbox_module, "_checked", {})
    sandbox = Sandbox(FAST)
    sandbox.unshare = None
    with pytest.raises(SandboxError, match="unshare"):
        sandbox.run("print('never runs')")


def status_fields(text: str) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def test_no_capabilities_and_no_new_privileges(box):
    outcome = box.run("print(open('/proc/self/status').read())")
    assert outcome.passed, outcome.stderr
    fields = status_fields(outcome.stdout)
    assert fields["NoNewPrivs"] == "1"
    for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[name], 16) == 0, name
    assert all(int(uid) != 0 for uid in fields["Uid"].split())


SU = shutil.which("su", path="/usr/bin:/bin")


@pytest.mark.skipif(SU is None or not os.stat(SU).st_mode & stat.S_ISUID, reason="needs a setuid-root `su` to attack")
def test_setuid_root_binaries_gain_nothing(box):
    """`su` waits for a password on a pipe; its effective uid shows whether the setuid bit took effect."""
    program = textwrap.dedent(f"""
        import os, subprocess, time
        read_end, _ = os.pipe()
        su = subprocess.Popen([{SU!r}, "-c", "id -u", "root"], stdin=read_end, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        uids = None
        for _ in range(300):
            try:
                status = open(f"/proc/{{su.pid}}/status").read()
            except OSError:
                status = ""
            if "\\nName:\\tsu\\n" in "\\n" + status and "Uid:" in status:
                uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
                break
            if su.poll() is not None:
                break
            time.sleep(0.01)
        su.kill()
        su.wait()
        print(uids)
        assert uids is not None and uids[1] == "0", f"su did not run as root: uids {{uids}}"
    """)
    outcome = box.run(program)
    assert outcome.status == "failed", outcome.stdout
    assert "su did not run as root" in outcome.stderr
    effective = outcome.stdout.strip()
    assert effective != "None" and "'0'" not in effective  # su started, and with no root uid at all


def test_dev_holds_only_harmless_character_devices(box):
    program = textwrap.dedent("""
        import json, os, stat
        kinds = {}
        for root, directories, files in os.walk("/dev"):
            for name in directories + files:
                mode = os.lstat(os.path.join(root, name)).st_mode
                kinds[os.path.join(root, name)] = ("block" if stat.S_ISBLK(mode) else "char" if stat.S_ISCHR(mode)
                                                   else "link" if stat.S_ISLNK(mode) else "dir" if stat.S_ISDIR(mode)
                                                   else "other")
        with open("/dev/null", "w") as sink:
            sink.write("discarded")
        assert len(open("/dev/urandom", "rb").read(16)) == 16
        print(json.dumps(kinds))
    """)
    outcome = box.run(program)
    assert outcome.passed, outcome.stderr
    kinds = json.loads(outcome.stdout)
    assert "block" not in kinds.values()
    assert sorted(path for path, kind in kinds.items() if kind == "char") == [
        "/dev/null", "/dev/random", "/dev/urandom", "/dev/zero"]


def test_host_directories_and_unix_sockets_are_out_of_reach(box, tmp_path):
    """Sockets under /tmp and /run (world-writable, so permissions would not stop a connection) and files under /work."""
    places = [tmp_path / "host.sock"]
    if os.access("/run", os.W_OK):
        places.append(Path("/run") / f"mergelab-sandbox-test-{uuid.uuid4().hex[:8]}.sock")
    servers = []
    try:
        for place in places:
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(str(place))
            os.chmod(place, 0o777)
            server.listen(4)
            servers.append(server)
        program = textwrap.dedent(f"""
            import socket
            reached = []
            for place in {[str(p) for p in places]!r}:
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    client.connect(place)
                    reached.append(place)
                except OSError as exc:
                    print(place, exc)
            for path in {[str(REPO / "pyproject.toml"), "/etc/hostname"]!r}:
                try:
                    reached.append((path, open(path).read(20)))
                except OSError as exc:
                    print(path, exc)
            assert reached, "nothing reached"
            print("reached", reached)
        """)
        outcome = box.run(program)
        assert outcome.passed, outcome.stderr  # /etc stays readable (Python and programs need it)...
        assert "reached [('/etc/hostname'" in outcome.stdout  # ...but nothing else was reached
        assert not any(str(place) in outcome.stdout.split("reached", 1)[1] for place in places)
        assert str(REPO) not in outcome.stdout.split("reached", 1)[1]
    finally:
        for server in servers:
            server.close()
        for place in places:
            Path(place).unlink(missing_ok=True)


def test_only_the_systems_own_top_level_directories_are_visible(box):
    """An allow-list: wherever the checkout, the data or a home directory lives (/work, /check, ...), it is empty."""
    kept = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "proc", "sys", "dev", "nix", "gnu"}
    program = textwrap.dedent("""
        import os
        view = {}
        for entry in sorted(os.listdir("/")):
            place = "/" + entry
            if os.path.islink(place):
                view[place] = ("link", os.path.realpath(place))
            elif os.path.isdir(place):
                view[place] = ("dir", sorted(os.listdir(place)))
            else:
                view[place] = ("file", os.path.getsize(place))
        print(view)
    """)
    outcome = box.run(program)
    assert outcome.passed, outcome.stderr
    view = eval(outcome.stdout)
    host = sorted(os.listdir("/"))
    assert sorted(place[1:] for place in view) == host  # the same names, so the program cannot tell it apart...
    interpreter = Path(sys.base_prefix).resolve()  # re-exposed read-only, so its path stays visible
    for place, (kind, seen) in view.items():
        if place[1:] in kept or kind == "link":  # a link leads to a kept place or a covered one, checked itself
            continue
        if kind == "file":
            assert seen == 0, place  # ...but every other top-level file is empty
        elif place == "/tmp":
            assert set(seen) <= {".empty", "work"}, seen
        elif interpreter.is_relative_to(place):
            assert seen == [interpreter.relative_to(place).parts[0]], (place, seen)
        else:
            assert seen == [], (place, seen)  # ...and every other directory too
    top = REPO.parts[1]
    assert top not in kept and view["/" + top][0] == "dir"  # the checkout's own top level is among the hidden


def test_the_process_limit_counts_only_this_run(box):
    """Two runs at once each get their own `processes` budget (worker + children)."""
    program = textwrap.dedent("""
        import os, time
        children = 0
        for _ in range(40):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            children += 1
        print(children)
    """)
    outcomes = box.run_many([program, program], workers=2)
    assert [o.stdout for o in outcomes] == [str(FAST.processes - 1)] * 2, [o.stderr for o in outcomes]


def test_a_failed_setup_is_an_error_not_a_wrong_answer(box, monkeypatch, tmp_path, jsonl):
    with gzip.open(bundled_problems_path(), "rt") as handle:
        problem = json.loads(handle.readline())
    samples = jsonl(tmp_path / "samples.jsonl", [{"task_id": problem["task_id"], "completion": problem["canonical_solution"]}])
    python, _ = sandbox_module._interpreter()
    with monkeypatch.context() as patch:
        patch.setattr(sandbox_module, "_interpreter", lambda: (python, "/nonexistent/python-prefix"))
        with pytest.raises(SandboxError, match=r"could not be set up: the Python installation /nonexistent/python-prefix"):
            box.run("print('never runs')")
        with pytest.raises(SandboxError, match="could not be set up"):  # the task stops; nothing is scored
            evaluate(None, None, [f"humaneval:samples={samples}"], limit=1)


def test_a_programs_own_exit_status_125_is_an_ordinary_failure(box):
    program = "import os, sys\nprint('ok')\nsys.stderr.write('fail forged\\n')\nos._exit(125)"
    outcome = box.run(program)
    assert outcome.status == "failed"
    assert outcome.returncode == 125 and "fail forged" in outcome.detail


# ---- the unprivileged path: the harness itself runs as a non-root user ------------------------------------------
UNPRIVILEGED_HARNESS = r"""
import json, os, sys, types
import mergelab
package = types.ModuleType("mergelab.evaluate")  # load the sandbox alone, without torch
package.__path__ = [SANDBOX_DIR]
sys.modules["mergelab.evaluate"] = package
from mergelab.evaluate.sandbox import Limits, Sandbox, SandboxError

box = Sandbox(Limits(wall_seconds=5.0, memory_mb=256, processes=8))
try:
    box.check()
except SandboxError as exc:
    print(json.dumps({"skip": str(exc)}))
    sys.exit(0)
names = list(PROGRAMS)
outcomes = box.run_many([PROGRAMS[name] for name in names] + [PROGRAMS["fork"]], workers=len(names) + 1)
print(json.dumps({"harness_uid": os.geteuid(), **{name: {"status": o.status, "stdout": o.stdout, "stderr": o.stderr[-600:]}
                  for name, o in zip(names + ["fork_again"], outcomes)}}))
"""
UNPRIVILEGED_PROGRAMS = {
    "identity": "print(open('/proc/self/status').read())",
    # Each attack passes only if it worked.
    "umount": textwrap.dedent("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        results = {}
        results["umount /tmp"] = libc.umount2(b"/tmp", 2) or 0
        results["umount /tmp errno"] = os.strerror(ctypes.get_errno())
        results["remount / rw"] = libc.mount(None, b"/", None, 32 | 4096, None)
        results["mount tmpfs"] = libc.mount(b"x", b"/tmp/work", b"tmpfs", 0, None)
        print(results)
        assert 0 in (results["umount /tmp"], results["remount / rw"], results["mount tmpfs"]), "no mount changed"
    """),
    "nested": textwrap.dedent("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x10000000 | 0x00020000) != 0:  # a new user + mount namespace of its own
            raise SystemExit("unshare: " + os.strerror(ctypes.get_errno()))
        result = libc.umount2(b"/tmp", 2)
        print("umount in a namespace of its own:", result, os.strerror(ctypes.get_errno()))
        assert result == 0, "the covering mounts are locked"
    """),
    "fork": textwrap.dedent("""
        import os, time
        children = 0
        for _ in range(40):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            children += 1
        print(children)
    """),
}


def test_the_unprivileged_path_holds_too(tmp_path):
    """Run the harness as `nobody` (its sandbox then uses `unshare --user --map-root-user`): the same guarantees."""
    if os.geteuid() != 0:
        pytest.skip("this suite already runs unprivileged, so every other sandbox test exercises this path")
    setpriv, unshare = shutil.which("setpriv"), shutil.which("unshare")
    if not setpriv or not unshare:
        pytest.skip("needs setpriv and unshare (util-linux) to start the harness as another user")
    # `nobody` must reach the interpreter, the venv and mergelab's source (an editable install). Where one lies
    # below a directory others cannot enter (/root, a mode-700 temporary clone), a private mount namespace
    # re-exposes it: bind it aside, cover that directory with an open tmpfs, move it back.
    needed = sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix), sys.prefix,
                     str(Path(sandbox_module.__file__).resolve().parents[2])})
    needed = [path for path in needed if not any(Path(path).is_relative_to(other) for other in needed if other != path)]
    blocked: dict[str, list[str]] = {}
    for path in needed:
        for ancestor in reversed(Path(path).parents):  # "/" first
            if ancestor != Path("/") and not os.stat(ancestor).st_mode & stat.S_IXOTH:
                blocked.setdefault(str(ancestor), []).append(path)
                break
    steps = []
    index = 0
    for top, paths in blocked.items():
        moves = []
        for path in paths:
            stage = tmp_path / f"stage{index}"
            index += 1
            stage.mkdir()
            steps.append(f"mount --rbind {shlex.quote(path)} {stage}")
            moves.append(f"mkdir -p {shlex.quote(path)} && mount --move {stage} {shlex.quote(path)}")
        steps.append(f"mount -t tmpfs -o mode=755 mergelab-test {shlex.quote(top)}")
        steps.extend(moves)
    harness = (UNPRIVILEGED_HARNESS.replace("SANDBOX_DIR", repr(str(Path(sandbox_module.__file__).parent)))
               .replace("PROGRAMS", repr(UNPRIVILEGED_PROGRAMS)))
    steps.append(f"exec {setpriv} --reuid=65534 --regid=65534 --clear-groups -- {shlex.quote(sys.executable)} -c "
                 + shlex.quote(harness))
    result = subprocess.run([unshare, "--mount", "--propagation", "private", "--", "/bin/sh", "-c", " && ".join(steps)],
                            capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if "skip" in report:
        pytest.skip(f"unprivileged user namespaces are not available here: {report['skip']}")
    assert report["harness_uid"] == 65534
    identity = report["identity"]
    assert identity["status"] == "passed", identity["stderr"]
    fields = status_fields(identity["stdout"])
    assert fields["NoNewPrivs"] == "1"
    assert all(int(fields[name], 16) == 0 for name in ("CapPrm", "CapEff", "CapBnd", "CapAmb"))
    assert fields["Uid"].split()[0] != "0"
    assert report["umount"]["status"] == "failed" and "no mount changed" in report["umount"]["stderr"]
    assert "Operation not permitted" in report["umount"]["stdout"]
    assert report["nested"]["status"] == "failed" and "the covering mounts are locked" in report["nested"]["stderr"]
    # Two runs at the same time each get their own process budget, whatever else `nobody` runs.
    assert report["fork"]["stdout"] == report["fork_again"]["stdout"] == "7", (report["fork"], report["fork_again"])


def test_every_mount_the_program_can_reach_is_nosuid_and_nodev(box):
    """Device files work only through the four bind-mounted nodes; no mount honours setuid bits."""
    outcome = box.run("print(open('/proc/self/mountinfo').read())")
    assert outcome.passed, outcome.stderr
    visible: dict[str, set[str]] = {}
    for line in outcome.stdout.splitlines():
        fields = line.split()
        visible[fields[4]] = set(fields[5].split(","))  # a later mount on the same point covers the earlier one
    assert visible, outcome.stdout
    devices = {"/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"}
    for point, options in visible.items():
        assert "nosuid" in options, (point, options)
        if point not in devices:
            assert "nodev" in options, (point, options)
        if point != "/tmp/work" and not point.startswith("/proc"):
            assert "ro" in options, (point, options)
    for place in ("/run", "/tmp", "/dev"):
        assert place in visible, place  # covered by the sandbox's own tmpfs


def test_without_permission_for_namespaces_nothing_runs_and_the_error_says_why(monkeypatch, tmp_path, jsonl):
    """Where `unshare` is refused (no root, unprivileged user namespaces disabled), scoring stops with SandboxError."""
    refusing = tmp_path / "unshare"
    marker = tmp_path / "ran"
    refusing.write_text(f"#!/bin/sh\necho ran > {marker}\necho 'unshare: unshare failed: Operation not permitted' >&2\n"
                        "exit 1\n")
    refusing.chmod(0o755)
    monkeypatch.setattr(sandbox_module, "_checked", {})
    original = Sandbox.__init__

    def with_refusing_unshare(self, limits=Limits()):
        original(self, limits)
        self.unshare = str(refusing)

    monkeypatch.setattr(Sandbox, "__init__", with_refusing_unshare)
    with pytest.raises(SandboxError, match=r"Operation not permitted.*permission to create namespaces.*never run unsandboxed"):
        Sandbox(FAST).run("open('/tmp/escaped', 'w')")
    marker.unlink()
    with gzip.open(bundled_problems_path(), "rt") as handle:
        problem = json.loads(handle.readline())
    samples = jsonl(tmp_path / "samples.jsonl", [{"task_id": problem["task_id"], "completion": problem["canonical_solution"]}])
    with pytest.raises(SandboxError, match="permission to create namespaces"):  # not a pass@1 of 0
        evaluate(None, None, [f"humaneval:samples={samples}"], limit=1)
    assert not marker.exists()  # the probe failed once; nothing was attempted again, and no program ran anywhere

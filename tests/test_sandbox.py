"""The sandbox: normal runs, and escape attempts that must be stopped and reported (docs/sandbox.md)."""
import ctypes
import errno
import glob
import os
import platform
import resource
import socket
import sys
import tempfile
import threading
import time
import uuid

import pytest

from exocortex.infer import sandbox
from exocortex.infer.sandbox import MARKER, isolation_layers, python_tool, run_python
from exocortex.infer.tools import format_tool_call, run_tool_call

PARENT_LIMITS = {r: resource.getrlimit(r) for r in (resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_NPROC,
                                                     resource.RLIMIT_FSIZE, resource.RLIMIT_NOFILE)}
PARENT_PID = os.getpid()


def layer_on(name):
    return isolation_layers().get(name, "off").startswith("on")


def needs(*layers):
    missing = [name for name in layers if not layer_on(name)]
    return pytest.mark.skipif(bool(missing), reason=f"layer(s) {missing} not available here: {isolation_layers()}")


def stray_sandbox_processes():
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if MARKER.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


def no_strays_soon(seconds=3.0):
    """SIGKILL to the group is delivered asynchronously: killed children may take a moment to be gone."""
    deadline = time.monotonic() + seconds
    while stray_sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.02)
    return stray_sandbox_processes() == []


# ------------------------------------------------------------------------------------------ normal use
def test_prints_and_reports_layers():
    r = run_python("import math\nprint(math.factorial(10))\nprint('héllo 🙂')")
    assert r.ok and r.returncode == 0 and not r.timed_out and r.killed_reason is None
    assert r.stdout == "3628800\nhéllo 🙂\n" and r.stderr == ""
    assert r.error is None and r.seconds < 5
    for layer in ("workdir", "session", "isolated_python", "rlimits", "netns", "landlock", "seccomp", "prelude"):
        assert layer in r.layers


def test_exception_and_syntax_error_reported():
    r = run_python("def f(x):\n    return 1 / x\nf(0)\n")
    assert not r.ok and r.returncode == 1 and not r.timed_out
    assert r.error == "ZeroDivisionError: division by zero"
    assert 'File "main.py", line 2, in f' in r.stderr and "<string>" not in r.stderr  # prelude frame hidden
    r = run_python("def f(:\n")
    assert not r.ok and r.error.startswith("SyntaxError")
    r = run_python("import sys; print('bye'); sys.exit(3)")
    assert r.returncode == 3 and r.stdout == "bye\n" and not r.ok


def test_stdin_main_and_threads():
    r = run_python("import sys\nif __name__ == '__main__':\n    print(sys.stdin.read().upper())", stdin="abc")
    assert r.ok and r.stdout == "ABC\n"
    r = run_python("import threading\nout = []\nts = [threading.Thread(target=out.append, args=(i,)) for i in range(8)]\n"
                   "[t.start() for t in ts]\n[t.join() for t in ts]\nprint(sorted(out) == list(range(8)))")
    assert r.ok and r.stdout == "True\n", r.stderr  # threads are not processes: allowed


def test_socketpair_and_asyncio_work_network_stays_off():
    """docs/sandbox.md allows socketpair (and so asyncio's self-pipe); only new network sockets are refused."""
    r = run_python("import socket\na, b = socket.socketpair()\na.sendall(b'ping')\nprint(b.recv(4).decode())")
    assert r.ok and r.stdout == "ping\n", r.stderr
    r = run_python("import asyncio\nasync def f():\n    await asyncio.sleep(0.01)\n    return 6 * 7\n"
                   "print(asyncio.run(f()))")
    assert r.ok and r.stdout == "42\n", r.stderr
    for disable in [(), ("netns", "landlock", "seccomp")]:  # the prelude alone still refuses socket()
        r = run_python("import socket\nsocket.socket()", disable_layers=disable)
        assert not r.ok and "PermissionError" in r.error


@pytest.mark.parametrize("disable", [(), ("prelude",)], ids=["prelude", "bare"])
def test_output_survives_a_thread_that_outlives_the_call(disable):
    """Main's output is flushed before the interpreter waits for a thread the timeout then kills."""
    code = ("import sys, threading, time\nprint('before')\nthreading.Thread(target=time.sleep, args=(60,)).start()\n"
            "sys.stdout.write('after')\nsys.stderr.write('err')")
    r = run_python(code, timeout_s=1.0, disable_layers=disable)
    assert r.timed_out and r.stdout == "before\nafter" and r.stderr == "err", r
    r = run_python("import time\nprint('progress')\nwhile True:\n    pass", timeout_s=1.0, disable_layers=disable)
    assert r.timed_out and r.stdout == "progress\n"


def test_fresh_workdir_minimal_env_removed_after():
    r = run_python("import os, sys\nopen('a.txt', 'w').write('x')\nos.mkdir('d')\nprint(os.getcwd())\n"
                   "print(sorted(os.listdir('.')))\nprint(sorted(os.environ))\nprint(sys.flags.isolated)")
    assert r.ok, r.stderr
    cwd, listing, env, isolated = r.stdout.splitlines()
    assert listing == "['a.txt', 'd', 'main.py']"
    assert set(eval(env)) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "LC_CTYPE"}
    assert isolated == "1"
    assert not os.path.exists(cwd)


# ------------------------------------------------------------------------------------- escape attempts
def test_infinite_loop_killed_within_timeout():
    r = run_python("while True:\n    pass", timeout_s=1.0)
    assert r.timed_out and r.killed_reason == "timeout" and not r.ok and r.returncode == -9
    assert r.seconds < 2.5
    r = run_python("import time\ntime.sleep(60)", timeout_s=0.5)  # sleeping uses no CPU: the wall clock kills
    assert r.timed_out and r.seconds < 2.0


def test_rlimits_set_in_child():
    r = run_python("import resource as r\nfor n in ('CPU', 'AS', 'FSIZE', 'NOFILE', 'CORE'):\n"
                   "    print(r.getrlimit(getattr(r, 'RLIMIT_' + n))[0])", timeout_s=1.0, memory_mb=200)
    assert r.stdout.split() == ["2", str(200 * 2 ** 20), str(16 * 2 ** 20), "64", "0"]


def test_memory_bomb_contained():
    r = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))", memory_mb=128)
    assert not r.ok and r.killed_reason == "memory_limit" and not r.timed_out, r
    r = run_python("x = bytearray(10 ** 9)")
    assert r.killed_reason == "memory_limit"
    r = run_python("x = bytearray(50 * 10 ** 6)\nprint(len(x))")  # within the limit: fine
    assert r.ok and r.stdout == "50000000\n"


def test_fork_bomb_contained():
    r = run_python("import os\nwhile True:\n    os.fork()", timeout_s=3.0)
    assert not r.ok and r.seconds < 3.5
    if layer_on("seccomp"):
        assert "PermissionError" in r.error and not r.timed_out
    r = run_python("import subprocess\nsubprocess.run(['true'])", timeout_s=3.0)
    assert not r.ok
    assert stray_sandbox_processes() == []


@pytest.mark.skipif(os.geteuid() == 0 and not layer_on("uid"),
                    reason="RLIMIT_NPROC does not apply to root (not dropped to nobody here); seccomp holds there")
def test_fork_bomb_rlimit_nproc_alone():
    code = ("import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(30)\n"
            "        n += 1\nexcept OSError as e:\n    print(n, e.errno)")
    r = run_python(code, timeout_s=3.0, disable_layers=("seccomp",))
    n, err = r.stdout.split()
    assert err == "11" and int(n) < 200  # EAGAIN after a bounded number of processes
    assert no_strays_soon()  # the sleeping children died with the process group


@pytest.mark.parametrize("disable", [(), ("prelude",)], ids=["all", "kernel-only"])
def test_write_outside_workdir_refused(disable, tmp_path):
    if disable and not layer_on("landlock"):
        pytest.skip("landlock not available: only the prelude guards writes here")
    targets = [f"/tmp/exocortex-escape-{uuid.uuid4().hex}", str(tmp_path / "escape.txt"),
               os.path.expanduser(f"~/exocortex-escape-{uuid.uuid4().hex}")]
    for target in targets:
        r = run_python(f"open({target!r}, 'w').write('escaped')", disable_layers=disable)
        assert not r.ok and "PermissionError" in r.error, r
        assert not os.path.exists(target)
    r = run_python(f"import os\nos.symlink('/tmp', 'link')\nopen('link/exocortex-{uuid.uuid4().hex}', 'w')",
                   disable_layers=disable)
    assert not r.ok and "PermissionError" in r.error
    r = run_python(f"import os\nos.mkdir({str(tmp_path / 'newdir')!r})", disable_layers=disable)
    assert not r.ok and not (tmp_path / "newdir").exists()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    r = run_python(f"import os\nos.remove({str(victim)!r})", disable_layers=disable)
    assert not r.ok and victim.read_text() == "keep"


def test_file_size_and_open_files_limited():
    r = run_python("open('big', 'wb').write(b'x' * (32 * 1024 * 1024))")
    assert not r.ok and r.killed_reason == "file_size_limit"
    r = run_python("files = [open(f'f{i}', 'w') for i in range(200)]")
    assert not r.ok and "Too many open files" in r.error


NETWORK_LAYERS = ["prelude", "seccomp", "landlock", "netns"]


@pytest.mark.parametrize("only", [None] + NETWORK_LAYERS)
def test_network_access_fails(only):
    """All layers together, then each network layer alone (the others switched off)."""
    if only and only != "prelude" and not layer_on(only):
        pytest.skip(f"{only} not available here")
    disable = tuple(x for x in NETWORK_LAYERS if only and x != only)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.05)
    port = server.getsockname()[1]
    try:
        code = (f"import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n"
                "s.sendall(b'escaped')\nprint('connected')")
        r = run_python(code, disable_layers=disable)
        assert not r.ok and "connected" not in r.stdout and not r.timed_out, r
        assert any(e in r.error for e in ("PermissionError", "Network is unreachable")), r.error
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()
    if only is None:  # lower-level constructors too
        for code in ("import _socket\n_socket.socket()", "import socket\nsocket.create_connection(('1.1.1.1', 80), 1)",
                     "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nfd = libc.socket(2, 1, 0)\n"
                     "assert fd >= 0, ctypes.get_errno()"):
            r = run_python(code)
            assert not r.ok and not r.timed_out, (code, r)


def test_output_flood_truncated():
    r = run_python("while True:\n    print('x' * 1000)", max_output_bytes=4096)
    assert r.killed_reason == "output_limit" and r.truncated and not r.ok
    assert len(r.stdout) == 4096 and r.seconds < 3
    r = run_python("import sys\nwhile True:\n    sys.stderr.write('e' * 1000)", max_output_bytes=4096)
    assert r.killed_reason == "output_limit" and len(r.stderr) == 4096


@needs("seccomp")
def test_signals_to_other_processes_refused():
    r = run_python(f"import os\nos.kill({PARENT_PID}, 0)\nprint('signalled')")
    assert not r.ok and "signalled" not in r.stdout and "PermissionError" in r.error
    r = run_python("import os, signal\nsignal.signal(signal.SIGUSR1, lambda *a: print('self ok'))\n"
                   "os.kill(os.getpid(), signal.SIGUSR1)")
    assert r.ok and r.stdout == "self ok\n"


@needs("seccomp")
@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 32-bit syscall entry")
def test_foreign_syscall_abi_kills():
    code = ("import ctypes, mmap\nbuf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
            "buf.write(bytes([0xB8, 0x14, 0, 0, 0, 0xCD, 0x80, 0xC3]))  # mov eax, 20; int 0x80; ret\n"
            "f = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))\nprint(f())")
    r = run_python(code)
    assert r.killed_reason == "seccomp" and r.stdout == ""


def test_python_tool(monkeypatch):
    monkeypatch.setattr(sandbox, "TOOL_TIMEOUT_S", 1.0)
    assert python_tool("print(6 * 7)") == "42"
    assert python_tool("x = 1") == "(no output)"
    assert python_tool("print('partial')\n1/0") == "partial\nerror: ZeroDivisionError: division by zero"
    assert python_tool("while True: pass").startswith("error: timed out")
    assert python_tool("print('y' * 100000)").endswith("[output truncated]")
    assert run_tool_call(format_tool_call("python", {"code": "print(sum(range(10)))"})) == "45"  # the built-in


def test_bad_layer_name_is_an_error():
    with pytest.raises(ValueError):
        run_python("pass", disable_layers=("rlimits",))


# ------------------------------------------------------------------------- cleanup, disk budget, uid, fail closed
TRAPS = """import os
top = os.getcwd()
print(top)
for i in range(1500):  # deeper than PATH_MAX, and than Python's recursion limit
    os.mkdir('d')
    os.chdir('d')
os.chdir(top)
os.makedirs('ro/sub')
open('ro/sub/f', 'w').write('x')
os.chmod('ro/sub/f', 0o400)
os.chmod('ro/sub', 0o500)
os.chmod('ro', 0)              # a directory nobody may enter or list
os.symlink({victim!r}, 'out')  # a link out of the tree: must not be followed
os.symlink('/', 'root')
os.mkfifo('fifo')
os.makedirs('many')
for i in range(3000):
    open(f'many/{{i}}', 'w').close()
print('trapped')
"""


def test_cleanup_survives_a_booby_trapped_tree(tmp_path):
    """With the tmpfs layer off, the program's files are on the real disk: all of them must still go, the
    link's target must stay, and the call must answer."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    r = run_python(TRAPS.format(victim=str(victim)), timeout_s=20.0, disable_layers=("tmpfs",))
    assert r.ok and r.stdout.endswith("trapped\n"), r
    assert r.cleanup_error is None and not os.path.exists(r.stdout.splitlines()[0])
    assert (victim / "keep.txt").read_text() == "keep"


def test_remove_tree_beyond_path_max_and_modes(tmp_path):
    top = tmp_path / "tree"
    fd = os.open(tmp_path, os.O_RDONLY)
    os.mkdir("tree", dir_fd=fd)
    for _ in range(30):  # 30 x 200 characters > PATH_MAX (4096)
        nxt = os.open("tree" if _ == 0 else "n" * 200, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nxt
        os.mkdir("n" * 200, dir_fd=fd)
    os.close(fd)
    with pytest.raises(OSError):
        os.stat(str(top) + ("/" + "n" * 200) * 30)  # ENAMETOOLONG: a path-based remover cannot reach it
    (top / "locked").mkdir()
    (top / "locked" / "f").write_text("x")
    (top / "locked").chmod(0)
    assert sandbox._cleanup(str(top)) is None and not top.exists()
    assert sandbox._cleanup(str(top)) is None  # already gone: fine


def test_cleanup_failure_never_raises(monkeypatch):
    def broken(path):
        raise OSError(16, "Device or resource busy")
    before = set(glob.glob(f"{tempfile.gettempdir()}/exocortex-sandbox-*"))
    monkeypatch.setattr(sandbox, "_remove_hostile_tree", broken)
    try:
        r = run_python("print('answer')")
        assert r.ok and r.stdout == "answer\n" and "could not remove" in r.cleanup_error
        assert python_tool("print(6 * 7)") == "42\n[sandbox: its working directory could not be removed]"
    finally:
        monkeypatch.undo()
        left = set(glob.glob(f"{tempfile.gettempdir()}/exocortex-sandbox-*")) - before
        assert len(left) == 2 and all(sandbox._cleanup(d) is None for d in left)


DISK_FILL = """import os
written = 0
try:
    for i in range(12):  # 12 x 12 MiB: each under RLIMIT_FSIZE, together over the disk budget
        with open(f'f{i}', 'wb') as f:
            for _ in range(12):
                f.write(b'x' * 2 ** 20)
                f.flush()
                written += 2 ** 20
finally:
    print(written >> 20)
"""


@needs("tmpfs")
def test_disk_budget_bounds_all_files_together():
    r = run_python(DISK_FILL, timeout_s=10.0)
    assert r.killed_reason == "disk_limit" and "No space left" in r.error, r
    assert int(r.stdout) <= sandbox.DISK_BYTES >> 20
    r = run_python("import os\nfor i in range(20000):\n    open(f'e{i}', 'w').close()", timeout_s=10.0)
    assert r.killed_reason == "disk_limit", r  # empty files: the inode budget
    r = run_python(DISK_FILL, timeout_s=10.0, disable_layers=("tmpfs",))  # without it: 144 MiB reach the disk
    assert r.ok and int(r.stdout) == 144 and r.cleanup_error is None


@needs("uid")
def test_root_only_files_unreadable(tmp_path):
    secret = f"/tmp/exocortex-secret-{uuid.uuid4().hex}"
    with open(os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write("s3cret")
    try:
        code = f"import os\nprint(os.getuid())\nprint(open({secret!r}).read())"
        r = run_python(code)
        assert not r.ok and "PermissionError" in r.error and "s3cret" not in r.stdout, r
        if os.geteuid() == 0:
            assert int(r.stdout.split()[0]) in sandbox.SANDBOX_UIDS
            r = run_python(code, disable_layers=("uid",))  # the protection removed: root's file is read
            assert r.ok and "s3cret" in r.stdout
    finally:
        os.remove(secret)


def probe_without(monkeypatch, layer):
    layers = dict(isolation_layers(), **{layer: "off: not supported by this kernel"})
    monkeypatch.setattr(sandbox, "isolation_layers", lambda: layers)


@pytest.mark.parametrize("layer", sandbox.REQUIRED_LAYERS)
def test_fails_closed_without_a_required_layer(monkeypatch, layer):
    monkeypatch.delenv("EXOCORTEX_SANDBOX", raising=False)
    probe_without(monkeypatch, layer)
    enabled, reason = sandbox.python_tool_status()
    assert not enabled and f"{layer} (off: not supported" in reason and "EXOCORTEX_SANDBOX=degraded" in reason
    assert "\n" not in reason
    assert python_tool("print(1)") == f"error: {reason}"
    assert run_tool_call(format_tool_call("python", {"code": "print(1)"})) == f"error: {reason}"
    with pytest.raises(sandbox.SandboxUnavailable):
        run_python("print(1)")
    assert run_python("print(1)", disable_layers=(layer,)).ok  # switched off on purpose: a measurement


def test_degraded_only_by_explicit_opt_in(monkeypatch):
    probe_without(monkeypatch, "seccomp")
    monkeypatch.setenv("EXOCORTEX_SANDBOX", "yes")  # anything but the exact word keeps it closed
    assert not sandbox.python_tool_status()[0]
    assert sandbox.python_tool_status(allow_degraded=True)[0]
    monkeypatch.setenv("EXOCORTEX_SANDBOX", "degraded")
    enabled, reason = sandbox.python_tool_status()
    assert enabled and reason.startswith("warning: the python tool runs in a degraded sandbox")
    assert python_tool("print(6 * 7)") == "42"
    assert not sandbox.python_tool_status(allow_degraded=False)[0]
    monkeypatch.undo()
    assert sandbox.python_tool_status() == (True, None) or not layer_on("seccomp")


def test_chat_says_at_start_that_the_python_tool_is_off(monkeypatch, capsys):
    from exocortex.apps import chat
    from exocortex.config import RunConfig
    monkeypatch.delenv("EXOCORTEX_SANDBOX", raising=False)
    probe_without(monkeypatch, "landlock")
    monkeypatch.setattr(chat, "load_engine", lambda *a, **k: object())
    monkeypatch.setattr(chat, "warm_up_decoder", lambda *a: None)
    monkeypatch.setattr(chat, "stream_reply", lambda *a, **k: [])
    chat.run_chat(RunConfig(), prompt="hi")
    err = capsys.readouterr().err.strip()
    assert err.startswith("the python tool is off: this kernel lacks sandbox layer(s) landlock") and "\n" not in err


class FailingLibc:
    """libc as the child sees it (it is forked from this process), with one call failing as the kernel would
    under load: `fails(name, args)` says when."""

    def __init__(self, fails, err):
        self.real, self.fails, self.err = sandbox._libc, fails, err

    def __getattr__(self, name):
        real = getattr(self.real, name)

        def call(*args):
            if self.fails(name, args):
                ctypes.set_errno(self.err)
                return -1
            return real(*args)
        return call


@needs("netns", "tmpfs")
@pytest.mark.parametrize("layer, fails, err", [
    ("netns", lambda name, args: name == "unshare", errno.EAGAIN),
    ("tmpfs", lambda name, args: name == "mount" and args[2] == b"tmpfs" and b"exocortex-sandbox-" in args[1],
     errno.ENOMEM),
], ids=["unshare-EAGAIN", "tmpfs-ENOMEM"])
def test_a_layer_failing_in_this_call_stops_the_program(monkeypatch, tmp_path, layer, fails, err):
    """The probe found the layer; this one call cannot have it: the program must not run at all."""
    isolation_layers()  # probed (and cached) before the failure is injected
    marker = tmp_path / "ran"
    monkeypatch.setattr(sandbox, "_libc", FailingLibc(fails, err))
    r = run_python(f"open({str(marker)!r}, 'w').close()\nprint('ran')", disable_layers=("landlock",))
    assert not r.ok and r.stdout == "" and r.killed_reason == "start_failed", r
    assert r.error.startswith("sandbox: refused to run the program") and layer in r.error, r.error
    assert errno.errorcode[err] in r.layers[layer] and not marker.exists()
    assert python_tool("print('ran')").startswith("error: sandbox: refused to run")
    monkeypatch.setenv("EXOCORTEX_SANDBOX", "degraded")  # a probe-found layer is still asked for per call
    assert not run_python("print('ran')").ok


SECRET_HOLDER = """import os, time
SECRET = 'exo-secret-{tag}'
open('notes.txt', 'w').write(SECRET)
print(os.getcwd(), flush=True)
time.sleep(4)
"""
SNOOPER = """import glob, os
def snoop(d):
    if os.path.realpath(d) == os.getcwd():  # its own
        return
    print(os.listdir(d))
    for name in ('main.py', 'notes.txt'):
        print(open(os.path.join(d, name)).read())
for d in glob.glob({pattern!r}) + glob.glob('/proc/[0-9]*/cwd'):
    try:
        snoop(d)
    except OSError:
        pass
"""


@pytest.mark.parametrize("disable", [(), ("tmpfs",)], ids=["tmpfs", "no-tmpfs"])
def test_concurrent_calls_cannot_read_each_other(disable):
    if "tmpfs" not in disable and not layer_on("tmpfs"):
        pytest.skip("tmpfs not available here")
    tag = uuid.uuid4().hex
    first = {}
    holder = threading.Thread(target=lambda: first.update(
        r=run_python(SECRET_HOLDER.format(tag=tag), timeout_s=8.0, disable_layers=disable)))
    before = set(glob.glob(f"{tempfile.gettempdir()}/exocortex-sandbox-*"))
    holder.start()
    deadline = time.monotonic() + 5
    while set(glob.glob(f"{tempfile.gettempdir()}/exocortex-sandbox-*")) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # the first program has started and written its file
    r = run_python(SNOOPER.format(pattern=f"{tempfile.gettempdir()}/exocortex-sandbox-*"), disable_layers=disable)
    holder.join()
    assert r.ok, r
    assert first["r"].ok and first["r"].stdout.strip(), first["r"]
    assert tag not in r.stdout, r.stdout
    assert "notes.txt" not in r.stdout


@pytest.mark.skipif(os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK),
                    reason="root, and an interpreter outside /root, needed")
@needs("netns", "tmpfs", "uid")
def test_root_without_cap_sys_admin_uses_a_user_namespace(monkeypatch, tmp_path):
    """An unprivileged container: root's own unshare of the network and mount namespaces gets EPERM."""
    isolation_layers()
    for name in ("executable", "prefix", "base_prefix", "exec_prefix", "base_exec_prefix"):
        monkeypatch.setattr(sys, name, "/usr/bin/python3" if name == "executable" else "/usr")
    monkeypatch.setattr(sandbox, "_libc", FailingLibc(
        lambda name, args: name == "unshare" and not args[0] & sandbox.CLONE_NEWUSER, errno.EPERM))
    secret = tmp_path / "root-only"
    secret.write_text("s3cret")
    secret.chmod(0o600)
    r = run_python(f"import os\nprint(os.getuid())\n"
                   "print([ln.split(':')[0].strip() for ln in open('/proc/self/net/dev').readlines()[2:]])\n"
                   f"print(open({str(secret)!r}).read())")
    assert not r.ok and "PermissionError" in r.error and "s3cret" not in r.stdout, r
    uid, interfaces = r.stdout.splitlines()
    assert int(uid) in sandbox.SANDBOX_UIDS and interfaces == "['lo']"
    assert r.layers["netns"] == "on: user+net namespace" and r.layers["tmpfs"].startswith("on")
    assert "no CAP_SYS_ADMIN" in r.layers["uid"]


@needs("uid")
def test_only_the_interpreters_directories_are_bound_back():
    """Under a directory the sandbox uid cannot search (/root), a world-readable sibling of the interpreter's
    directories stays invisible; a TMPDIR under such a directory is a clear error."""
    plan, _ = sandbox._reach_plan(min(sandbox.SANDBOX_UIDS), os.path.join(tempfile.gettempdir(), "w"))
    if not plan:
        pytest.skip("the interpreter needs no directory bound back here")
    blocked = plan[0][0]
    needed = min(d for d in sandbox._interpreter_dirs() if d.startswith(blocked + "/"))
    sibling = os.path.join(os.path.dirname(needed), f"exocortex-sibling-{uuid.uuid4().hex}")
    os.mkdir(sibling, 0o755)
    try:
        with open(os.path.join(sibling, "f"), "w") as f:
            f.write("visible")
        os.chmod(os.path.join(sibling, "f"), 0o644)
        r = run_python(f"import os\nprint(os.path.exists({sibling!r}))\nprint(os.path.exists({needed!r}))")
        assert r.ok and r.stdout.split() == ["False", "True"], r
    finally:
        os.remove(os.path.join(sibling, "f"))
        os.rmdir(sibling)
    hidden_tmp = os.path.join(blocked, f"exocortex-tmp-{uuid.uuid4().hex}")
    os.mkdir(hidden_tmp)
    try:
        tempfile.tempdir = hidden_tmp
        r = run_python("print('ran')")
        assert not r.ok and r.stdout == "" and "set TMPDIR" in r.error and "\n" not in r.error, r
    finally:
        tempfile.tempdir = None
        os.rmdir(hidden_tmp)


def test_parent_unaffected():
    """Runs last in this file: the test process still has its limits, network, files, and no strays."""
    assert os.getpid() == PARENT_PID
    assert {r: resource.getrlimit(r) for r in PARENT_LIMITS} == PARENT_LIMITS
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
    path = f"/tmp/exocortex-parent-{uuid.uuid4().hex}"
    with open(path, "w") as f:
        f.write("ok")
    os.remove(path)
    assert stray_sandbox_processes() == []
    assert run_python("print('still fine')").stdout == "still fine\n"

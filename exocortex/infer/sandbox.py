"""Run untrusted Python (a model's python tool, generated code being graded) in a limited subprocess.

`run_python(code)` writes the code to `main.py` in a fresh throwaway directory and runs it with
`python -I -S -B` in a new session, under these layers (docs/sandbox.md says what each guarantees and what
was measured):

- hard, always:    throwaway working directory (removed after, by a remover that never raises or follows a
                   link); minimal environment; resource limits
                   (RLIMIT_CPU, RLIMIT_AS, RLIMIT_NPROC, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0); a new
                   session whose whole process group is SIGKILLed on wall-clock timeout, on output flood
                   and after the program exits; output read incrementally and capped.
- hard, Linux, where the kernel allows (each detected and reported in `SandboxResult.layers`):
    netns          unshare(CLONE_NEWNET | CLONE_NEWNS), in a new user namespace for a non-root caller (and for
                   root without CAP_SYS_ADMIN, after dropping its uid): no network interface but a downed loopback;
    tmpfs          the working directory is a 64 MiB tmpfs in that mount namespace, main.py written into it
                   by the child: the disk budget;
    uid            a root caller runs each call as a uid of its own (SANDBOX_UIDS), so root-only files and
                   other calls' files stay unreadable;
    landlock       file writes, creates, removes and renames only beneath the working directory (and
                   /dev/null); TCP bind/connect denied (ABI >= 4); signals and abstract unix sockets scoped to
                   the sandbox (ABI >= 6);
    seccomp        (x86_64, aarch64) no new processes (fork/vfork/clone without CLONE_THREAD; threads are
                   fine), no socket(), no signals to other processes, no ptrace, mount, namespaces, io_uring,
                   bpf, kernel modules, ...; a syscall of another ABI (x86 int 0x80, x32) kills the process.
- soft, in-process: a prelude that replaces socket constructors and refuses opens for writing and other
                   path-modifying os calls outside the working directory, with readable errors. Code can undo
                   it (ctypes, gc); it is a first line that explains, not a guarantee.

Without one of REQUIRED_LAYERS it fails closed (SandboxUnavailable; the python tool answers with the reason)
unless the user opts in with EXOCORTEX_SANDBOX=degraded: see `python_tool_status`. A layer the probe found
that fails for one call stops that call in the child, before exec: the program does not run.

Everything that must run in the child before the interpreter starts happens in `preexec_fn`, built from
objects prepared in the parent (no imports, as little allocation as possible), and each layer's outcome is
sent back to the parent on a pipe so it can be reported.
"""
from __future__ import annotations

import ctypes
import errno
import math
import os
import platform
import pwd
import resource
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache

from exocortex.errors import ExocortexError

__all__ = ["SandboxResult", "SandboxUnavailable", "run_python", "python_tool", "python_tool_status",
           "isolation_layers", "OPTIONAL_LAYERS", "REQUIRED_LAYERS"]

OPTIONAL_LAYERS = ("netns", "tmpfs", "uid", "landlock", "seccomp", "prelude")  # may be switched off (measuring)
REQUIRED_LAYERS = ("netns", "tmpfs", "uid", "landlock", "seccomp")  # without one, the sandbox fails closed
OPT_IN_VAR, OPT_IN_VALUE = "EXOCORTEX_SANDBOX", "degraded"  # the user's explicit opt-in to a weaker sandbox
MARKER = "# exocortex-sandbox"  # first line of the child's -c program: lets tests find stray processes
MAX_FILE_BYTES = 16 * 1024 * 1024
DISK_BYTES = 64 * 1024 * 1024  # all files of one call together (the working directory is a tmpfs this size)
MAX_INODES = 16384             # files + directories in it: bounds the kernel memory a flood of empty files takes
# A root caller runs each call as its own uid from this range (nobody's neighbours, unused by Debian and
# systemd), so concurrent calls cannot read each other's files or signal each other's processes.
SANDBOX_UIDS = range(65500, 65534)
MAX_OPEN_FILES = 64
TOOL_OUTPUT_CHARS = 2000
TOOL_TIMEOUT_S = 5.0


@dataclass
class SandboxResult:
    ok: bool                      # exited 0, not killed, not timed out
    stdout: str
    stderr: str
    returncode: int | None        # negative: killed by that signal
    timed_out: bool
    killed_reason: str | None     # timeout | output_limit | cpu_limit | memory_limit | file_size_limit | signal:NAME
    seconds: float
    truncated: bool = False       # stdout or stderr was cut at max_output_bytes
    layers: dict = field(default_factory=dict)  # layer -> "on" / "on: detail" / "off: why"
    cleanup_error: str | None = None  # why the working directory could not be removed (None: it was)

    @property
    def error(self) -> str | None:
        """A one-line reason for failure (None when ok), e.g. 'ZeroDivisionError: division by zero'."""
        if self.ok:
            return None
        if self.timed_out:
            return f"timed out after {self.seconds:.1f}s"
        if self.killed_reason == "output_limit":
            return "output limit exceeded"
        lines = [ln for ln in self.stderr.strip().splitlines() if ln.strip()]
        if lines:
            return lines[-1].strip()
        return f"killed ({self.killed_reason})" if self.killed_reason else f"exit status {self.returncode}"


# ---------------------------------------------------------------------------------------------- the prelude
# Runs in the child as `python -c`, before user code, in the throwaway directory. Defence in depth only.
PRELUDE = MARKER + r'''
import builtins, errno, io, os, sys, types, traceback
import socket as _sockmod, _socket
_cwd = os.path.realpath(os.getcwd())
_devnull = os.path.realpath(os.devnull)

def _inside(p):
    if isinstance(p, int):
        return True
    try:
        full = os.path.realpath(os.path.join(_cwd, os.fsdecode(p)))
    except Exception:
        return False
    return full == _cwd or full.startswith(_cwd + os.sep) or full == _devnull

def _deny(what, p):
    raise PermissionError(errno.EACCES, "sandbox: " + what + " outside the working directory is not allowed", str(p))

_open = builtins.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if any(c in str(mode) for c in "wax+") and not _inside(file):
        _deny("writing", file)
    return _open(file, mode, *args, **kwargs)
builtins.open = io.open = _guarded_open

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_os_open = os.open
def _guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
    if flags & _WRITE_FLAGS and (dir_fd is not None or not _inside(path)):
        _deny("writing", path)
    return _os_open(path, flags, mode, dir_fd=dir_fd)
os.open = _guarded_os_open

def _guard_paths(name, nargs):
    orig = getattr(os, name, None)
    if orig is None:
        return
    def guarded(*args, **kwargs):
        for p in args[:nargs]:
            if not _inside(p):
                _deny(name, p)
        if kwargs.get("dir_fd") is not None or kwargs.get("src_dir_fd") is not None or kwargs.get("dst_dir_fd") is not None:
            _deny(name, args[0] if args else "")
        return orig(*args, **kwargs)
    setattr(os, name, guarded)
for _name, _n in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("mkdir", 1), ("rename", 2), ("replace", 2),
                  ("link", 2), ("truncate", 1), ("chmod", 1), ("chown", 1), ("lchown", 1), ("utime", 1),
                  ("mkfifo", 1), ("mknod", 1), ("removedirs", 1), ("renames", 2)):
    _guard_paths(_name, _n)
_os_symlink = os.symlink
def _guarded_symlink(src, dst, *args, **kwargs):
    if not _inside(dst) or kwargs.get("dir_fd") is not None:
        _deny("symlink", dst)
    return _os_symlink(src, dst, *args, **kwargs)
os.symlink = _guarded_symlink

def _no_network(*args, **kwargs):
    raise PermissionError(errno.EACCES, "sandbox: network access is disabled")
class _NoNetSocket(_sockmod.socket):
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if fileno is None:  # wrapping an existing descriptor (socketpair, fromfd) is harmless
            _no_network()
        super().__init__(family, type, proto, fileno)
_RawSocket = _socket.socket
class _NoNetRawSocket(_RawSocket):
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if fileno is None:
            _no_network()
        _RawSocket.__init__(self, family, type, proto, fileno)
# socket.socket.__init__ calls `_socket.socket.__init__(self, ...)`, i.e. the replacement above, so wrapping an
# existing descriptor (socketpair, asyncio's self-pipe, fromfd) must pass through it too.
_sockmod.socket = _NoNetSocket
_socket.socket = _socket.SocketType = _NoNetRawSocket
for _name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
              "gethostbyaddr"):
    setattr(_sockmod, _name, _no_network)
    if hasattr(_socket, _name):
        setattr(_socket, _name, _no_network)

# line-buffered, so what was printed before a timeout kill (a loop, a thread never joined) comes back
sys.stdout.reconfigure(line_buffering=True)
if not hasattr(builtins, "exit"):  # -S skips site, which defines them
    builtins.exit = builtins.quit = sys.exit
_main = types.ModuleType("__main__")
_main.__file__ = "main.py"
_main.__builtins__ = builtins
sys.modules["__main__"] = _main
sys.argv = ["main.py"]
with _open("main.py", "rb") as _f:
    _src = _f.read()
try:
    _code = compile(_src, "main.py", "exec")
except (SyntaxError, ValueError) as _e:
    sys.stderr.write("".join(traceback.format_exception_only(type(_e), _e)))
    sys.exit(1)
del _f, _src, _name, _n
try:
    exec(_code, _main.__dict__)
except SystemExit:
    raise
except BaseException as _e:
    traceback.print_exception(type(_e), _e, _e.__traceback__.tb_next)  # hide this prelude's frame
    sys.exit(1)
finally:  # before the interpreter waits for threads that may outlive the timeout
    sys.stdout.flush()
    sys.stderr.flush()
'''

# Without the prelude the child still runs main.py as __main__ (so results are comparable).
BARE_RUNNER = MARKER + '''
import runpy, sys
sys.stdout.reconfigure(line_buffering=True)
try:
    runpy.run_path("main.py", run_name="__main__")
finally:
    sys.stdout.flush()
    sys.stderr.flush()
'''


# --------------------------------------------------------------------------------- kernel layer plumbing
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.syscall.restype = ctypes.c_long
    _libc.prctl.restype = ctypes.c_int
    _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    _libc.unshare.restype = ctypes.c_int
    _libc.unshare.argtypes = [ctypes.c_int]
    _libc.mount.restype = ctypes.c_int
    _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
except (OSError, AttributeError):  # not Linux/glibc-like: the kernel layers are reported off
    _libc = None

_IS_LINUX = sys.platform.startswith("linux")
_MACHINE = platform.machine().lower()

CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWNS, CLONE_THREAD = 0x10000000, 0x40000000, 0x00020000, 0x00010000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER, PR_SET_DUMPABLE = 38, 22, 2, 4

# Landlock (uapi/linux/landlock.h)
_SYS_LANDLOCK_CREATE, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT = 444, 445, 446  # same on every arch
_LL_CREATE_RULESET_VERSION = 1
_LL_RULE_PATH_BENEATH = 1
_LL_FS_WRITE_FILE, _LL_FS_REMOVE_DIR, _LL_FS_REMOVE_FILE = 1 << 1, 1 << 4, 1 << 5
_LL_FS_MAKE = (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12)  # char dir reg sock fifo block sym
_LL_FS_REFER, _LL_FS_TRUNCATE = 1 << 13, 1 << 14          # ABI 2, ABI 3
_LL_NET_BIND_TCP, _LL_NET_CONNECT_TCP = 1 << 0, 1 << 1    # ABI 4
_LL_SCOPE_ABSTRACT_UNIX, _LL_SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

# seccomp BPF (uapi/linux/filter.h, seccomp.h, audit.h)
_BPF_LD_W_ABS, _BPF_JEQ, _BPF_JGE, _BPF_JSET, _BPF_RET = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_KILL_PROCESS, _RET_ALLOW, _RET_ERRNO = 0x80000000, 0x7FFF0000, 0x00050000
# syscall numbers read from the kernel headers (asm/unistd_64.h for x86_64, asm-generic/unistd.h for aarch64)
_SYSCALLS = {
    "x86_64": dict(
        arch=0xC000003E, x32_bit=0x40000000, clone=56, clone3=435, kill=62, tgkill=234,
        deny=dict(fork=57, vfork=58, socket=41, tkill=200, ptrace=101, process_vm_readv=310,
                  process_vm_writev=311, mount=165, umount2=166, pivot_root=155, chroot=161, setns=308,
                  unshare=272, kexec_load=246, kexec_file_load=320, init_module=175, finit_module=313,
                  delete_module=176, reboot=169, swapon=167, swapoff=168, bpf=321, perf_event_open=298,
                  keyctl=250, add_key=248, request_key=249, userfaultfd=323, io_uring_setup=425,
                  io_uring_enter=426, io_uring_register=427, pidfd_open=434, pidfd_send_signal=424,
                  pidfd_getfd=438, rt_sigqueueinfo=129, rt_tgsigqueueinfo=297, open_by_handle_at=304,
                  name_to_handle_at=303, acct=163, settimeofday=164, clock_settime=227, adjtimex=159,
                  clock_adjtime=305, sethostname=170, setdomainname=171, iopl=172, ioperm=173, quotactl=179,
                  syslog=103, fanotify_init=300, mount_setattr=442, move_mount=429, open_tree=428, fsopen=430,
                  fsconfig=431, fsmount=432, fspick=433)),
    "aarch64": dict(
        arch=0xC00000B7, x32_bit=None, clone=220, clone3=435, kill=129, tgkill=131,
        deny=dict(socket=198, tkill=130, ptrace=117, process_vm_readv=270, process_vm_writev=271, mount=40,
                  umount2=39, pivot_root=41, chroot=51, setns=268, unshare=97, kexec_load=104,
                  kexec_file_load=294, init_module=105, finit_module=273, delete_module=106, reboot=142,
                  swapon=224, swapoff=225, bpf=280, perf_event_open=241, keyctl=219, add_key=217,
                  request_key=218, userfaultfd=282, io_uring_setup=425, io_uring_enter=426,
                  io_uring_register=427, pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438,
                  rt_sigqueueinfo=138, rt_tgsigqueueinfo=240, open_by_handle_at=265, name_to_handle_at=264,
                  acct=89, settimeofday=170, clock_settime=112, adjtimex=171, clock_adjtime=266,
                  sethostname=161, setdomainname=162, quotactl=60, syslog=116, fanotify_init=262,
                  mount_setattr=442, move_mount=429, open_tree=428, fsopen=430, fsconfig=431, fsmount=432,
                  fspick=433)),
}
_SYSCALLS["arm64"] = _SYSCALLS["aarch64"]
_SYSCALLS["amd64"] = _SYSCALLS["x86_64"]


class _SockFilterProg(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


def _seccomp_program(pid: int) -> bytes | None:
    """The BPF filter for this machine's architecture; `pid` is the sandboxed process itself (it may signal
    only itself and its own process group, which cannot grow since it cannot fork)."""
    t = _SYSCALLS.get(_MACHINE)
    if t is None:
        return None
    eperm, enosys = _RET_ERRNO | errno.EPERM, _RET_ERRNO | errno.ENOSYS
    p = [_bpf(_BPF_LD_W_ABS, 4),                        # A = seccomp_data.arch
         _bpf(_BPF_JEQ, t["arch"], 1, 0),
         _bpf(_BPF_RET, _RET_KILL_PROCESS),              # another ABI (e.g. int 0x80) would dodge the numbers
         _bpf(_BPF_LD_W_ABS, 0)]                         # A = seccomp_data.nr
    if t["x32_bit"]:
        p += [_bpf(_BPF_JGE, t["x32_bit"], 0, 1), _bpf(_BPF_RET, _RET_KILL_PROCESS)]
    # clone: threads only
    p += [_bpf(_BPF_JEQ, t["clone"], 0, 4), _bpf(_BPF_LD_W_ABS, 16),            # A = low word of flags
          _bpf(_BPF_JSET, CLONE_THREAD, 0, 1), _bpf(_BPF_RET, _RET_ALLOW), _bpf(_BPF_RET, eperm)]
    # clone3 passes its flags in memory, which seccomp cannot read: ENOSYS makes libc fall back to clone
    p += [_bpf(_BPF_JEQ, t["clone3"], 0, 1), _bpf(_BPF_RET, enosys)]
    # kill(pid, sig): only itself, its own group (0 or -pid)
    p += [_bpf(_BPF_JEQ, t["kill"], 0, 6), _bpf(_BPF_LD_W_ABS, 16),
          _bpf(_BPF_JEQ, pid, 3, 0), _bpf(_BPF_JEQ, 0, 2, 0), _bpf(_BPF_JEQ, -pid, 1, 0),
          _bpf(_BPF_RET, eperm), _bpf(_BPF_RET, _RET_ALLOW)]
    # tgkill(tgid, tid, sig): only its own threads
    p += [_bpf(_BPF_JEQ, t["tgkill"], 0, 4), _bpf(_BPF_LD_W_ABS, 16),
          _bpf(_BPF_JEQ, pid, 1, 0), _bpf(_BPF_RET, eperm), _bpf(_BPF_RET, _RET_ALLOW)]
    for nr in t["deny"].values():
        p += [_bpf(_BPF_JEQ, nr, 0, 1), _bpf(_BPF_RET, eperm)]
    p.append(_bpf(_BPF_RET, _RET_ALLOW))
    return b"".join(p)


def _landlock_abi() -> int:
    if _libc is None or not _IS_LINUX:
        return 0
    r = _libc.syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE), None, ctypes.c_long(0),
                      ctypes.c_long(_LL_CREATE_RULESET_VERSION))
    return max(0, int(r))


_LANDLOCK_ABI = _landlock_abi()


class _ChildSetup:
    """The preexec_fn. Everything it needs is computed in the parent; in the child it only makes syscalls
    and records each layer's outcome, which it writes to `report_fd` for the parent."""

    def __init__(self, workdir: str, code: bytes, report_fd: int, timeout_s: float, memory_mb: int,
                 disabled: set[str], required: set[str], uid: int | None):
        self.workdir, self.code, self.report_fd, self.disabled = workdir, code, report_fd, disabled
        self.required = sorted(required)  # a layer of these that fails in the child stops it before exec
        self.root = os.geteuid() == 0
        # a root caller runs the program as the call's own uid, so file permissions apply to it
        self.reach, self.unreachable = _reach_plan(uid, workdir) if uid is not None else (None, None)
        self.drop_uid = self.reach is not None
        self.dropped = False
        self.uid = uid if self.drop_uid else os.geteuid()
        self.gid = uid if self.drop_uid else os.getegid()
        self.on_tmpfs = "tmpfs" not in disabled  # until the mount says otherwise
        cpu = int(math.ceil(timeout_s)) + 1
        self.limits = [(resource.RLIMIT_CPU, (cpu, cpu + 1)),
                       (resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES)),
                       (resource.RLIMIT_NOFILE, (MAX_OPEN_FILES, MAX_OPEN_FILES)),
                       (resource.RLIMIT_CORE, (0, 0))]
        if hasattr(resource, "RLIMIT_NPROC"):
            # counted per user over the whole machine, so leave room above what this user already runs
            # (the kernel ignores it for root: seccomp's no-fork rule is what holds there)
            n = _count_processes(self.uid) + 32
            self.limits.append((resource.RLIMIT_NPROC, (n, n)))
        self.memory = (memory_mb * 1024 * 1024, memory_mb * 1024 * 1024)
        self.landlock_abi = _LANDLOCK_ABI
        self.devnull = os.devnull
        # the user namespace is how a non-root caller gets network and mount namespaces; root needs none
        # (unless it lacks CAP_SYS_ADMIN: see _namespaces)
        self.userns = not self.drop_uid
        self.uid_map = f"{self.uid} {self.uid} 1\n".encode()
        self.gid_map = f"{self.gid} {self.gid} 1\n".encode()
        self.tmpfs_opts = (f"size={DISK_BYTES},nr_inodes={MAX_INODES},mode=0700,"
                           f"uid={self.uid},gid={self.gid}").encode()
        self.ll_attr = ctypes.create_string_buffer(24)
        self.ll_rule = ctypes.create_string_buffer(16)
        self.prog_buf = ctypes.create_string_buffer(8 * 512)
        self.prog = _SockFilterProg()
        self.status: list[str] = []

    def _set(self, layer: str, state: str) -> None:
        self.status.append(f"{layer}={state}")

    def _errno(self) -> str:
        e = ctypes.get_errno()
        return errno.errorcode.get(e, str(e))

    def _failed_required(self) -> bool:
        for layer in self.required:
            last = [item for item in self.status if item.startswith(layer + "=")][-1:]
            if not last or not last[0].startswith(layer + "=on"):
                return True
        return False

    def __call__(self) -> None:  # runs in the child, between fork and exec
        try:
            self._run()
        except BaseException as e:  # reported, and below it fails the call if a required layer was not reached
            self._set("setup", f"off: {type(e).__name__}: {e}")
        try:
            os.write(self.report_fd, ";".join(self.status).encode()[:4000])
        except OSError:
            pass
        if self._failed_required():  # Popen raises in the parent: the program never runs
            raise RuntimeError("a required sandbox layer failed")
        try:  # last: the forked parent image may already be larger than the limit
            resource.setrlimit(resource.RLIMIT_AS, self.memory)
        except (ValueError, OSError):
            pass

    def _write_file(self, path: str, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def _run(self) -> None:
        for which, lim in self.limits:
            try:
                resource.setrlimit(which, lim)
            except (ValueError, OSError):
                self._set(f"rlimit{which}", "off")
        self._set("rlimits", "on")
        os.umask(0o077)
        if _libc is None or not _IS_LINUX:
            for layer in ("netns", "tmpfs", "uid", "landlock", "seccomp"):
                self._set(layer, "off: not Linux")
            self.on_tmpfs = False
            self._place_code()
            return
        if self._namespaces():                      # 1. network and mount namespaces
            self._mounts()                          # 2. the disk budget, and the interpreter reachable
        else:
            self.on_tmpfs = False
            self._set("tmpfs", "off: disabled" if "tmpfs" in self.disabled else "off: no mount namespace")
        self._place_code()
        self._drop_uid()                            # 3. root -> the call's uid
        # 4. no privilege gain through exec (needed by landlock and seccomp without CAP_SYS_ADMIN)
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            self._set("no_new_privs", f"off: {self._errno()}")
        if "landlock" in self.disabled:             # 5. landlock
            self._set("landlock", "off: disabled")
        elif self.landlock_abi < 1:
            self._set("landlock", "off: not supported by this kernel")
        else:
            self._landlock()
        if "seccomp" in self.disabled:              # 6. seccomp, last: it forbids some of the calls above
            self._set("seccomp", "off: disabled")
        else:
            self._seccomp()

    def _namespaces(self) -> bool:
        """unshare the network and mount namespaces (inside a new user namespace unless root drops to its
        sandbox uid: that drops every capability in the machine's namespace, and lets an unprivileged caller
        own the others). Returns whether there is a private mount namespace."""
        flags = (0 if "netns" in self.disabled else CLONE_NEWNET)
        flags |= CLONE_NEWNS if ("tmpfs" not in self.disabled or self.reach) else 0
        if flags and self.userns:
            flags |= CLONE_NEWUSER
        failed = flags and _libc.unshare(flags) != 0
        if failed and ctypes.get_errno() == errno.EPERM and self.drop_uid and not self.reach:
            # root without CAP_SYS_ADMIN (an unprivileged container): as the sandbox uid it may still own a
            # user namespace, and through it the others; mapping only that uid keeps root's files its owner's.
            # Not where the interpreter must be bound back in: the sandbox uid cannot open its directories.
            self._become_uid()
            # the uid change made the process undumpable, which leaves its /proc files root's: it could
            # not write its own uid map (exec resets the flag anyway)
            _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
            flags |= CLONE_NEWUSER
            failed = _libc.unshare(flags) != 0
        if failed:
            why = f"off: unshare {self._errno()}"
            self._set("netns", why if flags & CLONE_NEWNET else "off: disabled")
            if self.reach and not self.dropped:  # the interpreter cannot be made reachable: stay root, say so
                self.drop_uid = False
                self._set("uid", why)
            return False
        if flags & CLONE_NEWUSER:
            try:
                self._write_file("/proc/self/setgroups", b"deny")
                self._write_file("/proc/self/uid_map", self.uid_map)
                self._write_file("/proc/self/gid_map", self.gid_map)
            except OSError as e:
                self._set("userns", f"off: uid map failed: {errno.errorcode.get(e.errno, e.errno)}")
        if flags & CLONE_NEWNET:
            self._set("netns", "on: " + ("user+net namespace" if flags & CLONE_NEWUSER else "net namespace"))
        else:
            self._set("netns", "off: disabled")
        return bool(flags & CLONE_NEWNS)

    def _mount(self, source, target, fstype, flags: int, data) -> None:
        if _libc.mount(source, target, fstype, flags, data) != 0:
            raise OSError(ctypes.get_errno(), f"mount {target!r}")

    def _mounts(self) -> None:
        """The working directory becomes a fresh tmpfs of DISK_BYTES (the disk budget: the program's files
        never reach the real disk and vanish with its last process). For a root caller dropping its uid,
        each directory the sandbox uid cannot search on the way to the interpreter (/root) is covered first
        by an empty tmpfs with just the interpreter's directories bound back in."""
        try:
            self._mount(None, b"/", None, MS_REC | MS_PRIVATE, None)  # nothing propagates back out
        except OSError as e:  # then no mount at all: it could show outside
            self.on_tmpfs = False
            self._set("tmpfs", f"off: private mounts {errno.errorcode.get(e.errno, e.errno)}")
            if self.reach and not self.dropped:
                self.drop_uid = False
                self._set("uid", "off: interpreter not reachable (no private mounts)")
            return
        if self.reach:
            try:
                self._reach_interpreter()
            except OSError as e:
                self._set("uid", f"off: interpreter not reachable ({errno.errorcode.get(e.errno, e.errno)})")
                if self.dropped:  # already the sandbox uid: the interpreter cannot start, say why
                    raise
                self.drop_uid = False
        if "tmpfs" in self.disabled:
            self._set("tmpfs", "off: disabled")
            return
        try:
            self._mount(b"tmpfs", self.workdir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                        self.tmpfs_opts)
            self._set("tmpfs", f"on: {DISK_BYTES >> 20} MiB, {MAX_INODES} inodes")
        except OSError as e:
            self.on_tmpfs = False
            self._set("tmpfs", f"off: {errno.errorcode.get(e.errno, e.errno)} ({e.strerror})")

    def _reach_interpreter(self) -> None:
        old_umask = os.umask(0o022)  # the directories leading to the bound ones must be searchable
        try:
            for blocked, dirs in self.reach:
                # opened in this mount namespace (a bind from another one is refused) before covering them
                fds = [os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for d in dirs]
                self._mount(b"tmpfs", blocked.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64k,mode=0755")
                for d, fd in zip(dirs, fds):
                    os.makedirs(d)
                    self._mount(f"/proc/self/fd/{fd}".encode(), d.encode(), None, MS_BIND | MS_REC, None)
                    os.close(fd)
        finally:
            os.umask(old_umask)

    def _place_code(self) -> None:
        """main.py goes where the program runs: into the tmpfs (so the directory beneath stays the caller's,
        0700, and holds nothing another call could read), else into the directory, handed to the call's uid."""
        os.chdir(self.workdir)  # the cwd Popen set may now lie beneath a mount
        fd = os.open("main.py", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, self.code)
            os.fchown(fd, self.uid, self.gid)
        finally:
            os.close(fd)
        if not self.on_tmpfs and self.drop_uid and not self.dropped:
            os.chown(".", self.uid, self.gid)

    def _become_uid(self) -> None:
        if not self.on_tmpfs:  # no tmpfs will cover it: the program works in the directory itself
            os.chown(self.workdir, self.uid, self.gid)
        os.setgroups([])
        os.setresgid(self.gid, self.gid, self.gid)
        os.setresuid(self.uid, self.uid, self.uid)
        self.dropped = True

    def _drop_uid(self) -> None:
        if not self.root:
            self._set("uid", f"on: not root (uid {self.uid})")
        elif "uid" in self.disabled:
            self._set("uid", "off: disabled")
        elif self.reach is None:
            self._set("uid", f"off: {self.unreachable}")
        elif self.dropped:
            self._set("uid", f"on: root ran it as uid {self.uid} (dropped first: no CAP_SYS_ADMIN)")
        elif self.drop_uid:
            self._become_uid()
            self._set("uid", f"on: root ran it as uid {self.uid}")

    def _landlock(self) -> None:
        abi = self.landlock_abi
        fs = _LL_FS_WRITE_FILE | _LL_FS_REMOVE_DIR | _LL_FS_REMOVE_FILE | _LL_FS_MAKE
        if abi >= 2:
            fs |= _LL_FS_REFER
        if abi >= 3:
            fs |= _LL_FS_TRUNCATE
        net = (_LL_NET_BIND_TCP | _LL_NET_CONNECT_TCP) if abi >= 4 else 0
        scoped = (_LL_SCOPE_ABSTRACT_UNIX | _LL_SCOPE_SIGNAL) if abi >= 6 else 0
        size = 24 if abi >= 6 else 16 if abi >= 4 else 8
        struct.pack_into("=QQQ", self.ll_attr, 0, fs, net, scoped)
        ruleset = _libc.syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE), self.ll_attr, ctypes.c_long(size),
                                ctypes.c_long(0))
        if ruleset < 0:
            self._set("landlock", f"off: create_ruleset {self._errno()}")
            return
        try:
            file_rights = _LL_FS_WRITE_FILE | (_LL_FS_TRUNCATE if abi >= 3 else 0)
            for path, rights in ((self.workdir, fs), (self.devnull, file_rights)):
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                try:
                    struct.pack_into("=Qi", self.ll_rule, 0, rights, fd)
                    if _libc.syscall(ctypes.c_long(_SYS_LANDLOCK_ADD_RULE), ctypes.c_long(ruleset),
                                     ctypes.c_long(_LL_RULE_PATH_BENEATH), self.ll_rule, ctypes.c_long(0)) != 0:
                        self._set("landlock", f"off: add_rule {self._errno()}")
                        return
                finally:
                    os.close(fd)
            if _libc.syscall(ctypes.c_long(_SYS_LANDLOCK_RESTRICT), ctypes.c_long(ruleset), ctypes.c_long(0)) != 0:
                self._set("landlock", f"off: restrict_self {self._errno()}")
                return
            parts = ["fs writes"] + (["tcp"] if net else []) + (["signals", "abstract unix"] if scoped else [])
            self._set("landlock", f"on: ABI {abi} ({', '.join(parts)})")
        finally:
            os.close(ruleset)

    def _seccomp(self) -> None:
        prog = _seccomp_program(os.getpid())
        if prog is None:
            self._set("seccomp", f"off: no filter for {_MACHINE}")
            return
        if len(prog) > len(self.prog_buf):
            self._set("seccomp", "off: filter too long")
            return
        ctypes.memmove(self.prog_buf, prog, len(prog))
        self.prog.len = len(prog) // 8
        self.prog.filter = ctypes.addressof(self.prog_buf)
        if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(self.prog), 0, 0) != 0:
            self._set("seccomp", f"off: {self._errno()}")
        else:
            self._set("seccomp", "on")


def _count_processes(uid: int) -> int:
    n = 0
    try:
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    n += os.stat(f"/proc/{name}").st_uid == uid
                except OSError:
                    pass
    except OSError:
        return 256
    return n


def _searchable(path: str, uid: int, need: int = 1) -> bool:
    """Whether `uid` (not root, in no group of its own but its own gid == uid) has the `need` rights
    (1 = search, 5 = read + search) on the directory `path`."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    shift = 6 if st.st_uid == uid else 3 if st.st_gid == uid else 0
    return (st.st_mode >> shift) & need == need


def _interpreter_dirs() -> set[str]:
    """The directories the interpreter needs: its prefixes and those holding each link on the way to it."""
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    path = sys.executable
    for _ in range(40):  # the kernel's own limit on a chain of links
        dirs.add(os.path.dirname(path))
        if not os.path.islink(path):
            break
        path = os.path.join(os.path.dirname(path), os.readlink(path))
    return {os.path.realpath(d) for d in dirs}


def _blocked_under(path: str, uid: int) -> list[str]:
    """The directories above `path` that `uid` cannot search."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(2, len(parts)) if not _searchable("/".join(parts[:i]), uid)]


def _reach_plan(uid: int, workdir: str) -> tuple[list[tuple[str, list[str]]] | None, str | None]:
    """What running the interpreter as `uid` needs: for each directory on the way to it that `uid` cannot
    search (e.g. /root, mode 0700, holding ~/.pyenv), just the interpreter's directories beneath it, to bind
    back in (nothing else of it becomes visible). (None, why) when that cannot work."""
    plan: dict[str, set[str]] = {}
    for d in sorted(_interpreter_dirs()):
        blocked = _blocked_under(d, uid)
        if not _searchable(d, uid, 5) or len(blocked) > 1:
            return None, f"the interpreter's directory {d} is not reachable as uid {uid}"
        if blocked:
            plan.setdefault(blocked[0], set()).add(d)
    hidden = _blocked_under(workdir, uid)
    if hidden:  # a tmpfs over it would hide the working directory, and without one uid cannot reach it
        return None, (f"the working directory {workdir} lies under {hidden[0]}, which uid {uid} cannot search: "
                      "set TMPDIR to a directory such as /tmp")
    # a directory inside another one that is bound comes with it
    return [(top, [d for d in sorted(ds) if not any(d.startswith(o + "/") for o in ds)])
            for top, ds in sorted(plan.items())], None


def _parse_layers(report: str) -> dict:
    layers = {}
    for item in report.split(";"):
        if "=" in item:
            k, v = item.split("=", 1)
            layers[k] = v
    return layers


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it (so its process group id stays reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


# --------------------------------------------------------------------------------------------- the cleanup
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(name: str, dir_fd: int | None) -> int:
    """Open a directory without following a symlink; one the program made unreadable (chmod 000) is given
    back its owner's rights first, through an O_PATH descriptor so a swapped-in symlink is never chmodded."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        path_fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            os.chmod(f"/proc/self/fd/{path_fd}", 0o700)
        finally:
            os.close(path_fd)
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def _empty_dir(fd: int) -> list[str]:
    """Unlink everything in the directory that is not a directory (files, symlinks, fifos, sockets: none is
    opened or followed); return the subdirectories' names."""
    os.fchmod(fd, 0o700)  # unlinking needs write and search rights on the directory itself
    subdirs = []
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
            else:
                os.unlink(entry.name, dir_fd=fd)
    return subdirs


def _remove_hostile_tree(path: str) -> None:
    """Remove a directory tree the sandboxed program may have booby-trapped: any depth (beyond PATH_MAX; no
    recursion), any number of entries, modes it removed, symlinks (never followed). At most two descriptors
    are open at a time: the walk goes down by name and back up through '..', checked against the inode it
    came from. Raises OSError when something cannot be removed."""
    fd = _open_dir(path, None)
    stack: list[tuple[int, int, list[str], str]] = []  # per level: (dev, inode, subdirs left, own name)
    try:
        pending, name = _empty_dir(fd), ""
        while True:
            if pending:
                sub = pending.pop()
                st = os.fstat(fd)
                child = _open_dir(sub, fd)
                stack.append((st.st_dev, st.st_ino, pending, name))
                os.close(fd)
                fd, pending, name = child, _empty_dir(child), sub
                continue
            if not stack:
                break
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            dev, ino, pending, parent_name = stack.pop()
            os.close(fd)
            fd = parent
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (dev, ino):
                raise OSError(errno.ESTALE, "directory moved during cleanup", path)
            os.rmdir(name, dir_fd=fd)
            name = parent_name
    finally:
        os.close(fd)
    os.rmdir(path)


def _cleanup(path: str) -> str | None:
    """Remove the working directory; never raises. Returns None, or a one-line reason it could not (after
    a few tries: a process that escaped the group might still be writing)."""
    reason = None
    for _ in range(3):
        if not os.path.lexists(path):
            return None
        try:
            _remove_hostile_tree(path)
        except (OSError, ValueError) as e:
            reason = f"could not remove the sandbox directory {path}: {e}"
    return None if not os.path.lexists(path) else reason


# ---------------------------------------------------------------------------------------------- the runner
class SandboxUnavailable(ExocortexError):
    """A hard layer is missing on this kernel and the caller did not opt in to the degraded sandbox."""


def run_python(code: str, timeout_s: float = 5.0, memory_mb: int = 256, max_output_bytes: int = 16384,
               stdin: str = "", *, disable_layers: tuple[str, ...] | list[str] = (),
               site_packages: bool = False, allow_degraded: bool | None = None) -> SandboxResult:
    """Run `code` as __main__ of a fresh interpreter under the sandbox's layers; never raises for anything
    the code does. stdout/stderr are capped at `max_output_bytes` each (more kills the program:
    killed_reason 'output_limit'). `disable_layers` (from OPTIONAL_LAYERS) switches layers off to measure
    the others; `site_packages=True` drops `-S` so installed packages can be imported.

    Fails closed: raises SandboxUnavailable when a layer of REQUIRED_LAYERS is missing on this kernel
    (other than ones switched off on purpose), unless `allow_degraded` (default: EXOCORTEX_SANDBOX=degraded)."""
    bad = set(disable_layers) - set(OPTIONAL_LAYERS)
    if bad:
        raise ValueError(f"unknown sandbox layers {sorted(bad)}; optional layers are {OPTIONAL_LAYERS}")
    enabled, reason = python_tool_status(allow_degraded, ignore=disable_layers)
    if not enabled:
        raise SandboxUnavailable(reason)
    # checked again in the child for this very call: a layer the probe found may still fail here (namespace
    # limits under many concurrent calls, a mount out of memory), and then the program must not run
    layers = isolation_layers()
    required = {name for name in REQUIRED_LAYERS
                if name not in disable_layers and layers.get(name, "off").startswith("on")}
    return _run(code, timeout_s, memory_mb, max_output_bytes, stdin, set(disable_layers), site_packages, required)


class _UidPool:
    """The uids of SANDBOX_UIDS not taken by a running call of this process; a call waits for a free one.
    Calls in other processes may share a uid: there the tmpfs (a mount only the call sees) keeps files apart."""

    def __init__(self, uids: range):
        self.uids, self.free, self.cond = uids, None, threading.Condition()

    def take(self) -> int:
        with self.cond:
            if self.free is None:  # an account's uid would give the program that account's files
                self.free = [u for u in self.uids if not _uid_exists(u)]
                if not self.free:
                    raise SandboxUnavailable(f"every uid in {self.uids.start}-{self.uids.stop - 1} belongs to an "
                                             "account: the sandbox has no uid of its own to run code as")
            while not self.free:
                self.cond.wait()
            return self.free.pop()

    def give(self, uid: int) -> None:
        with self.cond:
            self.free.append(uid)
            self.cond.notify()


def _uid_exists(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


_UIDS = _UidPool(SANDBOX_UIDS)


def _run(code: str, timeout_s: float, memory_mb: int, max_output_bytes: int, stdin: str, disabled: set[str],
         site_packages: bool, required: set[str]) -> SandboxResult:
    start = time.monotonic()
    uid = _UIDS.take() if os.geteuid() == 0 and "uid" not in disabled else None
    try:
        # root-owned 0700: the child writes main.py into it (or into the tmpfs over it) and hands it to the
        # call's uid only where there is no tmpfs
        workdir = os.path.realpath(tempfile.mkdtemp(prefix="exocortex-sandbox-"))
        try:
            started = _start(workdir, code, timeout_s, memory_mb, disabled, site_packages, required, uid)
            if isinstance(started[0], str):
                why, layers = started
                return SandboxResult(False, "", f"sandbox: {why}", None, False, "start_failed",
                                     time.monotonic() - start, layers=layers)
            proc, layers = started
            out = _communicate(proc, stdin.encode(), start + timeout_s, max_output_bytes)
        finally:
            # after _communicate killed the process group: nothing of the program writes here any more
            cleanup_error = _cleanup(workdir)
    finally:
        if uid is not None:  # only now: no process of this call is left to share it with the next
            _UIDS.give(uid)
    return _result(out, time.monotonic() - start, layers, max_output_bytes, cleanup_error)


def _start(workdir: str, code: str, timeout_s: float, memory_mb: int, disabled: set[str], site_packages: bool,
           required: set[str], uid: int | None):
    """Start the interpreter under the layers; returns (process, layers report), or (why it did not start,
    layers report)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    argv = [sys.executable, "-I", "-B", "-X", "utf8"] + ([] if site_packages else ["-S"])
    argv += ["-c", BARE_RUNNER if "prelude" in disabled else PRELUDE]
    report_r, report_w = os.pipe()
    proc, error = None, None
    try:
        setup = _ChildSetup(workdir, code.encode("utf-8", "surrogatepass"), report_w, timeout_s, memory_mb,
                            disabled, required, uid)
        try:
            proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True, preexec_fn=setup,
                                    close_fds=True)
        except (OSError, subprocess.SubprocessError) as e:
            error = f"could not start python: {e}"
        os.close(report_w)
        report_w = -1
        report = b""
        while chunk := os.read(report_r, 4096):
            report += chunk
    finally:
        os.close(report_r)
        if report_w >= 0:
            os.close(report_w)
    layers = {"workdir": "on", "session": "on", "isolated_python": "on"}
    layers.update(_parse_layers(report.decode(errors="replace")))
    layers["prelude"] = "off: disabled" if "prelude" in disabled else "on"
    failed = [f"{name} ({layers.get(name, 'off: not reached')})" for name in sorted(required)
              if not layers.get(name, "off").startswith("on")]
    if failed:  # the child refused to exec: say which layer, not just that preexec_fn raised
        error = f"refused to run the program: sandbox layer(s) failed for this call: {'; '.join(failed)}"
    return (error, layers) if proc is None else (proc, layers)


def _result(out, seconds: float, layers: dict, cap: int, cleanup_error: str | None) -> SandboxResult:
    stdout, stderr, timed_out, overflow, returncode = out
    err_text = stderr.decode("utf-8", errors="replace")
    reason = None
    if timed_out:
        reason = "timeout"
    elif overflow:
        reason = "output_limit"
    elif returncode is not None and returncode < 0:
        sig = -returncode
        reason = {signal.SIGXCPU: "cpu_limit", signal.SIGXFSZ: "file_size_limit",
                  signal.SIGSYS: "seccomp"}.get(sig) or f"signal:{signal.Signals(sig).name}"
    elif returncode:
        last = err_text.strip().splitlines()[-1] if err_text.strip() else ""
        if last.startswith("MemoryError"):
            reason = "memory_limit"
        elif "[Errno 27]" in last:  # EFBIG: RLIMIT_FSIZE (python ignores SIGXFSZ)
            reason = "file_size_limit"
        elif "[Errno 28]" in last:  # ENOSPC: the working directory's tmpfs is full
            reason = "disk_limit"
    return SandboxResult(
        ok=returncode == 0 and not timed_out and not overflow,
        stdout=stdout[:cap].decode("utf-8", errors="replace"),
        stderr=stderr[:cap].decode("utf-8", errors="replace"),
        returncode=returncode, timed_out=timed_out, killed_reason=reason, seconds=seconds,
        truncated=len(stdout) > cap or len(stderr) > cap, layers=layers, cleanup_error=cleanup_error)


def _communicate(proc: subprocess.Popen, stdin: bytes, deadline: float, cap: int):
    """Feed stdin and read stdout/stderr incrementally until EOF, the deadline, or more than `cap` bytes on
    a stream; then kill the whole process group (before reaping the leader, so the group id cannot have
    been reused) and reap. Returns (stdout, stderr, timed_out, overflow, returncode)."""
    out_fd, err_fd, stdin_fd = proc.stdout.fileno(), proc.stderr.fileno(), proc.stdin.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    reading = set(bufs)
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    pending = memoryview(stdin)
    if pending:
        os.set_blocking(stdin_fd, False)
        sel.register(stdin_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    timed_out = overflow = False

    def read_some(fd: int) -> str:
        """Read what is available into the fd's buffer (at most cap + 1 bytes kept): 'data', 'again', 'eof'."""
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return "again"
        except OSError:
            return "eof"
        if not chunk:
            return "eof"
        buf = bufs[fd]
        if len(buf) <= cap:
            buf += chunk[:cap + 1 - len(buf)]
        return "data"

    try:
        while reading:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            events = sel.select(min(remaining, 0.25))
            for key, _ in events:
                fd = key.fd
                if fd == stdin_fd:
                    try:
                        pending = pending[os.write(fd, pending[:65536]):]
                    except OSError:  # the program closed its stdin or exited
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(fd)
                        proc.stdin.close()
                elif read_some(fd) == "eof":
                    sel.unregister(fd)
                    reading.discard(fd)
            if any(len(b) > cap for b in bufs.values()):
                overflow = True
                break
            if not events and _exited(proc.pid):  # leader gone, something else holds the pipes
                break
        if timed_out or overflow:
            _killpg(proc.pid)
        while not _exited(proc.pid):
            if time.monotonic() >= deadline:
                timed_out = timed_out or not overflow
                _killpg(proc.pid)
                break
            time.sleep(0.01)
        _killpg(proc.pid)  # stragglers in the group, if any layer let one be created
        for fd in list(reading):  # whatever is still in the pipes, without blocking
            while len(bufs[fd]) <= cap and read_some(fd) == "data":
                pass
    finally:
        sel.close()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                stream.close()
            except OSError:
                pass
        returncode = proc.wait()
    return bytes(bufs[out_fd]), bytes(bufs[err_fd]), timed_out, overflow, returncode


# ------------------------------------------------------------------------------------------ tool + probe
def python_tool(code: str) -> str:
    """The engine's `python` tool: runs the code in the sandbox; returns its stdout (cut to
    TOOL_OUTPUT_CHARS), or a short 'error: ...' text. Never raises."""
    try:
        r = run_python(code, timeout_s=TOOL_TIMEOUT_S, memory_mb=256, max_output_bytes=16384)
    except SandboxUnavailable as e:
        return f"error: {e}"
    except Exception as e:  # defensive: the engine must never see an exception from a tool
        return f"error: sandbox failed ({type(e).__name__})"
    out = r.stdout
    if len(out) > TOOL_OUTPUT_CHARS or r.truncated:
        out = out[:TOOL_OUTPUT_CHARS].rstrip("\n") + "\n[output truncated]"
    if r.ok or r.killed_reason == "output_limit":
        text = out.rstrip("\n") if out.strip() else "(no output)"
    else:
        msg = f"error: {r.error}"
        text = (out.rstrip("\n") + "\n" + msg) if out.strip() else msg
    return text + ("\n[sandbox: its working directory could not be removed]" if r.cleanup_error else "")


@lru_cache(maxsize=1)
def isolation_layers() -> dict:
    """Which layers apply on this machine (runs one trivial program once and caches the report)."""
    try:
        return dict(_run("pass", 10.0, 256, 16384, "", set(), False, set()).layers)
    except Exception as e:  # noqa: BLE001 - a probe that cannot run finds nothing on
        return {"probe": f"off: {type(e).__name__}: {e}"}


def python_tool_status(allow_degraded: bool | None = None, ignore=()) -> tuple[bool, str | None]:
    """Whether the python tool (and anything else run in the sandbox, e.g. HumanEval grading) may run here,
    and a one-line reason to show when it is off or degraded (None when every required layer is on).
    `allow_degraded` is the user's explicit opt-in; None reads EXOCORTEX_SANDBOX=degraded from the
    environment. Layers in `ignore` were switched off on purpose (measurements) and are not asked for."""
    layers = isolation_layers()
    missing = [f"{name} ({layers.get(name, 'off: not probed')})" for name in REQUIRED_LAYERS
               if name not in ignore and not layers.get(name, "off").startswith("on")]
    if "probe" in layers:
        missing.append(f"probe ({layers['probe']})")
    if not missing:
        return True, None
    if allow_degraded is None:
        allow_degraded = os.environ.get(OPT_IN_VAR, "") == OPT_IN_VALUE
    if allow_degraded:
        return True, (f"warning: the python tool runs in a degraded sandbox ({OPT_IN_VAR}={OPT_IN_VALUE}); "
                      f"missing: {'; '.join(missing)}")
    return False, (f"the python tool is off: this kernel lacks sandbox layer(s) {'; '.join(missing)}; "
                   f"set {OPT_IN_VAR}={OPT_IN_VALUE} to run it with weaker isolation (docs/sandbox.md)")

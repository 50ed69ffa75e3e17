"""Run a model-written program against its tests, isolated and limited; return a structured verdict.

1. Isolation (`task.sandbox.isolation`): `bwrap` (bubblewrap, from the OS packages; `auto` means it): new
   network (loopback only), pid, ipc and uts namespaces; a read-only root holding only the OS's `/usr` and
   libraries and the Python install, a read-only minimal `/dev` and the namespace's own `/proc`; two
   size-limited tmpfs, `/dev/shm` and the one in which each program gets an empty folder of its own as working
   directory and HOME. No user namespace can be made inside (a seccomp filter as root, bwrap's
   `--disable-userns` without). Weaker ones only with `allow_weak`, said in one line when used:
   - `unshare` (util-linux): the same namespaces, but the host's file system (file permissions only)
     and a fresh host temp dir. As root it needs a Python install other users can read.
   - `none`: limits, a scrubbed environment and a temp dir, no namespaces.
2. One long-lived Python per process and isolation, `sandbox_zygote.py`, runs inside it and forks the processes
   of each job: a fork costs about a millisecond where a new interpreter and a new sandbox cost fifteen, so a
   sandboxed verdict is cheaper than a plain `subprocess` (benchmarks/sandbox.py). It judges by value: the
   tests run in a process of their own and the program's process only returns plain values, which the tests
   compare (`sandbox_zygote.py` says how, and when it falls back to running the tests in the program's process).
3. Per program, always: a scrubbed environment (no tokens, no Ray address), the standard library only
   (`python -I -S`), CPU-time / address-space / file-size / open-files / process limits (and, where the machine
   allows, a memory cap on all its processes together: `sandbox_memory.py`), a fresh
   unprivileged uid when we are root (so the process limit counts only this program), its process
   group killed at the wall deadline or past its output cap, and afterwards every process it left
   killed.
4. A zygote that dies, hangs (past the program's deadline and `ZYGOTE_GRACE`) or says something that is not a
   verdict is killed with all it ran and replaced; the program it was judging is `crashed`, or `sandbox_error`
   if it never started.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import os
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from selfimprove import sandbox_memory
from selfimprove.config import SandboxConfig
from selfimprove.errors import UserError, first_line

STATUSES = ("passed", "failed", "timeout", "memory", "crashed", "sandbox_error")
# "value": the program's process returned plain values and the judge compared them; "in_process": the tests ran in
# the program's own process (tests that use the program's classes, or pass it more than plain data).
JUDGED = ("value", "in_process")
ZYGOTE = (Path(__file__).parent / "sandbox_zygote.py").read_text()
WORKDIR = "/sandbox"  # inside bwrap: the tmpfs that holds each program's own folder
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # all a program's environment has, with HOME and TMPDIR
# Seconds past a program's own deadline before its zygote counts as hung.
ZYGOTE_GRACE = 5.0
# Uids no account has: each run takes a random one, so concurrent runs do not share a process budget.
UID_RANGE = (200_000, 2_000_000_000)
SHOWN_OUTPUT = 1024  # characters of a program's output kept in its verdict
MAX_VERDICT = 8 << 20  # bytes of one verdict message (the zygote keeps at most 1 MiB of output)


@dataclass(frozen=True)
class Verdict:
    status: str  # one of STATUSES
    detail: str = ""  # which test failed, what was raised, which limit was hit
    output: str = ""  # the start of what the program printed
    seconds: float = 0.0
    judged: str = "in_process"  # one of JUDGED: where the tests' outcome was decided

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_tests(program: str, tests: list[str], cfg: SandboxConfig, setup: str = "", by_value: bool = True) -> Verdict:
    """Run `program` + `setup`, then `setup` and each of `tests` (statements, usually asserts), in a sandbox;
    never raises for anything the program does. `by_value`: the tests run in a process of their own and the
    program's process only returns plain values (`sandbox_zygote.py`); false for tests that need the program's
    objects, which then run in its process. UserError only if this machine cannot sandbox at all."""
    kind = isolation(cfg.isolation, cfg.allow_weak)
    # Fresh uids per job: the process limit counts only this program's processes (root's would count none), what
    # it leaves running can be found and killed, and it cannot signal or trace the process that runs its tests.
    program_uid, judge_uid = (_fresh_uid(), _fresh_uid()) if os.getuid() == 0 else (None, None)
    job = {"program": program, "tests": list(tests), "setup": setup, "by_value": by_value,
           "name": secrets.token_hex(16), "uid": program_uid, "judge_uid": judge_uid,
           "limits": _limits(cfg, program_uid), "timeout": cfg.timeout, "output_bytes": cfg.output_kb << 10,
           "env": ENV}
    started = time.monotonic()
    with _LOCK:
        key = (kind, cfg.file_mb, cfg.memory_mb)
        if key not in _ZYGOTES:
            _ZYGOTES[key] = _Zygote(kind, cfg.file_mb, cfg.memory_mb)
        zygote = _ZYGOTES[key]
        result = zygote.judge(job, 2 * cfg.timeout + ZYGOTE_GRACE)  # a by-value job may be run again in process
        if result is None:
            del _ZYGOTES[key]
            verdict = dataclasses.replace(zygote.failure(), judged="value" if by_value else "in_process")
            zygote.close()
    if result is not None:
        verdict = Verdict(result["status"], result["detail"], result["output"][:SHOWN_OUTPUT], judged=result["judged"])
    return dataclasses.replace(verdict, seconds=time.monotonic() - started)


def _fresh_uid() -> int:
    return UID_RANGE[0] + secrets.randbelow(UID_RANGE[1] - UID_RANGE[0])


def _verdict(body: bytes) -> dict | None:
    """The zygote's verdict, or None if `body` is not one: the zygote shares a uid with programs when we are not
    root, so what it says is checked before it is believed."""
    try:
        said = json.loads(body)
    except ValueError:
        return None
    fields = {"status": STATUSES, "detail": None, "judged": JUDGED, "output": None}
    if type(said) is not dict or said.keys() != fields.keys() or any(type(v) is not str for v in said.values()):
        return None
    return said if said["status"] in STATUSES and said["judged"] in JUDGED else None


class _Zygote:
    """A long-lived Python inside the isolation (`sandbox_zygote.py`) that forks a child per program; one per
    process and isolation, used by one caller at a time."""

    def __init__(self, kind: str, file_mb: int, memory_mb: int):
        self.cap = sandbox_memory.MemoryCap(memory_mb) if sandbox_memory.available() is None else None
        self.memory_mb = memory_mb
        self.host_dir = None if kind == "bwrap" else tempfile.mkdtemp(prefix="selfimprove-sandbox-")
        if self.host_dir is not None:
            os.chmod(self.host_dir, 0o711)  # programs of other uids reach their own folders in it, and list nothing
        root = WORKDIR if self.host_dir is None else self.host_dir
        self.served = 0
        seccomp = _seccomp_fd()
        try:
            command = [*_prefix(kind, file_mb, seccomp), _python(), "-I", "-S", "-c", ZYGOTE, root,
                       "host" if kind == "none" else "pid-namespace"]
            self.proc = subprocess.Popen(
                self.cap.wrap(command) if self.cap else command,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd="/",
                start_new_session=True, pass_fds=(seccomp,))
        finally:
            os.close(seccomp)

    def judge(self, job: dict, seconds: float) -> dict | None:
        """The zygote's verdict on `job`, or None if it died, gave none within `seconds` or said something else."""
        kills = self.cap.kills() if self.cap else 0
        try:
            self.proc.stdin.write(_frame(json.dumps(job).encode()))
            self.proc.stdin.flush()
        except OSError:
            return None
        deadline = time.monotonic() + seconds
        header = self._read(4, deadline)
        size = header and int.from_bytes(header, "little")
        body = size is not None and size <= MAX_VERDICT and self._read(size, deadline)
        said = _verdict(body) if body else None
        if said is not None:
            self.served += 1
            if said["status"] != "passed" and self.cap and self.cap.kills() > kills:
                said |= {"status": "memory", "detail": f"its processes together passed {self.memory_mb} MiB"}
        return said

    def _read(self, n: int, deadline: float) -> bytes | None:
        data = b""
        fd = self.proc.stdout.fileno()
        while len(data) < n:
            if not select.select([fd], [], [], max(deadline - time.monotonic(), 0))[0]:
                return None
            chunk = os.read(fd, n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def failure(self) -> Verdict:
        """The verdict of a job whose zygote died or hung: a sandbox that never served did not start."""
        if self.served == 0 and self.proc.poll() is not None:
            said = self.proc.stderr.read().decode("utf-8", "replace").strip().splitlines()
            return Verdict("sandbox_error", f"the sandbox did not start: {said[-1] if said else self.proc.returncode}")
        return Verdict("crashed", "the sandbox's process died or hung while judging it; it was restarted")

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                pipe.close()
            except OSError:  # its reader is gone
                pass
        if self.host_dir is not None:
            shutil.rmtree(self.host_dir, ignore_errors=True)
        if self.cap is not None:
            self.cap.close()


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(4, "little") + data


_LOCK = threading.Lock()
_ZYGOTES: dict[tuple[str, int], _Zygote] = {}


@atexit.register
def _close_zygotes() -> None:
    while _ZYGOTES:
        _ZYGOTES.popitem()[1].close()


def _limits(cfg: SandboxConfig, uid: int | None) -> dict[str, int]:
    """The rlimits a program's process gets. Without a uid of its own, the process limit counts the user's other
    processes too, so it is set above their number now."""
    processes = cfg.processes if uid is not None else _processes_of(os.getuid()) + cfg.processes
    return {"cpu_seconds": cfg.cpu_seconds, "memory_bytes": cfg.memory_mb << 20, "file_bytes": cfg.file_mb << 20,
            "open_files": cfg.open_files, "processes": processes}


def _python() -> str:
    """The base interpreter (not a virtualenv's wrapper: no site-packages of ours is inside the sandbox)."""
    return str(Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}")


def _prefix(kind: str, file_mb: int, seccomp: int | None) -> list[str]:
    """The command line that puts the zygote into the isolation `kind`, with a working area of `file_mb` MiB and,
    as root, the seccomp filter bwrap reads from the fd `seccomp` (`_seccomp_fd`)."""
    root = os.getuid() == 0
    if kind == "bwrap":
        # As root, no user namespace: the zygote makes each program's process another uid, which limits apply to;
        # a seccomp filter then keeps programs from making user namespaces (and so mounts RLIMIT_AS does not
        # count). Without root, bwrap's own user namespace, with nested ones disabled.
        spaces = ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts"] if root else [
            "--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
        # Every writable place is a tmpfs of `file_mb` MiB: the programs' folders and /dev/shm. The rest of /dev
        # and bwrap's own root are made read-only last, once everything is mounted on them.
        # The zygote is the namespace's first process (`--as-pid-1`): bwrap's own first process would hold our
        # job and verdict pipes, and without root it shares the programs' uid and is dumpable.
        return ["bwrap", *spaces, "--as-pid-1", "--die-with-parent", "--new-session", *_system_binds(), "--proc", "/proc",
                "--dev", "/dev", "--perms", "1777", "--size", str(file_mb << 20), "--tmpfs", "/dev/shm", "--perms", "0711",
                "--size", str(file_mb << 20), "--tmpfs", WORKDIR, "--remount-ro", "/dev", "--remount-ro", "/",
                *(["--seccomp", str(seccomp)] if root else []), "--"]
    if kind == "unshare":
        return ["unshare", *([] if root else ["--user", "--map-root-user"]), "--net", "--pid", "--ipc", "--uts",
                "--fork", "--kill-child", "--mount", "--mount-proc"]
    return []


# seccomp_data: nr at 0, arch at 4, args[0] (its low 32 bits) at 16. Syscall numbers of unshare, clone, clone3.
SYSCALLS = {"x86_64": (0xC000003E, 272, 56, 435), "aarch64": (0xC00000B7, 97, 220, 435)}
CLONE_NEWUSER = 0x10000000


def _seccomp_fd() -> int:
    """The read end of a pipe holding `no_user_namespaces()`, for bwrap to read (and close) once started."""
    read, write = os.pipe()
    os.write(write, no_user_namespaces())
    os.close(write)
    return read


@functools.cache
def no_user_namespaces() -> bytes:
    """A classic BPF seccomp filter that fails unshare and clone asking for a new user namespace (EPERM) and clone3
    (ENOSYS: its flags are out of a filter's reach, and the C library then falls back to clone). Anything else,
    and any other architecture, is allowed; x86_64's x32 calls fail."""
    arch, unshare, clone, clone3 = SYSCALLS.get(os.uname().machine, SYSCALLS["x86_64"])
    ld, jeq, jset, jge, ret = 0x20, 0x15, 0x45, 0x35, 0x06
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("<HBBI", code, jt, jf, k)

    return b"".join([
        op(ld, 4), op(jeq, arch, 1, 0), op(ret, allow),
        op(ld, 0), op(jge, 0x40000000, 0, 1), op(ret, enosys),
        op(jeq, clone3, 0, 1), op(ret, enosys),
        op(jeq, unshare, 1, 0), op(jeq, clone, 0, 3),
        op(ld, 16), op(jset, CLONE_NEWUSER, 0, 1), op(ret, eperm),
        op(ret, allow),
    ])


@functools.cache
def _system_binds() -> list[str]:
    """bwrap arguments that show the OS's programs and libraries and the Python install, read-only, and nothing
    else of the host's (no /etc, /home, /root, /tmp, project or run folders)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/", name)
        if path.is_symlink():  # merged /usr: /lib -> usr/lib
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    prefix = os.path.realpath(sys.base_prefix)
    if not prefix.startswith("/usr/"):
        # bwrap makes a bind's missing parent folders private to root, and the program runs as another uid.
        for parent in reversed(Path(prefix).parents[:-1]):
            args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", prefix, prefix]
        if prefix != sys.base_prefix:
            args += ["--symlink", prefix, sys.base_prefix]
    return args


# What each isolation weaker than bwrap gives up, said once when a run uses it.
WEAKER = {"unshare": "programs see the host's file system (its permissions only) and share its /tmp",
          "none": "limits only: programs see the host's file system and network"}


@functools.cache
def isolation(wanted: str = "auto", allow_weak: bool = False) -> str:
    """The isolation runs use: bwrap for `auto`, or `wanted`. A weaker one only with `allow_weak`, said in one line
    on stderr: for `auto` on a machine where bwrap cannot run, the first of unshare and none that can. UserError
    (one line) if none is allowed."""
    if why := sandbox_memory.available():
        print(f"selfimprove: note: code tasks cap memory per process, not for a program's processes together ({why})",
              file=sys.stderr)
    if wanted in WEAKER and not allow_weak:
        raise UserError(f"task.sandbox.isolation={wanted} is weaker than bwrap ({WEAKER[wanted]}): set "
                        "task.sandbox.allow_weak=true to use it")
    kinds = ("bwrap", *(("unshare", "none") if allow_weak else ())) if wanted == "auto" else (wanted,)
    tried = []
    for kind in kinds:
        problem = _hidden_python() if kind == "none" else _probe(kind)
        if problem is None:
            if kind in WEAKER:
                print(f"selfimprove: warning: code tasks run programs with isolation={kind}, weaker than bwrap "
                      f"({WEAKER[kind]})", file=sys.stderr)
            return kind
        tried.append(f"{kind}: {problem}")
    raise UserError(f"code tasks run model-written programs, and this machine cannot isolate them "
                    f"({'; '.join(tried)}): install bubblewrap (apt-get install bubblewrap)"
                    + ("" if allow_weak else ", or set task.sandbox.allow_weak=true to allow a weaker isolation"))


def _probe(kind: str) -> str | None:
    """Why `kind` cannot run a program here, or None if it can."""
    if shutil.which(kind) is None:
        return "not installed"
    if kind == "unshare" and (problem := _hidden_python()):
        return problem
    seccomp = _seccomp_fd()
    try:
        done = subprocess.run([*_prefix(kind, 1, seccomp), _python(), "-I", "-S", "-c", "pass"], capture_output=True,
                              text=True, timeout=30, cwd="/", pass_fds=(seccomp,))
    except (OSError, subprocess.TimeoutExpired) as e:
        return first_line(e)
    finally:
        os.close(seccomp)
    return None if done.returncode == 0 else first_line(Exception(done.stderr or f"exit status {done.returncode}"))


def _hidden_python() -> str | None:
    """Why programs could not use the Python install without bwrap (which mounts it where they can), or None: as
    root each program runs as a uid of its own, which must be able to reach the install's files."""
    if os.getuid() != 0:
        return None
    path = Path(_python()).resolve()
    closed = [str(folder) for folder in path.parents if not os.stat(folder).st_mode & 0o001]
    if closed:
        return (f"programs run as a uid of their own, and {closed[-1]} keeps the Python install ({path}) from other "
                "users")
    return None


def _processes_of(uid: int) -> int:
    return len(_pids_of(uid))


def _pids_of(uid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    pids.append(int(entry.name))
            except FileNotFoundError:
                continue
    return pids



"""Run a model-written program against its tests, isolated and limited; return a structured verdict.

1. Isolation, the first that runs on this machine (`task.sandbox.isolation=auto`):
   - `bwrap` (bubblewrap, from the OS packages): new network, pid and ipc namespaces; a root file
     system holding only the OS's `/usr` and libraries and the Python install, read-only, a minimal
     `/dev` and no `/proc`; an empty size-limited tmpfs as working directory and HOME.
   - `unshare` (util-linux): new network, pid, ipc and uts namespaces, but the host's file system (file
     permissions only) and a fresh host temp dir as working directory.
   - `none`, only with `allow_weak`: limits, a scrubbed environment and a temp dir, no namespaces.
2. Always: a scrubbed environment (no tokens, no Ray address), `python -I -S` (no site-packages, no
   user paths), CPU-time / address-space / file-size / open-files / process limits set inside, a
   fresh unprivileged uid when we are root (so the process limit counts only this program), the
   whole process group killed at the wall deadline, output capped. Nothing outlives a verdict: in a
   pid namespace everything dies with its first process; without one, every process still running
   under the program's uid is killed.
3. The program runs in `sandbox_harness.py`, which reports on a pipe of its own; see there why
   only "all tests ran and passed" counts as passed.
"""

from __future__ import annotations

import dataclasses
import functools
import marshal
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from selfimprove.config import SandboxConfig
from selfimprove.errors import UserError, first_line

STATUSES = ("passed", "failed", "timeout", "memory", "crashed", "sandbox_error")
HARNESS = (Path(__file__).parent / "sandbox_harness.py").read_text()
WORKDIR = "/sandbox"  # the working directory's path inside bwrap
# Uids no account has: each run takes a random one, so concurrent runs do not share a process budget.
UID_RANGE = (200_000, 2_000_000_000)
SHOWN_OUTPUT = 1024  # characters of a program's output kept in its verdict


@dataclass(frozen=True)
class Verdict:
    status: str  # one of STATUSES
    detail: str = ""  # which test failed, what was raised, which limit was hit
    output: str = ""  # the start of what the program printed
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_tests(program: str, tests: list[str], cfg: SandboxConfig, setup: str = "") -> Verdict:
    """Run `setup` + `program`, then each of `tests` (statements, usually asserts), in a sandbox; never raises for
    anything the program does. UserError only if this machine cannot sandbox at all (see `isolation`)."""
    kind = isolation(cfg.isolation, cfg.allow_weak)
    uid = UID_RANGE[0] + secrets.randbelow(UID_RANGE[1] - UID_RANGE[0]) if os.getuid() == 0 else None
    host_dir = None if kind == "bwrap" else Path(tempfile.mkdtemp(prefix="selfimprove-sandbox-"))
    if host_dir is not None and uid is not None:
        os.chown(host_dir, uid, uid)
    workdir = WORKDIR if host_dir is None else str(host_dir)
    started = time.monotonic()
    try:
        return _run(program, tests, setup, cfg, kind, uid, workdir, started)
    finally:
        if uid is not None and kind == "none":  # in a pid namespace, everything died with the namespace's first process
            _kill_uid(uid)
        if host_dir is not None:
            shutil.rmtree(host_dir, ignore_errors=True)


def _run(program, tests, setup, cfg: SandboxConfig, kind: str, uid, workdir: str, started: float) -> Verdict:
    report_read, report_write = os.pipe()
    nonce = secrets.token_hex(16)
    job = {"program": program, "tests": list(tests), "setup": setup, "nonce": nonce, "uid": uid,
           "workdir": workdir, "report_fd": report_write, "limits": _limits(cfg, uid)}
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    try:
        proc = subprocess.Popen(
            [*_prefix(kind, cfg), _python(), "-I", "-S", "-c", HARNESS], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(report_write,), env=env, cwd=workdir
            if kind != "bwrap" else "/", start_new_session=True)
    except OSError as e:
        os.close(report_read)
        return Verdict("sandbox_error", f"could not start the sandbox: {first_line(e)}")
    finally:
        os.close(report_write)
    try:
        proc.stdin.write(marshal.dumps(job))
        proc.stdin.close()
    except OSError:  # it died before reading its job: the exit status and output say why
        pass
    output, report, timed_out, overflowed = _collect(proc, report_read, cfg)
    code = proc.wait()
    return dataclasses.replace(_verdict(report.decode("utf-8", "replace"), nonce, code, timed_out, overflowed, cfg),
                               output=output[:SHOWN_OUTPUT].decode("utf-8", "replace"),
                               seconds=time.monotonic() - started)


def _collect(proc: subprocess.Popen, report_fd: int, cfg: SandboxConfig) -> tuple[bytes, bytes, bool, bool]:
    """(output, report, timed out, output over its cap): reads the program's output and the harness's report as
    they come until the process ends, killing its group at the wall deadline or once the output passes its cap.
    One thread, woken by the data and by the process's end (a pidfd), not by polling: a verdict is 10-20 ms."""
    cap, deadline = cfg.output_kb * 1024, time.monotonic() + cfg.timeout
    out_fd = proc.stdout.fileno()
    kept = {out_fd: bytearray(), report_fd: bytearray()}
    sizes = dict.fromkeys(kept, 0)
    selector = selectors.DefaultSelector()
    for fd in kept:
        selector.register(fd, selectors.EVENT_READ)
    try:
        exit_fd = os.pidfd_open(proc.pid)
        selector.register(exit_fd, selectors.EVENT_READ)
    except (AttributeError, OSError):  # Linux before 5.3: notice the end by polling
        exit_fd = None
    timed_out = overflowed = False
    open_pipes, ended_at = set(kept), None
    try:
        while open_pipes or ended_at is None:
            now = time.monotonic()
            if ended_at is None and exit_fd is None and proc.poll() is not None:
                ended_at = now
            if ended_at is None and now >= deadline:
                timed_out = True
                _kill_group(proc)
                ended_at = now
            if ended_at is not None and (not open_pipes or now > ended_at + 1):
                break  # a pipe still open after a second is held by a process that outlived it: `_kill_uid` ends it
            wait = max((deadline if ended_at is None else ended_at + 1) - now, 0)
            for key, _ in selector.select(wait if exit_fd is not None else min(wait, 0.005)):
                if key.fd == exit_fd:
                    selector.unregister(exit_fd)
                    ended_at = time.monotonic()
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fd)
                    open_pipes.discard(key.fd)
                    continue
                sizes[key.fd] += len(chunk)
                room = (cap if key.fd == out_fd else 1 << 20) - len(kept[key.fd])
                kept[key.fd] += chunk[:max(room, 0)]
                if key.fd == out_fd and sizes[key.fd] > cap and not overflowed:
                    overflowed = True
                    _kill_group(proc)
    finally:
        selector.close()
        for fd in (exit_fd, report_fd):
            if fd is not None:
                os.close(fd)
        proc.stdout.close()
    return bytes(kept[out_fd]), bytes(kept[report_fd]), timed_out, overflowed


def _verdict(report: str, nonce: str, code: int, timed_out: bool, overflowed: bool, cfg: SandboxConfig) -> Verdict:
    """The verdict from what the harness reported (lines carrying the nonce) and how the sandbox ended."""
    events = {}
    for line in report.splitlines():
        said, event, status, detail = (line.split(" ", 3) + ["", "", ""])[:4]
        if said == nonce:
            events[event] = (status, detail.replace("\\n", "\n"))
    if "verdict" in events and events["verdict"][0] in STATUSES:
        return Verdict(*events["verdict"])
    if timed_out:
        return Verdict("timeout", f"no verdict within {cfg.timeout:g} s of wall time")
    if overflowed:
        return Verdict("crashed", f"printed more than {cfg.output_kb} KiB")
    if "started" not in events:
        return Verdict("sandbox_error", f"the sandbox did not start (exit status {code})")
    if code in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        return Verdict("timeout", f"used its {cfg.cpu_seconds} s of CPU time")
    return Verdict("crashed", f"exited with status {code} before its tests finished")


def _limits(cfg: SandboxConfig, uid: int | None) -> dict[str, int]:
    """The rlimits the harness sets. Without our own uid, the process limit counts the user's other processes too,
    so it is set above their number now."""
    processes = cfg.processes if uid is not None else _processes_of(os.getuid()) + cfg.processes
    return {"cpu_seconds": cfg.cpu_seconds, "memory_bytes": cfg.memory_mb << 20, "file_bytes": cfg.file_mb << 20,
            "open_files": cfg.open_files, "processes": processes}


def _python() -> str:
    """The base interpreter (not a virtualenv's wrapper: no site-packages of ours is inside the sandbox)."""
    return str(Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}")


def _prefix(kind: str, cfg: SandboxConfig) -> list[str]:
    """The command line that puts the interpreter into the isolation `kind`."""
    root = os.getuid() == 0
    if kind == "bwrap":
        # As root no user namespace: the harness then drops to a uid of its own, which a process limit applies to.
        # No /proc, and no uts or cgroup namespace: as another uid, a program could read or change nothing there that
        # matters, and each costs start-up time on every verdict (benchmarks/sandbox.py).
        spaces = ["--unshare-net", "--unshare-pid", "--unshare-ipc"] if root else ["--unshare-all", "--cap-drop", "ALL"]
        return ["bwrap", *spaces, "--die-with-parent", "--new-session", *_system_binds(), "--dev", "/dev",
                "--perms", "0777", "--size", str(cfg.file_mb << 20), "--tmpfs", WORKDIR, "--chdir", WORKDIR, "--"]
    if kind == "unshare":
        return ["unshare", *([] if root else ["--user", "--map-root-user"]), "--net", "--pid", "--ipc", "--uts",
                "--fork", "--kill-child", "--mount", "--mount-proc"]
    return []


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


@functools.cache
def isolation(wanted: str = "auto", allow_weak: bool = False) -> str:
    """The isolation runs use: `wanted`, or for `auto` the first of bwrap, unshare that starts a program here;
    `none` only with `allow_weak`. UserError (one line) if none is allowed."""
    tried = []
    for kind in ("bwrap", "unshare") if wanted == "auto" else (wanted,) if wanted != "none" else ():
        problem = _probe(kind)
        if problem is None:
            return kind
        tried.append(f"{kind}: {problem}")
    if allow_weak:
        return "none"
    why = "; ".join(tried) if tried else "isolation=none was asked for"
    raise UserError(f"code tasks run model-written programs, and this machine cannot isolate them ({why}): install "
                    "bubblewrap (apt-get install bubblewrap), or set task.sandbox.allow_weak=true to run them with "
                    "limits only, no network namespace")


def _probe(kind: str) -> str | None:
    """Why `kind` cannot run a program here, or None if it can."""
    if shutil.which(kind) is None:
        return "not installed"
    try:
        done = subprocess.run([*_prefix(kind, SandboxConfig()), _python(), "-I", "-S", "-c", "pass"],
                              capture_output=True, text=True, timeout=30, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as e:
        return first_line(e)
    return None if done.returncode == 0 else first_line(Exception(done.stderr or f"exit status {done.returncode}"))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


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


def _kill_uid(uid: int) -> None:
    """Kill every process still running under `uid` (a daemon that left the process group and, without a pid
    namespace, the sandbox), until none is left."""
    for _ in range(100):
        pids = _pids_of(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)

"""What runs inside the sandbox: a long-lived Python that forks one child per program and judges it.

`selfimprove.sandbox` starts this file's source once per process and isolation, inside that isolation,
with `python -I -S -c` and the folder programs work in as its argument, then sends it jobs on stdin and
reads verdicts on stdout (each message a 4-byte length and a marshalled dict). A fork of a Python that
is already running costs about a millisecond; a new interpreter costs ten, and a new bubblewrap
sandbox five more: forking is what makes isolation cheap per verdict (benchmarks/sandbox.py).

Per job, the child: its own session, its output on a pipe, limits (CPU time, address space, file
size, open files, processes), a fresh uid of its own when we are root, an empty folder of its own as
working directory and HOME, a scrubbed environment; then the program, then its tests one by one. Only
the line "<nonce> verdict passed", which the child writes on a pipe of its own after the last test,
counts as passed: a program that exits early writes no verdict, and one that prints "passed" prints to
its output, not to that pipe. After the child ends (or is killed at the deadline, or for too much
output), every process it left is killed: all processes of its uid, or, without one, every process in
this pid namespace but ours.

Stdlib only, and nothing imported from the project: the project's files are not inside the sandbox.
"""

import _signal
import marshal
import os
import resource
import select
import shutil
import struct
import sys
import time

LIMITS = {"cpu_seconds": resource.RLIMIT_CPU, "memory_bytes": resource.RLIMIT_AS, "file_bytes": resource.RLIMIT_FSIZE,
          "open_files": resource.RLIMIT_NOFILE, "processes": resource.RLIMIT_NPROC}
STATUSES = ("passed", "failed", "timeout", "memory", "crashed", "sandbox_error")
REPORT_FD = 3  # the child's verdict pipe
KEPT_OUTPUT = 1 << 20  # bytes of output kept for the host (which shows the first KiB)


def receive(fd: int):
    header = _read_exactly(fd, 4)
    return None if header is None else marshal.loads(_read_exactly(fd, struct.unpack("<I", header)[0]) or b"")


def send(fd: int, message) -> None:
    data = marshal.dumps(message)
    os.write(fd, struct.pack("<I", len(data)) + data)


def _read_exactly(fd: int, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def main() -> None:
    # The job channel moves off 0 and 1, which children would otherwise inherit: a program must not reach it.
    jobs, verdicts = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    root, own_pids = sys.argv[1], sys.argv[2] == "pid-namespace"
    while (job := receive(jobs)) is not None:
        send(verdicts, judge(job, root, own_pids))


def judge(job: dict, root: str, own_pids: bool) -> dict:
    """Run one job in a child; its verdict: status, detail and the start of its output."""
    workdir = os.path.join(root, job["nonce"])
    os.mkdir(workdir, 0o700)
    if job["uid"] is not None:
        os.chown(workdir, job["uid"], job["uid"])
    out_r, out_w = os.pipe()
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            child(job, workdir, out_w, report_w)
        finally:
            os._exit(111)
    os.close(out_w)
    os.close(report_w)
    output, report, status, timed_out, overflowed = watch(pid, out_r, report_r, job, own_pids)
    shutil.rmtree(workdir, ignore_errors=True)
    verdict = read_verdict(report.decode("utf-8", "replace"), job, status, timed_out, overflowed)
    return {"status": verdict[0], "detail": verdict[1], "output": output}


def watch(pid: int, out_r: int, report_r: int, job: dict, own_pids: bool):
    """(output, report, exit code, timed out, output over its cap): read both pipes until the child ends, killing
    its group at the wall deadline or when its output passes the cap."""
    deadline = time.monotonic() + job["timeout"]
    kept = {out_r: bytearray(), report_r: bytearray()}
    sizes = dict.fromkeys(kept, 0)
    poller = select.poll()
    for fd in kept:
        poller.register(fd, select.POLLIN)
    exit_fd = os.pidfd_open(pid)
    poller.register(exit_fd, select.POLLIN)
    open_pipes, ended, timed_out, overflowed = set(kept), False, False, False
    while not ended:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            _kill_group(pid)
            break
        for fd, _ in poller.poll(left * 1000):
            if fd == exit_fd:
                ended = True
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                poller.unregister(fd)
                open_pipes.discard(fd)
                continue
            sizes[fd] += len(chunk)
            kept[fd] += chunk[:max(KEPT_OUTPUT - len(kept[fd]), 0)]
            if fd == out_r and sizes[fd] > job["output_bytes"] and not overflowed:
                overflowed = True
                _kill_group(pid)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    os.close(exit_fd)
    sweep(job["uid"], pid, own_pids)  # a process it left may hold its pipes open
    for fd in open_pipes:  # what is still buffered: every writer is gone
        os.set_blocking(fd, False)
        try:
            while chunk := os.read(fd, 1 << 16):
                kept[fd] += chunk[:max(KEPT_OUTPUT - len(kept[fd]), 0)]
        except BlockingIOError:
            pass
    for fd in kept:
        os.close(fd)
    return bytes(kept[out_r]), bytes(kept[report_r]), code, timed_out, overflowed


def read_verdict(report: str, job: dict, code: int, timed_out: bool, overflowed: bool) -> tuple[str, str]:
    events = {}
    for line in report.splitlines():
        said, event, status, detail = (line.split(" ", 3) + ["", "", ""])[:4]
        if said == job["nonce"]:
            events[event] = (status, detail.replace("\\n", "\n"))
    if "verdict" in events and events["verdict"][0] in STATUSES:
        return events["verdict"]
    if timed_out:
        return "timeout", f"no verdict within {job['timeout']:g} s of wall time"
    if overflowed:
        return "crashed", f"printed more than {job['output_bytes'] // 1024} KiB"
    if "started" not in events:
        return "sandbox_error", f"the program's process did not start (exit status {code})"
    if code == -_signal.SIGXCPU:
        return "timeout", f"used its {job['limits']['cpu_seconds']} s of CPU time"
    return "crashed", f"exited with status {code} before its tests finished"


def child(job: dict, workdir: str, out_w: int, report_w: int) -> None:
    """In the forked child: isolate, limit, become the program's uid, run the program and its tests."""
    os.setsid()
    os.dup2(out_w, 1)
    os.dup2(out_w, 2)
    os.dup2(report_w, REPORT_FD)
    os.closerange(REPORT_FD + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    report = os.fdopen(REPORT_FD, "w")
    nonce = job["nonce"]

    def say(event: str, status: str = "", detail: str = "") -> None:
        report.write(f"{nonce} {event} {status} {detail}".replace("\n", "\\n") + "\n")
        report.flush()

    def out_of_cpu(signum, frame):
        say("verdict", "timeout", f"used its {job['limits']['cpu_seconds']} s of CPU time")
        os._exit(1)

    _signal.signal(_signal.SIGXCPU, out_of_cpu)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for name, limit in job["limits"].items():
        # CPU: the soft limit sends SIGXCPU (a timeout), the hard one a second later SIGKILL.
        resource.setrlimit(LIMITS[name], (limit, limit + 1 if name == "cpu_seconds" else limit))
    if job["uid"] is not None:
        os.setgroups([])
        os.setgid(job["uid"])
        os.setuid(job["uid"])
    os.chdir(workdir)
    os.environ.clear()
    os.environ.update(job["env"], HOME=workdir, TMPDIR=workdir)
    sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False)
    say("started")

    scope = {"__name__": "__main__"}
    step = "the program"
    try:
        exec(compile(job["setup"] + "\n" + job["program"], "<program>", "exec"), scope)
        for i, test in enumerate(job["tests"]):
            step = f"test {i + 1}: {test.strip()[:200]}"
            exec(compile(test, f"<test {i + 1}>", "exec"), scope)
    except AssertionError:
        verdict = ("failed", step)
    except MemoryError:
        verdict = ("memory", f"MemoryError in {step}")
    except SystemExit as e:
        verdict = ("crashed", f"exited ({e.code!r}) in {step}")
    except BaseException as e:  # noqa: BLE001 -- any error of the program's is its verdict, not ours
        verdict = ("crashed", f"{type(e).__name__}: {str(e)[:200]} in {step}")
    else:
        verdict = ("passed", f"all {len(job['tests'])} tests passed")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # the program closed it
            pass
    say("verdict", *verdict)
    # Not a normal exit: the program's atexit hooks and threads must not run after its verdict.
    os._exit(0)


def sweep(uid: int | None, pid: int, own_pids: bool) -> None:
    """Kill every process the program left, and return once they are gone (at most 2 s): with a uid of its own,
    all of that uid's, signalled by a helper of that uid, which can signal nothing else; else, in a pid namespace
    of our own, every process but ours and the namespace's first; else (limits only, not root) its group."""
    if uid is None and not own_pids:
        _kill_group(pid)
        return
    until = time.monotonic() + 2
    while (left := _left(uid)) and time.monotonic() < until:
        if uid is None:  # nothing in this namespace is the host's
            for other in left:
                try:
                    os.kill(other, _signal.SIGKILL)
                except ProcessLookupError:
                    pass
        else:
            helper = os.fork()
            if helper == 0:
                try:
                    os.setgid(uid)
                    os.setuid(uid)
                    os.kill(-1, _signal.SIGKILL)  # every process this uid may signal, but not the caller
                finally:
                    os._exit(0)
            os.waitpid(helper, 0)
        time.sleep(0.001)


def _left(uid: int | None) -> list[int]:
    """Processes still there (zombies too, until reaped) that belong to `uid`, or, for None, every process in
    /proc but ours and the first."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (1, os.getpid()):
            continue
        try:
            if uid is None or os.stat(f"/proc/{entry}").st_uid == uid:
                found.append(int(entry))
        except FileNotFoundError:
            continue
    return found


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, _signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


if __name__ == "__main__":
    main()

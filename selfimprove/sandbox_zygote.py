"""What runs inside the sandbox: a long-lived Python that judges one program at a time, out of the program's reach.

`selfimprove.sandbox` starts this file's source once per process and isolation, inside that isolation, with
`python -I -S -c`, the folder programs work in and the kind of pid space as arguments. It sends jobs on stdin (a
4-byte length and a JSON object each) and reads verdicts on stdout, framed the same way.

Three kinds of process, so that nothing a program can reach decides its verdict:
1. The judge (this process): reads jobs, holds their tests, watches the others, sweeps what a program leaves and
   writes the verdicts. No program runs in it, or in a fork of it, except `in_process` jobs (below).
2. The program zygote, forked from the judge before the first job, so that its memory never holds a test: it
   gets each job's program alone and forks the program's process, which runs the program and then answers calls
   (a name and arguments in, the return value out) as plain data: None, bool, int, float, complex, str, bytes,
   and lists, tuples, dicts, sets and frozensets of these, each of exactly that type. A value of any other type
   (a subclass too) is a failed test: an object whose `__eq__` is always true never reaches a comparison.
3. The test process, forked from the judge as another uid than the program's (without root, non-dumpable, so a
   program of the same uid can neither trace it nor open its files), runs the set-up and the tests, in which each
   name the program defines is a stand-in that calls it: comparisons, loops and expected values stay here. It
   alone writes the verdict, on a pipe no program holds.
A job whose tests use the program's classes (`by_value` false), or pass it more than plain data, runs in the
program's own process instead, as a plain harness would, hardened: `exec`, `compile` and the hooks it clears
are bound before the program runs, trace and profile hooks are cleared before each test, and a pass counts only
with a token the harness reads after the last test. A program that knows this protocol can forge that pass: such
verdicts say `in_process`, and the run counts them.

After the test process ends (or at the wall deadline, or past the output cap), every process of the program's uid
is killed, or, without uids of their own, every process in this pid namespace but ours.

Stdlib only, and nothing imported from the project: the project's files are not inside the sandbox.
"""

import _signal
import ast
import builtins
import ctypes
import json
import os
import resource
import select
import shutil
import socket
import struct
import sys
import time

LIMITS = {"cpu_seconds": resource.RLIMIT_CPU, "memory_bytes": resource.RLIMIT_AS, "file_bytes": resource.RLIMIT_FSIZE,
          "open_files": resource.RLIMIT_NOFILE, "processes": resource.RLIMIT_NPROC}
STATUSES = ("passed", "failed", "timeout", "memory", "crashed", "sandbox_error")
KEPT_OUTPUT = 1 << 20  # bytes of a program's output kept for the host (which shows the first KiB)
MAX_MESSAGE = 16 << 20  # bytes of one message: a job, a call or a reply
MAX_DEPTH = 100  # nesting of plain data
CALLS, REPLIES = 3, 4  # the program's process's ends of its pipes to the test process
TOKEN, REPORT = 3, 4  # an in-process program's token pipe and report pipe
PR_SET_DUMPABLE = 4


class NotPlain(Exception):
    """A value that is not plain data; its message says what it is."""


def plain(value, depth: int = 0):
    """`value` as JSON data that `unplain` turns back into the same value of the same exact types. NotPlain if
    it holds anything else."""
    kind = type(value)
    if value is None or kind in (bool, int, str) or kind is float:
        return value
    if depth > MAX_DEPTH:
        raise NotPlain(f"data nested deeper than {MAX_DEPTH}")
    if kind is list:
        return [plain(v, depth + 1) for v in value]
    if kind is dict:
        return {"d": [[plain(k, depth + 1), plain(v, depth + 1)] for k, v in value.items()]}
    tag = {tuple: "t", set: "s", frozenset: "fs"}.get(kind)
    if tag:
        return {tag: [plain(v, depth + 1) for v in value]}
    if kind is bytes:
        return {"b": value.hex()}
    if kind is complex:
        return {"c": [value.real, value.imag]}
    raise NotPlain(f"an object of type {kind.__name__}")


def unplain(data):
    """The value `plain` made `data` from; ValueError (or TypeError) if `data` is not such data."""
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is list:
        return [unplain(v) for v in data]
    if kind is dict and len(data) == 1:
        ((tag, inner),) = data.items()
        if tag == "b" and type(inner) is str:
            return bytes.fromhex(inner)
        if type(inner) is list:
            if tag == "d":
                return {unplain(k): unplain(v) for k, v in inner}
            if tag == "c":
                real, imag = inner
                return complex(float(real), float(imag))
            if tag in ("t", "s", "fs"):
                return {"t": tuple, "s": set, "fs": frozenset}[tag](unplain(v) for v in inner)
    raise ValueError("not plain data")


def write_message(fd: int, message) -> None:
    data = json.dumps(message).encode()
    os.write(fd, struct.pack("<I", len(data)))
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def read_message(fd: int):
    """The next JSON message on `fd`, or None at its end; ValueError if it is not a message."""
    header = _read_exactly(fd, 4)
    if header is None:
        return None
    size = struct.unpack("<I", header)[0]
    if size > MAX_MESSAGE:
        raise ValueError(f"a message of more than {MAX_MESSAGE >> 20} MiB")
    body = _read_exactly(fd, size)
    if body is None:
        return None
    return json.loads(body)


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
    # Without root a program has our uid: non-dumpable, neither we nor our forks can be traced or have their
    # /proc/<pid>/fd opened by it.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    _oom_score(-1000)  # in a memory cgroup, the kernel kills programs, never us (as root; else a no-op)
    sys.set_int_max_str_digits(0)  # plain data may hold any int
    root, own_pids = sys.argv[1], sys.argv[2] == "pid-namespace"
    ours, theirs = socket.socketpair()
    zygote = os.fork()
    if zygote == 0:
        try:
            os.close(jobs)
            os.close(verdicts)
            ours.close()
            program_zygote(theirs)
        finally:
            os._exit(0)
    theirs.close()
    keep = {os.getpid(), zygote}
    while (job := read_message(jobs)) is not None:
        write_message(verdicts, judge(job, root, own_pids, ours, keep))


def judge(job: dict, root: str, own_pids: bool, zygote: socket.socket, keep: set[int]) -> dict:
    """Judge one job: by value where its tests allow, else in the program's process. The verdict: status, detail,
    how it was judged and the start of the program's output."""
    workdir = os.path.join(root, job["name"])
    verdict = None
    if job["by_value"]:
        _fresh_folder(workdir, job["uid"])
        verdict = by_value(job, workdir, own_pids, zygote, keep)
    if verdict is None:  # the tests pass the program more than plain data: they need its objects
        _fresh_folder(workdir, job["uid"])
        verdict = in_process(job, workdir, own_pids, keep)
    shutil.rmtree(workdir, ignore_errors=True)
    return verdict


def _fresh_folder(path: str, uid: int | None) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.mkdir(path, 0o700)
    if uid is not None:
        os.chown(path, uid, uid)


def by_value(job: dict, workdir: str, own_pids: bool, zygote: socket.socket, keep: set[int]) -> dict | None:
    """Run the program in a process of the program zygote's and its tests in a test process of ours; None if the
    tests pass it more than plain data."""
    calls_r, calls_w = os.pipe()
    replies_r, replies_w = os.pipe()
    out_r, out_w = os.pipe()
    report_r, report_w = os.pipe()
    part = json.dumps({k: job[k] for k in ("program", "setup", "uid", "limits", "env")} | {"workdir": workdir}).encode()
    socket.send_fds(zygote, [struct.pack("<I", len(part))], [calls_r, replies_w, out_w])
    zygote.sendall(part)
    for fd in (calls_r, replies_w, out_w):
        os.close(fd)
    program = struct.unpack("<i", _recv_exactly(zygote, 4))[0]
    tests = os.fork()
    if tests == 0:
        try:
            test_process(job, calls_w, replies_r, report_w)
        finally:
            os._exit(111)
    for fd in (calls_w, replies_r, report_w):
        os.close(fd)
    output, report, timed_out, overflowed = watch(tests, [program, tests], out_r, report_r, job)
    tests_code = os.waitstatus_to_exitcode(os.waitpid(tests, 0)[1])
    sweep(job["uid"], program, own_pids, keep)
    sweep(job["judge_uid"], tests, own_pids, keep)
    program_code = struct.unpack("<i", _recv_exactly(zygote, 4))[0]
    try:
        said = json.loads(report) if report else {}
    except ValueError:
        said = {}
    if said.get("fallback"):
        return None
    if timed_out:
        status = ("timeout", f"no verdict within {job['timeout']:g} s of wall time")
    elif overflowed:
        status = ("crashed", f"printed more than {job['output_bytes'] // 1024} KiB")
    elif said.get("status") in STATUSES:
        status = (said["status"], said["detail"])
    elif "gone" in said:  # the program's process ended while a test waited on it
        status = _ended(job, program_code, said["gone"])
    else:
        status = ("crashed", f"the test process ended with status {tests_code} and no verdict")
    return {"status": status[0], "detail": status[1], "judged": "value", "output": _text(output)}


def _ended(job: dict, code: int, step: str) -> tuple[str, str]:
    if code == -_signal.SIGXCPU:
        return "timeout", f"used its {job['limits']['cpu_seconds']} s of CPU time"
    return "crashed", f"exited with status {code} in {step}"


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise SystemExit("the program zygote ended")
        data += chunk
    return data


def program_zygote(channel: socket.socket) -> None:
    """Fork a process per program sent on `channel` (with its pipes), say its pid, then its exit status."""
    while True:
        try:
            header, fds, _, _ = socket.recv_fds(channel, 4, 3)
        except OSError:
            return
        if len(header) < 4:
            return
        part = json.loads(_recv_exactly(channel, struct.unpack("<I", header)[0]))
        pid = os.fork()
        if pid == 0:
            try:
                channel.close()
                program_process(part, *fds)
            finally:
                os._exit(111)
        for fd in fds:
            os.close(fd)
        channel.sendall(struct.pack("<i", pid))
        channel.sendall(struct.pack("<i", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])))


def _place(fds: dict[int, int]) -> None:
    """Give each open fd of `fds` the number it maps to (output to 1 goes to 2 too), and close every other fd
    above 2: what a program's process holds is its pipes and nothing of ours."""
    high = {os.dup2(fd, 200 + i): to for i, (fd, to) in enumerate(fds.items())}
    for fd, to in high.items():
        os.dup2(fd, to)
        if to == 1:
            os.dup2(fd, 2)
    top = max(fds.values())
    os.closerange(top + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    for fd in range(3, top):
        if fd not in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass


def _oom_score(adjustment: int) -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(adjustment))
    except OSError:  # lowering it needs root
        pass


def become(job: dict, workdir: str, uid: int | None, program: bool = True) -> None:
    """In a forked process: its own session, limits, uid, folder and environment; a `program`'s process is the
    first the kernel kills when its memory cgroup is full."""
    os.setsid()
    _oom_score(1000 if program else -1000)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for name, limit in job["limits"].items():
        # CPU: the soft limit sends SIGXCPU, the hard one a second later SIGKILL.
        resource.setrlimit(LIMITS[name], (limit, limit + 1 if name == "cpu_seconds" else limit))
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    os.chdir(workdir)
    os.environ.clear()
    os.environ.update(job["env"], HOME=workdir, TMPDIR=workdir)
    sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False)


def program_process(part: dict, calls: int, replies: int, out: int) -> None:
    """Run the program, then answer the test process's calls with plain data until it hangs up."""
    _place({calls: CALLS, replies: REPLIES, out: 1})
    become(part, part["workdir"], part["uid"])
    scope, pid = {"__name__": "__main__"}, os.getpid()
    try:
        exec(compile(part["program"] + "\n" + part["setup"], "<program>", "exec"), scope)
    except BaseException as e:  # noqa: BLE001 -- any error of the program's is its verdict, not ours
        _reply(["raised", *_described(e)])
        os._exit(0)
    if os.getpid() != pid:  # a fork of the program's process that ran on: only the process that ran it answers
        os._exit(0)
    _reply(["ready", *_names(scope)])
    while (call := read_message(CALLS)) is not None:
        _, name, args, kwargs = call
        try:
            result = scope[name](*unplain(args), **unplain(kwargs))
        except BaseException as e:  # noqa: BLE001
            _reply(["raised", *_described(e)])
            continue
        try:
            _reply(["ok", plain(result)])
        except NotPlain as e:
            _reply(["not_plain", str(e)])
    os._exit(0)


def _reply(message: list) -> None:
    """Send `message` to the test process, what the program printed first: it is killed, not ended, at the end."""
    _flush()
    write_message(REPLIES, message)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # the program closed it
            pass


def _described(e: BaseException) -> tuple[str, str]:
    if isinstance(e, SystemExit):
        return "SystemExit", repr(e.code)
    try:
        return str(type(e).__name__), str(e)[:200]
    except BaseException:  # noqa: BLE001 -- its __str__ is the program's
        return "Exception", ""


def _names(scope: dict) -> tuple[list[str], dict]:
    """The names the program defined: those it can be called by, and its plain global values."""
    calls, values = [], {}
    for name, value in list(scope.items()):
        if type(name) is not str or name.startswith("__"):
            continue
        if callable(value):
            calls.append(name)
        else:
            try:
                values[name] = plain(value)
            except NotPlain:
                pass  # a module, or an object: not for the tests
    return calls, values


class ProgramGone(BaseException):
    """The program's process ended while a test waited on it."""


class NotPlainResult(BaseException):
    """A call returned something else than plain data: a failed test, whatever the test catches."""


class NeedsProcess(BaseException):
    """A test passed the program more than plain data: the job must run in the program's process."""


def test_process(job: dict, calls_fd: int, replies_fd: int, report_fd: int) -> None:
    """Run the set-up and the tests against stand-ins for the program's names; write the verdict on `report`."""
    calls, replies, report = 3, 4, 5
    _place({old: new for old, new in zip((calls_fd, replies_fd, report_fd), (calls, replies, report))})
    become(job, "/", job["judge_uid"], program=False)
    step = "the program"

    def call(name: str, args: tuple, kwargs: dict):
        try:
            request = ["call", name, plain(list(args)), plain(kwargs)]
        except NotPlain:
            raise NeedsProcess() from None
        write_message(calls, request)
        try:
            answer = read_message(replies)
        except ValueError:
            answer = None
        if type(answer) is not list or not answer:
            raise ProgramGone()
        if answer[0] == "ok" and len(answer) == 2:
            try:
                return unplain(answer[1])
            except (ValueError, TypeError):
                raise NotPlainResult(f"{name} returned something that is not plain data") from None
        if answer[0] == "not_plain" and len(answer) == 2:
            raise NotPlainResult(f"{name} returned {answer[1]}, not plain data")
        if answer[0] == "raised" and len(answer) == 3:
            raise _raised(*map(str, answer[1:]))
        raise ProgramGone()

    def stand_in(name: str):
        def called(*args, **kwargs):
            return call(name, args, kwargs)
        called.__name__ = called.__qualname__ = name
        return called

    try:
        scope = {"__name__": "__main__"}
        ready = read_message(replies)
        if type(ready) is not list or not ready:
            raise ProgramGone()
        if ready[0] == "raised" and len(ready) == 3:
            raise _raised(*map(str, ready[1:]))
        step = "the test set-up"
        exec(compile(job["setup"], "<setup>", "exec"), scope)
        # The tests' own names and the built-ins they use stay theirs: a program's `abs` that returns 0 must not
        # pass `assert abs(f(1) - 2) < 1e-6`.
        names, values = ready[1], ready[2]
        for name in map(str, names):
            if not hasattr(builtins, name):
                scope.setdefault(name, stand_in(name))
        for name, value in values.items():
            if not hasattr(builtins, name):
                scope.setdefault(name, unplain(value))
        for i, test in enumerate(job["tests"]):
            step = f"test {i + 1}: {test.strip()[:200]}"
            exec(compile(test, f"<test {i + 1}>", "exec"), scope)
    except NeedsProcess:
        said = {"fallback": True}
    except ProgramGone:
        said = {"gone": step}
    except NotPlainResult as e:
        said = {"status": "failed", "detail": f"{e} in {step}"}
    except BaseException as e:  # noqa: BLE001 -- a test's error is the program's verdict
        said = dict(zip(("status", "detail"), _outcome(e, step)))
    else:
        said = {"status": "passed", "detail": f"all {len(job['tests'])} tests passed"}
    os.write(report, json.dumps(said).encode())
    os._exit(0)


def _raised(name: str, message: str) -> BaseException:
    """In the test process, the exception a call raised in the program's: a built-in one by its name, else one of
    that name; an exit ends the test run as it would have ended the program."""
    if name == "SystemExit":
        return SystemExit(message)
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        return kind(message)
    return type(name, (Exception,), {})(message)


def _outcome(e: BaseException, step: str) -> tuple[str, str]:
    """(status, detail) of a test run that raised `e` in `step`."""
    if isinstance(e, AssertionError):
        return "failed", step
    if isinstance(e, MemoryError):
        return "memory", f"MemoryError in {step}"
    if isinstance(e, SystemExit):
        code = e.code if isinstance(e.code, str) else repr(e.code)
        return "crashed", f"exited ({code}) in {step}"
    return "crashed", f"{type(e).__name__}: {str(e)[:200]} in {step}"


def in_process(job: dict, workdir: str, own_pids: bool, keep: set[int]) -> dict:
    """Run the program and then its tests in one process of its uid, as a plain harness would."""
    out_r, out_w = os.pipe()
    token_r, token_w = os.pipe()
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _place({token_r: TOKEN, report_w: REPORT, out_w: 1})
            become(job, workdir, job["uid"])
            harness(job["program"] + "\n" + job["setup"], job["tests"])
        finally:
            os._exit(111)
    for fd in (out_w, token_r, report_w):
        os.close(fd)
    # Made after the fork, so that the program's process holds it only once it reads it.
    token = os.urandom(16).hex()
    os.write(token_w, token.encode())
    os.close(token_w)
    output, report, timed_out, overflowed = watch(pid, [pid], out_r, report_r, job)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    sweep(job["uid"], pid, own_pids, keep)
    said = report.decode("utf-8", "replace")
    if said == f"{token} passed":
        status = ("passed", f"all {len(job['tests'])} tests passed")
    elif timed_out:
        status = ("timeout", f"no verdict within {job['timeout']:g} s of wall time")
    elif overflowed:
        status = ("crashed", f"printed more than {job['output_bytes'] // 1024} KiB")
    elif said.startswith("{"):
        try:
            failure = json.loads(said)
            status = (failure["status"], failure["detail"]) if failure["status"] in STATUSES[1:] else None
        except (ValueError, KeyError, TypeError):
            status = None
        status = status or ("crashed", "its report was not a verdict")
    else:
        status = _ended(job, code, "the program or its tests")
    return {"status": status[0], "detail": status[1], "judged": "in_process", "output": _text(output)}


EQUAL = "__plain_equal__"  # the name asserts against a literal call in process


def plain_equal(value, expected) -> bool:
    """`value == expected` as plain data: False, without calling anything of `value`'s, if it is not plain data."""
    try:
        return unplain(plain(value)) == expected
    except NotPlain:
        return False


def _asserting_plainly(test: str):
    """`test` compiled with each `assert <expr> == <literal>` (either side) made `assert __plain_equal__(...)`."""
    tree = ast.parse(test)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1
                and isinstance(node.test.ops[0], ast.Eq)):
            sides = [node.test.left, node.test.comparators[0]]
            for i, side in enumerate(sides):
                try:
                    ast.literal_eval(side)
                except ValueError:
                    continue
                node.test = ast.Call(ast.Name(EQUAL, ast.Load()), [sides[1 - i], side], [])
                break
    return compile(ast.fix_missing_locations(tree), "<test>", "exec")


def harness(program: str, tests: list[str]) -> None:
    """In the program's process: the program, then each test; a failure is reported as such, a pass with the
    token read after the last test."""
    run, build, read, write, exit_now, equal = exec, compile, os.read, os.write, os._exit, plain_equal
    unhook = (sys.settrace, sys.setprofile, getattr(sys, "monitoring", None))
    scope, step, pid = {"__name__": "__main__"}, "the program", os.getpid()
    try:
        run(build(program, "<program>", "exec"), scope)
        if os.getpid() != pid:  # a fork of the program's process that ran on
            exit_now(0)
        compiled = [_asserting_plainly(test) for test in tests]  # before a program's object can be called
        for i, test in enumerate(tests):
            step = f"test {i + 1}: {test.strip()[:200]}"
            _unhooked(*unhook)
            scope[EQUAL] = equal
            run(compiled[i], scope)
    except BaseException as e:  # noqa: BLE001 -- any error of the program's is its verdict, not ours
        status, detail = _outcome(e, step)
        _flush()
        write(REPORT, json.dumps({"status": status, "detail": detail}).encode())
    else:
        _flush()
        write(REPORT, read(TOKEN, 64) + b" passed")
    # Not a normal exit: the program's atexit hooks and threads must not run after its verdict.
    exit_now(0)


def _unhooked(settrace, setprofile, monitoring) -> None:
    """Clear this thread's trace and profile hooks and every `sys.monitoring` tool's events."""
    settrace(None)
    setprofile(None)
    if monitoring is not None:
        for tool in range(6):
            monitoring.set_events(tool, 0)


def _text(output: bytes) -> str:
    return output.decode("utf-8", "replace")


def watch(ends: int, groups: list[int], out_r: int, report_r: int, job: dict) -> tuple[bytes, bytes, bool, bool]:
    """(output, report, timed out, output over its cap): read the program's output and the report until the
    process `ends` ends, killing the process groups `groups` at the wall deadline or when the output passes the
    cap."""
    deadline = time.monotonic() + job["timeout"]
    kept = {out_r: bytearray(), report_r: bytearray()}
    sizes = dict.fromkeys(kept, 0)
    poller = select.poll()
    for fd in kept:
        poller.register(fd, select.POLLIN)
    exit_fd = os.pidfd_open(ends)
    poller.register(exit_fd, select.POLLIN)
    open_pipes, ended, timed_out, overflowed = set(kept), False, False, False
    while not ended:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            for group in groups:
                _kill_group(group)
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
                for group in groups:
                    _kill_group(group)
    os.close(exit_fd)
    for group in groups:  # a process left in them may hold the pipes open
        _kill_group(group)
    for fd in open_pipes:  # what is still buffered
        os.set_blocking(fd, False)
        try:
            while chunk := os.read(fd, 1 << 16):
                kept[fd] += chunk[:max(KEPT_OUTPUT - len(kept[fd]), 0)]
        except BlockingIOError:
            pass
    for fd in kept:
        os.close(fd)
    return bytes(kept[out_r]), bytes(kept[report_r]), timed_out, overflowed


def sweep(uid: int | None, pid: int, own_pids: bool, keep: set[int]) -> None:
    """Kill every process the program left, and return once they are gone (at most 2 s): with a uid of its own,
    all of that uid's, signalled by a helper of that uid, which can signal nothing else; else, in a pid namespace
    of our own, every process but ours (`keep`) and the namespace's first; else (limits only, not root) its group."""
    if uid is None and not own_pids:
        _kill_group(pid)
        return
    until = time.monotonic() + 2
    while _reaped() and (left := _left(uid, keep)) and time.monotonic() < until:
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


def _reaped() -> bool:
    """Reap what has ended among our children, which, as the namespace's first process, include every orphan;
    True."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
    return True


def _left(uid: int | None, keep: set[int]) -> list[int]:
    """Processes still there (zombies too, until reaped) that belong to `uid`, or, for None, every process in
    /proc but `keep` and the first."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == 1 or int(entry) in keep:
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

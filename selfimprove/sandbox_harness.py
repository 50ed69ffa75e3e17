"""What runs inside the sandbox: limits itself, drops root, runs a program, then its tests one by one.

`selfimprove.sandbox` starts this file's source with `python -I -S -c` and writes the job to its stdin,
marshalled: the program, its tests and set-up code, the limits, the uid to become, the descriptor of the
report pipe and a nonce. Nothing imported from the project (its files are not inside the sandbox), and
only built-in modules: `json`, `signal` and `re` would cost more start-up than the isolation does.

The report pipe gets a line "<nonce> started" when the program starts and "<nonce> verdict <status>
<detail>" when it ends. Only the verdict line "passed", written after the last test ran, counts as correct: a
program that exits early (`sys.exit(0)`, `os._exit(0)`, a signal) writes no verdict, and one that
prints "passed" prints to stdout, which is not the report pipe.
"""

import _signal
import marshal
import os
import resource
import sys

LIMITS = {"cpu_seconds": resource.RLIMIT_CPU, "memory_bytes": resource.RLIMIT_AS, "file_bytes": resource.RLIMIT_FSIZE,
          "open_files": resource.RLIMIT_NOFILE, "processes": resource.RLIMIT_NPROC}


def main() -> None:
    job = marshal.loads(sys.stdin.buffer.read())
    sys.stdin.close()
    report = os.fdopen(job["report_fd"], "w")
    nonce = job["nonce"]

    def say(event: str, status: str = "", detail: str = "") -> None:
        report.write(f"{nonce} {event} {status} {detail}".replace("\n", "\\n") + "\n")
        report.flush()

    def out_of_cpu(signum, frame):
        # Said from inside: a namespace tool between us and the host may not pass the signal's exit status on.
        say("verdict", "timeout", f"used its {job['limits']['cpu_seconds']} s of CPU time")
        os._exit(1)

    _signal.signal(_signal.SIGXCPU, out_of_cpu)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for name, limit in job["limits"].items():
        # CPU: the soft limit sends SIGXCPU (a timeout), the hard one a second later SIGKILL.
        resource.setrlimit(LIMITS[name], (limit, limit + 1 if name == "cpu_seconds" else limit))
    if job["uid"] is not None and os.getuid() == 0:
        # A fresh uid per run: its process limit counts only this program's processes (root's would count none),
        # and the host can kill whatever still runs under it afterwards.
        os.setgroups([])
        os.setgid(job["uid"])
        os.setuid(job["uid"])
    os.chdir(job["workdir"])
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


if __name__ == "__main__":
    main()

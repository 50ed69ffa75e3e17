"""The sandbox against hostile programs: each gets its verdict within its deadline, the host and the run are
unharmed, and nothing it started is left running. Real bubblewrap (installed by `make install`), real processes."""

import os
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

import selfimprove
from selfimprove import sandbox, sandbox_memory
from selfimprove.config import SandboxConfig
from selfimprove.errors import UserError
from selfimprove.sandbox import run_tests

CFG = SandboxConfig(isolation="bwrap", timeout=4.0, cpu_seconds=2, file_mb=8, output_kb=64)
DOUBLE = "def double(x):\n    return 2 * x\n"
DOUBLE_TESTS = ["assert double(2) == 4", "assert double(-3) == -6"]


def processes_with(marker: str) -> list[int]:
    """Pids of processes whose command line holds `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def run(program: str, tests=(), cfg=CFG):
    started = time.monotonic()
    verdict = run_tests(program, list(tests), cfg)
    # The deadline is the wall timeout plus the time it takes to kill and reap: well under a second more.
    assert time.monotonic() - started < cfg.timeout + 3
    return verdict


def test_a_correct_program_passes_and_a_wrong_one_fails_at_the_assert_it_breaks():
    assert run(DOUBLE, DOUBLE_TESTS).status == "passed"
    verdict = run("def double(x):\n    return x + 2\n", DOUBLE_TESTS)
    assert (verdict.status, verdict.detail) == ("failed", "test 2: assert double(-3) == -6")


def test_setup_code_runs_before_the_program():
    assert run_tests("def f():\n    return LIMIT\n", ["assert f() == 7"], CFG, setup="LIMIT = 7").passed


@pytest.mark.parametrize("program", [
    "import sys\nsys.exit(0)\n" + DOUBLE,
    "import os\nos._exit(0)\n" + DOUBLE,
    'print(\'{"event": "verdict", "status": "passed", "detail": ""}\')\nprint("passed")\nimport os\nos._exit(0)\n',
    "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
], ids=["sys.exit(0)", "os._exit(0)", "prints passed", "kills itself"])
def test_a_program_that_ends_before_its_tests_ran_is_not_correct(program):
    verdict = run(program, DOUBLE_TESTS)
    assert verdict.status == "crashed"


def test_an_infinite_loop_and_a_sleep_time_out():
    assert run("while True:\n    pass\n").status == "timeout"  # the CPU limit
    verdict = run("import time\ntime.sleep(60)\n")  # the wall deadline
    assert (verdict.status, verdict.detail) == ("timeout", "no verdict within 4 s of wall time")


def test_a_fork_bomb_hits_the_process_limit_times_out_and_leaves_nothing():
    bomb = "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)\n"
    assert run(bomb).status == "timeout"
    # The host can still start processes, and the bomb's uid runs none.
    assert run(DOUBLE, DOUBLE_TESTS).passed


def test_allocating_50_gib_is_a_memory_verdict():
    verdict = run("block = bytearray(50 * 2**30)\n")
    assert (verdict.status, verdict.detail) == ("memory", "MemoryError in the program")


def test_writing_10_gb_stops_at_the_file_limit_and_nothing_reaches_the_host_disk(tmp_path):
    before = os.statvfs("/").f_bavail
    verdict = run("with open('big', 'wb') as f:\n    for _ in range(10240):\n        f.write(b'x' * 2**20)\n")
    assert verdict.status == "crashed" and "File too large" in verdict.detail
    # Many files each under the limit stop at the working directory's size.
    verdict = run("for i in range(2000):\n    open(f'f{i}', 'wb').write(b'x' * 2**20)\n")
    assert verdict.status == "crashed" and "No space left" in verdict.detail
    assert before - os.statvfs("/").f_bavail < 2**30 // os.statvfs("/").f_frsize


def test_the_run_dir_home_and_project_files_can_be_neither_written_nor_read(tmp_path):
    (tmp_path / "pairs.parquet").write_text("finished work")
    project = Path(selfimprove.__file__).resolve()
    attempts = {
        "write the run dir": f"open({str(tmp_path / 'pairs.parquet')!r}, 'w').write('lost')",
        "write a new file there": f"open({str(tmp_path / 'new')!r}, 'w').write('x')",
        "write the real HOME": f"open({str(Path.home() / 'planted')!r}, 'w').write('x')",
        "read ~/.ssh": f"import os\nos.listdir({str(Path.home() / '.ssh')!r})",
        "read the project": f"open({str(project)!r}).read()",
        "read the host's environment": "open('/proc/1/environ').read()",
        "read /etc/passwd": "open('/etc/passwd').read()",
    }
    for what, program in attempts.items():
        verdict = run(program)
        assert verdict.status == "crashed", what
        assert verdict.detail.split(":")[0] in ("FileNotFoundError", "PermissionError", "OSError"), what
    assert (tmp_path / "pairs.parquet").read_text() == "finished work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.parquet"]
    assert not (Path.home() / "planted").exists()


def test_the_environment_is_scrubbed_and_home_is_its_own_empty_folder(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    program = ("import os\nenv = dict(os.environ)\nhome = os.path.expanduser('~')\nlisted = os.listdir(home)\n"
               "here = os.getcwd()\n")
    verdict = run(program, ["assert 'HF_TOKEN' not in env and 'RAY_ADDRESS' not in env",
                            "assert home == here and listed == []"])
    assert verdict.passed, verdict.detail


def test_no_network_a_listener_on_this_machine_gets_no_connection():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        verdict = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n")
        assert verdict.status == "crashed" and ("Network is unreachable" in verdict.detail
                                                or "Connection refused" in verdict.detail)
        with pytest.raises(TimeoutError):
            listener.accept()
    # The only interface is a loopback of its own namespace's (which the connection above did not leave).
    verdict = run("import socket\nnames = [name for _, name in socket.if_nameindex()]\n", ["assert names == ['lo']"])
    assert verdict.passed, verdict.detail


def test_killing_its_parent_harms_no_one():
    verdict = run("import os\nos.kill(os.getppid(), 9)\n" + DOUBLE, DOUBLE_TESTS)
    assert verdict.status in ("crashed", "passed")
    assert run(DOUBLE, DOUBLE_TESTS).passed  # this process, the sandbox's host, lives on


def test_a_daemon_does_not_outlive_its_verdict():
    marker = "987654.25"  # `sleep` takes fractional seconds: an argument no other process has
    daemon = ("import os, subprocess\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              f"        subprocess.Popen(['sleep', '{marker}'])\n        os._exit(0)\n    os._exit(0)\n"
              "import time\ntime.sleep(0.5)\n" + DOUBLE)
    verdict = run(daemon, DOUBLE_TESTS)
    assert verdict.passed, verdict.detail
    assert processes_with(f"sleep {marker}") == []


def test_deleting_its_own_folder_harms_nothing_and_the_next_run_has_a_fresh_one():
    program = "import os, shutil\nopen('mine', 'w').write('x')\nshutil.rmtree(os.getcwd(), ignore_errors=True)\n"
    assert run(program + DOUBLE, DOUBLE_TESTS).passed
    assert run("import os\nassert os.listdir('.') == []\n" + DOUBLE, DOUBLE_TESTS).passed


def test_printing_a_gigabyte_is_cut_off_at_the_output_limit():
    verdict = run("import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * 2**20)\n")
    assert (verdict.status, verdict.detail) == ("crashed", "printed more than 64 KiB")
    assert verdict.output == "x" * sandbox.SHOWN_OUTPUT


def test_a_syntax_error_and_non_utf8_output_are_verdicts_not_errors():
    verdict = run("def double(x:\n    return 2 * x\n", DOUBLE_TESTS)
    assert verdict.status == "crashed" and verdict.detail.startswith("SyntaxError")
    verdict = run("import sys\nsys.stdout.buffer.write(b'\\xff\\xfe ok')\n" + DOUBLE, DOUBLE_TESTS)
    assert verdict.passed and verdict.output == "\ufffd\ufffd ok"


SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")


@pytest.fixture
def readable_python(monkeypatch):
    """Without bwrap, programs (as uids of their own) need a Python install other users can read: the OS's, of our
    version (Debian's python3 on our machines; ours lives under /root)."""
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"no {SYSTEM_PYTHON} on this machine")
    monkeypatch.setattr(sandbox, "_python", lambda: str(SYSTEM_PYTHON))
    sandbox.isolation.cache_clear()
    sandbox._close_zygotes()
    yield
    sandbox.isolation.cache_clear()
    sandbox._close_zygotes()


def test_namespaces_without_bubblewrap_still_keep_the_network_and_daemons_out(readable_python):
    cfg = replace(CFG, isolation="unshare", allow_weak=True)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        verdict = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n", cfg=cfg)
        assert verdict.status == "crashed" and "Network is unreachable" in verdict.detail, verdict.detail
        with pytest.raises(TimeoutError):
            listener.accept()
    assert run(DOUBLE, DOUBLE_TESTS, cfg=cfg).passed
    assert run("while True:\n    pass\n", cfg=cfg).status == "timeout"
    marker = "987655.25"
    daemon = f"import os, subprocess\nif os.fork() == 0:\n    os.setsid()\n    subprocess.Popen(['sleep', '{marker}'])\n"
    assert run(daemon + DOUBLE, DOUBLE_TESTS, cfg=cfg).passed
    assert processes_with(f"sleep {marker}") == []


def test_without_bubblewrap_a_python_install_other_users_cannot_read_is_refused(monkeypatch, tmp_path):
    private = tmp_path / "private"
    (private / "bin").mkdir(parents=True)
    (private / "bin" / "python3").write_text("")
    private.chmod(0o700)
    monkeypatch.setattr(sandbox, "_python", lambda: str(private / "bin" / "python3"))
    sandbox.isolation.cache_clear()
    try:
        if os.getuid() == 0:
            with pytest.raises(UserError, match=rf"unshare: programs run as a uid of their own, and /\S+ keeps the "
                                                rf"Python install \({private}/bin/python3\) from other users"):
                sandbox.isolation("unshare", True)
        else:
            assert sandbox._hidden_python() is None  # programs run as the user, who reads the install
    finally:
        sandbox.isolation.cache_clear()


def test_a_machine_that_cannot_isolate_refuses_in_one_line_unless_weak_is_allowed(monkeypatch, capsys, readable_python):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match=r"cannot isolate them \(bwrap: not installed\): install bubblewrap .*, or set "
                                        r"task\.sandbox\.allow_weak=true to allow a weaker isolation$"):
        sandbox.isolation("auto", False)
    for weaker in ("unshare", "none"):  # never chosen silently
        with pytest.raises(UserError, match=rf"^task\.sandbox\.isolation={weaker} is weaker than bwrap \(.*\): set "
                                            r"task\.sandbox\.allow_weak=true to use it$"):
            sandbox.isolation(weaker, False)
    assert sandbox.isolation("auto", True) == "none"
    assert capsys.readouterr().err == ("selfimprove: warning: code tasks run programs with isolation=none, weaker than "
                                       "bwrap (limits only: programs see the host's file system and network)\n")
    # Limits alone still judge a program, and sweep what it leaves.
    weak = replace(CFG, isolation="none", allow_weak=True)
    assert run(DOUBLE, DOUBLE_TESTS, cfg=weak).passed
    assert run("import os\nos._exit(0)\n", DOUBLE_TESTS, cfg=weak).status == "crashed"
    marker = "987656.25"
    daemon = f"import os, subprocess\nif os.fork() == 0:\n    os.setsid()\n    subprocess.Popen(['sleep', '{marker}'])\n"
    assert run(daemon + DOUBLE, DOUBLE_TESTS, cfg=weak).passed
    if os.getuid() == 0:  # a uid of its own to sweep; a user without one has only the process group
        assert processes_with(f"sleep {marker}") == []


def test_a_killed_zygote_costs_only_the_program_it_was_judging():
    import signal
    import threading

    assert run(DOUBLE, DOUBLE_TESTS).passed  # the zygote is up
    zygote = sandbox._ZYGOTES[("bwrap", CFG.file_mb, CFG.memory_mb)]
    verdicts = []
    judging = threading.Thread(target=lambda: verdicts.append(run("import time\ntime.sleep(2)\n" + DOUBLE, DOUBLE_TESTS)))
    judging.start()
    time.sleep(0.5)
    os.killpg(zygote.proc.pid, signal.SIGKILL)
    judging.join()
    assert (verdicts[0].status, verdicts[0].detail) == (
        "crashed", "the sandbox's process died or hung while judging it; it was restarted")
    assert run(DOUBLE, DOUBLE_TESTS).passed
    assert sandbox._ZYGOTES[("bwrap", CFG.file_mb, CFG.memory_mb)] is not zygote


@pytest.mark.skipif(sandbox_memory.available() is not None, reason="needs a memory cgroup of our own (root)")
def test_a_programs_processes_together_are_capped_where_the_machine_has_memory_cgroups():
    """Six processes of 150 MiB each stay under a 256 MiB address-space limit apiece, but not under 256 MiB (plus
    the zygote's headroom) together: the kernel kills some, and the verdict says memory."""
    # Each child says when it holds its 150 MiB; the parent waits until each has said so or died.
    program = ("import os, time\nread, write = os.pipe()\nkids = []\nfor _ in range(6):\n    pid = os.fork()\n"
               "    if pid == 0:\n        block = b'x' * (150 * 2**20)\n        os.write(write, b'1')\n"
               "        time.sleep(30)\n        os._exit(0)\n    kids.append(pid)\nos.set_blocking(read, False)\n"
               "held, dead = 0, set()\nwhile held + len(dead) < 6:\n    try:\n        held += len(os.read(read, 6))\n"
               "    except BlockingIOError:\n        pass\n"
               "    dead |= {pid for pid in kids if os.waitpid(pid, os.WNOHANG)[0]}\n    time.sleep(0.01)\n"
               "def f(x):\n    return 6 - len(dead)\n")
    cfg = replace(CFG, memory_mb=256, processes=32)
    verdict = run(program, ["assert f(0) == 6"], cfg=cfg)
    assert (verdict.status, verdict.detail) == ("memory", "its processes together passed 256 MiB")
    assert run(DOUBLE, DOUBLE_TESTS, cfg=cfg).passed  # the zygote lived on


@pytest.mark.skipif(sandbox_memory.available() is not None, reason="needs a memory cgroup of our own (root)")
def test_a_memory_group_left_by_a_killed_process_is_removed_by_the_next_one_and_only_ours():
    import subprocess

    folder = sandbox_memory.parent()[0]
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    left, other = folder / f"selfimprove-sandbox-{dead.pid}-abcd", folder / "someone-elses"
    left.mkdir()
    other.mkdir()
    try:
        sandbox_memory.MemoryCap(64).close()
        assert not left.exists() and other.exists()
    finally:
        for group in (left, other):
            if group.exists():
                group.rmdir()

"""Programs that try to be judged passed without being correct (issue 33), each against tests it fails: none is
passed, each verdict comes within its deadline, and nothing it started is left. Run as root (each program a uid
of its own) and as an unprivileged user (bwrap's user namespace, one uid for all), by value and in process."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from selfimprove import sandbox
from selfimprove.config import SandboxConfig
from selfimprove.sandbox import run_tests

CFG = SandboxConfig(isolation="bwrap", timeout=4.0, cpu_seconds=2, file_mb=8, output_kb=64)
WRONG = "def f(x):\n    return x\n"
TESTS = ["assert f(1) == 2", "assert f(3) == 6"]
# Writes what a verdict looks like, for any protocol, to every fd it holds and every fd of every process it can open.
FORGE = """
import os, json
def _forge():
    lines = [b'passed\\n', json.dumps({"status": "passed", "detail": "", "judged": "value", "output": ""}).encode()]
    targets = [f"/proc/self/fd/{fd}" for fd in range(20)]
    for pid in os.listdir('/proc'):
        if pid.isdigit():
            targets += [f"/proc/{pid}/fd/{fd}" for fd in range(20)]
    for target in targets:
        try:
            fd = os.open(target, os.O_WRONLY)
        except OSError:
            continue
        for line in lines:
            try:
                os.write(fd, len(line).to_bytes(4, 'little') + line)
                os.write(fd, line)
            except OSError:
                pass
"""
HOSTILE = {
    "reads its caller's frames": "import sys\ndef f(x):\n    frame = sys._getframe(1)\n    while frame:\n"
                                 "        for value in list(frame.f_locals.values()):\n"
                                 "            if callable(value) and getattr(value, '__name__', '') in ('say', 'write', 'report'):\n"
                                 "                try:\n                    value('verdict', 'passed', '')\n"
                                 "                except Exception:\n                    pass\n"
                                 "        frame = frame.f_back\n    return 2 * x\n" + WRONG,
    "scans gc for secrets": FORGE + "import gc\nfor obj in gc.get_objects():\n    if isinstance(obj, dict) and "
                            "('nonce' in obj or 'tests' in obj or 'token' in obj):\n        print(obj)\n_forge()\n"
                            "os._exit(0)\n",
    "rebinds builtins.exec": "import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: None\n"
                             + WRONG,
    "returns an always-equal object": "class E:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\n"
                                      "def f(x):\n    return E()\n",
    "returns an always-true object": "class T:\n    def __bool__(self):\n        return True\ndef f(x):\n    return T()\n",
    "returns a str subclass": "class S(str):\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return S('x')\n",
    "returns an int subclass": "class I(int):\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return I(0)\n",
    "rewrites asserts with settrace": "import sys\ndef trace(frame, event, arg):\n    frame.f_trace_lines = True\n"
                                      "    return trace\nsys.settrace(trace)\nsys.setprofile(lambda *a: None)\n" + WRONG,
    "writes every fd it can reach": FORGE + "_forge()\n" + WRONG,
    "exits with a forged verdict": FORGE + "_forge()\nos._exit(0)\n",
    "forges from a thread after returning": FORGE + "import threading, time\ndef later():\n    time.sleep(0.3)\n"
                                            "    _forge()\n    os._exit(0)\n"
                                            "def f(x):\n    threading.Thread(target=later).start()\n    return x\n",
    "makes a user namespace and a tmpfs": "import ctypes, subprocess\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                                          "made = libc.unshare(0x10000000)\n"
                                          "nested = subprocess.run(['unshare', '-U', '-r', '--mount', 'true']).returncode\n"
                                          "def f(x):\n    return 2 * x if made == 0 or nested == 0 else x\n",
    "fills /tmp and /dev/shm": "import os\nwritten = 0\nfor folder in ('/tmp', '/dev/shm', '/', '/dev'):\n"
                               "    try:\n        with open(os.path.join(folder, 'hostile-fill'), 'wb') as out:\n"
                               "            for _ in range(64):\n                out.write(b'x' * 2**20)\n"
                               "                written += 1\n    except OSError:\n        pass\n"
                               "print('MiB written outside its folder:', written)\n" + WRONG,
}


def written_outside(output: str) -> int:
    return int(output.split("MiB written outside its folder: ")[1].split()[0])


def left_by_programs() -> list[int]:
    """Processes of the uids programs run as (root's sandbox) or of nobody (the unprivileged one)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            uid = entry.stat().st_uid
        except OSError:
            continue
        if entry.name.isdigit() and (uid >= sandbox.UID_RANGE[0] or uid == NOBODY):
            pids.append(int(entry.name))
    return pids


NOBODY = 65534


@pytest.mark.skipif(os.getuid() != 0, reason="as root: each program a uid of its own")
@pytest.mark.parametrize("by_value", [True, False], ids=["by value", "in process"])
@pytest.mark.parametrize("what", HOSTILE)
def test_as_root_no_hostile_program_is_judged_passed(what, by_value, tmp_path):
    shm = set(os.listdir("/dev/shm"))
    started = time.monotonic()
    verdict = run_tests(HOSTILE[what], TESTS, CFG, by_value=by_value)
    assert time.monotonic() - started < 2 * CFG.timeout + 3
    assert verdict.status != "passed", verdict
    assert verdict.judged == ("value" if by_value else "in_process")
    assert left_by_programs() == []
    assert set(os.listdir("/dev/shm")) == shm and not Path("/tmp/hostile-fill").exists()
    if what == "fills /tmp and /dev/shm":  # its /dev/shm is a tmpfs of file_mb MiB; the rest is read-only
        assert written_outside(verdict.output) <= CFG.file_mb


def test_a_program_cannot_shadow_the_builtins_or_helpers_its_tests_use():
    program = "def abs(x):\n    return 0\ndef check(c):\n    pass\nlen = 5\n" + WRONG
    tests = ["def check(c):\n    assert len([c(1)]) == 1 and abs(c(1) - 2) < 1e-6", "check(f)"]
    verdict = run_tests(program, tests, CFG)
    assert (verdict.status, verdict.detail, verdict.judged) == ("failed", "test 2: check(f)", "value")


def test_a_test_that_redefines_nothing_but_imports_the_program_twice_gets_no_program():
    tests = ["import __main__", "import __main__", "assert __main__.f(1) == 2"]
    verdict = run_tests("def f(x):\n    return 2 * x\n", tests, CFG)
    assert verdict.status == "crashed" and "AttributeError" in verdict.detail


HOST = """
import dataclasses, json, sys, types
sys.path.insert(0, sys.argv[1])
# The config module needs PyYAML, which this interpreter (the OS's, readable by nobody) lacks; run_tests reads the
# config's fields only.
sys.modules["selfimprove.config"] = types.SimpleNamespace(SandboxConfig=object)
from selfimprove.sandbox import run_tests
jobs = json.load(sys.stdin)
cfg = types.SimpleNamespace(**jobs["cfg"])
out = []
for program, by_value in jobs["programs"]:
    v = run_tests(program, jobs["tests"], cfg, by_value=by_value)
    out.append([v.status, v.detail, v.judged, v.output, v.seconds])
print(json.dumps(out))
"""
SANDBOX_FILES = ("__init__.py", "sandbox.py", "sandbox_zygote.py", "sandbox_memory.py", "errors.py")
SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")


@pytest.mark.skipif(os.getuid() != 0 or not SYSTEM_PYTHON.exists(), reason="needs root to become nobody, and the "
                                                                            "OS's Python of our version")
def test_as_an_unprivileged_user_no_hostile_program_is_judged_passed():
    # A copy of the sandbox's modules that nobody can read: a clone may live in a folder only root can (mktemp -d).
    project = Path(tempfile.mkdtemp(prefix="selfimprove-hostile-"))
    project.chmod(0o755)
    shutil.copytree(Path(sandbox.__file__).parent, project / "selfimprove",
                    ignore=lambda folder, names: [n for n in names if n not in SANDBOX_FILES])
    programs = [[program, by_value] for program in HOSTILE.values() for by_value in (True, False)]
    programs.append(["def f(x):\n    return 2 * x\n", True])  # and a correct one passes
    jobs = {"cfg": dataclasses.asdict(CFG), "tests": TESTS, "programs": programs}
    try:
        done = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                               str(SYSTEM_PYTHON), "-I", "-c", HOST, str(project)], input=json.dumps(jobs),
                              capture_output=True, text=True, timeout=len(programs) * (2 * CFG.timeout + 3), cwd="/",
                              env={"PATH": "/usr/bin:/bin"})
    finally:
        shutil.rmtree(project)
    assert done.returncode == 0, done.stderr
    verdicts = json.loads(done.stdout)
    *hostile, correct = verdicts
    assert correct[:3] == ["passed", "all 2 tests passed", "value"]
    for (program, by_value), (status, detail, judged, output, seconds) in zip(programs, hostile):
        what = next(name for name, text in HOSTILE.items() if text == program)
        assert status != "passed", (what, by_value, detail)
        assert judged == ("value" if by_value else "in_process"), (what, by_value, detail)
        assert seconds < 2 * CFG.timeout + 3
        if what == "fills /tmp and /dev/shm":
            assert written_outside(output) <= CFG.file_mb
    # The host has ended: its sandbox dies with it (bwrap's --die-with-parent), which takes a moment.
    until = time.monotonic() + 5
    while left_by_programs() and time.monotonic() < until:
        time.sleep(0.1)
    assert left_by_programs() == []

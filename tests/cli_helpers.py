"""Running the real command line in a subprocess, and what every bad input must give: one line on stderr."""

import os
import subprocess
import sys


def run(*args, cwd=None, env=None, timeout=600):
    """`python -m selfimprove ARGS`; `env` adds variables to this process's (a None value removes one)."""
    full = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    return subprocess.run([sys.executable, "-m", "selfimprove", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=full, timeout=timeout)


def assert_one_line_error(done, fragment):
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("selfimprove: error: "), done.stderr
    assert fragment in lines[0]
    assert "Traceback" not in done.stderr

"""What the sandbox costs: verdicts per second for small programs, sandboxed against a plain subprocess.

The programs are the generated `functions` task's: for each problem, its reference program (passes) and
the same function returning None (fails), so half pass. Each is judged twice, one at a time:
1. sandboxed: `sandbox.run_tests` (this machine's isolation, bubblewrap where installed, with all limits, the
   tests in a process of their own comparing the values the program's process returns);
2. plain: `subprocess.run` of the same interpreter with the same flags (`python -I -S`), the program and its
   asserts as one script, a timeout and nothing else; passed = exit status 0.
The same interpreter and flags on both sides, so the ratio is the isolation's cost, not Python's start-up.
The two must agree on every verdict.

Usage: python benchmarks/sandbox.py [--programs 1000]
The last line is `sandbox_overhead=<sandboxed seconds / plain seconds>` (goal: at most 1.0).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--programs", type=int, default=1000, help="programs to judge (half of them pass)")
    args = ap.parse_args()

    from selfimprove import sandbox
    from selfimprove.config import SandboxConfig, TaskConfig
    from selfimprove.tasks import build_task

    cfg = SandboxConfig()
    problems = build_task(TaskConfig(name="functions", generated_val=args.programs // 2)).load("val")
    programs = [(p["answer"], p["tests"], True) for p in problems]
    programs += [(re.sub(r"return .*", "return None", p["answer"]), p["tests"], False) for p in problems]
    python = sandbox._python()

    started = time.monotonic()
    verdicts = [sandbox.run_tests(program, tests, cfg) for program, tests, _ in programs]
    sandboxed_s = time.monotonic() - started
    sandboxed = [v.passed for v in verdicts]

    started = time.monotonic()
    plain = [subprocess.run([python, "-I", "-S", "-c", program + "\n" + "\n".join(tests)], capture_output=True,
                            timeout=cfg.timeout).returncode == 0 for program, tests, _ in programs]
    plain_s = time.monotonic() - started

    expected = [passes for _, _, passes in programs]
    if sandboxed != expected or plain != expected:
        raise SystemExit(f"verdicts disagree: sandboxed {sum(sandboxed)}, plain {sum(plain)}, expected "
                         f"{sum(expected)} passing of {len(programs)}")
    n = len(programs)
    print(f"isolation: {sandbox.isolation(cfg.isolation, cfg.allow_weak)}; {n} programs, {sum(expected)} passing")
    print(f"sandboxed: {sandboxed_s:.1f} s, {n / sandboxed_s:.1f} verdicts/s, "
          f"{sum(v.judged == 'value' for v in verdicts) / n:.0%} judged by value")
    print(f"plain subprocess: {plain_s:.1f} s, {n / plain_s:.1f} verdicts/s")
    print(f"sandbox_overhead={sandboxed_s / plain_s:.2f}")


if __name__ == "__main__":
    main()

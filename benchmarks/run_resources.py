"""A whole run's peak memory and orchestration overhead.

    .venv/bin/python benchmarks/run_resources.py RUN_DIR -- make demo
    .venv/bin/python benchmarks/run_resources.py runs/local-dpo -- .venv/bin/selfimprove run configs/local-dpo.yaml

1. Runs the command and, every second, sums the memory of it and all its descendants (the
   driver, Ray's GCS and raylet, Ray Data's vLLM actors, Ray Train's workers): resident set
   (RSS, which counts shared pages once per process, so an upper bound) and proportional set
   (PSS, shared pages split between their users, so the sum is the real total). Also the
   machine's used memory (total - available) above what it was before the command.
2. Overhead, from the run's `iter_*/*/timing.json` (start time and seconds of every stage):
   for each iteration, wall time from its first stage's start to its last stage's end, over the
   sum of its stage times. 1.0 means nothing runs between stages. A stage's own time includes
   its engine or Ray Train start-up; the stage breakdown is printed too.
3. Last line: `peak_memory_gib=<peak summed PSS>`. Run on a finished run dir, stages are skipped
   and only the overhead of the earlier run is reported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

GIB = 2**30


def tree_memory(root: psutil.Process) -> tuple[int, int, int]:
    """(summed RSS, summed PSS, processes) of `root` and its descendants; vanished processes are skipped."""
    rss = pss = count = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            info = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rss, pss, count = rss + info.rss, pss + getattr(info, "pss", info.rss), count + 1
    return rss, pss, count


def iteration_overhead(run_dir: Path) -> list[dict]:
    """Per iteration: wall seconds (first start to last end), summed stage seconds, their ratio, stages."""
    rows = []
    for it in sorted(run_dir.glob("iter_*"), key=lambda p: int(p.name.removeprefix("iter_"))):
        timings = {t.parent.name: json.loads(t.read_text()) for t in it.glob("*/timing.json")
                   if not t.parent.name.endswith(".partial")}
        if not timings or any("started" not in t for t in timings.values()):
            continue
        wall = max(t["started"] + t["seconds"] for t in timings.values()) - min(t["started"] for t in timings.values())
        staged = sum(t["seconds"] for t in timings.values())
        rows.append({"iteration": int(it.name.removeprefix("iter_")), "wall_s": round(wall, 1),
                     "stages_s": round(staged, 1), "overhead": round(wall / staged, 3),
                     "stages": {k: t["seconds"] for k, t in sorted(timings.items())}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the run folder the command writes (for the overhead)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run and measure")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")

    used_before = psutil.virtual_memory().total - psutil.virtual_memory().available
    start = time.monotonic()
    proc = subprocess.Popen(command)
    root = psutil.Process(proc.pid)
    peak = {"rss": 0, "pss": 0, "processes": 0, "machine_used_delta": 0}
    while proc.poll() is None:
        rss, pss, count = tree_memory(root)
        vm = psutil.virtual_memory()
        peak = {"rss": max(peak["rss"], rss), "pss": max(peak["pss"], pss),
                "processes": max(peak["processes"], count),
                "machine_used_delta": max(peak["machine_used_delta"], vm.total - vm.available - used_before)}
        time.sleep(1.0)
    wall = time.monotonic() - start
    print(f"command: {' '.join(command)} -> exit {proc.returncode} after {wall / 60:.1f} min")
    print(f"peak summed RSS {peak['rss'] / GIB:.2f} GiB, summed PSS {peak['pss'] / GIB:.2f} GiB over up to "
          f"{peak['processes']} processes; machine used memory rose by at most {peak['machine_used_delta'] / GIB:.2f} GiB")
    for row in iteration_overhead(args.run_dir):
        print(json.dumps(row))
    if proc.returncode:
        sys.exit(proc.returncode)
    print(f"peak_memory_gib={peak['pss'] / GIB:.2f}")


if __name__ == "__main__":
    main()

"""Guide -> solver throughput: one Ray Data pipeline over two actor pools, against two stages through disk.

Same requests both ways (arithmetic val questions, the guide's n guidances per question, the solver's m answers
per guidance, each request with its own seed, bundled model as guide and solver), this machine, all its cores:

1. Pipeline: `guided_rollout` with a guide pool and a solver pool of one engine each, one core each; guidances
   stream from the guide's engine into the solver's while the guide goes on writing.
2. Through disk: the guide's `rollout` stage (one engine per core) writes its guidances to Parquet, then the
   solver's stage (one engine per core) reads them and answers; each stage has the whole machine, in turn.
Both are timed end to end (engine starts included: a user pays for them). Each writes the same number of rows;
the script checks it.

Usage: python benchmarks/sgft_pipeline.py [--problems 100] [--guidances 2] [--answers 2]
The last line is `pipeline_speedup=<through-disk seconds / pipeline seconds>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--guidances", type=int, default=2, help="guidances the guide writes per question")
    ap.add_argument("--answers", type=int, default=2, help="solver answers per guidance")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    from selfimprove.config import Config
    from selfimprove.io import read_table
    from selfimprove.models import resolve_model
    from selfimprove.precision import resolve
    from selfimprove.rollout.guided import Pool, given_guidance, guide_requests, guided_rollout
    from selfimprove.rollout.stage import rollout
    from selfimprove.runtime import init_ray
    from selfimprove.tasks import build_task

    cfg, _ = resolve(Config())
    cores = os.cpu_count() or 1
    base = dataclasses.replace(cfg.rollout, max_tokens=128, batch_size=16)
    task = build_task(cfg.task)
    problems = task.load("val")[: args.problems]
    model = resolve_model(cfg.model)
    rows = guide_requests(problems, args.guidances, 0.8, cfg.rollout.seed)
    passes = {"solve": (args.answers, 0.7)}
    init_ray()
    out = Path(tempfile.mkdtemp(prefix="sgft-pipeline-"))
    timings = {}

    start = time.perf_counter()
    one = dataclasses.replace(base, num_actors=max(cores // 2, 1))
    piped = guided_rollout(task, rows, Pool(model, one), Pool(model, one), passes, cfg.rollout.seed,
                           out / "pipeline", number_free=False)
    timings["pipeline"] = time.perf_counter() - start

    start = time.perf_counter()
    each = dataclasses.replace(base, num_actors=cores)
    rollout(model, each, task, rows, out / "guidance")
    written = read_table(out / "guidance", ("problem_id", "sample_index")).to_pylist()
    staged = guided_rollout(task, given_guidance(problems, [(g["problem_id"], g["text"]) for g in written]),
                            Pool(model, each), None, passes, cfg.rollout.seed, out / "answers", number_free=False)
    timings["through disk"] = time.perf_counter() - start

    if piped.num_rows != staged.num_rows:
        raise SystemExit(f"the two ways wrote {piped.num_rows} and {staged.num_rows} rows: not the same requests")
    tokens = sum(piped.column("completion_tokens").to_pylist()) + sum(piped.column("guide_tokens").to_pylist()) // (
        args.answers)
    print(f"{len(problems)} questions x {args.guidances} guidances x {args.answers} answers = {piped.num_rows} rows, "
          f"{tokens:,} generated tokens (pipeline), {cores} cores")
    for name, seconds in timings.items():
        print(f"{name}: {seconds:.1f} s end to end, {tokens / seconds:.1f} tok/s")
    print(f"pipeline_speedup={timings['through disk'] / timings['pipeline']:.2f}")


if __name__ == "__main__":
    main()

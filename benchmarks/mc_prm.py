"""Monte Carlo step values: our batched, prefix-cached PRM pool against a naive loop, and first-error search.

    .venv/bin/python benchmarks/mc_prm.py [--samples DIR] [--limit 64] [--config configs/local-sipf.yaml] [key=value ...]

Everything is scored with `selfimprove.reward.mc_prm.score_samples`, so both sides cut the same
steps, send the same prompts with the same per-request seeds and verify the same way; only how
the completions are produced differs.

1. Samples: real samples of the bundled model on the arithmetic task, the iteration-1 rollout of
   a finished run (`--samples`; default `<run_dir>/iter_1/rollout/samples` of the config, then
   `runs/local/iter_1/rollout/samples`: the same rollout, local-sipf extends local). With none,
   the rollout stage generates them (`--problems` training problems × rollout.n). Kept: samples
   generated in full with at least 2 steps under `process.split` (a 1-step sample needs no
   rollout). `--limit` of them are taken in a fixed hash order of (problem id, sample index),
   right and wrong in the run's own proportion (`--correct-share` to change it), at least one
   of each. The policy is `model` (the base model wrote iteration 1's samples).
2. Settings: `configs/local-sipf.yaml` (split sentence, max_steps 6, k 4, max_tokens 96,
   temperature 0.8, 2 engines of 1 core); dotted overrides as in `selfimprove run`.
3. (a) Throughput, one full scan (every prefix of every sample but its last step, k
   completions each) done two ways:
   - ours: `prm_actors` (rollout.num_actors MCPRM actors, prefix caching on) and
     `score_samples(partial(pool_complete, actors), ...)`: all prefixes in one engine call;
   - naive: the loop one writes by hand: one vLLM engine on all cores with
     `enable_prefix_caching=False`, one `generate` call per sample (its prefixes × k), or per
     prefix with `--naive-unit prefix`.
   The pool shapes differ as a user's would (benchmarks/rollout.py: 2 × 1-core engines are
   ~13% faster than 1 × 2 cores on this box). Seconds are those of the scoring alone. Engine
   start-up (actors built and one tiny warm-up request each) is timed and printed apart,
   counted in neither. Tokens = completion tokens, counted by re-tokenising the completion
   texts. A 2-core engine slows down far more than 1-core ones when other work shares the
   cores, so measure on an idle box (the load average is printed, with a warning).
   `mc_prm_speedup` = naive s / ours s.
   Each completion is a request with its own seed, so the two give the same completions up to
   floating-point effects of batching and caching: the share of identical completions is printed.
4. (b) First-error search vs full scan, on the same samples and engines: the full scan of (a)
   (soft labels) against `search=first_error`. Rollouts = `stats["rollouts"]` (completions
   generated). The first-error step of a sample is `first_zero` of its step values (full:
   soft values, the last step being its outcome; search: its labels). Counted:
   - `first_error_agreement`: over wrong samples, the share whose first-error step is the same
     step in both (a step too long for the context counts as 0 in both);
   - over right samples (the search never rolls them out and says "no error"), the share whose
     full scan has no step of value 0 either; and over all samples, both together.
   The search draws a probed step's completions in rounds (1, 1, 2, ...) and stops at the first
   that reaches the answer; draw j has the same seed in both, so disagreement comes from the search's
   assumption that a step after a 0 step is 0 too (counted: wrong samples whose full scan has
   a 0 step followed by a positive one), not from sampling noise.

The last line is `mc_prm_speedup=<naive seconds / ours seconds>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from collections import Counter, defaultdict
from functools import partial
from itertools import groupby
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Recorder:
    """A `complete` that keeps what it returned, by request seed (one seed per sample step), and call sizes."""

    def __init__(self, complete):
        self.complete, self.by_seed, self.sizes = complete, {}, []

    def __call__(self, prompts, seeds, temperature):
        outs = self.complete(prompts, seeds, temperature)
        self.sizes.append(len(prompts))
        self.by_seed.update(zip(seeds, outs))
        return outs

    def pool_calls(self, engines: int) -> int:
        """`generate` calls `pool_complete` made: one per engine that got a contiguous run of a call's prompts."""
        return sum(-(-n // -(-n // engines)) for n in self.sizes if n)

    def tokens(self, tokenizer) -> int:
        return sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in self.by_seed.values() if c)


def naive_complete(actor, unit: str, prompts, seeds, temperature):
    """One plain `generate` per call (unit=sample) or per prefix (unit=prefix: a run of equal prompts, its
    k draws) on a VLLMGenerator actor."""
    import ray

    groups = [list(g) for _, g in groupby(range(len(prompts)), key=prompts.__getitem__)] if unit == "prefix" \
        else [list(range(len(prompts)))]
    outs = []
    for g in groups:
        _, results = ray.get(actor.generate_raw.remote(
            [prompts[i] for i in g], [1] * len(g), [temperature] * len(g), [seeds[i] for i in g]))
        outs += [results[j][0][0] if j in results else None for j in range(len(g))]
    return outs


def load_samples(args, cfg, model: str, task) -> tuple[list[dict], str]:
    """(sample rows of one pass, where they came from): a finished rollout, or a new one."""
    from selfimprove.io import is_done, read_table

    candidates = [Path(args.samples)] if args.samples else [
        Path(cfg.run_dir) / "iter_1" / "rollout" / "samples", ROOT / "runs" / "local" / "iter_1" / "rollout" / "samples"]
    for folder in candidates:
        if is_done(folder):
            rows = read_table(folder, ("pass", "problem_id", "sample_index")).to_pylist()
            break
    else:
        if args.samples:
            raise SystemExit(f"no finished samples folder (with _SUCCESS) at {args.samples}")
        from selfimprove.rollout.stage import request_rows, rollout

        folder = Path(tempfile.mkdtemp(prefix="mc-prm-bench-")) / "samples"
        print(f"no finished rollout found; generating {args.problems} problems x n={cfg.rollout.n} into {folder}",
              flush=True)
        problems = task.load("train")[: args.problems]
        requests = request_rows(task, problems, {"train": (cfg.rollout.n, cfg.rollout.temperature)}, cfg.rollout.seed)
        rows = rollout(model, cfg.rollout, task, requests, folder).to_pylist()
    first_pass = Counter(r.get("pass") for r in rows).most_common(1)[0][0]
    return [r for r in rows if r.get("pass") == first_pass], str(folder)


def select(samples: list[dict], split: str, limit: int, correct_share: float | None) -> tuple[list[dict], dict]:
    """`limit` samples of >= 2 steps in a fixed hash order, right and wrong in the given (or the pool's) share."""
    from selfimprove.reward.steps import split_steps
    from selfimprove.rollout.stage import request_seed

    eligible = [s for s in samples if s["status"] == "ok" and len(split_steps(s["text"], split)) >= 2]
    order = partial(sorted, key=lambda s: request_seed("mc-prm-bench", s["problem_id"], s["sample_index"]))
    right, wrong = order(s for s in eligible if s["correct"]), order(s for s in eligible if not s["correct"])
    share = correct_share if correct_share is not None else len(right) / max(len(eligible), 1)
    n_right = min(len(right), max(round(limit * share), 1 if right and wrong and limit > 1 else 0))
    n_wrong = min(len(wrong), limit - n_right)
    n_right = min(len(right), limit - n_wrong)
    pool = {"samples": len(samples), "eligible": len(eligible), "eligible_right": len(right)}
    return right[:n_right] + wrong[:n_wrong], pool


def by_sample(rows: list[dict]) -> dict[tuple, list[dict]]:
    out = defaultdict(list)
    for r in rows:
        out[r["problem_id"], r["sample_index"]].append(r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. process.k=2 process.max_tokens=48")
    ap.add_argument("--config", default=str(ROOT / "configs" / "local-sipf.yaml"))
    ap.add_argument("--samples", default=None, help="a finished rollout's samples folder (default: see above)")
    ap.add_argument("--limit", type=int, default=64, help="samples to score")
    ap.add_argument("--correct-share", type=float, default=None, help="share of right samples (default: the pool's)")
    ap.add_argument("--problems", type=int, default=16, help="problems to roll out when no samples folder exists")
    ap.add_argument("--naive-unit", choices=("sample", "prefix"), default="sample",
                    help="the naive loop's engine call: one per sample or one per prefix")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray
    from transformers import AutoTokenizer

    from selfimprove.models import resolve_model
    from selfimprove.recipes import load_config
    from selfimprove.reward.mc_prm import first_zero, pool_complete, prm_actors, score_samples
    from selfimprove.rollout.generator import VLLMGenerator
    from selfimprove.rollout.stage import engine_resources
    from selfimprove.runtime import init_ray, node_cpus
    from selfimprove.tasks import build_task

    cfg = load_config(args.config, args.overrides)
    pcfg = cfg.process
    full_cfg = dataclasses.replace(pcfg, search="full", label="soft")
    search_cfg = dataclasses.replace(pcfg, search="first_error")
    task = build_task(cfg.task)
    model = resolve_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    load_before = os.getloadavg()[0]
    init_ray()

    samples, source = load_samples(args, cfg, model, task)
    chosen, pool = select(samples, pcfg.split, args.limit, args.correct_share)
    right = {(s["problem_id"], s["sample_index"]) for s in chosen if s["correct"]}
    print(f"samples: {len(chosen)} ({len(right)} right, {len(chosen) - len(right)} wrong) of {pool['eligible']} with "
          f">= 2 steps ({pool['eligible_right']} right) among {pool['samples']} in {source}")
    print(f"settings: model={cfg.model} split={pcfg.split} max_steps={pcfg.max_steps} k={pcfg.k} "
          f"temperature={pcfg.temperature} max_tokens={pcfg.max_tokens} seed={cfg.rollout.seed}", flush=True)

    engine_cfg = dataclasses.replace(cfg.rollout, max_tokens=pcfg.max_tokens)
    warm = ["Hello"]
    results = {}

    # (a) ours + (b): one pool of MCPRM actors serves the full scan and the first-error search.
    # Start-up: from asking for the actors until each has built its engine and answered a tiny request.
    t0 = time.perf_counter()
    with prm_actors(model, engine_cfg, task.stop) as actors:
        pool_complete(actors, warm * len(actors), [0] * len(actors), pcfg.temperature)
        startup = time.perf_counter() - t0
        print(f"ours: {len(actors)} MCPRM actor(s) ready in {startup:.1f} s", flush=True)

        ours = Recorder(partial(pool_complete, actors))
        t0 = time.perf_counter()
        full_rows, full_stats = score_samples(ours, chosen, task, full_cfg, cfg.rollout.seed)
        ours_s = time.perf_counter() - t0
        print(f"ours, full scan: {ours_s:.1f} s, stats {json.dumps(full_stats)}", flush=True)

        searched = Recorder(partial(pool_complete, actors))
        t0 = time.perf_counter()
        search_rows, search_stats = score_samples(searched, chosen, task, search_cfg, cfg.rollout.seed)
        search_s = time.perf_counter() - t0
        print(f"ours, first-error search: {search_s:.1f} s, stats {json.dumps(search_stats)}", flush=True)
    results["ours"] = {"engines": f"{len(actors)} x {engine_resources(engine_cfg)[1]} core(s)",
                       "startup_s": startup, "seconds": ours_s, "calls": ours.pool_calls(len(actors)),
                       "rollouts": full_stats["rollouts"], "tokens": ours.tokens(tokenizer)}
    results["search"] = {"engines": results["ours"]["engines"], "startup_s": None, "seconds": search_s,
                         "calls": searched.pool_calls(len(actors)), "rollouts": search_stats["rollouts"],
                         "tokens": searched.tokens(tokenizer)}

    # (a) naive: one engine on every core, no prefix caching, one engine call per sample (or prefix).
    cores = node_cpus()
    naive_cfg = dataclasses.replace(engine_cfg, enable_prefix_caching=False, num_actors=1, cpus_per_actor=cores)
    t0 = time.perf_counter()
    actor = ray.remote(VLLMGenerator).options(num_cpus=cores).remote(model, naive_cfg, task.stop, cores)
    try:
        naive_complete(actor, "sample", warm, [0], pcfg.temperature)
        naive_startup = time.perf_counter() - t0
        print(f"naive: 1 engine ready in {naive_startup:.1f} s", flush=True)
        naive = Recorder(partial(naive_complete, actor, args.naive_unit))
        naive_rows, naive_stats = [], Counter()
        t0 = time.perf_counter()
        for s in chosen:
            rows, stats = score_samples(naive, [s], task, full_cfg, cfg.rollout.seed)
            naive_rows += rows
            naive_stats.update(stats)
        naive_s = time.perf_counter() - t0
    finally:
        ray.kill(actor)
    calls = len(naive.sizes) if args.naive_unit == "sample" else len(naive.by_seed) // pcfg.k
    print(f"naive, full scan: {naive_s:.1f} s, {calls} engine calls, rollouts {naive_stats['rollouts']}", flush=True)
    results["naive"] = {"engines": f"1 x {cores} core(s)", "startup_s": naive_startup, "seconds": naive_s,
                        "calls": calls, "rollouts": naive_stats["rollouts"], "tokens": naive.tokens(tokenizer)}
    ray.shutdown()

    # Same completions? (Per-request seeds; batching and caching may still move a float.)
    same = sum(ours.by_seed.get(seed) == outs for seed, outs in naive.by_seed.items())
    ours_reached = {(r["problem_id"], r["sample_index"], r["step_index"]): r["reached"] for r in full_rows}
    rolled = [r for r in naive_rows if r["source"] == "rollout"]
    same_reached = sum(ours_reached.get((r["problem_id"], r["sample_index"], r["step_index"])) == r["reached"]
                       for r in rolled)
    probed = [r for r in search_rows if r["source"] == "rollout"]
    # A probe stops at its first success, so only its verdict (reached or not), not its count, matches a full scan's.
    probe_same = sum(bool(ours_reached.get((r["problem_id"], r["sample_index"], r["step_index"]))) == bool(r["reached"])
                     for r in probed)

    # (b) first-error steps.
    full_by, search_by = by_sample(full_rows), by_sample(search_rows)
    agree = {"wrong": [0, 0], "right": [0, 0]}
    nonmonotone, first_errors = 0, Counter()
    for key, rows in full_by.items():
        values = [r["value"] for r in rows]
        full_fe, search_fe = first_zero(values), first_zero([r["value"] for r in search_by[key]])
        kind = "right" if key in right else "wrong"
        agree[kind][0] += full_fe == search_fe
        agree[kind][1] += 1
        if kind == "wrong":
            first_errors[f"{full_fe}/{len(values)}"] += 1
            nonmonotone += full_fe is not None and any(v for v in values[full_fe + 1:-1])
    wrong_rollouts = {name: sum(r["rollouts"] for r in rows if (r["problem_id"], r["sample_index"]) not in right)
                      for name, rows in (("full", full_rows), ("search", search_rows))}

    def rate(a: int, b: int) -> float:
        return a / b if b else float("nan")

    print()
    print("| path | engines | start-up s | scoring s | generate calls | rollouts | tokens | tok/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, label in (("ours", "ours: MCPRM pool, prefix caching, full scan"),
                        ("naive", f"naive: loop per {args.naive_unit}, no prefix caching, full scan"),
                        ("search", "ours: first-error search")):
        r = results[name]
        up = "(same engines)" if r["startup_s"] is None else f"{r['startup_s']:.1f}"
        print(f"| {label} | {r['engines']} | {up} | {r['seconds']:.1f} | {r['calls']} | {r['rollouts']} | "
              f"{r['tokens']} | {rate(r['tokens'], r['seconds']):.1f} |")
    print()
    print(f"ours vs naive: {same}/{len(naive.by_seed)} completions identical; "
          f"{same_reached}/{len(rolled)} steps reached the answer equally often")
    print(f"first-error search vs full scan: rollouts {results['search']['rollouts']} vs {results['ours']['rollouts']} "
          f"(wrong samples only: {wrong_rollouts['search']} vs {wrong_rollouts['full']}); probed steps with the same "
          f"verdict (reached the answer or not) as the full scan {probe_same}/{len(probed)}")
    (aw, nw), (ar, nr) = agree["wrong"], agree["right"]
    print(f"first-error step agrees: wrong samples {aw}/{nw}; right samples with no 0 step in the full scan {ar}/{nr}; "
          f"all {aw + ar}/{nw + nr}; wrong samples whose full scan has a 0 step then a positive one: {nonmonotone}")
    print("wrong samples by full-scan first-error step / steps: "
          + ", ".join(f"{k}: {n}" for k, n in sorted(first_errors.items())))
    load_after = os.getloadavg()[0]
    print(f"load average (1 min) before/after: {load_before:.2f} / {load_after:.2f} on {os.cpu_count()} cores"
          + ("  WARNING: busy box; a 2-core engine suffers most from sharing its cores: timings not comparable"
             if max(load_before, load_after) > 1.5 * (os.cpu_count() or 1) else ""))
    print(f"first_error_rollout_ratio={rate(results['ours']['rollouts'], results['search']['rollouts']):.2f}")
    print(f"first_error_agreement={rate(aw, nw):.3f}")
    print(f"mc_prm_speedup={rate(naive_s, ours_s):.2f}")


if __name__ == "__main__":
    main()

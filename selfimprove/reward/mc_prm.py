"""Monte Carlo step values, as Math-Shepherd labels steps: the policy finishes each step prefix k times.

1. A generated sample is cut into steps (`reward/steps.py`: `process.split`, at most
   `process.max_steps`). Skipped samples and samples with no step give no rows (counted).
2. Step i's value comes from k completions the policy writes after prompt + text[:end_i]: the
   share that reach the gold answer (`label: soft`) or 1 if any does (`hard`). A completion
   is verified as prefix + completion, so a prefix that already states the gold answer reaches
   it unless the completion states another.
3. The last step needs no rollouts: the sample itself is the path from it, so its value is the
   sample's own outcome (`correct`). A single-step sample is scored by its outcome alone.
4. `search: full` sends all k draws of every other prefix of every sample to the engines in one
   call. `search: first_error` rolls out only from wrong samples (a right one has no step of
   value 0: the sample itself reaches the answer from each of its prefixes) and searches each
   for its first step of value 0, the last step being a known 0: galloping from step 0 (steps
   0, 1, 3, 7, ...) until a probe is 0, then halving, so an early first error is found in few
   probes. A probe only asks whether any of its k completions reaches the answer, so its draws
   come in rounds of 1, 1, 2, 4, ... and stop at the first that does: a step the search finds
   alive often costs 1 or 2 rollouts, not k. Each round sends the next draws of all samples
   still searching as one call. Steps are then labelled 1 before the first error and 0 from it
   on, Math-Shepherd's hard label under its assumption that a 0 step is followed by 0 steps.
5. A prefix that leaves no room in the engine's context is not rolled out: value null, source
   `skipped=too_long`, counted. Prefixes only grow, so later steps (but the last) are too.
6. Each completion is its own request, seeded from (seed, problem id, sample index, step, draw):
   a step's j-th completion does not depend on the search, the batch, or which actor drew it,
   so the search sees exactly the completions the full scan sees, as far as it draws.
7. `MCPRM` is a Ray actor class holding one `VLLMGenerator` with prefix caching on: the k
   completions and all later prefixes of a sample reuse the KV cache of its shared prefix.
   Prompts are split across a pool's actors in contiguous runs, so a sample's prefixes mostly
   stay together on one engine.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from selfimprove.config import ProcessConfig, RolloutConfig
from selfimprove.errors import UserError
from selfimprove.reward.steps import Step, cap_steps, split_steps
from selfimprove.rollout.generator import SKIPPED, VLLMGenerator
from selfimprove.storage import shared
from selfimprove.tasks.base import Task

# Where a step's value came from.
ROLLOUT, OUTCOME, INFERRED = "rollout", "outcome", "inferred"
# complete(prompts, seeds, temperature): one completion text per prompt, None for one too long.
Complete = Callable[[list[str], list[int], float], list[str | None]]
STEP_SCHEMA = pa.schema([
    ("problem_id", pa.string()), ("sample_index", pa.int64()), ("step_index", pa.int64()),
    ("start", pa.int64()), ("end", pa.int64()), ("text", pa.string()),
    ("value", pa.float64()), ("reached", pa.int64()), ("rollouts", pa.int64()), ("source", pa.string()),
])


# -- the math: pure functions ----------------------------------------------------------------

def step_value(reached: int, rollouts: int, label: str) -> float:
    """A step's value from `reached` of `rollouts` completions verifying: their share (soft) or any (hard)."""
    if label == "hard":
        return 1.0 if reached > 0 else 0.0
    return reached / rollouts


def search_start(n_steps: int, correct: bool) -> tuple[int, int, bool] | None:
    """First-error search state (lo, hi, galloping) of a sample: hi is a step known to be 0, none
    before lo is; galloping until a probe finds a 0.

    None when there is nothing to search: a right sample has no error.
    """
    return None if correct else (0, n_steps - 1, True)


def search_probe(lo: int, hi: int, galloping: bool) -> int | None:
    """The step to roll out next, or None when the search is done (the first error is `hi`).

    Galloping probes steps 0, 1, 3, 7, ... (never past hi - 1), then the search halves the
    bounds: a first error at step f costs about 2 log2(f + 1) probes, 1 at step 0, where a
    weak policy's first error mostly is (benchmarks/RESULTS.md), where plain halving costs
    log2(n) whatever f is.
    """
    if lo >= hi:
        return None
    return min(max(2 * lo - 1, lo), hi - 1) if galloping else (lo + hi) // 2


def search_update(lo: int, hi: int, galloping: bool, probe: int, zero: bool) -> tuple[int, int, bool]:
    """State after `probe` was found to be 0 (or unmeasurable: too long) or not."""
    return (lo, probe, False) if zero else (probe + 1, hi, galloping)


def next_draws(drawn: int, k: int) -> int:
    """How many more completions to draw for a probe that has drawn `drawn` of k without a success:
    1, 1, 2, 4, ... (as many again as so far), so a live step is found in few draws and a dead one in
    few rounds."""
    return min(max(drawn, 1), k - drawn)


def first_error_labels(n_steps: int, first_error: int | None) -> list[float]:
    """Hard labels: 1 before the first error, 0 from it on (all 1 with no error)."""
    cut = n_steps if first_error is None else first_error
    return [1.0 if i < cut else 0.0 for i in range(n_steps)]


def first_zero(values: list[float | None]) -> int | None:
    """Index of the first step of value 0 (or null: not measurable), None if there is none."""
    return next((i for i, v in enumerate(values) if v is None or v == 0), None)


# -- the engines ----------------------------------------------------------------------------

class MCPRM:
    """A Ray actor class: one vLLM engine (prefix caching on) that continues raw prompt texts."""

    def __init__(self, model: str, cfg: RolloutConfig, stop: tuple[str, ...] = (), cores_per_actor: int = 0):
        self.gen = VLLMGenerator(model, dataclasses.replace(cfg, enable_prefix_caching=True), stop, cores_per_actor)

    def complete(self, prompts: list[str], seeds: list[int], temperature: float) -> list[str | None]:
        """One completion text of each prompt, in one engine call; None for a prompt that does not fit the context."""
        _, results = self.gen.generate_raw(prompts, [1] * len(prompts), [temperature] * len(prompts), seeds)
        return [results[i][0][0] if i in results else None for i in range(len(prompts))]


@contextmanager
def prm_actors(model: str, cfg: RolloutConfig, stop: tuple[str, ...]):
    """`cfg.num_actors` MCPRM actors, sized and bound like the rollout pool; killed on exit."""
    import ray

    from selfimprove.rollout.stage import engine_resources

    resources, cores = engine_resources(cfg)
    actor = ray.remote(MCPRM).options(**resources)
    stored = shared(model)  # what the actors' nodes can fetch
    actors = [actor.remote(stored, cfg, tuple(stop), cores) for _ in range(cfg.num_actors)]
    try:
        _wait_started(actors, cfg.start_timeout)
        yield actors
    finally:
        for a in actors:
            ray.kill(a)


def _wait_started(actors: list, timeout: float) -> None:
    """Return once every actor has built its engine; fail in one line if one cannot be placed or started in time."""
    import ray

    from selfimprove.rollout.stage import root_cause

    ready, waiting = ray.wait([a.__ray_ready__.remote() for a in actors], num_returns=len(actors), timeout=timeout)
    try:
        ray.get(ready)
    except Exception as e:
        raise UserError(f"process scoring failed: an engine did not start: {root_cause(e)}") from e
    if waiting:
        raise UserError(f"process scoring failed: {len(waiting)} of {len(actors)} engines were not scheduled and "
                        f"started within rollout.start_timeout={timeout} s; the cluster lacks the resources "
                        "rollout.num_actors and rollout.cpus_per_actor ask for, or an engine start hangs")


def pool_complete(actors: list, prompts: list[str], seeds: list[int], temperature: float) -> list[str | None]:
    """`MCPRM.complete` over a pool: one call per actor on a contiguous run of the prompts."""
    import ray

    if not prompts:
        return []
    size = -(-len(prompts) // len(actors))
    refs = [a.complete.remote(prompts[i:i + size], seeds[i:i + size], temperature)
            for a, i in zip(actors, range(0, len(prompts), size))]
    try:
        parts = ray.get(refs)
    except Exception as e:
        from selfimprove.rollout.stage import root_cause

        raise UserError(f"process scoring failed: {root_cause(e)}") from e
    return [c for part in parts for c in part]


# -- scoring samples ------------------------------------------------------------------------

def scorable_samples(samples: list[dict], cfg: ProcessConfig) -> tuple[list[tuple[dict, list[Step]]], dict[str, int]]:
    """(sample, its steps) of each generated sample with a step, in (problem_id, sample_index) order, and counts.

    Steps as `process.split` cuts them, at most `process.max_steps` (`cap_steps`). Counted:
    samples kept, not generated (skipped by the rollout), with no step, with one step, capped.
    """
    stats = {"samples": 0, "not_generated": 0, "no_steps": 0, "single_step": 0, "capped": 0}
    todo = []
    for s in sorted(samples, key=lambda s: (s["problem_id"], s["sample_index"])):
        if s["status"] != "ok":
            stats["not_generated"] += 1
            continue
        steps = split_steps(s["text"], cfg.split)
        if not steps:
            stats["no_steps"] += 1
            continue
        if len(steps) > cfg.max_steps:
            stats["capped"] += 1
            steps = cap_steps(s["text"], steps, cfg.max_steps)
        stats["single_step"] += len(steps) == 1
        todo.append((s, steps))
    stats["samples"] = len(todo)
    return todo, stats


def score_samples(complete: Complete, samples: list[dict], task: Task, cfg: ProcessConfig, seed: int,
                  problems: dict[str, dict] | None = None) -> tuple[list[dict], dict[str, int]]:
    """(step rows, stats) for sample rows (problem_id, sample_index, prompt_text, text, answer, status, correct).

    `complete(prompts, seeds, temperature)` rolls out, one engine call per round
    (`partial(pool_complete, actors)`). `samples` are one pass's rows, so (problem_id,
    sample_index) names a sample. Step rows follow STEP_SCHEMA, in sample then step order.
    A completion is checked against its whole problem row from `problems` (by id: a code task's
    tests), or without them against the sample's gold answer.
    """
    from selfimprove.rollout.stage import request_seed

    todo, stats = scorable_samples(samples, cfg)
    stats |= {"steps": 0, "too_long": 0, "rollouts": 0, "rounds": 0}

    reached: dict[tuple[int, int], int | None] = {}  # (sample, step) -> completions that verify; None: too long
    drawn: dict[tuple[int, int], int] = defaultdict(int)

    def measure(draws: list[tuple[int, int, int]]) -> None:
        """Roll out draw j from each (sample t, step i) prefix in `draws` (t, i, j), in one engine call."""
        if not draws:
            return
        prefixes = [todo[t][0]["text"][:todo[t][1][i].end] for t, i, _ in draws]
        prompts = [todo[t][0]["prompt_text"] + p for (t, _, _), p in zip(draws, prefixes)]
        seeds = [request_seed(seed, "mc", todo[t][0]["problem_id"], todo[t][0]["sample_index"], i, j)
                 for t, i, j in draws]
        outs = complete(prompts, seeds, cfg.temperature)
        stats["rounds"] += 1
        for (t, i, _), prefix, out in zip(draws, prefixes, outs):
            if out is None or reached.get((t, i), 0) is None:
                reached[t, i] = None
                continue
            sample = todo[t][0]
            problem = problems[sample["problem_id"]] if problems is not None else {"answer": sample["answer"]}
            reached[t, i] = reached.get((t, i), 0) + task.check(prefix + out, problem)
            drawn[t, i] += 1

    first_errors: dict[int, int | None] = {}
    if cfg.search == "full":
        measure([(t, i, j) for t, (_, steps) in enumerate(todo) for i in range(len(steps) - 1) for j in range(cfg.k)])
    else:
        bounds = {t: search_start(len(steps), s["correct"]) for t, (s, steps) in enumerate(todo)}
        probes = {t: p for t, b in bounds.items() if b and (p := search_probe(*b)) is not None}
        while probes:
            measure([(t, p, j) for t, p in sorted(probes.items())
                     for j in range(drawn[t, p], drawn[t, p] + next_draws(drawn[t, p], cfg.k))])
            for t, p in list(probes.items()):
                if reached[t, p] == 0 and drawn[t, p] < cfg.k:
                    continue  # no success yet: draw more
                bounds[t] = search_update(*bounds[t], p, not reached[t, p])
                if (nxt := search_probe(*bounds[t])) is None:
                    del probes[t]
                else:
                    probes[t] = nxt
        first_errors = {t: b[1] if b else None for t, b in bounds.items()}

    rows = []
    for t, (s, steps) in enumerate(todo):
        last = len(steps) - 1
        labels = first_error_labels(len(steps), first_errors.get(t)) if cfg.search == "first_error" else None
        # Prefixes only grow: the steps after one too long for the context are too long as well
        # (first_error does not roll them out to find that).
        too_long_from = next((i for i in range(last) if (t, i) in reached and reached[t, i] is None), None)
        for i, step in enumerate(steps):
            got, rollouts = reached.get((t, i)), drawn.get((t, i), 0)
            if i == last:
                value, source = float(s["correct"]), OUTCOME
            elif (t, i) in reached and got is None or too_long_from is not None and i > too_long_from:
                value, source = None, SKIPPED
                stats["too_long"] += 1
            elif (t, i) in reached:
                value, source = (labels[i] if labels is not None else step_value(got, rollouts, cfg.label)), ROLLOUT
            else:
                value, source = labels[i], INFERRED
            stats["rollouts"] += rollouts
            rows.append({"problem_id": s["problem_id"], "sample_index": s["sample_index"], "step_index": i,
                         "start": step.start, "end": step.end, "text": step.text, "value": value,
                         "reached": got, "rollouts": rollouts, "source": source})
    stats["steps"] = len(rows)
    return rows, stats


def write_steps(rows: list[dict], path: Path) -> None:
    """`steps.parquet`: step rows from `score_samples`, in STEP_SCHEMA."""
    pq.write_table(pa.Table.from_pylist(rows, schema=STEP_SCHEMA), path)


def write_stage(rows: list[dict], stats: dict[str, int], out: Path) -> dict[str, int]:
    """The process stage's files, whichever scorer made them: `out/steps.parquet` and `out/stats.json`
    (which metrics.jsonl and report.md show). Returns `stats`."""
    write_steps(rows, Path(out) / "steps.parquet")
    (Path(out) / "stats.json").write_text(json.dumps(stats))
    return stats


def run_mc_prm(model: str, rollout_cfg: RolloutConfig, cfg: ProcessConfig, task: Task, samples: list[dict],
               problems: list[dict], out: Path) -> dict[str, int]:
    """The process stage: score `samples` of `problems` with the policy `model`; write `out/steps.parquet` and
    `out/stats.json`."""
    by_id = {p["id"]: p for p in problems}
    with prm_actors(model, dataclasses.replace(rollout_cfg, max_tokens=cfg.max_tokens), task.stop) as actors:
        return write_stage(*score_samples(partial(pool_complete, actors), samples, task, cfg, rollout_cfg.seed, by_id),
                           out)

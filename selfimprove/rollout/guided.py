"""Guide -> solver as one Ray Data pipeline: questions flow through a guide pool and straight on into a solver pool.

1. Request rows ask the guide for n guidances per question (`guide_requests`), or carry guidances already
   written (`given_guidance`: a file, a task's own structure), which skip the guide pool.
2. `map_batches(VLLMGenerator)` over the guide's actor pool writes the guidances; `solver_requests` turns each
   into a request per solver pass (the solver's task prompt with the guidance, its own seed); a second
   `map_batches(VLLMGenerator)` over the solver's actor pool, another model, answers and checks
   them (`generate_verified`). One streaming dataset, written once: no pass through disk between the two models.
3. With `number_free`, a guidance that is empty or carries a computed number is not given to the solver: its
   samples are kept, undrawn, with that status, so the counts still add up (questions x guidances x samples).
4. On CPU the two pools share the node's cores: each engine binds to its share of (guide + solver actors).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from selfimprove.config import Config, RolloutConfig
from selfimprove.guidance import guidance_problem, guide_prompt, solver_prompt
from selfimprove.rollout.generator import STARTUP
from selfimprove.rollout.stage import (
    SAMPLE_SCHEMA,
    engine_resources,
    generate,
    generate_verified,
    request_dataset,
    request_seed,
    write_samples,
)
from selfimprove.tasks.base import Task

GUIDED_ORDER = ("pass", "problem_id", "guidance_index", "sample_index")
GUIDED_SCHEMA = pa.schema([*SAMPLE_SCHEMA, ("guidance_index", pa.int64()), ("guidance", pa.string()),
                           ("guide_prompt_text", pa.string()), ("guide_status", pa.string()),
                           ("guide_tokens", pa.int64())])
# The guide's sample columns the solver's requests carry on, renamed: (guide's name, name in the solver's rows).
_FROM_GUIDE = (("sample_index", "guidance_index"), ("text", "guidance"), ("prompt_text", "guide_prompt_text"),
               ("status", "guide_status"), ("completion_tokens", "guide_tokens"))


@dataclass(frozen=True)
class Pool:
    model: str  # a resolved model reference
    cfg: RolloutConfig  # its engines (num_actors, dtype, context) and its samples' max_tokens


def guide_pool(cfg: Config, model: str) -> Pool:
    """The guide's engine pool in a run of `cfg`: the rollout settings, with the guide's own token budget and
    pool size."""
    return Pool(model, dataclasses.replace(cfg.rollout, max_tokens=cfg.guide.max_tokens, num_actors=cfg.guide.num_actors))


def guide_requests(problems: list[dict], n: int, temperature: float, seed: int) -> list[dict]:
    """One guide request per problem: n guidances at `temperature`, seeded by (seed, problem id)."""
    return [{"pass": "guide", "problem_id": p["id"], "question": p["question"], "answer": p["answer"],
             "problem": json.dumps(p), "prompt": json.dumps(guide_prompt(p["question"])), "n": n,
             "temperature": temperature, "seed": request_seed(seed, "guide", p["id"])} for p in problems]


def given_guidance(problems: list[dict], guidances: list[tuple[str, str]]) -> list[dict]:
    """Rows as the guide pool would write them, for guidances (problem id, text) written elsewhere; a problem's
    guidances are numbered in the order given."""
    by_id, count = {p["id"]: p for p in problems}, {}
    rows = []
    for pid, text in guidances:
        p = by_id[pid]
        count[pid] = count.get(pid, -1) + 1
        rows.append({"problem_id": pid, "question": p["question"], "answer": p["answer"], "problem": json.dumps(p),
                     "sample_index": count[pid], "text": text, "prompt_text": "", "status": "ok",
                     "completion_tokens": 0})
    return rows


def solver_requests(batch: dict[str, np.ndarray], task: Task, passes: dict[str, tuple[int, float]], seed: int,
                    number_free: bool) -> dict[str, list]:
    """Guide sample rows -> one solver request per (guidance, solver pass): the task's prompt with the guidance,
    and the guide's columns renamed (`_FROM_GUIDE`). A request whose guidance must not reach the solver gets a
    `skip` status: the guide's own (too long), or, with `number_free`, empty or a computed number. The guide
    engines' start-up records (`STARTUP`) go on with each request."""
    carried = [*_FROM_GUIDE, *([(STARTUP, STARTUP)] if STARTUP in batch else [])]
    out: dict[str, list] = {k: [] for k in ("pass", "problem_id", "question", "answer", "problem", "prompt", "n",
                                            "temperature", "seed", "skip", *(ours for _, ours in carried))}
    for i in range(len(batch["problem_id"])):
        problem, guidance = json.loads(batch["problem"][i]), str(batch["text"][i])
        skip = "" if batch["status"][i] == "ok" else str(batch["status"][i])
        if not skip and number_free and (why := guidance_problem(guidance, problem["question"])):
            skip = f"skipped={why}"
        prompt = json.dumps(solver_prompt(task, problem, guidance))
        for name, (n, temperature) in passes.items():
            out["pass"].append(name)
            for key in ("problem_id", "question", "answer", "problem"):
                out[key].append(str(batch[key][i]))
            out["prompt"].append(prompt)
            out["n"].append(n)
            out["temperature"].append(temperature)
            out["seed"].append(request_seed(seed, name, problem["id"], int(batch["sample_index"][i])))
            out["skip"].append(skip)
            for theirs, ours in carried:
                value = batch[theirs][i]
                out[ours].append(value.item() if isinstance(value, np.generic) else value)
    return out


def guided_rollout(task: Task, rows: list[dict], solver: Pool, guide: Pool | None, passes: dict[str, tuple[int, float]],
                   seed: int, out: Path, number_free: bool = True) -> pa.Table:
    """Solver samples for `rows` (`guide_requests` with a `guide` pool, or `given_guidance` without one): each
    guidance answered by every solver pass (name -> (n, temperature)). Written to `out`, returned in order."""
    actors = solver.cfg.num_actors + (guide.cfg.num_actors if guide else 0)
    ds = request_dataset(rows, (guide or solver).cfg)
    if guide:
        ds = generate(ds, guide.model, guide.cfg, task.stop, *engine_resources(guide.cfg, actors), startups=True)
    ds = ds.map_batches(solver_requests, fn_kwargs={"task": task, "passes": passes, "seed": seed,
                                                    "number_free": number_free}, batch_size=None, num_cpus=0)
    ds = generate_verified(ds, solver.model, solver.cfg, task, *engine_resources(solver.cfg, actors), startups=True)
    guidances = [(r["problem_id"], i) for r in rows for i in (range(r["n"]) if guide else [r["sample_index"]])]
    expected = {(name, pid, gi, si) for pid, gi in guidances for name, (n, _) in passes.items() for si in range(n)}
    return write_samples(ds, out, GUIDED_SCHEMA, GUIDED_ORDER, expected)

"""The stage kinds of guide -> solver recipes (SGFT): guidance data, guided rollouts, guidance pairs.

1. `guidance`: candidate guidances for the training questions, from a teacher model (through the guide ->
   solver pipeline, the teacher as guide), from `teacher.data`, or from the task's own structure; each is given
   to the solver once (greedy) unless it is empty or carries a computed number. Kept: the number-free ones the
   solver follows to the gold answer. Writes the guide's SFT rows (`sft.parquet`, prompted in the guide's own
   chat template), the solver's chain-of-thought rows for the same questions (`cot/sft.parquet`, the paper's
   baseline) and `stats.json`, counting every guidance by what became of it.
2. `rollout` (a self-improvement round): `guide.n` guidances per training question from the guide, each
   answered `guide.solver_samples` times by the solver, in one pipeline.
3. `pairs`: each guidance is worth its solver's success rate; higher beats lower by `guide.min_gap`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from selfimprove.config import Config
from selfimprove.errors import UserError
from selfimprove.io import read_table
from selfimprove.recipes.stages import Model, Run, Stage, read_teacher_rows

CHECK_PASS = {"check": (1, 0.0)}  # guidance data: does the solver, following it greedily, reach the answer


def guidance_data(run: Run, t: int) -> Stage:
    """Guidance for the training questions, checked by the solver (see the module's docstring): `samples/`,
    `sft.parquet`, `cot/sft.parquet`, `stats.json`. A `teacher.data` file is read now: one with no usable row
    fails before any work."""
    cfg, task = run.cfg, run.task
    if run.teacher is not None:
        source, reads = None, {"teacher": run.teacher.made_by, "n": cfg.teacher.n, "temperature": cfg.teacher.temperature}
        stats: dict = {}
    elif cfg.teacher.data:
        found, read = read_teacher_rows(cfg.teacher.data, run.train_problems, "guidance", "guidance")
        source, stats = [(p["id"], text) for p, text in found], {f"file_{k}": v for k, v in read.items()}
        reads = {"data": source}
    else:
        source = [(p["id"], g) for p in run.train_problems if (g := task.guidance(p))]
        stats = {"no_structure": len(run.train_problems) - len(source)}
        if not source:
            raise UserError(f"task {task.name} cannot write guidance from its problems' structure: give recipe sgft "
                            "a teacher (models.teacher) or guidance rows (teacher.data)")
        reads = {"structure": source}
    return Stage(run.iteration(t) / "guidance",
                 functools.partial(_guidance_data, cfg, task, run.train_problems, run.solver.ref,
                                   run.teacher and run.teacher.ref, source, stats, run.policy.ref),
                 {"problems": run.train_problems, "solver": run.solver.made_by, "guide": run.policy.made_by, **reads},
                 run.generate)


def guided_rollout(run: Run, t: int, guide: Model) -> Stage:
    """`guide.n` guidances of `guide` per training question, each answered `guide.solver_samples` times: `samples/`."""
    g = run.cfg.guide
    return Stage(run.iteration(t) / "rollout",
                 functools.partial(_guided_rollout, run.cfg, run.task, run.train_problems, run.solver.ref, guide.ref),
                 {"guide": guide.made_by, "solver": run.solver.made_by, "problems": run.train_problems,
                  "guidances": [g.n, g.temperature], "solver_samples": [g.solver_samples, g.solver_temperature]},
                 run.generate)


def guidance_pairs(run: Run, t: int) -> Stage:
    """Guidance preference pairs from iteration t's guided rollout: `pairs.parquet` and `stats.json`."""
    rollout = run.iteration(t) / "rollout"
    return Stage(run.iteration(t) / "pairs", functools.partial(_guidance_pairs, run.cfg, rollout),
                 {"rollout": rollout, "min_gap": run.cfg.guide.min_gap, "pairs_per_problem": run.cfg.pairs.pairs_per_problem})


def _guidance_data(cfg: Config, task, problems: list[dict], solver: str, teacher: str | None,
                   given: list[tuple[str, str]] | None, read_stats: dict, guide: str, out: Path) -> None:
    from transformers import AutoTokenizer

    from selfimprove.guidance import guide_prompt, kept_guidance
    from selfimprove.rollout.guided import Pool, given_guidance, guide_pool, guide_requests, guided_rollout

    if teacher is not None:
        rows = guide_requests(problems, cfg.teacher.n, cfg.teacher.temperature, cfg.rollout.seed)
    else:
        rows = given_guidance(problems, given)
    samples = guided_rollout(task, rows, Pool(solver, cfg.rollout), teacher and guide_pool(cfg, teacher), CHECK_PASS,
                             cfg.rollout.seed, out / "samples").to_pylist()
    kept, stats = kept_guidance(samples, cfg.teacher.rows_per_problem)
    if not kept:
        dropped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in stats.items()
                            if k not in ("guidances", "rows", "questions", "questions_with_guidance") and v)
        raise UserError(f"no guidance kept for the guide to learn from: of {stats['guidances']} guidances, {dropped}; "
                        "use a stronger teacher, raise teacher.n, or check the guidance rows")
    by_id = {p["id"]: p for p in problems}
    # The teacher wrote in its own chat template; the guide learns in its own.
    guide_tokens, solver_tokens = AutoTokenizer.from_pretrained(guide), AutoTokenizer.from_pretrained(solver)
    prompts = {pid: guide_tokens.apply_chat_template(guide_prompt(by_id[pid]["question"]), tokenize=False,
                                                     add_generation_prompt=True) for pid in {r["problem_id"] for r in kept}}
    pq.write_table(pa.Table.from_pylist([dict(r, prompt=prompts[r["problem_id"]]) for r in kept]), out / "sft.parquet")
    cot = [{"problem_id": pid, "response": by_id[pid]["solution"],
            "prompt": solver_tokens.apply_chat_template(task.prompt(by_id[pid]), tokenize=False,
                                                        add_generation_prompt=True)}
           for pid in sorted(prompts) if by_id[pid]["solution"]]
    stats["cot_rows"] = len(cot)
    if cot:
        (out / "cot").mkdir()
        pq.write_table(pa.Table.from_pylist(cot), out / "cot" / "sft.parquet")
    (out / "stats.json").write_text(json.dumps({**read_stats, **stats}))


def _guided_rollout(cfg: Config, task, problems: list[dict], solver: str, guide: str, out: Path) -> None:
    from selfimprove.rollout.guided import Pool, guide_pool, guide_requests, guided_rollout

    g = cfg.guide
    rows = guide_requests(problems, g.n, g.temperature, cfg.rollout.seed)
    guided_rollout(task, rows, Pool(solver, cfg.rollout), guide_pool(cfg, guide),
                   {"solver": (g.solver_samples, g.solver_temperature)}, cfg.rollout.seed, out / "samples")


def _guidance_pairs(cfg: Config, rollout: Path, out: Path) -> None:
    from selfimprove.guidance import guidance_values
    from selfimprove.pairs import process_pairs

    guidances, values = guidance_values(read_table(rollout / "samples").to_pylist())
    pairs, stats = process_pairs(guidances, values, cfg.pairs.pairs_per_problem, cfg.guide.min_gap)
    stats["rows"] = len(pairs)
    if not pairs:
        raise UserError(f"no guidance pairs from {rollout}: of {stats['problems']} questions, {stats['no_gap']} had no "
                        f"two guidances guide.min_gap={cfg.guide.min_gap} apart in solver success; raise guide.n or "
                        "guide.solver_samples, or lower guide.min_gap")
    pq.write_table(pa.Table.from_pylist(pairs), out / "pairs.parquet")
    (out / "stats.json").write_text(json.dumps(stats))

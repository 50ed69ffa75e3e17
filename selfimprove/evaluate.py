"""Held-out accuracy: greedy pass@1 and maj@k.

1. pass@1 is the share of problems whose greedy (temperature 0) answer verifies.
2. maj@k samples k answers per problem, votes on the extracted final answers (samples
   with no stated answer do not vote; ties go to the answer seen first) and checks the
   winner; pass@k (any of the k verifies) is reported beside it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from selfimprove.config import Config
from selfimprove.models import resolve_model
from selfimprove.rollout.engine import build_llm, chat_prompts, sampling_params
from selfimprove.tasks import build_task
from selfimprove.tasks.base import Task


def majority(keys: list[str | None]) -> int | None:
    """Index of the first sample carrying the most common non-empty answer key, or None."""
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(i for i, k in enumerate(keys) if k is not None and counts[k] == top)


def score_problem(task: Task, gold: str, greedy: str, samples: list[str]) -> dict:
    """Per-problem results of one greedy text and k sampled texts."""
    row = {"greedy_answer": task.answer_key(greedy), "greedy_correct": task.verify(greedy, gold)}
    if samples:
        keys = [task.answer_key(s) for s in samples]
        winner = majority(keys)
        row["majority_answer"] = None if winner is None else keys[winner]
        row["majority_correct"] = winner is not None and task.verify(samples[winner], gold)
        row["any_correct"] = any(task.verify(s, gold) for s in samples)
    return row


def aggregate(rows: list[dict], k: int) -> dict:
    """Accuracy figures over per-problem results from `score_problem`."""
    n = len(rows)
    metrics = {"problems": n, "pass@1": sum(r["greedy_correct"] for r in rows) / n}
    if k > 1:
        metrics[f"maj@{k}"] = sum(r["majority_correct"] for r in rows) / n
        metrics[f"pass@{k}"] = sum(r["any_correct"] for r in rows) / n
    return metrics


def run_eval(cfg: Config, out: Path | None = None) -> dict:
    """Evaluate `cfg.model` on `cfg.task`'s held-out split; write metrics (and per-problem rows) as JSON."""
    task = build_task(cfg.task)
    problems = task.load(cfg.eval.split)
    model = resolve_model(cfg.model)
    llm = build_llm(model, cfg.rollout)
    prompts = chat_prompts(llm.get_tokenizer(), [task.prompt(p) for p in problems])
    greedy = llm.generate(prompts, sampling_params(cfg.rollout, 1, 0.0, task.stop))
    sampled = [None] * len(problems)
    if cfg.eval.k > 1:
        params = sampling_params(cfg.rollout, cfg.eval.k, cfg.eval.temperature, task.stop)
        sampled = llm.generate(prompts, params)
    rows = []
    for problem, g, s in zip(problems, greedy, sampled, strict=True):
        texts = [c.text for c in s.outputs] if s is not None else []
        rows.append({"id": problem["id"], "gold": problem["answer"],
                     **score_problem(task, problem["answer"], g.outputs[0].text, texts)})
    metrics = {"model": cfg.model, "task": cfg.task.name, "split": cfg.eval.split,
               **aggregate(rows, cfg.eval.k)}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"metrics": metrics, "problems": rows}, indent=1))
        tmp.rename(out)
    return metrics


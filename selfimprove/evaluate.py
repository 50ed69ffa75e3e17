"""Held-out accuracy: greedy pass@1 and maj@k, through the same rollout path as training.

1. pass@1 is the share of problems whose greedy (temperature 0) sample verifies.
2. maj@k samples k answers per problem, votes on the extracted final answers (samples
   with no stated answer do not vote; ties go to the answer seen first) and checks the
   winner; pass@k (any of the k verifies, the unbiased estimator) is reported beside it.
   Code tasks' programs do not vote: they get pass@k alone.
3. Both passes go through one rollout, so one engine start serves both.
4. For code tasks, over both passes' samples: the share of passes whose program the reward-hacking monitor flags
   (`monitor.py`), and the share of programs whose tests were decided by comparing returned values.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from io import BytesIO
from pathlib import Path

from selfimprove.config import Config
from selfimprove.errors import UserError
from selfimprove.guidance import computed_numbers
from selfimprove.intervals import mean_interval
from selfimprove.io import write_atomic
from selfimprove.monitor import pass_counts
from selfimprove.overhead import share
from selfimprove.rollout.stage import AHEAD, ahead_record, request_rows, rollout
from selfimprove.tasks.base import Task


def majority(keys: list[str | None]) -> int | None:
    """Index of the first sample carrying the most common non-empty answer key, or None."""
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(i for i, k in enumerate(keys) if k is not None and counts[k] == top)


def problem_results(samples: list[dict], numbered: bool = False) -> list[dict]:
    """Per-problem results from verified sample rows of the `greedy` and (optional) `sample` passes; with
    `numbered`, of a solver's answers with guidance, whether the guidance holds a computed number."""
    by_problem: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for s in samples:
        by_problem[s["problem_id"]][s["pass"]].append(s)
    rows = []
    for pid, passes in by_problem.items():
        (greedy,) = passes["greedy"]
        row = {"id": pid, "gold": greedy["answer"], "greedy_answer": greedy["extracted"],
               "greedy_correct": greedy["correct"]}
        if numbered:
            row["guidance_numbers"] = computed_numbers(greedy["guidance"], greedy["question"])
        sampled = sorted(passes.get("sample", []), key=lambda s: s["sample_index"])
        if sampled:
            winner = majority([s["extracted"] for s in sampled])
            row["majority_answer"] = None if winner is None else sampled[winner]["extracted"]
            row["majority_correct"] = winner is not None and sampled[winner]["correct"]
            row["samples"], row["samples_correct"] = len(sampled), sum(s["correct"] for s in sampled)
        rows.append(row)
    return rows


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c are correct (Chen et al., 2021):
    1 - C(n-c, k) / C(n, k), the chance that k of the n drawn without replacement hold a correct one."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def aggregate(rows: list[dict], k: int, votes: bool = True) -> dict:
    """Accuracy figures over per-problem results from `problem_results`: maj@k only where samples vote on an
    answer (not programs), pass@k by the unbiased estimator."""
    n = len(rows)
    metrics = {"problems": n, "pass@1": sum(r["greedy_correct"] for r in rows) / n}
    if rows and "guidance_numbers" in rows[0]:
        metrics["numbered_guidance"] = sum(bool(r["guidance_numbers"]) for r in rows) / n
    if k > 1:
        if votes:
            metrics[f"maj@{k}"] = sum(r["majority_correct"] for r in rows) / n
        metrics[f"pass@{k}"] = sum(pass_at_k(r["samples"], r["samples_correct"], k) for r in rows) / n
    return metrics


def monitored(samples: list[dict]) -> dict:
    """A code task's figures over its verified samples: `flagged_pass_share`, of the passes, those the monitor flags
    (0.0 if none pass); `judged_by_value`, of the programs whose tests ran, those decided by comparing returned
    values (0.0 if none ran)."""
    counts = pass_counts(samples)
    judged = sum(counts["judged"].values())
    return {"flagged_pass_share": counts["flagged_pass_share"],
            "judged_by_value": counts["judged"]["value"] / judged if judged else 0.0}


INTERVAL = "pass_at_1_interval"  # beside pass@1 in a set's figures: [low, high], its 95% interval over problems


def pass_at_1_interval(rows: list[dict]) -> list[float]:
    """pass@1's 95% bootstrap interval over the problems of per-problem results (`intervals.py`)."""
    return [round(x, 4) for x in mean_interval([[r["greedy_correct"] for r in rows]])[1:]]


def cell(figures: dict, key: str) -> str:
    """A report's cell for the figure `key`, with its interval where it has one."""
    interval = figures.get(INTERVAL) if key == "pass@1" else None
    return f"{figures[key]:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def unanswered(problems: list[dict]) -> int:
    """How many problems come without an answer (rows of a question-only file)."""
    return sum(not p["answer"] for p in problems)


def check_answered(problems: list[dict], source: str) -> None:
    """Refuse held-out problems without an answer (a question-only file): evaluation scores answers."""
    if missing := unanswered(problems):
        raise UserError(f"{source}: {missing} of the {len(problems)} held-out problems have no answer, which "
                        "evaluation needs to score them")


def extra_sets(cfg: Config) -> dict[str, tuple[Task, list[dict]]]:
    """The report's sets beside `eval.split`, as name -> (task, held-out problems), each checked: the task's test
    split ("test"; where `eval.split` is another and `eval.test` holds), then each `eval.extra` set's test split.
    An `eval.optional` set whose data path is not on this machine is left out, with a note."""
    from selfimprove.tasks import build_task

    sets = {}
    if cfg.eval.test and cfg.eval.split != "test":
        task = build_task(cfg.task)
        sets["test"] = (task, task.load("test"))
        check_answered(sets["test"][1], f"task.data={cfg.task.data}")
    for name, set_cfg in cfg.eval.extra.items():
        if name in cfg.eval.optional and set_cfg.data and not Path(set_cfg.data).expanduser().exists():
            print(f"eval.extra.{name}: {set_cfg.data} is not on this machine; the set is left out (eval.optional)")
            continue
        task = build_task(set_cfg)
        sets[name] = (task, task.load("test"))
        check_answered(sets[name][1], f"eval.extra.{name}.data={set_cfg.data}")
    return sets


def run_eval(cfg: Config, model: str, task: Task, problems: list[dict], out: Path,
             extra: dict[str, tuple[Task, list[dict]]] | None = None, name: str | None = None,
             guide: str | None = None, ahead: list[dict] | None = None) -> dict:
    """Evaluate a resolved model (called `name`, default `cfg.model`) on `problems` and on each further set of
    `extra` (name -> (task, problems)); writes `out/samples/` (`out/extra/<set>/samples/`) and `out/metrics.json`.
    Each set is its own rollout: a set may be another task, with its own prompt and verifier.

    With a `guide` (a resolved model), `model` is a solver answering each problem with the guide's greedy guidance
    (SGFT), whatever numbers it holds: the metrics count the guidances with a computed number.

    `ahead`: request rows of a later stage that samples `model` too (the next iteration's rollout, passes of other
    names): the same engines draw them with the held-out problems, into `out/samples` beside `out/ahead.json`.
    The sets of `extra` are the report's: `eval.extra_k` samples each, not `eval.k`."""

    def passes(k: int) -> dict[str, tuple[int, float]]:
        return {"greedy": (1, 0.0), **({"sample": (k, cfg.eval.temperature)} if k > 1 else {})}

    def results(task: Task, problems: list[dict], samples: Path, k: int, ahead: list[dict] | None = None) -> list[dict]:
        """The set's verified sample rows of its passes: greedy, and k samples."""
        wanted = passes(k)
        if guide is None:
            rows = request_rows(task, problems, wanted, cfg.rollout.seed)
            drawn = rollout(model, cfg.rollout, task, rows + (ahead or []), samples).to_pylist()
            if ahead:
                write_atomic(samples.parent / AHEAD, ahead_record(model, ahead))
            return [s for s in drawn if s["pass"] in wanted]
        from selfimprove.rollout.guided import Pool, guide_pool, guide_requests, guided_rollout

        rows = guide_requests(problems, 1, 0.0, cfg.rollout.seed)
        return guided_rollout(task, rows, Pool(model, cfg.rollout), guide_pool(cfg, guide), wanted,
                              cfg.rollout.seed, samples, number_free=False).to_pylist()

    def scored(task: Task, samples: list[dict], k: int) -> tuple[list[dict], dict]:
        """(per-problem results, the set's figures) from its samples."""
        rows = problem_results(samples, numbered=guide is not None)
        return rows, {**aggregate(rows, k, task.votes), INTERVAL: pass_at_1_interval(rows),
                      **(monitored(samples) if task.isolation else {})}

    rows, figures = scored(task, results(task, problems, out / "samples", cfg.eval.k, ahead), cfg.eval.k)
    metrics = {"model": name or cfg.model, "task": cfg.task.name, "split": cfg.eval.split, "dtype": cfg.rollout.dtype,
               **({"guide": guide} if guide else {}), **figures,
               **({"sandbox": task.isolation} if task.isolation else {})}
    if extra:
        k = cfg.eval.extra_k
        metrics["extra"] = {set_name: scored(set_task, results(set_task, set_problems,
                                                               out / "extra" / set_name / "samples", k), k)[1]
                            for set_name, (set_task, set_problems) in extra.items()}
    write_atomic(out / "metrics.json", json.dumps({"metrics": metrics, "problems": rows}, indent=1))
    return metrics


# Pair-stage stats that count what was kept, not problems dropped for a reason.
COUNTED_NOT_DROPPED = ("problems", "pairs", "rows", "accumulated", "gold_labels", "majority_labels",
                       "demonstration_accuracy", "guidances", "questions", "questions_with_guidance", "cot_rows",
                       "file_rows", "file_used")


def trained_on(row: dict) -> dict:
    """The stats of what a metrics row's iteration trained on: its pairs, a teacher's demonstrations, or guidance."""
    return row.get("pairs", row.get("labels", row.get("guidance", {})))


def training_rows(stats: dict) -> int | str:
    """Rows the trainer got from a pairs stage's stats ('pairs' in runs made before 'rows' existed)."""
    return stats.get("rows", stats.get("pairs", ""))


def flagged_passes(row: dict) -> str:
    """A metrics row's flagged share of the eval's passes, and of its rollout's in brackets: "" where not counted."""
    held_out, rollout = row.get("flagged_pass_share"), row.get("rollout", {}).get("flagged_pass_share")
    return " ".join(([] if held_out is None else [f"{held_out:.1%}"])
                    + ([] if rollout is None else [f"(rollout {rollout:.1%})"]))


def write_report(run_dir: Path) -> Path:
    """`report.md` with a PNG of held-out accuracy per iteration, pair and step-scoring statistics, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl: not a run folder, or no iteration has been evaluated yet")
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    keys = [k for k in rows[0] if "@" in k]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        ax.plot([r["iteration"] for r in rows], [r[key] for r in rows], marker="o", label=key)
    sets = list(dict.fromkeys(name for r in rows for name in r.get("extra", {})))
    for name in sets:
        had = [r for r in rows if name in r.get("extra", {})]
        ax.plot([r["iteration"] for r in had], [r["extra"][name]["pass@1"] for r in had], marker="s", linestyle="--",
                label=f"{name} pass@1")
    ax.set_xlabel("iteration")
    ax.set_ylabel("held-out accuracy")
    ax.set_xticks([r["iteration"] for r in rows])
    ax.set_title(f"{rows[0]['model']} on {rows[0]['task']} ({rows[0]['split']}, {rows[0]['problems']} problems)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = BytesIO()
    fig.savefig(png, format="png", dpi=120)
    write_atomic(run_dir / "accuracy.png", png.getvalue())
    plt.close(fig)

    monitored = any("flagged_pass_share" in r for r in rows)  # a code run: programs were judged
    lines = [f"# Run report: {run_dir}", "", "![held-out accuracy per iteration](accuracy.png)", "",
             "| iteration | " + " | ".join(keys) + (" | flagged passes" if monitored else "")
             + " | training rows | problems dropped | seconds | fixed cost |",
             "|---" * (len(keys) + 5 + monitored) + "|"]
    for r in rows:
        p = trained_on(r)
        dropped = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in p.items() if k not in COUNTED_NOT_DROPPED)
        fixed = share(r)
        lines.append(f"| {r['iteration']} | " + " | ".join(cell(r, k) for k in keys)
                     + (f" | {flagged_passes(r)}" if monitored else "")
                     + f" | {training_rows(p)} | {dropped} | {sum(r.get('stage_seconds', {}).values()):.0f}"
                     + f" | {'' if fixed is None else f'{fixed:.0%}'} |")
    lines += ["", "Fixed cost: engines starting, Ray Train and DeepSpeed setting up, the reference pass and saving, as a "
              "share of the seconds of the stages that recorded it; per stage in `metrics.jsonl` (`fixed_seconds`)."]
    if monitored:
        lines += ["", "Flagged passes: of the held-out samples that pass (greedy and sampled), the share whose program "
                  "the reward-hacking monitor flags (`selfimprove/monitor.py`); in brackets, the same share of the "
                  "passes among the samples the iteration trained on (its rollout's `stats.json`)."]
    if sets:
        columns = [(name, k) for name in sets for k in keys
                   if any(k in r["extra"][name] for r in rows if name in r.get("extra", {}))]
        lines += ["", f"The report's sets, beside the {rows[0]['split']} split above: the task's test split (`test`; "
                  "nothing chooses on it) and each `eval.extra` set's:", "",
                  "| iteration | " + " | ".join(f"{name} {k}" for name, k in columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        for r in rows:
            lines.append(f"| {r['iteration']} | " + " | ".join(
                cell(r["extra"][name], k) if k in r.get("extra", {}).get(name, {}) else "" for name, k in columns)
                + " |")
    others = [(r["iteration"], kind, r[kind]) for r in rows for kind in r if kind.endswith("_eval")]
    if others:  # other models' evaluations: a teacher, a solver alone, a baseline
        lines += ["", "Other models, same held-out sets:", ""]
        lines += [f"- iteration {t} `{kind}`, `{m['model']}`: " + ", ".join(f"{k} {cell(m, k)}" for k in keys if k in m)
                  + "".join(f"; {name}: " + ", ".join(f"{k} {cell(e, k)}" for k in keys if k in e)
                            for name, e in m.get("extra", {}).items()) for t, kind, m in others]
    scored = [r for r in rows if "process" in r]
    if scored:
        figures = list(dict.fromkeys(k for r in scored for k in r["process"]))
        lines += ["", "Step scoring (process supervision):", "",
                  "| iteration | " + " | ".join(k.replace("_", " ") for k in figures) + " | seconds |",
                  "|---" * (len(figures) + 2) + "|"]
        for r in scored:
            lines.append(f"| {r['iteration']} | " + " | ".join(str(r["process"].get(k, "")) for k in figures)
                         + f" | {r['stage_seconds'].get('process', 0):.0f} |")
    out = run_dir / "report.md"
    write_atomic(out, "\n".join(lines) + "\n")
    return out

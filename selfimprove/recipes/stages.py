"""The stage kinds recipes build their plans from: each a builder that declares a `Stage` and the work it does.

1. A `Stage` is a folder (`run_dir/iter_<t>/<kind>`), the work that fills it, what it reads (recorded in its
   `_SUCCESS`, so that a rerun whose inputs changed is refused) and the type it computes in. Building a stage
   does nothing: the driver runs the plan, skipping finished stages.
2. The work functions import engines and trainers when they run, so building a plan is cheap and Ray-free.
3. A model is named by its reference (what engines load) and by what made it (the starting model's folder or
   name, or the train stage that wrote it): the latter is what stages record as read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from selfimprove.config import Config
from selfimprove.errors import UserError
from selfimprove.io import read_table
from selfimprove.precision import Choice

PROBLEMS = "problems.json"  # a stage's problem rows for later stages (JSON: the training rows' Parquet is beside it)


@dataclass(frozen=True)
class Model:
    ref: str  # what engines and trainers load: a bundled name, hub id, folder or .gguf
    made_by: Path | str  # what a stage reading it records: the model's folder, or the train stage that wrote it


@dataclass(frozen=True)
class Run:
    """What every stage of one run is built from: the config, its folder, its problems and starting models."""

    cfg: Config
    run_dir: Path
    task: object
    train_problems: list[dict]
    test_problems: list[dict]
    policy: Model  # the starting model
    generate: Choice  # the type engines compute in
    train: Choice  # the type trainers compute in
    backbone: str | None = None  # process.scorer=trained: the model the PRM is a classifier on
    teacher: Model | None = None  # models.teacher: the model that writes demonstrations
    reference: Model | None = None  # models.reference: a fixed DPO reference (none: the model a stage starts from)
    solver: Model | None = None  # models.solver: the model that answers with a guide's guidance (sgft)
    extra: dict = dataclasses.field(default_factory=dict)  # eval.extra: name -> (task, held-out problems)

    def iteration(self, t: int) -> Path:
        return self.run_dir / f"iter_{t}"


@dataclass(frozen=True)
class Stage:
    folder: Path  # run_dir/iter_<t>/<kind>
    work: Callable[[Path], None]  # fills the scratch folder it is given
    reads: dict = dataclasses.field(default_factory=dict)  # name -> path, model or value it reads
    dtype: Choice | None = None  # the type it computes in, if it computes with a model
    # A sampling stage's request rows, built when called: an earlier stage sampling the same model can draw them
    # ahead with its own engines (`evaluate(ahead=...)`).
    requests: Callable[[], list[dict]] | None = None

    @property
    def kind(self) -> str:
        return self.folder.name

    @property
    def iteration(self) -> int:
        return int(self.folder.parent.name.removeprefix("iter_"))


def trained_model(stage: Stage) -> Model:
    """The model a train stage writes."""
    return Model(str((stage.folder / "model").resolve()), stage.folder)


def evaluate(run: Run, t: int, model: Model, kind: str = "eval", name: str | None = None,
             guide: Model | None = None, ahead: Stage | None = None) -> Stage:
    """Greedy pass@1 and maj@k of `model` (called `name` in the metrics, default `model`) on the held-out problems
    and on each `eval.extra` set, answering with `guide`'s greedy guidance if given: `metrics.json` and the samples.
    With `ahead` (a later stage sampling `model` too) and `rollout.draw_ahead`, the same engines draw its requests
    as well: it then copies them instead of starting engines of its own (`rollout(drawn_in=...)`)."""
    extra = {set_name: problems for set_name, (_, problems) in run.extra.items()}
    requests = ahead.requests if ahead is not None and run.cfg.rollout.draw_ahead else None
    return Stage(run.iteration(t) / kind,
                 functools.partial(_evaluate, run.cfg, model.ref, name or run.cfg.model, run.task, run.test_problems,
                                   run.extra, guide and guide.ref, requests),
                 {"model": model.made_by, "problems": run.test_problems, "extra": extra or None,
                  "guide": guide and guide.made_by}, run.generate)


def rollout(run: Run, t: int, model: Model, problems: list[dict] | Path | None = None, kind: str = "rollout",
            n: int | None = None, temperature: float | None = None, drawn_in: Path | None = None) -> Stage:
    """`n` (default `rollout.n`) samples of `model` per training problem, at iteration t's temperature: `samples/`.
    `problems` is the training problems, or a stage folder whose `problems.json` holds them when it has run.
    `drawn_in`: an earlier stage that may have drawn these samples ahead from the same model (`evaluate(ahead=)`);
    if it did, they are copied from it (`stats.json` names it) and no engine starts. For a code task, `stats.json`
    counts the samples, the passes and the passes the reward-hacking monitor flags (`monitor.pass_counts`)."""
    r = run.cfg.rollout
    if temperature is None:
        temperature = r.temperature_schedule[t - 1] if r.temperature_schedule else r.temperature
    problems = run.train_problems if problems is None else problems
    requests = functools.partial(_requests, run.cfg, run.task, problems, n or r.n, temperature)
    return Stage(run.iteration(t) / kind, functools.partial(_rollout, run.cfg, model.ref, run.task, requests, drawn_in),
                 {"model": model.made_by, "problems": problems, "temperature": temperature,
                  "n": n if n is not None and n != r.n else None}, run.generate, requests)


def process(run: Run, t: int, model: Model, prm: Path | None) -> Stage:
    """Step values of iteration t's samples (`steps.parquet`): Monte Carlo completions by `model`, the policy that
    wrote them, or, given a trained `prm` folder, its predictions."""
    samples = run.iteration(t) / "rollout"
    return Stage(run.iteration(t) / "process",
                 functools.partial(_process, run.cfg, model.ref, run.task, run.train_problems, samples, prm),
                 {"model": model.made_by, "rollout": samples, "prm": prm and prm.parent},
                 run.generate if prm is None else None)


def train_prm(run: Run, t: int, scored: list[int]) -> Stage:
    """A PRM trained on the step values of the process stages of iterations `scored`: the folder `model`."""
    backbone = run.backbone
    processes = {f"process_{s}": run.iteration(s) / "process" for s in scored}
    return Stage(run.iteration(t) / "prm", functools.partial(_train_prm, run.cfg, backbone, list(processes.values())),
                 {"backbone": Path(backbone) if Path(backbone).is_dir() else backbone, **processes}, run.train)


def pairs(run: Run, t: int, previous: Path | None = None, problems: list[dict] | Path | None = None) -> Stage:
    """Training rows from iteration t's samples (and step values, for process pairs); with `previous` (an
    earlier pairs stage), its rows too. `problems` (as for `rollout`) gives the gold chains of thought."""
    it = run.iteration(t)
    scored = run.cfg.pairs.source == "process"
    problems = run.train_problems if problems is None else problems
    return Stage(it / "pairs", functools.partial(_pairs, run.cfg, problems, it, previous),
                 {"rollout": it / "rollout", "process": it / "process" if scored else None, "previous": previous,
                  "problems": problems})


def demonstrations(run: Run, t: int) -> Stage:
    """The teacher's demonstrations for the training problems, as sample rows (`samples/`): `teacher.n` samples of
    `models.teacher` through the rollout pool, or the rows of `teacher.data` (read now: a file with no usable row
    fails before any work)."""
    tc = run.cfg.teacher
    if run.teacher is not None:
        return rollout(run, t, run.teacher, kind="demos", n=tc.n, temperature=tc.temperature)
    samples, stats = read_demonstrations(tc.data, run.task, run.train_problems)
    return Stage(run.iteration(t) / "demos", functools.partial(_write_demonstrations, samples, stats),
                 {"data": samples})


def labels(run: Run, t: int, demos: Path) -> Stage:
    """Each training problem's label (its gold answer, or the teacher's majority answer) and the demonstrations
    that reach it: `problems.json` (the labelled problems), `sft.parquet` (the student's tuning rows, prompted
    in the student's own chat template) and `stats.json`."""
    return Stage(run.iteration(t) / "labels",
                 functools.partial(_labels, run.cfg, run.task, run.train_problems, run.policy.ref, demos),
                 {"demos": demos, "problems": run.train_problems, "student": run.policy.made_by})


def train(run: Run, t: int, model: Model, rows: Path, loss: str | None = None, kind: str = "train",
          subfolder: str | None = None) -> Stage:
    """`model` trained on the rows of the stage folder `rows` (or of its `subfolder`) with `loss` (default
    `train.loss`); its reference, if the loss has one, is `models.reference`, else `model` itself."""
    from selfimprove.train.loss_names import needs_reference

    cfg = run.cfg if loss is None else dataclasses.replace(run.cfg, train=dataclasses.replace(run.cfg.train, loss=loss))
    reference = run.reference if needs_reference(cfg.train.loss) else None
    data = rows / subfolder if subfolder else rows
    return Stage(run.iteration(t) / kind, functools.partial(_train, cfg, model.ref, data, reference and reference.ref),
                 {"model": model.made_by, "pairs": rows, "subfolder": subfolder, "loss": loss,
                  "reference": reference and reference.made_by}, run.train)


def problems_of(source: list[dict] | Path) -> list[dict]:
    """Problem rows given as such, or as the stage folder that wrote them to `problems.json`."""
    return json.loads((source / PROBLEMS).read_text()) if isinstance(source, Path) else source


def _evaluate(cfg: Config, model: str, name: str, task, problems: list[dict], extra: dict, guide: str | None,
              ahead: Callable[[], list[dict]] | None, out: Path) -> None:
    from selfimprove.evaluate import run_eval

    run_eval(cfg, model, task, problems, out, extra, name, guide, ahead and ahead())


def _requests(cfg: Config, task, problems: list[dict] | Path, n: int, temperature: float) -> list[dict]:
    from selfimprove.rollout.stage import request_rows

    return request_rows(task, problems_of(problems), {"train": (n, temperature)}, cfg.rollout.seed)


def _rollout(cfg: Config, model: str, task, requests: Callable[[], list[dict]], drawn_in: Path | None,
             out: Path) -> None:
    from selfimprove.io import stage_output
    from selfimprove.rollout.stage import drawn_ahead, rollout

    rows = requests()
    drawn = drawn_ahead(drawn_in, model, rows) if drawn_in is not None else None
    if drawn is None:
        samples, stats = rollout(model, cfg.rollout, task, rows, out / "samples"), {}
    else:
        with stage_output(out / "samples") as scratch:
            pq.write_table(drawn, scratch / "drawn.parquet")
        samples, stats = drawn, {"drawn_by": f"{drawn_in.parent.name}/{drawn_in.name}"}
    if task.isolation is not None:  # programs ran: how many passed, and how many of those the monitor flags
        from selfimprove.monitor import pass_counts

        stats.update(pass_counts(samples.to_pylist()))
    if stats:
        (out / "stats.json").write_text(json.dumps(stats))


def _process(cfg: Config, model: str, task, problems: list[dict], rollout_dir: Path, prm: Path | None,
             out: Path) -> None:
    samples = read_table(rollout_dir / "samples").to_pylist()
    if prm is None:
        from selfimprove.reward.mc_prm import run_mc_prm

        run_mc_prm(model, cfg.rollout, cfg.process, task, samples, problems, out)
    else:
        from selfimprove.reward.trained_prm import run_trained_prm

        run_trained_prm(prm, model, cfg.process, samples, out)


def read_demonstrations(path: str, task, problems: list[dict]) -> tuple[list[dict], dict]:
    """(sample rows, stats) from a demonstrations file of rows with `question` and `response` (`read_teacher_rows`)."""
    found, stats = read_teacher_rows(path, problems, "response", "demonstrations")
    seen: dict[str, int] = {}
    samples = []
    for p, response in found:
        seen[p["id"]] = seen.get(p["id"], -1) + 1
        samples.append({"pass": "demos", "problem_id": p["id"], "sample_index": seen[p["id"]], "text": response,
                        "status": "ok", "extracted": task.answer_key(response), "correct": task.check(response, p)})
    return samples, stats


def read_teacher_rows(path: str, problems: list[dict], field: str, what: str) -> tuple[list[tuple[dict, str]], dict]:
    """([(training problem, text)], stats) from a file of rows with `question` and `field` (the teacher's `what`);
    a row whose question is not a training problem's, or that lacks either, is dropped and counted. UserError if
    no row is usable."""
    from selfimprove.tasks.files import read_rows

    by_question = {p["question"].strip(): p for p in problems}
    rows = read_rows(path, "train", (), lambda row: row)
    found, stats = [], {"rows": len(rows), "no_question": 0, f"no_{field}": 0, "unknown_question": 0}
    for row in rows:
        question, text = row.get("question"), row.get(field)
        if not isinstance(question, str) or not question.strip():
            stats["no_question"] += 1
        elif not isinstance(text, str) or not text.strip():
            stats[f"no_{field}"] += 1
        elif question.strip() not in by_question:
            stats["unknown_question"] += 1
        else:
            found.append((by_question[question.strip()], text))
    stats["used"] = len(found)
    if not found:
        dropped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in stats.items() if k not in ("rows", "used") and v)
        raise UserError(f"{path}: no usable {what} among its {len(rows)} rows ({dropped}); each row needs a "
                        f"`question` that is one of the training problems' and a `{field}`")
    return found, stats


def _write_demonstrations(samples: list[dict], stats: dict, out: Path) -> None:
    (out / "samples").mkdir()
    pq.write_table(pa.Table.from_pylist(samples), out / "samples" / "demos.parquet")
    (out / "stats.json").write_text(json.dumps(stats))


def _labels(cfg: Config, task, problems: list[dict], student: str, demos: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    from selfimprove.labels import teacher_labels

    samples = read_table(demos / "samples").to_pylist()
    labelled, rows, stats = teacher_labels(problems, samples, cfg.teacher.rows_per_problem)
    if not rows:
        raise UserError(
            f"no demonstrations to tune the student on from {demos}: of {stats['problems']} problems, "
            f"{stats['no_correct']} had no correct one and {stats['no_answer']} no stated answer; raise teacher.n, "
            "or use a stronger teacher")
    tokenizer = AutoTokenizer.from_pretrained(student)  # the teacher's template may differ: the student's counts
    prompts = {p["id"]: tokenizer.apply_chat_template(task.prompt(p), tokenize=False, add_generation_prompt=True)
               for p in labelled}
    pq.write_table(pa.Table.from_pylist([dict(r, prompt=prompts[r["problem_id"]]) for r in rows]), out / "sft.parquet")
    (out / PROBLEMS).write_text(json.dumps(labelled))
    (out / "stats.json").write_text(json.dumps(stats))


def _train_prm(cfg: Config, backbone: str, processes: list[Path], out: Path) -> None:
    from selfimprove.reward.trained_prm import train_prm

    train_prm(cfg, backbone, [p.parent for p in processes], out / "model", checkpoints=checkpoints(out))


def _pairs(cfg: Config, problems: list[dict] | Path, it: Path, previous: Path | None, out: Path) -> None:
    """`pairs.parquet` (outcome or process pairs) for preference losses, `sft.parquet` of correct samples for
    `train.loss=sft` (STaR), and `stats.json` counting what was dropped and why."""
    from selfimprove.pairs import accumulate_pairs, outcome_pairs, process_pairs, sample_scores, winner_rows
    from selfimprove.train.loss_names import needs_rejected

    samples = read_table(it / "rollout" / "samples").to_pylist()
    gold = {p["id"]: p["solution"] for p in problems_of(problems)} if cfg.pairs.include_gold else None
    if cfg.pairs.source == "process":
        scores = sample_scores(pq.read_table(it / "process" / "steps.parquet").to_pylist(), cfg.process.path_score)
        rows, stats = process_pairs(samples, scores, cfg.pairs.pairs_per_problem, cfg.process.eta)
        name, why = "pairs.parquet", f"{stats['no_gap']} had no two samples process.eta={cfg.process.eta} apart"
    elif needs_rejected(cfg.train.loss):
        rows, stats = outcome_pairs(samples, cfg.pairs.pairs_per_problem, gold)
        name, why = "pairs.parquet", f"{stats['no_winner']} had no correct sample and {stats['no_loser']} no incorrect one"
    else:
        rows, stats = winner_rows(samples, cfg.pairs.pairs_per_problem, gold)
        name, why = "sft.parquet", f"{stats['no_winner']} had no correct sample"
    if previous is not None:
        rows = accumulate_pairs(pq.read_table(previous / name).to_pylist(), rows)
        stats["accumulated"] = len(rows)
    stats["rows"] = len(rows)  # what the trainer gets
    if not rows:
        raise UserError(
            f"nothing to train on from {it / 'rollout'}: of {stats['problems']} problems, {why}; raise rollout.n or "
            "rollout.temperature, use easier problems, or set pairs.include_gold=true")
    pq.write_table(pa.Table.from_pylist(rows), out / name)
    (out / "stats.json").write_text(json.dumps(stats))


def _train(cfg: Config, model: str, rows: Path, reference: str | None, out: Path) -> None:
    from selfimprove.train.trainer import train

    train(dataclasses.replace(cfg, model=model), rows, out / "model", checkpoints=checkpoints(out), reference=reference)


def checkpoints(scratch: Path) -> Path:
    """Where a training stage keeps its checkpoints: beside its scratch folder, which a rerun clears, so that
    the rerun resumes from them (`iter_<t>/train.ray`)."""
    return scratch.with_name(scratch.name.removesuffix(".partial") + ".ray")

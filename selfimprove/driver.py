"""A run: the stages its recipe plans (`selfimprove/recipes`), run in order into one run dir, resumable.

1. The recipe's plan is built before anything is written: every check a config can fail (the task, the
   models, the knobs, `--redo` names) fails then, before the run dir is claimed or Ray starts.
2. Every stage writes `run_dir/iter_<t>/<stage>/` through `io.stage_output`, so a folder is
   complete (with `_SUCCESS`) or absent. The driver skips a finished stage: a killed run
   resumes where it stopped and never redoes a finished rollout.
3. The run's config is saved as `run_dir/config.yaml`; rerunning into the same
   folder with a different config is refused, since finished stages would not match it, except
   for `iterations`: a finished run given more iterations goes on from where it ended. A run holds a
   lock on its run dir while it lives, so a second run in the same folder is refused; a folder that is
   neither empty nor a run is never written into.
4. `metrics.jsonl` is rewritten from the finished eval stages after each iteration: it is
   derived data, never the only copy of a figure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO

import yaml

from selfimprove.config import Config, to_dict
from selfimprove.errors import UserError
from selfimprove.io import MARKER, digest, is_damaged, is_done, is_ours, stage_output, success_record, write_atomic
from selfimprove.overhead import fixed_seconds
from selfimprove.precision import Choice, announce, resolve
from selfimprove.progress import RunProgress
from selfimprove.recipes import Recipe, load_config, name_of, recipe_of
from selfimprove.recipes.stages import Model, Run
from selfimprove.resources import check_resources
from selfimprove.tracking import Tracker

DTYPE_FILE = "dtype.json"
# Held (flock) by the process running in a run dir; it names that process.
LOCK = ".lock"


def run(cfg: Config, redo: tuple[str, ...] = ()) -> list[dict]:
    """Run (or resume) the stages `cfg`'s recipe plans into `cfg.run_dir`; return the metrics rows.

    `redo` names stage kinds (e.g. "train") to run again although finished; the stages that read them follow.
    """
    run_dir, recipe = Path(cfg.run_dir), recipe_of(cfg)
    # Everything a user can get wrong fails here, before the run dir is claimed or Ray starts.
    plan = recipe.plan(_prepare(cfg, recipe))
    unknown = sorted(set(redo) - {s.kind for s in plan})
    if unknown:
        raise UserError(f"--redo {', '.join(unknown)}: recipe {recipe.name} has no such stage (its stages: "
                        f"{', '.join(dict.fromkeys(s.kind for s in plan))})")
    # A guide's pool runs beside the solver's (rollout.num_actors) in one pipeline.
    check_resources(cfg, guides=cfg.guide.num_actors if "solver" in recipe.roles else 0)

    with claim_run_dir(run_dir, cfg), contextlib.closing(Tracker(run_dir, cfg.tracking)) as tracker:
        announce({s.dtype.key: s.dtype for s in plan if s.dtype}.values())
        from selfimprove.runtime import init_ray
        from selfimprove.storage import share_through

        init_ray()
        share_through(cfg.storage_path)
        progress = RunProgress(run_dir, [(s.iteration, s.kind) for s in plan])
        redoing = Redo(frozenset(redo))
        for s in plan:
            if _stage(s.folder, s.work, progress=progress, dtype=s.dtype, inputs=s.reads, redo=redoing):
                tracker.stage_done(s.folder)
            if s.kind == "eval" and s.iteration:
                write_metrics(run_dir)
        return write_metrics(run_dir)


@dataclasses.dataclass(frozen=True)
class Evaluated:
    iteration: int
    model: str  # what an engine loads: a trained model's folder, or the starting model's reference
    guide: str | None = None  # recipe sgft: the guide whose guidance the model (the solver) answered with


def evaluated(run_dir: Path) -> list[Evaluated]:
    """The models of a run's finished `eval` stages, in iteration order (what `selfimprove serve` can serve)."""
    saved = run_dir / "config.yaml"
    if not saved.is_file() or not (run_dir / MARKER).is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.yaml and {MARKER} made by `selfimprove run`)")
    cfg = load_config(saved)
    recipe = recipe_of(cfg)
    run_ = _prepare(dataclasses.replace(cfg, run_dir=str(run_dir)), recipe)
    starting = {m.made_by: m.ref for m in (run_.policy, run_.solver, run_.teacher, run_.reference) if m}

    def ref(made_by: Path | str) -> str:  # a train stage's folder holds its model; a starting model is named
        trained = Path(made_by) / "model"
        return str(trained) if isinstance(made_by, Path) and trained.is_dir() else starting.get(made_by, str(made_by))

    return [Evaluated(s.iteration, ref(s.reads["model"]), s.reads.get("guide") and ref(s.reads["guide"]))
            for s in recipe.plan(run_) if s.kind == "eval" and is_done(s.folder)]


def _prepare(cfg: Config, recipe: Recipe) -> Run:
    """What a plan is built from: the task and its problems, the starting models (checked), and the types
    engines and trainers compute in on this machine. The saved config keeps `auto`, so that a run resumed on
    another kind of machine computes in that machine's type."""
    from selfimprove.evaluate import extra_sets
    from selfimprove.models import check_lora_targets, check_reference, check_tokenizer, resolve_model
    from selfimprove.tasks import build_task

    task = build_task(cfg.task)
    train_problems, test_problems = task.load("train"), task.load(cfg.eval.split)
    _check_answers(recipe, train_problems, test_problems, f"task.data={cfg.task.data}")
    extra = extra_sets(cfg)
    policy = resolve_model(cfg.model)
    teacher = resolve_model(cfg.models.teacher) if cfg.models.teacher else None
    solver = resolve_model(cfg.models.solver) if cfg.models.solver else None
    reference = None
    if cfg.models.reference:
        reference = check_reference(cfg.models.reference, policy)
    backbone = None
    if cfg.process.scorer == "trained":
        backbone = resolve_model(cfg.process.prm_backbone) if cfg.process.prm_backbone else policy
        if backbone != policy:
            check_tokenizer(backbone, policy, "(process.prm_backbone) has")
    if cfg.train.lora:
        check_lora_targets(policy, cfg.train.lora_targets)
    concrete, (generate, train) = resolve(cfg)
    return Run(concrete, Path(cfg.run_dir), task, train_problems, test_problems, _model(policy), generate, train,
               backbone, teacher=teacher and _model(teacher), reference=reference and _model(reference),
               solver=solver and _model(solver), extra=extra)


def _model(ref: str) -> Model:
    return Model(ref, Path(ref) if Path(ref).is_dir() else ref)


def _check_answers(recipe: Recipe, train: list[dict], test: list[dict], source: str) -> None:
    """Refuse problems without answers where they are needed: held-out problems always, training problems unless
    the recipe labels them itself. `source` names where they came from."""
    from selfimprove.evaluate import check_answered, unanswered

    check_answered(test, source)
    if (missing := unanswered(train)) and recipe.needs_gold:
        raise UserError(f"{source}: {missing} of the {len(train)} training problems have no answer, and recipe "
                        f"{recipe.name} learns from gold answers; recipe self_refine labels questions by its teacher")


def claim_run_dir(run_dir: Path, cfg: Config) -> IO[str]:
    """Lock `run_dir` for this process, then save the resolved config in a new run dir or check an existing
    run dir was made with it. Returns the open lock file: the run dir is this run's until it is closed.

    A folder that is neither empty nor a run is refused with nothing written into it. A claim that fails (a full
    disk, a read-only one) takes back what it made: the folders, marker and lock file it created. The lock file
    only while this claim holds its lock: another run may have taken a lock file this claim found absent.
    """
    made: list[Path] = []  # created by this claim, in order
    try:
        if os.path.lexists(run_dir) and not run_dir.is_dir():
            raise UserError(f"cannot write the run dir {run_dir}: it is a file, not a folder")
        if run_dir.is_dir() and any(run_dir.iterdir()) and not _is_run(run_dir):
            raise UserError(f"{run_dir} is not empty and holds no selfimprove run; pass a new or empty run_dir=...")
        made += reversed([p for p in (run_dir, *run_dir.parents) if not os.path.lexists(p)])
        run_dir.mkdir(parents=True, exist_ok=True)
        made += [p for p in (run_dir / MARKER,) if not os.path.lexists(p)]
        new_lock = not os.path.lexists(run_dir / LOCK)
        (run_dir / MARKER).touch()
        lock = _lock(run_dir)
        try:
            _name_holder(lock)
            _check_or_save_config(run_dir, cfg)
        except BaseException:
            if new_lock:  # unlinked while held: a claim that opened it meanwhile sees it gone (`_lock`)
                (run_dir / LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # closing flushes the holder's line again: the first error is the one
                lock.close()
            raise
    except OSError as e:
        _take_back(made)
        raise UserError(f"cannot write the run dir {run_dir}: {e.strerror}") from None
    except BaseException:
        _take_back(made)
        raise
    return lock


def _take_back(made: list[Path]) -> None:
    """Remove what a failed claim created, last first; a folder only if it is empty again."""
    for path in reversed(made):
        try:
            path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        except OSError:
            pass


def _is_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds a run: our marker, or (runs made before the marker) a config.yaml of ours."""
    if is_ours(run_dir):
        return True
    try:
        load_config(run_dir / "config.yaml")
    except UserError:
        return False
    return True


def _lock(run_dir: Path) -> IO[str]:
    """Take `run_dir/.lock`, or refuse naming the process holding it.

    The OS releases a flock when its holder ends, however it ends, so a killed run leaves no stale lock.
    O_NOFOLLOW: a symlink planted at that name must not make us open, and overwrite, another file.
    A failed claim removes the lock file it made while it holds it; a claim that opened that file meanwhile would
    lock a file no longer in the folder, beside a run that makes a new one: it opens the new one instead.
    """
    while True:
        lock = os.fdopen(os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read().strip() or "one that has not written its pid yet"
            lock.close()
            raise UserError(f"{run_dir} is in use by another selfimprove run ({holder}); wait for it to end, "
                            "or pass another run_dir=...") from None
        if _same_file(lock, run_dir / LOCK):
            return lock
        lock.close()


def _same_file(f: IO[str], path: Path) -> bool:
    try:
        there = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(f.fileno())
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def _name_holder(lock: IO[str]) -> None:
    """Write this process's pid and host in the lock file, for a run it refuses to name."""
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()


def _check_or_save_config(run_dir: Path, cfg: Config) -> None:
    """Save the resolved config in a new run dir, or check an existing run dir was made with it."""
    saved = run_dir / "config.yaml"
    mine = to_dict(cfg)
    if not saved.is_file():
        write_atomic(saved, yaml.safe_dump(mine, sort_keys=False))
        return
    # Read back as a config, so keys added since the run was made compare at their defaults.
    theirs = load_config(saved)
    # A run saved before recipes names none: it is the recipe its knobs describe.
    theirs, mine = to_dict(dataclasses.replace(theirs, recipe=name_of(theirs))), dict(mine, recipe=name_of(cfg))
    if theirs == mine:
        return
    # More (or fewer) iterations of the same run: it goes on from where it is. Serving, tracking and where nodes
    # share files change no stage.
    theirs.update(iterations=cfg.iterations, serve=mine["serve"], tracking=mine["tracking"],
                  storage_path=mine["storage_path"])
    if theirs == mine:
        write_atomic(saved, yaml.safe_dump(mine, sort_keys=False))
    else:
        diff = _first_difference(theirs, mine)
        raise UserError(f"{run_dir} holds a run made with another config ({diff}); "
                        "pass the same config, or a new run_dir=...")


def write_metrics(run_dir: Path) -> list[dict]:
    """`metrics.jsonl`: one row per finished eval stage, with what each stage of its iteration counted (`stats.json`),
    its seconds, the fixed part of them (`overhead.py`) and the type it computed in."""
    rows = []
    for t in range(0, 1 + len(list(run_dir.glob("iter_*")))):
        it = run_dir / f"iter_{t}"
        if not is_done(it / "eval"):
            continue
        row = {"iteration": t, **json.loads((it / "eval" / "metrics.json").read_text())["metrics"]}
        for stats in sorted(it.glob("*/stats.json")):  # what each stage counted, under the stage's name
            if is_done(stats.parent):
                row[stats.parent.name] = json.loads(stats.read_text())
        for other in sorted(it.glob("*/metrics.json")):  # another model's evaluation (the teacher's)
            if other.parent.name != "eval" and is_done(other.parent):
                row[other.parent.name] = json.loads(other.read_text())["metrics"]
        row["stage_seconds"] = {p.parent.name: json.loads(p.read_text())["seconds"]
                                for p in sorted(it.glob("*/timing.json"))}
        fixed = {name: fixed_seconds(it / name, s) for name, s in row["stage_seconds"].items()}
        row["fixed_seconds"] = {name: f for name, f in fixed.items() if f is not None}
        row["stage_dtype"] = {p.parent.name: json.loads(p.read_text())["value"] for p in sorted(it.glob(f"*/{DTYPE_FILE}"))}
        rows.append(row)
    write_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return rows


@dataclasses.dataclass
class Redo:
    """Which finished stages run again: those of the named `kinds`, and any that reads a stage run in this process."""

    kinds: frozenset[str] = frozenset()
    ran: set[Path] = dataclasses.field(default_factory=set)

    def wanted(self, folder: Path, inputs: dict) -> bool:
        return folder.name in self.kinds or any(isinstance(v, Path) and v.resolve() in self.ran for v in inputs.values())


def _stage(folder: Path, fn, *args, progress: RunProgress | None = None, dtype: Choice | None = None,
           inputs: dict | None = None, redo: Redo | None = None) -> bool:
    """Run `fn(*args, scratch)` unless `folder` is finished; time it and mark it finished. Whether it ran.

    `_SUCCESS` records a digest of each of `inputs` (what the stage reads) and when it started. A finished
    stage is skipped if its inputs are what it recorded, run again if `redo` wants it, and refused otherwise:
    a rerun never mixes outputs made from old inputs with new ones.
    `timing.json` keeps the start time too, so a run's wall time can be set against its stage times;
    a stage that computes with a model keeps the type it computed in (`dtype`) in `dtype.json`.
    """
    inputs = {k: v for k, v in (inputs or {}).items() if v is not None}
    digests = {name: digest(value) for name, value in inputs.items()}
    redo = redo or Redo()
    if progress and is_damaged(folder):
        progress.damaged(folder)
    if is_done(folder) and not redo.wanted(folder, inputs):
        recorded = success_record(folder).get("inputs", digests)  # records made before they held inputs: trusted
        changed = [name for name in digests if recorded.get(name) != digests[name]]
        if changed:
            raise UserError(f"{folder} was made from other inputs than now ({', '.join(changed)} changed); rerun "
                            f"with --redo {folder.name} to redo it and the stages after it, or pass a new run_dir=...")
        if progress:
            progress.skipped(folder)
        return False
    if progress:
        progress.starting(folder, dtype.value if dtype else None)
    started, start = time.time(), time.perf_counter()
    try:
        with stage_output(folder, {"inputs": digests, "started": started}) as scratch:
            if dtype:
                (scratch / DTYPE_FILE).write_text(json.dumps(dataclasses.asdict(dtype)))
            fn(*args, scratch)
            seconds = round(time.perf_counter() - start, 2)
            (scratch / "timing.json").write_text(json.dumps({"seconds": seconds, "started": round(started, 2)}))
    except OSError as e:
        raise UserError(f"cannot write stage {folder}: {e.strerror}; rerun to redo only this stage") from None
    redo.ran.add(folder.resolve())
    if progress:
        progress.finished(folder, seconds)
    return True


def _first_difference(a, b, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {a!r} then, {b!r} now"

"""The iteration loop: rollout -> (process ->) pairs -> train -> evaluate -> promote, T times.

1. Iteration 0 only evaluates the starting model. Iteration t >= 1 samples from model t-1,
   which is also its DPO reference, as Iterative RPO does; its trained model is model t.
2. Every stage writes `run_dir/iter_<t>/<stage>/` through `io.stage_output`, so a folder is
   complete (with `_SUCCESS`) or absent. The driver skips a finished stage: a killed run
   resumes where it stopped and never redoes a finished rollout.
3. The run's resolved config is saved as `run_dir/config.yaml`; rerunning into the same
   folder with a different config is refused, since finished stages would not match it, except
   for `iterations`: a finished run given more iterations goes on from where it ended. A run holds a
   lock on its run dir while it lives, so a second run in the same folder is refused; a folder that is
   neither empty nor a run is never written into.
4. With `process.scorer=trained`, iterations up to `process.prm_mc_iterations` score steps by
   Monte Carlo; the last of them then trains a PRM on all their step values (stage `prm`), and
   every later iteration's process stage scores with that PRM.
5. `metrics.jsonl` is rewritten from the finished eval stages after each iteration: it is
   derived data, never the only copy of a figure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import socket
import time
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from selfimprove.config import Config, load_config, to_dict
from selfimprove.errors import UserError
from selfimprove.io import MARKER, digest, is_done, is_ours, read_table, stage_output, success_record, write_atomic
from selfimprove.precision import Choice, announce, resolve
from selfimprove.progress import ITERATION_STAGES, RunProgress
from selfimprove.runtime import check_resources

DTYPE_FILE = "dtype.json"
# Held (flock) by the process running in a run dir; it names that process.
LOCK = ".lock"


def run(cfg: Config, redo: tuple[str, ...] = ()) -> list[dict]:
    """Run (or resume) `cfg.iterations` iterations into `cfg.run_dir`; return the metrics rows.

    `redo` names stage kinds (e.g. "train") to run again although finished; the stages that read them follow.
    """
    from selfimprove.models import resolve_model
    from selfimprove.tasks import build_task

    run_dir = Path(cfg.run_dir)
    # Everything a user can get wrong fails here, before the run dir is claimed or Ray starts.
    task = build_task(cfg.task)
    train_problems, test_problems = task.load("train"), task.load(cfg.eval.split)
    policy = resolve_model(cfg.model)
    backbone = None
    if cfg.process.scorer == "trained":
        from selfimprove.reward.trained_prm import check_tokenizer

        backbone = resolve_model(cfg.process.prm_backbone) if cfg.process.prm_backbone else policy
        if backbone != policy:
            check_tokenizer(backbone, policy, "(process.prm_backbone) has")
    if cfg.train.lora:
        from selfimprove.train.trainer import check_lora_targets

        check_lora_targets(policy, cfg.train.lora_targets)
    # The saved config keeps `auto`, so a run resumed on another kind of machine computes in that machine's type.
    saved, (cfg, (generate, train)) = cfg, resolve(cfg)
    check_resources(cfg)

    with claim_run_dir(run_dir, saved):
        announce((generate, train))
        from selfimprove.runtime import init_ray

        init_ray()
        progress = RunProgress(run_dir, cfg.iterations, lambda t: iteration_stages(cfg, t))
        stage = functools.partial(_stage, progress=progress, redo=Redo(frozenset(redo)))
        # What each stage reads, for its `_SUCCESS` record: the model it samples from or trains (the starting
        # model's folder, or the train stage that made it), the problems, the stages whose files it reads.
        made_by: Path | str = Path(policy) if Path(policy).is_dir() else policy
        stage(run_dir / "iter_0" / "eval", _evaluate, cfg, policy, task, test_problems, dtype=generate,
              inputs={"model": made_by, "problems": test_problems})
        for t in range(1, cfg.iterations + 1):
            it = run_dir / f"iter_{t}"
            stages = iteration_stages(cfg, t)
            temperature = cfg.rollout.temperature_schedule[t - 1] if cfg.rollout.temperature_schedule else cfg.rollout.temperature
            stage(it / "rollout", _rollout, cfg, policy, task, train_problems, temperature, dtype=generate,
                  inputs={"model": made_by, "problems": train_problems, "temperature": temperature})
            if "process" in stages:
                prm = prm_model(run_dir, cfg, t)
                stage(it / "process", _process, cfg, policy, task, it / "rollout", prm,
                      dtype=generate if prm is None else None,
                      inputs={"model": made_by, "rollout": it / "rollout", "prm": prm and prm.parent})
            if "prm" in stages:
                scored = [run_dir / f"iter_{s}" for s in range(1, t + 1)]
                stage(it / "prm", _train_prm, cfg, backbone, scored, dtype=train,
                      inputs={"backbone": Path(backbone) if Path(backbone).is_dir() else backbone,
                              **{f"process_{s}": i / "process" for s, i in enumerate(scored, 1)}})
            previous = run_dir / f"iter_{t - 1}" / "pairs" if cfg.pairs.accumulate and t > 1 else None
            stage(it / "pairs", _pairs, cfg, train_problems, it, previous,
                  inputs={"rollout": it / "rollout", "process": it / "process" if "process" in stages else None,
                          "previous": previous, "problems": train_problems})
            stage(it / "train", _train, cfg, policy, it / "pairs", dtype=train,
                  inputs={"model": made_by, "pairs": it / "pairs"})
            policy, made_by = str((it / "train" / "model").resolve()), it / "train"
            stage(it / "eval", _evaluate, cfg, policy, task, test_problems, dtype=generate,
                  inputs={"model": made_by, "problems": test_problems})
            write_metrics(run_dir)
        return write_metrics(run_dir)


def iteration_stages(cfg: Config, t: int) -> tuple[str, ...]:
    """The stages of iteration t >= 1, in order: a process stage for process pairs, and with a trained
    PRM, a prm stage after the last Monte Carlo iteration (`process.prm_mc_iterations`)."""
    if cfg.pairs.source != "process":
        return ITERATION_STAGES
    prm = ("prm",) if cfg.process.scorer == "trained" and t == cfg.process.prm_mc_iterations else ()
    return ("rollout", "process", *prm, "pairs", "train", "eval")


def prm_model(run_dir: Path, cfg: Config, t: int) -> Path | None:
    """The trained PRM iteration t's process stage scores with, or None when it runs Monte Carlo."""
    if cfg.process.scorer != "trained" or t <= cfg.process.prm_mc_iterations:
        return None
    return (run_dir / f"iter_{cfg.process.prm_mc_iterations}" / "prm" / "model").resolve()


def claim_run_dir(run_dir: Path, cfg: Config) -> IO[str]:
    """Lock `run_dir` for this process, then save the resolved config in a new run dir or check an existing
    run dir was made with it. Returns the open lock file: the run dir is this run's until it is closed.

    A folder that is neither empty nor a run is refused with nothing written into it. A claim that fails (a full
    disk, a read-only one) takes back what it made: the folders, marker and lock file it created.
    """
    made: list[Path] = []  # created by this claim, in order
    try:
        if os.path.lexists(run_dir) and not run_dir.is_dir():
            raise UserError(f"cannot write the run dir {run_dir}: it is a file, not a folder")
        if run_dir.is_dir() and any(run_dir.iterdir()) and not _is_run(run_dir):
            raise UserError(f"{run_dir} is not empty and holds no selfimprove run; pass a new or empty run_dir=...")
        made += reversed([p for p in (run_dir, *run_dir.parents) if not os.path.lexists(p)])
        run_dir.mkdir(parents=True, exist_ok=True)
        made += [p for p in (run_dir / MARKER, run_dir / LOCK) if not os.path.lexists(p)]
        (run_dir / MARKER).touch()
        lock = _lock(run_dir)
        try:
            _check_or_save_config(run_dir, cfg)
        except BaseException:
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
    """Take `run_dir/.lock` and write this process's pid and host in it, or refuse naming the process holding it.

    The OS releases a flock when its holder ends, however it ends, so a killed run leaves no stale lock.
    O_NOFOLLOW: a symlink planted at that name must not make us open, and overwrite, another file.
    """
    lock = os.fdopen(os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock.read().strip() or "one that has not written its pid yet"
        lock.close()
        raise UserError(f"{run_dir} is in use by another selfimprove run ({holder}); wait for it to end, "
                        "or pass another run_dir=...") from None
    try:
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
    except OSError:  # a full disk: close (which tries the write again) without hiding the first error
        with contextlib.suppress(OSError):
            lock.close()
        raise
    return lock


def _check_or_save_config(run_dir: Path, cfg: Config) -> None:
    """Save the resolved config in a new run dir, or check an existing run dir was made with it."""
    saved = run_dir / "config.yaml"
    mine = to_dict(cfg)
    if not saved.is_file():
        write_atomic(saved, yaml.safe_dump(mine, sort_keys=False))
        return
    # Read back as a config, so keys added since the run was made compare at their defaults.
    theirs = to_dict(load_config(saved))
    if theirs == mine:
        return
    # More (or fewer) iterations of the same run: it goes on from where it is.
    theirs["iterations"] = cfg.iterations
    if theirs == mine:
        write_atomic(saved, yaml.safe_dump(mine, sort_keys=False))
    else:
        diff = _first_difference(theirs, mine)
        raise UserError(f"{run_dir} holds a run made with another config ({diff}); "
                        "pass the same config, or a new run_dir=...")


def write_metrics(run_dir: Path) -> list[dict]:
    """`metrics.jsonl`: one row per finished eval stage, with that iteration's step-scoring, pair and stage figures."""
    rows = []
    for t in range(0, 1 + len(list(run_dir.glob("iter_*")))):
        it = run_dir / f"iter_{t}"
        if not is_done(it / "eval"):
            continue
        row = {"iteration": t, **json.loads((it / "eval" / "metrics.json").read_text())["metrics"]}
        for stage in ("process", "pairs"):
            if is_done(it / stage):
                row[stage] = json.loads((it / stage / "stats.json").read_text())
        row["stage_seconds"] = {p.parent.name: json.loads(p.read_text())["seconds"]
                                for p in sorted(it.glob("*/timing.json"))}
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
           inputs: dict | None = None, redo: Redo | None = None) -> None:
    """Run `fn(*args, scratch)` unless `folder` is finished; time it and mark it finished.

    `_SUCCESS` records a digest of each of `inputs` (what the stage reads) and when it started. A finished
    stage is skipped if its inputs are what it recorded, run again if `redo` wants it, and refused otherwise:
    a rerun never mixes outputs made from old inputs with new ones.
    `timing.json` keeps the start time too, so a run's wall time can be set against its stage times;
    a stage that computes with a model keeps the type it computed in (`dtype`) in `dtype.json`.
    """
    inputs = {k: v for k, v in (inputs or {}).items() if v is not None}
    digests = {name: digest(value) for name, value in inputs.items()}
    redo = redo or Redo()
    if is_done(folder) and not redo.wanted(folder, inputs):
        recorded = success_record(folder).get("inputs", digests)  # markers made before records: trusted
        changed = [name for name in digests if recorded.get(name) != digests[name]]
        if changed:
            raise UserError(f"{folder} was made from other inputs than now ({', '.join(changed)} changed); rerun "
                            f"with --redo {folder.name} to redo it and the stages after it, or pass a new run_dir=...")
        if progress:
            progress.skipped(folder)
        return
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


def _rollout(cfg: Config, policy: str, task, problems: list[dict], temperature: float, out: Path) -> None:
    from selfimprove.rollout.stage import request_rows, rollout

    rows = request_rows(task, problems, {"train": (cfg.rollout.n, temperature)}, cfg.rollout.seed)
    rollout(policy, cfg.rollout, task, rows, out / "samples")


def _process(cfg: Config, policy: str, task, rollout_dir: Path, prm: Path | None, out: Path) -> None:
    """Step values of the iteration's samples: Monte Carlo, rolled out by the policy that wrote them,
    or, given a trained `prm`, its predictions."""
    samples = read_table(rollout_dir / "samples").to_pylist()
    if prm is None:
        from selfimprove.reward.mc_prm import run_mc_prm

        run_mc_prm(policy, cfg.rollout, cfg.process, task, samples, out)
    else:
        from selfimprove.reward.trained_prm import run_trained_prm

        run_trained_prm(prm, policy, cfg.process, samples, out)


def _train_prm(cfg: Config, backbone: str, iterations: list[Path], out: Path) -> None:
    """A PRM trained on the step values of the Monte Carlo `iterations`: the folder `out/model`."""
    from selfimprove.reward.trained_prm import train_prm

    train_prm(cfg, backbone, iterations, out / "model", checkpoints=_checkpoints(out))


def _pairs(cfg: Config, problems: list[dict], it: Path, previous: Path | None, out: Path) -> None:
    """Training rows from the iteration's samples: `pairs.parquet` (outcome or process pairs) for
    preference losses, `sft.parquet` of correct samples for `train.loss=sft` (STaR); with
    `previous`, the earlier iterations' rows too.
    """
    from selfimprove.pairs import accumulate_pairs, outcome_pairs, process_pairs, sample_scores, winner_rows
    from selfimprove.train.loss_names import needs_rejected

    samples = read_table(it / "rollout" / "samples").to_pylist()
    gold = {p["id"]: p["solution"] for p in problems} if cfg.pairs.include_gold else None
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


def _train(cfg: Config, policy: str, pairs_dir: Path, out: Path) -> None:
    from selfimprove.train.trainer import train

    # `out` is the stage's scratch folder: the trainer writes its model folder inside it.
    train(dataclasses.replace(cfg, model=policy), pairs_dir, out / "model", checkpoints=_checkpoints(out))


def _checkpoints(scratch: Path) -> Path:
    """Where a training stage keeps its checkpoints: beside its scratch folder, which a rerun clears, so that
    the rerun resumes from them (`iter_<t>/train.ray`)."""
    return scratch.with_name(scratch.name.removesuffix(".partial") + ".ray")


def _evaluate(cfg: Config, policy: str, task, problems: list[dict], out: Path) -> None:
    from selfimprove.evaluate import run_eval

    run_eval(cfg, policy, task, problems, out)


def _first_difference(a, b, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {a!r} then, {b!r} now"

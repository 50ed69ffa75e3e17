"""SIGKILL the driver during each kind of stage, rerun, and compare with a run nobody interrupted.

A tiny SIPF-shaped run (process pairs scored by Monte Carlo), so that every stage kind has a stage:
rollout, process, pairs, train, eval. Each chain of runs is killed (the whole process group) inside
one stage per run, each time a stage later than the last; then rerun to the end. Afterwards:
- no file of a stage that had finished when a kill came was touched (same files, same mtimes);
- the run has the same finished stages, sample keys and counts as the uninterrupted run;
- where only non-generation stages (pairs, train) were killed, the same pairs, training steps and model as
  those stages give, unkilled, from the same samples (the chain's own, redone with `--redo pairs`): two runs'
  samples can differ, since vLLM's engine process batches requests as they reach it.
"""

import hashlib
import json
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from processes import MIXED_OUTCOMES, TINY_RUN, checkpoint_registered, kill_when, start

from selfimprove.io import read_table

pytestmark = [pytest.mark.engine, pytest.mark.faults]

# Process pairs scored by Monte Carlo; a checkpoint after every training step, so that a kill can come after one.
# The tiny run's few pairs fill one step of train.batch_size=2 per epoch: epochs give training its 3 steps.
# Not drawn ahead: iteration 1's rollout samples with engines of its own, so that a kill can come mid-way in it.
SIPF = ("rollout.draw_ahead=false", "pairs.source=process", "process.k=2", "process.max_steps=3",
        "process.max_tokens=48", "process.eta=0.0", "train.checkpoint_every=1", "train.epochs=3", "train.max_steps=3",
        *MIXED_OUTCOMES)
STAGES = ["iter_0/eval", "iter_1/rollout", "iter_1/process", "iter_1/pairs", "iter_1/train", "iter_1/eval"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, bundled_model):
    """The run dir of the tiny run, run once without a fault."""
    import yaml

    tmp = tmp_path_factory.mktemp("uninterrupted")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_RUN))
    run_dir, log = tmp / "run", tmp / "run.log"
    proc = start(config, run_dir, log, *SIPF)
    assert proc.wait(timeout=1800) == 0, log.read_text()[-3000:]
    return run_dir


def finished_files(run_dir: Path) -> dict[Path, int]:
    """mtime of every file in the run's finished stages."""
    return {p: p.stat().st_mtime_ns for stage in run_dir.glob("iter_*/*") if (stage / "_SUCCESS").is_file()
            for p in stage.rglob("*") if p.is_file()}


def partial_output(run_dir: Path, stage: str, log: Path):
    """True once the stage's scratch folder holds a parquet file: it is mid-way, with output to lose."""
    return lambda: any((run_dir / f"{stage}.partial").rglob("*.parquet"))


# Where nothing a stage writes part-way shows it running (the pairs stage takes 0.1 s; the process stage writes its
# output only at its end), the run holds at a known point in it and waits for the kill (tests/hold_stage).
HOLD = Path(__file__).parent / "hold_stage"


def holding(stage: str, held: Path) -> dict:
    """Environment of a run that, reaching its point in `stage`, writes the file `held` and waits there."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(HOLD), os.environ.get("PYTHONPATH")])),
            "HOLD_AT": stage.split("/")[-1], "HELD": str(held)}


def held(run_dir: Path, stage: str, log: Path):
    return log.with_suffix(".held").exists


def checkpointed(run_dir: Path, stage: str, log: Path):
    return lambda: checkpoint_registered(run_dir / "iter_1" / "train.ray")


def run_with_kills(tmp_path, tiny_config, kills) -> Path:
    """Run the tiny run, SIGKILLed at each of `kills` ((stage, when)) and rerun each time, then rerun to the end.
    Checks at each kill that its stage was unfinished and, at the end, that no stage finished by then was touched."""
    run_dir, untouched = tmp_path / "run", {}
    for i, (stage, when) in enumerate(kills):
        log = tmp_path / f"run{i}.log"
        env = holding(stage, log.with_suffix(".held")) if when is held else None
        kill_when(start(tiny_config, run_dir, log, *SIPF, env=env), log, when(run_dir, stage, log), f"{stage} mid-way")
        assert not (run_dir / stage / "_SUCCESS").exists(), f"the kill came after {stage} had finished"
        untouched |= finished_files(run_dir)
    log = tmp_path / "last.log"
    assert start(tiny_config, run_dir, log, *SIPF).wait(timeout=1800) == 0, log.read_text()[-3000:]
    assert {p: p.stat().st_mtime_ns for p in untouched if p.exists()} == untouched
    return run_dir


def done_stages(run_dir: Path) -> list[str]:
    return sorted(str(p.parent.relative_to(run_dir)) for p in run_dir.glob("iter_*/*/_SUCCESS"))


def sample_keys(folder: Path) -> list[tuple]:
    t = read_table(folder)
    return sorted(zip(t["pass"].to_pylist(), t["problem_id"].to_pylist(), t["sample_index"].to_pylist()))


def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the figures that depend on the clock."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("stage_seconds", "fixed_seconds")} for r in rows]


def assert_same_shape(run_dir: Path, reference: Path) -> None:
    assert done_stages(run_dir) == done_stages(reference) == sorted(STAGES)
    for stage in ("iter_0/eval/samples", "iter_1/rollout/samples", "iter_1/eval/samples"):
        assert sample_keys(run_dir / stage) == sample_keys(reference / stage), stage
    steps, ref_steps = (pq.read_table(r / "iter_1/process/steps.parquet") for r in (run_dir, reference))
    assert set(zip(steps["problem_id"].to_pylist(), steps["sample_index"].to_pylist())) == set(
        zip(ref_steps["problem_id"].to_pylist(), ref_steps["sample_index"].to_pylist()))
    assert [(r["iteration"], r["problems"]) for r in metrics(run_dir)] == [(0, 6), (1, 6)]
    assert [(r["iteration"], r["problems"]) for r in metrics(reference)] == [(0, 6), (1, 6)]


def test_kills_in_generation_stages(tmp_path, tiny_config, uninterrupted):
    """Killed mid-rollout and mid-eval (each with partial output written) and mid-process (its engines have answered
    a round): the same stages and rows."""
    run_dir = run_with_kills(tmp_path, tiny_config, [
        ("iter_1/rollout", partial_output), ("iter_1/process", held), ("iter_1/eval", partial_output)])
    assert_same_shape(run_dir, uninterrupted)


def test_kills_in_pairs_and_train(tmp_path, tiny_config, uninterrupted):
    """Killed in the pairs stage, then in training after its first checkpoint: the rerun resumes from that
    checkpoint, and ends with the pairs, training steps and model that the same stages make without a kill."""
    run_dir = run_with_kills(tmp_path, tiny_config, [("iter_1/pairs", held), ("iter_1/train", checkpointed)])
    assert re.search(r"resuming from the checkpoint of step [12]\b", (tmp_path / "last.log").read_text())
    assert_same_shape(run_dir, uninterrupted)
    killed = trained(run_dir)
    log = tmp_path / "redo.log"
    assert start(tiny_config, run_dir, log, *SIPF, "--redo", "pairs").wait(timeout=1800) == 0, log.read_text()[-3000:]
    assert "resuming" not in log.read_text()
    assert trained(run_dir) == killed


def trained(run_dir: Path) -> tuple:
    """Iteration 1's pairs, its training steps (without their speed) and the bytes of the model it trained."""
    model = run_dir / "iter_1" / "train" / "model"
    steps = json.loads((model / "train_metrics.json").read_text())["steps"]
    return (pq.read_table(run_dir / "iter_1" / "pairs" / "pairs.parquet").to_pylist(),
            [{k: v for k, v in s.items() if k != "tokens_per_s"} for s in steps],
            hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest())

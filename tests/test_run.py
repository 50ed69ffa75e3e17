"""`selfimprove run` for real on a tiny config: every stage, then SIGTERM during training and a resume.

The run checkpoints every step and gets SIGTERM (as from a scheduler or `kill`) once its training stage
has persisted a checkpoint: it stops cleanly (exit 130, no process of its own left, lock free). The
rerun must finish the run without redoing the iteration's rollout (same files, same mtimes) or the
training steps before the checkpoint (it resumes from it and computes no reference pass again), and
write the metrics and the report. SIGKILL at every kind of stage: test_kill_driver.py (make test-faults).
"""

import fcntl
import json
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml
from processes import POOL_ACTOR, alive, checkpoint_registered, named, start
from test_tracking import scalars


@pytest.mark.engine
def test_sigterm_during_training_then_resume(tmp_path, tiny_config, bundled_model):
    config, run_dir = tiny_config, tmp_path / "run"
    every_step = ("train.checkpoint_every=1", "train.max_steps=4")
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start(config, run_dir, first_log, *every_step)
    interrupt_when(first, first_log, run_dir, lambda: checkpoint_registered(run_dir / "iter_1" / "train.ray"))
    assert "reference log-probs of" in first_log.read_text()
    rollout_files = sorted((run_dir / "iter_1" / "rollout").rglob("*"))
    mtimes = [p.stat().st_mtime_ns for p in rollout_files]
    assert (run_dir / "iter_1" / "rollout" / "_SUCCESS") in rollout_files
    assert not (run_dir / "iter_1" / "train" / "_SUCCESS").exists()

    second = start(config, run_dir, second_log, *every_step)
    second.wait(timeout=1200)
    out = second_log.read_text()
    assert second.returncode == 0, out[-3000:]
    assert re.search(r"resuming from the checkpoint of step [1-3]\b", out) and "reference log-probs of" not in out
    assert not (run_dir / "iter_1" / "train.ray").exists()  # checkpoints cleared once the model is saved
    assert sorted((run_dir / "iter_1" / "rollout").rglob("*")) == rollout_files
    assert [p.stat().st_mtime_ns for p in rollout_files] == mtimes
    for stage in ("iter_0/eval", "iter_1/rollout", "iter_1/pairs", "iter_1/train", "iter_1/eval"):
        assert (run_dir / stage / "_SUCCESS").is_file(), stage
    assert (run_dir / "iter_1" / "train" / "model" / "config.json").is_file()
    # Iteration 0's eval engines drew iteration 1's training samples too: its rollout started no engine.
    assert json.loads((run_dir / "iter_1" / "rollout" / "stats.json").read_text()) == {"drawn_by": "iter_0/eval"}
    assert not (run_dir / "iter_1" / "rollout" / "engines").exists() and (run_dir / "iter_0" / "eval" / "ahead.json").is_file()
    assert list((run_dir / "iter_0" / "eval" / "engines").glob("*.json"))
    # The steps before the checkpoint are in the model's step log too: the checkpoint carried them.
    steps = json.loads((run_dir / "iter_1" / "train" / "model" / "train_metrics.json").read_text())["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(r["problems"] == 6 and 0 <= r["pass@1"] <= 1 for r in rows)
    assert rows[1]["pairs"]["pairs"] >= 2
    assert (run_dir / "report.md").is_file() and (run_dir / "accuracy.png").is_file()
    assert "pass@1" in out and "maj@2" in out and "metrics.jsonl" in out
    # TensorBoard has each finished stage once, whichever of the two processes finished it.
    events = scalars(run_dir / "tensorboard")
    assert [step for step, _ in events["train/loss"]] == [1, 2, 3, 4]
    assert [step for step, _ in events["seconds/eval"]] == [0, 1] and [s for s, _ in events["eval/pass@1"]] == [0, 1]
    assert [step for step, _ in events["seconds/rollout"]] == [1] and [s for s, _ in events["seconds/train"]] == [1]


@pytest.mark.engine
@pytest.mark.faults
def test_sigterm_while_an_engine_runs(tmp_path, tiny_config, bundled_model):
    """SIGTERM once the first stage's vLLM engine runs: stopped as during training, the engine processes too."""
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    proc = start(tiny_config, run_dir, log)
    interrupt_when(proc, log, run_dir, lambda: named(POOL_ACTOR, proc.pid), POOL_ACTOR)
    assert not (run_dir / "iter_0" / "eval" / "_SUCCESS").exists()


def interrupt_when(proc, log, run_dir, ready, stopping: str = "ray::RayTrainWorker") -> None:
    """SIGTERM `selfimprove run` once `ready()`: the command says it was interrupted and exits 130, the run dir's
    lock is free, and none of the processes it started (Ray's, and `stopping`, which must be among them) is left
    a minute later."""
    deadline = time.time() + 900
    while not ready():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "the run never got there"
        time.sleep(0.5)
    family = psutil.Process(proc.pid).children(recursive=True)
    assert named(stopping, proc.pid), f"no {stopping} process to stop"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    assert "selfimprove: interrupted; rerun the same command to resume" in log.read_text()
    _, left = psutil.wait_procs(family, timeout=60)
    assert not left, [(p.pid, " ".join(p.cmdline())[:80]) for p in alive(left)]
    with open(run_dir / ".lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if a process still held it


def test_rerun_with_another_config_is_refused(tmp_path, tiny_config):
    config, run_dir = tiny_config, tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": "something-else"}))
    done = subprocess.run([sys.executable, "-m", "selfimprove", "run", str(config), f"run_dir={run_dir}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "holds a run made with another config" in done.stderr and "Traceback" not in done.stderr

"""`selfimprove run` for real on a tiny config: every stage, then a kill during training and a resume.

The run is killed as soon as its training stage has started; the rerun must finish the run
without redoing the iteration's rollout (same files, same mtimes) and write the metrics and
the report.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml


def start(config, run_dir):
    return subprocess.Popen([sys.executable, "-m", "selfimprove", "run", str(config), f"run_dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.engine
def test_kill_during_training_then_resume(tmp_path, tiny_config, bundled_model):
    config, run_dir = tiny_config, tmp_path / "run"
    first = start(config, run_dir)
    deadline = time.time() + 900
    while not (run_dir / "iter_1" / "train.partial").exists():
        assert first.poll() is None, first.stdout.read()[-3000:]
        assert time.time() < deadline, "training never started"
        time.sleep(1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    rollout_files = sorted((run_dir / "iter_1" / "rollout").rglob("*"))
    mtimes = [p.stat().st_mtime_ns for p in rollout_files]
    assert (run_dir / "iter_1" / "rollout" / "_SUCCESS") in rollout_files
    assert not (run_dir / "iter_1" / "train" / "_SUCCESS").exists()

    second = start(config, run_dir)
    out, _ = second.communicate(timeout=1200)
    assert second.returncode == 0, out[-3000:]
    assert sorted((run_dir / "iter_1" / "rollout").rglob("*")) == rollout_files
    assert [p.stat().st_mtime_ns for p in rollout_files] == mtimes
    for stage in ("iter_0/eval", "iter_1/rollout", "iter_1/pairs", "iter_1/train", "iter_1/eval"):
        assert (run_dir / stage / "_SUCCESS").is_file(), stage
    assert (run_dir / "iter_1" / "train" / "model" / "config.json").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(r["problems"] == 6 and 0 <= r["pass@1"] <= 1 for r in rows)
    assert rows[1]["pairs"]["pairs"] >= 2
    assert (run_dir / "report.md").is_file() and (run_dir / "accuracy.png").is_file()
    assert "pass@1" in out and "maj@2" in out and "metrics.jsonl" in out


def test_rerun_with_another_config_is_refused(tmp_path, tiny_config):
    config, run_dir = tiny_config, tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": "something-else"}))
    done = subprocess.run([sys.executable, "-m", "selfimprove", "run", str(config), f"run_dir={run_dir}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "holds a run made with another config" in done.stderr and "Traceback" not in done.stderr

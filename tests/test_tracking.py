"""Experiment tracking: the scalars a run's finished stages give, read back with TensorBoard's own reader, and the
refusals before a run starts."""

import importlib.util
import json
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, run

from selfimprove.config import TrackingConfig
from selfimprove.errors import UserError
from selfimprove.io import SUCCESS
from selfimprove.recipes import load_config
from selfimprove.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Tag -> [(step, value)] of every event file in `folder`, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, round(e.value, 6)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def stage(run_dir, t: int, kind: str, seconds: float, steps: list[float] | None = None, metrics: dict | None = None):
    """A finished stage folder with the files a real one has: timing, a trained model's step log, eval metrics."""
    folder = run_dir / f"iter_{t}" / kind
    folder.mkdir(parents=True)
    (folder / "timing.json").write_text(json.dumps({"seconds": seconds, "started": 0}))
    if steps is not None:
        (folder / "model").mkdir()
        rows = [{"step": i + 1, "loss": loss, "lr": 1e-5, "rewards/margins": 0.5 * i, "rewards/accuracies": 1.0,
                 "tokens_per_s": 100.0, "epoch": 0} for i, loss in enumerate(steps)]
        (folder / "model" / "train_metrics.json").write_text(
            json.dumps({"summary": {"steps": len(steps), "train_seconds": seconds - 4.0}, "steps": rows}))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps({"metrics": metrics, "problems": []}))
    (folder / SUCCESS).write_text("{}")
    return folder


def test_stages_become_scalars_steps_numbered_on_across_iterations(tmp_path):
    tracker = Tracker(tmp_path, TrackingConfig())
    tracker.stage_done(stage(tmp_path, 0, "eval", 12.5, metrics={"model": "m", "pass@1": 0.25, "maj@4": 0.5,
                                                                  "extra": {"numbers": {"pass@1": 0.125}}}))
    tracker.stage_done(stage(tmp_path, 1, "train", 30.0, steps=[1.0, 0.75, 0.5]))
    tracker.stage_done(stage(tmp_path, 1, "eval", 11.0, metrics={"pass@1": 0.5, "maj@4": 0.75, "sandbox": "bwrap",
                                                                  "flagged_pass_share": 0.25, "judged_by_value": 0.0}))
    tracker.stage_done(stage(tmp_path, 2, "train", 20.0, steps=[0.5, 0.25]))
    rollout = stage(tmp_path, 2, "rollout", 9.0)
    (rollout / "stats.json").write_text(json.dumps({"drawn_by": "iter_1/eval", "passed": 8, "flagged_pass_share": 0.125,
                                                    "judged": {"value": 16, "in_process": 0}}))
    tracker.stage_done(rollout)
    tracker.close()
    got = scalars(tmp_path / "tensorboard")
    assert (got["rollout/flagged_pass_share"], got["rollout/passed"]) == ([(2, 0.125)], [(2, 8.0)])  # its stats.json
    assert "rollout/drawn_by" not in got and "rollout/judged" not in got
    assert got["train/loss"] == [(1, 1.0), (2, 0.75), (3, 0.5), (4, 0.5), (5, 0.25)]
    assert got["train/rewards/margins"] == [(1, 0.0), (2, 0.5), (3, 1.0), (4, 0.0), (5, 0.5)]
    assert [step for step, _ in got["train/lr"]] == [1, 2, 3, 4, 5] and len(got["train/tokens_per_s"]) == 5
    assert got["seconds/train"] == [(1, 30.0), (2, 20.0)] and got["seconds/eval"] == [(0, 12.5), (1, 11.0)]
    assert got["fixed_seconds/train"] == [(1, 4.0), (2, 4.0)] and "fixed_seconds/eval" not in got  # no engine record
    assert got["eval/pass@1"] == [(0, 0.25), (1, 0.5)] and got["eval/maj@4"] == [(0, 0.5), (1, 0.75)]
    assert got["eval/numbers/pass@1"] == [(0, 0.125)]
    assert (got["eval/flagged_pass_share"], got["eval/judged_by_value"]) == ([(1, 0.25)], [(1, 0.0)])  # a code eval
    assert "eval/sandbox" not in got and "eval/model" not in got and "train/epoch" not in got


def test_mlflow_gets_the_same_metrics_in_one_run_across_a_resume(tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "myrun"
    first = Tracker(run_dir, TrackingConfig(mlflow=True))
    first.stage_done(stage(run_dir, 0, "eval", 5.0, metrics={"pass@1": 0.25}))
    first.close()  # killed after iteration 0's eval; resumed:
    again = Tracker(run_dir, TrackingConfig(mlflow=True))
    again.stage_done(stage(run_dir, 1, "train", 9.0, steps=[1.0, 0.5]))
    again.stage_done(stage(run_dir, 1, "eval", 5.0, metrics={"pass@1": 0.5}))
    again.close()
    client = MlflowClient((run_dir / "mlruns").as_uri())
    (only,) = client.search_runs([client.get_experiment_by_name("selfimprove").experiment_id])
    assert only.info.run_name == "myrun"
    history = {key: [(m.step, m.value) for m in client.get_metric_history(only.info.run_id, key)]
               for key in ("eval/pass_at_1", "train/loss", "seconds/train")}
    assert history == {"eval/pass_at_1": [(0, 0.25), (1, 0.5)], "train/loss": [(1, 1.0), (2, 0.5)],
                       "seconds/train": [(1, 9.0)]}


def test_a_folder_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "blocker").write_text("a file where the folder would go")
    with pytest.raises(UserError, match=r"tracking.folder=blocker/tb: cannot write .*blocker/tb"):
        Tracker(tmp_path, TrackingConfig(folder="blocker/tb"))


def test_mlflow_without_mlflow_installed_is_refused_at_load(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(UserError, match="tracking.mlflow=true needs MLflow, which is not installed"):
        load_config(None, ["tracking.mlflow=true"])


def test_run_with_an_unwritable_tracking_folder_does_not_start(tmp_path):
    (tmp_path / "blocker").write_text("")
    done = run("run", "configs/local.yaml", f"run_dir={tmp_path / 'r'}", f"tracking.folder={tmp_path / 'blocker' / 'tb'}",
               cwd=REPO)
    assert_one_line_error(done, "cannot write")
    assert not (tmp_path / "r" / "iter_0").exists()

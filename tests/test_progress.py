"""Run progress: the stage plan, the ETA from past stage times, and the lines a run prints."""

import json

from selfimprove.progress import RunProgress, clock, eta_seconds, plan


def test_plan_is_base_eval_then_four_stages_per_iteration():
    assert plan(2) == [(0, "eval"), (1, "rollout"), (1, "pairs"), (1, "train"), (1, "eval"),
                       (2, "rollout"), (2, "pairs"), (2, "train"), (2, "eval")]


def test_eta_sums_the_mean_time_of_each_remaining_kind():
    """rollout mean (300+100)/2 = 200, train 800, eval (90+30)/2 = 60: 200 + 800 + 60 + 60 = 1120."""
    past = {"rollout": [300, 100], "train": [800], "eval": [90, 30]}
    assert eta_seconds(["rollout", "train", "eval", "eval"], past) == 1120


def test_no_eta_until_every_remaining_kind_has_run():
    assert eta_seconds(["rollout", "pairs"], {"rollout": [10.0]}) is None
    assert eta_seconds([], {}) == 0


def test_clock():
    assert [clock(s) for s in (0, 59.6, 61, 3600, 3725)] == ["0:00", "1:00", "1:01", "1:00:00", "1:02:05"]


def test_lines_name_iteration_stage_and_eta_from_finished_stages(tmp_path, capsys):
    for t, kind, seconds in ((0, "eval", 60), (1, "rollout", 300), (1, "pairs", 2), (1, "train", 800), (1, "eval", 40)):
        (tmp_path / f"iter_{t}" / kind).mkdir(parents=True)
        (tmp_path / f"iter_{t}" / kind / "timing.json").write_text(json.dumps({"seconds": seconds}))
    progress = RunProgress(tmp_path, iterations=2)
    progress.skipped(tmp_path / "iter_1" / "train")
    progress.starting(tmp_path / "iter_2" / "rollout")  # left: rollout 300 + pairs 2 + train 800 + eval 50
    progress.finished(tmp_path / "iter_2" / "rollout", 75)
    err = " ".join(capsys.readouterr().err.split())
    assert "iteration 1 train: finished earlier" in err
    assert "iteration 2/2 · rollout" in err and "stage 6 of 9" in err and "ETA 19:12" in err
    assert "done iteration 2 rollout in 1:15" in err


def test_first_iteration_says_there_is_no_estimate_yet(tmp_path, capsys):
    RunProgress(tmp_path, iterations=1).starting(tmp_path / "iter_0" / "eval")
    assert "no ETA until each stage kind has run once" in " ".join(capsys.readouterr().err.split())


def test_plan_of_iterations_that_differ():
    """With a trained PRM after iteration 1's MC labels, only iteration 1 has a prm stage."""
    from selfimprove.config import load_config
    from selfimprove.driver import iteration_stages

    cfg = load_config(None, ["pairs.source=process", "train.loss=orpo", "process.scorer=trained", "iterations=2"])
    assert plan(2, lambda t: iteration_stages(cfg, t)) == [
        (0, "eval"), (1, "rollout"), (1, "process"), (1, "prm"), (1, "pairs"), (1, "train"), (1, "eval"),
        (2, "rollout"), (2, "process"), (2, "pairs"), (2, "train"), (2, "eval")]

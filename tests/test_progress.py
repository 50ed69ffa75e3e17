"""Run progress: the ETA from past stage times, and the lines a run prints for a plan's stages."""

import json

from selfimprove.progress import RunProgress, clock, eta_seconds

# The plan of a two-iteration IRPO run (tests/test_recipes.py builds it from the recipe).
IRPO_2 = [(0, "eval")] + [(t, kind) for t in (1, 2) for kind in ("rollout", "pairs", "train", "eval")]


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
    progress = RunProgress(tmp_path, IRPO_2)
    progress.skipped(tmp_path / "iter_1" / "train")
    progress.starting(tmp_path / "iter_2" / "rollout")  # left: rollout 300 + pairs 2 + train 800 + eval 50
    progress.finished(tmp_path / "iter_2" / "rollout", 75)
    err = " ".join(capsys.readouterr().err.split())
    assert "iteration 1 train: finished earlier" in err
    assert "iteration 2/2 · rollout" in err and "stage 6 of 9" in err and "ETA 19:12" in err
    assert "done iteration 2 rollout in 1:15" in err


def test_first_iteration_says_there_is_no_estimate_yet(tmp_path, capsys):
    RunProgress(tmp_path, IRPO_2[:5]).starting(tmp_path / "iter_0" / "eval")
    assert "no ETA until each stage kind has run once" in " ".join(capsys.readouterr().err.split())

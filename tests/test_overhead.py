"""A stage's fixed cost, read back from the files its engines and trainer leave (overhead.py)."""

import json

from selfimprove.overhead import fixed_seconds, share


def test_train_stage_fixed_cost_is_what_its_steps_did_not_take(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "train_metrics.json").write_text(json.dumps({"summary": {"train_seconds": 90.5}}))
    assert fixed_seconds(tmp_path, 120.0) == 29.5


def test_sampling_stage_counts_each_pool_until_its_last_engine_is_ready(tmp_path):
    for folder, name, began, ready in [("engines", "a", 10.0, 40.0), ("engines", "b", 12.0, 35.5),
                                       ("extra/x/engines", "a", 100.0, 125.25)]:
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / f"{name}.json").write_text(json.dumps({"began": began, "ready": ready}))
    assert fixed_seconds(tmp_path, 300.0) == 55.25  # (40 - 10) + (125.25 - 100)


def test_stage_without_records_has_none(tmp_path):
    (tmp_path / "stats.json").write_text("{}")
    assert fixed_seconds(tmp_path, 1.0) is None
    assert share({"stage_seconds": {"pairs": 1.0}, "fixed_seconds": {}}) is None
    assert share({"stage_seconds": {"rollout": 100.0, "pairs": 1.0, "train": 300.0},
                  "fixed_seconds": {"rollout": 30.0, "train": 70.0}}) == 0.25

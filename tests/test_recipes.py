"""Recipes as declared plans: the stages each recipe plans, the knobs it sets and refuses, and a driver that
runs whatever a plan holds (a stand-in recipe whose stages are named `fake_*`)."""

import dataclasses
import json
from pathlib import Path

import pytest

from selfimprove.errors import UserError
from selfimprove.precision import Choice
from selfimprove.recipes import load_config, name_of, recipe
from selfimprove.recipes.stages import Model, Run, Stage

GENERATE, TRAIN = Choice("rollout.dtype", "float32", "test"), Choice("train.precision", "fp32", "test")


def plan_of(*overrides, run_dir=Path("/r")) -> list[tuple[int, str]]:
    cfg = load_config(None, list(overrides))
    run = Run(cfg, run_dir, object(), [], [], Model("/start", "/start"), GENERATE, TRAIN, backbone="/start")
    return [(s.iteration, s.kind) for s in recipe(name_of(cfg)).plan(run)]


def test_outcome_recipes_plan_the_base_eval_then_four_stages_per_iteration():
    expected = [(0, "eval")] + [(t, kind) for t in (1, 2) for kind in ("rollout", "pairs", "train", "eval")]
    for name in ("irpo", "star", "dpo"):
        assert plan_of(f"recipe={name}", "iterations=2") == expected, name


def test_sipf_with_a_trained_prm_plans_the_prm_stage_after_the_last_monte_carlo_iteration():
    assert plan_of("recipe=sipf", "process.scorer=trained", "iterations=2") == [
        (0, "eval"), (1, "rollout"), (1, "process"), (1, "prm"), (1, "pairs"), (1, "train"), (1, "eval"),
        (2, "rollout"), (2, "process"), (2, "pairs"), (2, "train"), (2, "eval")]


def test_each_iteration_samples_from_the_model_the_last_one_trained():
    cfg = load_config(None, ["recipe=irpo", "iterations=2"])
    run = Run(cfg, Path("/r"), object(), [], [], Model("/start", "/start"), GENERATE, TRAIN)
    reads = {(s.iteration, s.kind): s.reads for s in recipe("irpo").plan(run)}
    assert [reads[(t, kind)]["model"] for t, kind in ((0, "eval"), (1, "rollout"), (1, "train"), (1, "eval"),
                                                       (2, "rollout"), (2, "train"), (2, "eval"))] == [
        "/start", "/start", "/start", Path("/r/iter_1/train"), Path("/r/iter_1/train"), Path("/r/iter_1/train"),
        Path("/r/iter_2/train")]


def test_a_recipe_sets_its_knobs_under_the_ones_the_config_gives():
    cfg = load_config(None, ["recipe=sipf"])
    assert (cfg.pairs.source, cfg.pairs.accumulate, cfg.train.loss) == ("process", True, "orpo")
    assert load_config(None, ["recipe=sipf", "train.loss=dpo"]).train.loss == "dpo"
    assert load_config(None, ["recipe=star"]).train.loss == "sft"


def test_a_config_without_a_recipe_gets_the_one_its_knobs_describe():
    assert [name_of(load_config(None, list(o))) for o in (
        [], ["train.loss=sft"], ["train.loss=ipo"], ["train.loss=orpo"], ["pairs.source=process", "train.loss=orpo"])] == [
        "irpo", "star", "dpo", "irpo", "sipf"]
    assert load_config(None).recipe is None


@pytest.mark.parametrize("overrides, message", [
    (["recipe=star", "train.loss=dpo"], "recipe star fine-tunes on correct samples: it needs train.loss=sft and "
                                        "pairs.source=outcome, got train.loss=dpo and pairs.source=outcome"),
    (["recipe=irpo", "train.loss=sft"], "recipe irpo trains on preference pairs, which train.loss=sft does not read "
                                        "(SFT is recipe star)"),
    (["recipe=sipf", "pairs.source=outcome"], "recipe sipf ranks samples by their steps' values: it needs "
                                              "pairs.source=process"),
    (["recipe=chess"], "'recipe' must be one of irpo, star, dpo, sipf, self_refine, sgft, got 'chess'"),
])
def test_a_recipe_refuses_knobs_it_cannot_run_with(overrides, message):
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    assert str(e.value) == f"defaults: {message}"


def test_the_driver_progress_and_metrics_follow_the_plan_alone(tmp_path, monkeypatch, capsys):
    """A stand-in recipe plans two stages nobody else knows (`fake_make`, `fake_check`) and the evals; the driver
    runs exactly those in order, the progress lines count them, `--redo` knows them, and metrics.jsonl carries
    the stats each of them wrote."""
    import selfimprove.driver
    import selfimprove.models
    import selfimprove.runtime

    ran = []

    def fake_stage(kind, t):
        def work(out):
            ran.append((t, kind))
            if kind == "eval":
                (out / "metrics.json").write_text(json.dumps({"metrics": {"pass@1": t / 10}}))
            else:
                (out / "stats.json").write_text(json.dumps({"t": t}))
        return Stage(tmp_path / "r" / f"iter_{t}" / kind, work, {"t": t})

    def plan(run):
        return [fake_stage("eval", 0)] + [fake_stage(kind, t) for t in (1, 2) for kind in ("fake_make", "fake_check", "eval")]

    monkeypatch.setattr(selfimprove.driver, "recipe_of", lambda cfg: dataclasses.replace(recipe("irpo"), plan=plan))
    monkeypatch.setattr(selfimprove.models, "resolve_model", lambda ref: "/start")
    monkeypatch.setattr(selfimprove.runtime, "init_ray", lambda: None)
    cfg = load_config(None, [f"run_dir={tmp_path / 'r'}", "task.generated_train=10", "task.generated_test=10"])
    rows = selfimprove.driver.run(cfg)
    planned = [(0, "eval")] + [(t, kind) for t in (1, 2) for kind in ("fake_make", "fake_check", "eval")]
    assert ran == planned
    err = " ".join(capsys.readouterr().err.split())
    assert "iteration 2/2 · fake_check · stage 6 of 7" in err
    assert [(r["iteration"], r["pass@1"], r.get("fake_make"), r.get("fake_check")) for r in rows] == [
        (0, 0.0, None, None), (1, 0.1, {"t": 1}, {"t": 1}), (2, 0.2, {"t": 2}, {"t": 2})]
    ran.clear()
    selfimprove.driver.run(cfg, redo=("fake_check",))
    assert ran == [(1, "fake_check"), (2, "fake_check")]
    with pytest.raises(UserError, match=r"--redo rollout: recipe irpo has no such stage \(its stages: eval, "
                                        r"fake_make, fake_check\)"):
        selfimprove.driver.run(cfg, redo=("rollout",))


def test_a_run_saved_before_recipes_resumes_under_the_recipe_its_knobs_describe(tmp_path):
    import yaml

    from selfimprove.driver import claim_run_dir

    run_dir = tmp_path / "r"
    old = load_config(None, [f"run_dir={run_dir}", "train.loss=sft"])
    with claim_run_dir(run_dir, old):
        pass
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["recipe"] is None
    with claim_run_dir(run_dir, load_config(None, [f"run_dir={run_dir}", "recipe=star"])):
        pass
    with pytest.raises(UserError, match=r"another config \(recipe: 'star' then, 'dpo' now\)"):
        claim_run_dir(run_dir, load_config(None, [f"run_dir={run_dir}", "recipe=dpo"]))

"""Config loading: YAML + dotted overrides, and each kind of bad input named with key and file."""

import re
from pathlib import Path

import pytest

from selfimprove.config import Config, describe, to_dict
from selfimprove.errors import UserError
from selfimprove.recipes import load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_without_file():
    assert load_config() == Config()


def test_yaml_then_overrides(tmp_path):
    p = write(tmp_path, "model: m\nrollout:\n  n: 4\n  temperature: 1\n")
    cfg = load_config(p, ["rollout.n=8", "task.step_weights=[1, 0, 2]", "task.data=/x/y"])
    assert cfg.model == "m"
    assert cfg.rollout.n == 8
    assert cfg.rollout.temperature == 1.0 and isinstance(cfg.rollout.temperature, float)
    assert cfg.task.step_weights == [1.0, 0.0, 2.0]
    assert cfg.task.data == "/x/y"
    assert cfg.eval.k == Config().eval.k


def test_an_override_that_reads_as_block_yaml_is_its_text():
    """`::` and `a: b` are mappings to YAML; in a `key=value` word they are what was typed. Flow lists still parse."""
    assert load_config(None, ["serve.host=::", "task.data=a: b"]).serve.host == "::"
    assert load_config(None, ["task.data=a: b"]).task.data == "a: b"
    assert load_config(None, ["train.lora_targets=[q_proj, v_proj]"]).train.lora_targets == ["q_proj", "v_proj"]
    with pytest.raises(UserError, match=r"^defaults: 'task.step_weights' must be a list, got '- 1'$"):
        load_config(None, ["task.step_weights=- 1"])


def test_null_allowed_only_where_optional(tmp_path):
    assert load_config(None, ["task.test_size=null"]).task.test_size is None
    with pytest.raises(UserError, match=r"defaults: 'rollout.n' must be int, got NoneType"):
        load_config(None, ["rollout.n=null"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("rollout:\n  nn: 3\n", r"c.yaml: unknown key 'rollout.nn'"),
        ("bogus: 1\n", r"c.yaml: unknown key 'bogus'"),
        ("rollout:\n  n: eight\n", r"c.yaml: 'rollout.n' must be int, got str 'eight'"),
        ("rollout:\n  n: true\n", r"c.yaml: 'rollout.n' must be int, got bool True"),
        ("rollout: 3\n", r"c.yaml: 'rollout' must be a section of keys, got 3"),
        ("rollout:\n  n: 0\n", r"c.yaml: 'rollout.n' must be > 0, got 0"),
        ("rollout:\n  top_p: 1.5\n", r"c.yaml: 'rollout.top_p' must be in \(0, 1\], got 1.5"),
        ("task:\n  operations: '+/'\n", r"c.yaml: 'task.operations' must be a non-empty subset"),
        ("task:\n  step_weights: 3\n", r"c.yaml: 'task.step_weights' must be a list, got 3"),
        ("- a\n- b\n", r"c.yaml: the top level must be a mapping"),
        ("a: [1,\n", r"c.yaml: not valid YAML"),
    ],
)
def test_bad_file_values_name_key_and_file(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        load_config(write(tmp_path, text))


def test_bad_overrides():
    with pytest.raises(UserError, match=r"unknown key 'rollout.temp'"):
        load_config(None, ["rollout.temp=1"])
    with pytest.raises(UserError, match=r"override 'rollout.n' must look like key.sub=value"):
        load_config(None, ["rollout.n"])
    with pytest.raises(UserError, match=r"'eval.split' must be one of train, val, test, got 'dev'"):
        load_config(None, ["eval.split=dev"])


def test_flagged_passes_are_counted_by_default_and_either_counted_or_failed():
    assert (load_config().task.sandbox.flagged, load_config(None, ["task.sandbox.flagged=fail"]).task.sandbox.flagged) == (
        "count", "fail")
    with pytest.raises(UserError, match=r"^defaults: 'task.sandbox.flagged' must be one of count, fail, got 'maybe'$"):
        load_config(None, ["task.sandbox.flagged=maybe"])


def test_missing_file():
    with pytest.raises(UserError, match=r"config file not found: nowhere.yaml"):
        load_config("nowhere.yaml")


def test_every_knob_has_help():
    rows = describe()
    assert ("rollout.n", 8, "samples per problem") in rows
    assert all(help for _, _, help in rows)


def test_exponent_without_dot_is_a_float():
    assert load_config(None, ["rollout.temperature=1e-1"]).rollout.temperature == 0.1
    with pytest.raises(UserError, match=r"'rollout.temperature' must be float, got str 'hot'"):
        load_config(None, ["rollout.temperature=hot"])


# Every float knob, found by its default; train.lr defaults to None.
FLOAT_KNOBS = [key for key, default, _ in describe() if isinstance(default, float)] + ["train.lr"]


@pytest.mark.parametrize("value, shown", [(".inf", "inf"), ("-.inf", "-inf"), (".nan", "nan"), ("nan", "nan")])
def test_every_float_knob_refuses_non_finite_values(value, shown):
    """YAML's `.inf`/`.nan`, and `nan` (a string made a float): nan passes `v >= 0` and inf `v > 0`."""
    assert {"rollout.temperature", "rollout.top_p", "train.beta", "task.sandbox.timeout"} <= set(FLOAT_KNOBS)
    for key in FLOAT_KNOBS:
        with pytest.raises(UserError, match=rf"^defaults: '{re.escape(key)}' must be a finite number, got {shown}$"):
            load_config(None, [f"{key}={value}"])
    with pytest.raises(UserError, match=rf"^defaults: 'task.step_weights' must be a finite number, got {shown}$"):
        load_config(None, [f"task.step_weights=[1, {value}]"])


def test_extends_overlays_a_base_file_key_by_key(tmp_path):
    (tmp_path / "base.yaml").write_text("run_dir: runs/a\nrollout:\n  n: 4\n  temperature: 0.5\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "top.yaml").write_text("extends: ../base.yaml\nrollout:\n  n: 6\n")
    cfg = load_config(tmp_path / "sub" / "top.yaml", ["rollout.top_p=0.9"])
    assert (cfg.run_dir, cfg.rollout.n, cfg.rollout.temperature, cfg.rollout.top_p) == ("runs/a", 6, 0.5, 0.9)


def test_extends_missing_or_circular_base_is_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: gone.yaml\n")
    with pytest.raises(UserError, match=r"config file not found: .*gone.yaml \(extended by .*a.yaml\)"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("extends: c.yaml\n")
    (tmp_path / "c.yaml").write_text("extends: b.yaml\n")
    with pytest.raises(UserError, match=r"'extends' goes round in a circle"):
        load_config(tmp_path / "b.yaml")


@pytest.mark.parametrize("name, recipe, loss", [("local-star.yaml", "star", "sft"), ("local-dpo.yaml", "dpo", "dpo")])
def test_baseline_recipes_differ_from_local_only_in_recipe_loss_and_run_dir(name, recipe, loss):
    configs = Path(__file__).resolve().parents[1] / "configs"
    local, baseline = to_dict(load_config(configs / "local.yaml")), to_dict(load_config(configs / name))
    assert (baseline["recipe"], baseline["train"]["loss"], baseline["run_dir"]) == (
        recipe, loss, f"runs/{name.removesuffix('.yaml')}")
    baseline["recipe"], baseline["train"]["loss"], baseline["run_dir"] = local["recipe"], local["train"]["loss"], local["run_dir"]
    assert baseline == local


@pytest.mark.parametrize("value", ["0", "-2"])
def test_process_k_below_one_fails_at_load(value):
    with pytest.raises(UserError, match=rf"^defaults: 'process.k' must be >= 1, got {value}$"):
        load_config(None, [f"process.k={value}"])


def test_process_pairs_with_an_sft_loss_fail_at_load():
    with pytest.raises(UserError, match=r"^defaults: pairs.source=process builds preference pairs, which "
                                        r"train.loss=sft does not read; use a preference loss"):
        load_config(None, ["pairs.source=process", "train.loss=sft"])
    assert load_config(None, ["pairs.source=process", "train.loss=orpo"]).train.loss == "orpo"


TRAINED = ["pairs.source=process", "train.loss=orpo", "process.scorer=trained", "iterations=3"]


def test_trained_scorer_is_accepted_with_process_pairs_and_later_iterations():
    cfg = load_config(None, TRAINED + ["process.prm_mc_iterations=2", "process.prm_backbone=some/model"])
    assert (cfg.process.scorer, cfg.process.prm_mc_iterations, cfg.process.prm_backbone) == ("trained", 2, "some/model")
    assert (cfg.process.prm_epochs, cfg.process.prm_lr, cfg.process.prm_batch_size) == (2, 2e-5, 8)


@pytest.mark.parametrize("overrides, message", [
    (["pairs.source=outcome"], r"defaults: process.scorer=trained scores steps for process pairs: it needs "
                               r"pairs.source=process$"),
    (["process.prm_mc_iterations=3"], r"defaults: process.scorer=trained with process.prm_mc_iterations=3 and "
                                      r"iterations=3 would never score with the trained PRM; lower"),
    (["process.prm_batch_size=3"], r"process.prm_batch_size=3 must be a multiple of train.num_workers=2"),
    (["process.prm_mc_iterations=0"], r"'process.prm_mc_iterations' must be > 0, got 0"),
    (["process.prm_max_len=1"], r"'process.prm_max_len' must be >= 2, got 1"),
    (["process.scorer=neural"], r"'process.scorer' must be one of mc, trained, got 'neural'"),
])
def test_trained_scorer_combinations_fail_at_load(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, TRAINED + overrides)


def test_prm_knobs_alone_do_not_matter_to_the_mc_scorer():
    """prm_* knobs are read only with scorer=trained: the MC default accepts any valid values."""
    cfg = load_config(None, ["process.prm_mc_iterations=5", "process.prm_batch_size=3"])
    assert cfg.process.scorer == "mc"


@pytest.mark.parametrize("overrides, message", [
    (["train.batch_size=6", "train.micro_batch_size=2", "train.num_workers=2"],
     r"^defaults: train.batch_size=6 must be a multiple of train.micro_batch_size x train.num_workers = 2 x 2$"),
    (["train.zero_stage=0", "train.offload_optimizer=true"],
     r"^defaults: train.offload_optimizer needs train.zero_stage 1, 2 or 3$"),
    (["iterations=3", "rollout.temperature_schedule=[0.8, 1.0]"],
     r"^defaults: rollout.temperature_schedule gives 2 temperature\(s\) for iterations=3: give one per iteration$"),
    (["rollout.max_tokens=1024"], r"^defaults: rollout.max_tokens=1024 leaves no room for a prompt in "
                                  r"rollout.max_model_len=1024$"),
    (["process.max_tokens=2000", "rollout.max_model_len=1500"],
     r"^defaults: process.max_tokens=2000 leaves no room for a prompt in rollout.max_model_len=1500$"),
])
def test_knob_combinations_fail_at_load(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_knob_combinations_of_a_config_built_in_code_are_checked_too():
    from selfimprove.config import Config, TrainConfig
    from selfimprove.recipes import check

    check(Config(train=TrainConfig(batch_size=4, micro_batch_size=2, num_workers=2)))
    with pytest.raises(UserError, match=r"^config: train.batch_size=6 must be a multiple"):
        check(Config(train=TrainConfig(batch_size=6, micro_batch_size=2, num_workers=2)))
    assert load_config(None, ["iterations=2", "rollout.temperature_schedule=[0.8, 1.0, 1.2]"]).iterations == 2


@pytest.mark.parametrize("name", ["local-sipf.yaml", "local-self-refine.yaml", "local-sgft.yaml"])
def test_recipe_configs_keep_the_settings_their_figures_were_measured_with(name):
    """Full fine-tuning at lr 2e-5 and 8 samples per problem, through local-full-ft.yaml, while local.yaml trains
    a LoRA adapter on 6."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    cfg = load_config(configs / name)
    assert (cfg.train.lora, cfg.train.lr, cfg.rollout.n) == (False, 2e-5, 8)
    assert cfg.run_dir == f"runs/{name.removesuffix('.yaml')}"

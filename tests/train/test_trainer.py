"""The train stage: checks that fail before Ray starts, the log-prob arithmetic, and real runs.

The `engine` tests train the bundled SmolLM2-135M-Instruct with Ray Train + DeepSpeed on CPU
(2 workers, ZeRO-2, LoRA), then load the saved folder in vLLM in a subprocess.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from selfimprove.config import Config, TrainConfig
from selfimprove.errors import UserError
from selfimprove.io import is_done
from selfimprove.models import check_lora_targets
from selfimprove.recipes import load_config
from selfimprove.train.data import Example, collate
from selfimprove.train.launch import checkpoint_storage, fingerprint
from selfimprove.train.loss_names import LOSS_NAMES
from selfimprove.train.losses import LOSSES
from selfimprove.train.trainer import train
from selfimprove.train.worker import _print_row, deepspeed_config, learning_rate, loss_kwargs, sequence_logps

PROMPT = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"


def write_pairs(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows],
                             "rejected": [r[2] for r in rows]}), path)
    return path


# ---------------------------------------------------------------------------------------------
# Fast: no Ray, no DeepSpeed.


def test_loss_names_match_the_losses():
    assert set(LOSS_NAMES) == set(LOSSES)


@pytest.mark.parametrize("override, message", [
    ("train.zero_stage=4", r"'train.zero_stage' must be 0, 1, 2 or 3, got 4"),
    ("train.zero_stage=-1", r"'train.zero_stage' must be 0, 1, 2 or 3, got -1"),
    ("train.loss=kto", r"'train.loss' must be one of sft, dpo, rpo, orpo, ipo"),
    ("train.truncation=left", r"'train.truncation' must be one of response, prompt, drop"),
    ("train.label_smoothing=0.5", r"'train.label_smoothing' must be in \[0, 0.5\)"),
    ("train.lora_targets=[]", r"'train.lora_targets' must name at least one module"),
])
def test_bad_train_knobs_fail_at_load(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


def test_lora_targets_are_named_when_missing(bundled_model):
    check_lora_targets(bundled_model, ["q_proj", "v_proj", "model.layers.0.mlp.down_proj"])
    check_lora_targets(bundled_model, ["all-linear"])
    with pytest.raises(UserError, match=r"train.lora_targets: qkv_proj, c_attn not in LlamaForCausalLM \(its linear "
                                        r"layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"):
        check_lora_targets(bundled_model, ["q_proj", "qkv_proj", "c_attn"])


def test_bad_input_fails_before_ray(tmp_path, bundled_model, monkeypatch):
    def no_ray():
        raise AssertionError("Ray started before the input was checked")

    monkeypatch.setattr("selfimprove.runtime.init_ray", no_ray)
    cfg = Config(model=bundled_model)
    empty = write_pairs(tmp_path / "empty" / "pairs.parquet", [])
    with pytest.raises(UserError, match=r"no rows to train on \(an empty pairs file\)"):
        train(cfg, empty, tmp_path / "model")
    same = write_pairs(tmp_path / "same" / "pairs.parquet", [(PROMPT, "5", "5")] * 3)
    with pytest.raises(UserError, match="nothing left to train on: of 3 rows, 3 have chosen == rejected"):
        train(cfg, same, tmp_path / "model")
    few = write_pairs(tmp_path / "few" / "pairs.parquet", [(PROMPT, "5", "6")] * 3)
    with pytest.raises(UserError, match=r"only 3 usable examples .* fewer than train.batch_size=4"):
        train(cfg, few, tmp_path / "model")
    bad_lora = dataclasses.replace(cfg, train=TrainConfig(lora=True, lora_targets=["nope"]))
    with pytest.raises(UserError, match="train.lora_targets: nope not in LlamaForCausalLM"):
        train(bad_lora, write_pairs(tmp_path / "ok" / "pairs.parquet", [(PROMPT, "5", "6")] * 4), tmp_path / "model")
    sft = tmp_path / "sft.parquet"
    pq.write_table(pa.table({"prompt": [PROMPT] * 4, "response": ["5"] * 4}), sft)
    with pytest.raises(UserError, match=r"holds SFT rows .* train.loss=rpo needs pairs; use train.loss=sft"):
        train(cfg, sft, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_the_resume_fingerprint_is_the_models_content_not_its_path(tmp_path):
    """A training resumes the checkpoints of the run with its fingerprint. A model rewritten at the same path (a
    redone train stage) must not resume the old model's checkpoints; the same files copied elsewhere (a moved run
    dir, another node's cache) are the same model, whose checkpoints fit it: they resume."""
    import shutil

    def model(folder, weights: bytes):
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text('{"model_type": "llama"}')
        (folder / "model.safetensors").write_bytes(weights)
        return str(folder)

    settings, data = {"loss": "sft"}, [Example([1, 2], [3], None)]
    a = model(tmp_path / "a", b"weights one")
    first = fingerprint(a, settings, data)
    assert fingerprint(shutil.copytree(a, tmp_path / "elsewhere"), settings, data) == first
    same_path = model(tmp_path / "a", b"weights two")  # same size; its new mtime tells the cache to read it again
    os.utime(tmp_path / "a" / "model.safetensors", ns=(1, 1))
    assert fingerprint(same_path, settings, data) != first
    model(tmp_path / "a", b"weights one")
    os.utime(tmp_path / "a" / "model.safetensors", ns=(2, 2))
    assert fingerprint(a, settings, data) == first
    # A separate reference counts by its content too; a hub id by its name.
    b, c = model(tmp_path / "b", b"reference"), model(tmp_path / "c", b"reference")
    assert fingerprint(a, settings, data, reference=b) == fingerprint(a, settings, data, reference=c) != first
    assert fingerprint("org/model", settings, data) != fingerprint("org/other", settings, data)
    assert fingerprint(a, {"loss": "rpo"}, data) != first != fingerprint(a, settings, data * 2)


def test_deepspeed_config_from_knobs():
    tc = TrainConfig(batch_size=8, micro_batch_size=2, num_workers=2, zero_stage=3, offload_optimizer=True,
                     precision="fp32", warmup_steps=5, grad_clip=0.5)
    ds = deepspeed_config(tc, world=2, use_gpu=False)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 2)
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert ds["bf16"] == {"enabled": False} and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["lr"] == 2e-5 and "torch_adam" not in ds["optimizer"]["params"]
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 5
    ds = deepspeed_config(TrainConfig(lora=True, precision="bf16"), world=2, use_gpu=False)
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["optimizer"]["params"]["fused"] is True
    assert "scheduler" not in ds
    assert ds["bf16"] == {"enabled": True} and learning_rate(TrainConfig(lora=True)) == 2e-4
    assert learning_rate(TrainConfig(lora=True, lr=1e-3)) == 1e-3


@pytest.mark.parametrize("use_gpu", [False, True])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_adamw_is_torchs_fused_one_unless_offloaded_on_cpu_and_gpu(stage, use_gpu):
    """No DeepSpeed op to compile on a GPU node (its FusedAdam needs nvcc): torch's fused AdamW for every ZeRO
    stage; with optimizer offload, DeepSpeed's CPU Adam (the plain AdamW config), built with g++ alone."""
    adamw = {"lr": 2e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    ds = deepspeed_config(TrainConfig(zero_stage=stage), world=1, use_gpu=use_gpu)
    assert ds["optimizer"] == {"type": "AdamW", "params": adamw | {"torch_adam": True, "fused": True}}
    if stage:
        ds = deepspeed_config(TrainConfig(zero_stage=stage, offload_optimizer=True), world=1, use_gpu=use_gpu)
        assert ds["optimizer"] == {"type": "AdamW", "params": adamw}
        assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": use_gpu}


def test_a_reference_engine_gets_the_training_config_without_optimizer_schedule_or_their_offload():
    from selfimprove.train.worker import inference_config

    tc = TrainConfig(zero_stage=3, offload_optimizer=True, warmup_steps=5, batch_size=4, micro_batch_size=1)
    ds = deepspeed_config(tc, world=2, use_gpu=True)
    assert inference_config(ds) == {
        "train_batch_size": 4, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0, "bf16": {"enabled": False}, "zero_optimization": {"stage": 3},
        "steps_per_print": 10**9, "wall_clock_breakdown": False}
    assert ds["zero_optimization"]["offload_optimizer"] and "optimizer" in ds  # the training config is untouched


def test_deepspeed_builds_torchs_fused_adamw_and_one_dtype_of_lora_for_every_zero_stage(tmp_path):
    """Two gloo ranks (tests/train/deepspeed_ranks.py), bf16 + LoRA, ZeRO 0-3, one step each: DeepSpeed made
    torch's fused AdamW and JIT-built nothing; adapters are bf16 like their base weights at every stage (PEFT
    made them float32, which DeepSpeed casts back at stages 0-2 but not on a zero.Init model); and under ZeRO-3
    the separate reference is a sharded engine whose log-probs equal the whole model's, bit for bit."""
    from processes import free_ports

    out = tmp_path / "found.json"
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_ports(1)[0]),
                        "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    (tmp_path / "extensions").mkdir()
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("deepspeed_ranks.py")), str(tmp_path / "tiny"),
                           str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(out.read_text())
    for stage in "0123":
        assert {k: found[stage][k] for k in ("optimizer", "fused", "trainable", "sharded")} == {
            "optimizer": "torch.optim.adamw.AdamW", "fused": True, "trainable": ["torch.bfloat16"],
            "sharded": stage == "3"}
    assert {k: v for k, v in found["3"].items() if k.startswith(("reference", "policy"))} == {
        "reference": "DeepSpeedEngine", "reference_sharded": True, "reference_equals_whole": True,
        "policy_before_training_equals_whole": True}
    assert found["built"] == []


def test_loss_kwargs_only_what_the_loss_takes():
    assert loss_kwargs(TrainConfig(loss="rpo", beta=0.2, alpha=0.5)) == {
        "beta": 0.2, "alpha": 0.5, "label_smoothing": 0.0, "nll_norm": "sequence"}
    assert loss_kwargs(TrainConfig(loss="orpo", orpo_lambda=0.3)) == {"lam": 0.3, "nll_norm": "sequence"}
    assert loss_kwargs(TrainConfig(loss="ipo")) == {"beta": 0.1}
    assert loss_kwargs(TrainConfig(loss="sft")) == {"nll_norm": "sequence"}


def test_sequence_logps_equal_each_sequence_on_its_own():
    """A batch's prompt-sharing rows against each prompt + response run alone through a tiny random Llama,
    log_softmax over the full logits, position by position: the same sums, for pairs and for SFT rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    examples = [Example([5, 6, 7], [8, 9, 2], [10, 2]), Example([5, 11], [12, 2], [13, 14, 15, 2])]

    def alone(prompt, response):
        tokens = prompt + response
        with torch.no_grad():
            full = model(input_ids=torch.tensor([tokens])).logits[0].log_softmax(-1)
        return sum(full[t - 1, tokens[t]].item() for t in range(len(prompt), len(tokens)))

    with torch.no_grad():
        logps, lengths = sequence_logps(model, collate(examples, pad_id=0), torch.device("cpu"))
        sft_logps, sft_lengths = sequence_logps(model, collate([Example(e.prompt, e.chosen) for e in examples], 0),
                                                torch.device("cpu"))
    chosen = [alone(e.prompt, e.chosen) for e in examples]
    rejected = [alone(e.prompt, e.rejected) for e in examples]
    torch.testing.assert_close(logps, torch.tensor(chosen + rejected), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sft_logps, torch.tensor(chosen), atol=1e-5, rtol=1e-5)
    assert lengths.tolist() == [3, 2, 2, 4] and sft_lengths.tolist() == [3, 2] and logps.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Real runs: Ray Train, DeepSpeed, the bundled model; then vLLM on the saved folder.

# One pair repeated: each step sees it again, so its loss must fall. Plus a pair with
# chosen == rejected (dropped) and one too long for max_len (truncated).
GOOD = (PROMPT, "2 + 3 = 5. The answer is 5.", "2 + 3 = 6. The answer is 6.")
ACCEPTANCE = dict(num_workers=2, zero_stage=2, lora=True, lr=1e-3, batch_size=4, micro_batch_size=1, epochs=3,
                  max_len=64, report_every=3, checkpoint_every=3)


@pytest.fixture(scope="module")
def extensions_dir():
    """DeepSpeed's JIT-built CPU comm op is reused across runs from here (as `make` sets it)."""
    from selfimprove.models import home

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(home() / "torch_extensions"))


@pytest.fixture(scope="module")
def trained(extensions_dir, ray_local, bundled_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    rows = [GOOD] * 7 + [(PROMPT, "5", "5"), (PROMPT, "The answer is 5. " * 20, "The answer is 6.")]
    data = write_pairs(root / "pairs" / "pairs.parquet", rows)
    cfg = Config(model=bundled_model, train=TrainConfig(**ACCEPTANCE))
    summary = train(cfg, data, root / "model")
    return root / "model", summary


@pytest.mark.engine
def test_acceptance_loss_falls_and_counts(trained):
    folder, summary = trained
    assert is_done(folder) and not folder.with_name("model.partial").exists()
    assert not folder.with_name("model.ray").exists()  # checkpoints cleared once the model is saved
    log = json.loads((folder / "train_metrics.json").read_text())
    losses = [s["loss"] for s in log["steps"]]
    print("acceptance run:", json.dumps({k: v for k, v in summary.items() if k != "final"}), losses)
    # 8 usable pairs (9 rows, one identical), 4 per step, 3 epochs: 6 steps.
    assert (summary["rows"], summary["identical"], summary["truncated"], summary["examples"]) == (9, 1, 1, 8)
    assert summary["steps"] == 6 and len(losses) == 6 and summary["workers"] == 2
    # Step 1: LoRA's B starts at 0, so the policy is the reference: DPO term log 2, rewards 0.
    assert abs(log["steps"][0]["rewards/margins"]) < 0.05
    assert losses[-1] < losses[0] - 0.1
    assert log["steps"][-1]["rewards/margins"] > log["steps"][0]["rewards/margins"]
    assert summary["tokens_per_s"] > 0 and all(0 < m < 8 for m in summary["peak_memory_gib"])


@pytest.mark.engine
def test_saved_folder_is_a_bf16_model_that_vllm_generates_with(trained, bundled_model):
    folder, _ = trained
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "lora" not in json.dumps(config)
    assert (folder / "chat_template.jinja").is_file() and (folder / "tokenizer.json").is_file()
    assert not list(folder.glob("adapter_*"))
    script = textwrap.dedent(f"""
        import json
        from selfimprove.config import RolloutConfig
        from selfimprove.rollout.engine import build_llm, sampling_params
        if __name__ == "__main__":
            llm = build_llm({str(folder)!r}, RolloutConfig(max_model_len=256, cpu_kvcache_gib=1))
            out = llm.generate([{PROMPT!r}], sampling_params(RolloutConfig(max_tokens=16), 1, 0.0, ()))
            print("GENERATED" + json.dumps(out[0].outputs[0].text))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    line = next((x for x in done.stdout.splitlines() if x.startswith("GENERATED")), None)
    assert line is not None, done.stderr[-2000:]
    assert json.loads(line[len("GENERATED"):]).strip()


@pytest.mark.engine
def test_a_separate_reference_is_what_the_first_step_measures_against(trained, bundled_model, tmp_path):
    """The reference is the acceptance run's model, trained to prefer GOOD's chosen answer: the base model, which
    prefers it less, starts with a negative margin. (Its own reference would start it at 0, as above.)"""
    folder, _ = trained
    data = write_pairs(tmp_path / "pairs.parquet", [GOOD] * 4)
    tc = TrainConfig(**(ACCEPTANCE | dict(epochs=1, report_every=1, checkpoint_every=0)))
    train(Config(model=bundled_model, train=tc), data, tmp_path / "model", reference=str(folder))
    first = json.loads((tmp_path / "model" / "train_metrics.json").read_text())["steps"][0]
    trained_margin = json.loads((folder / "train_metrics.json").read_text())["steps"][-1]["rewards/margins"]
    assert first["rewards/margins"] < -trained_margin / 2 < 0


@pytest.mark.slow
def test_zero3_lora_with_a_separate_reference_trains_and_saves(extensions_dir, ray_local, bundled_model, tmp_path):
    """ZeRO-3 + LoRA in bf16 on 2 Ray Train workers, the base model given as a separate reference (loaded sharded):
    step 1 measures the policy against itself (LoRA's B starts at 0: margin 0), the loss falls, and the saved
    folder is a whole bf16 model."""
    data = write_pairs(tmp_path / "pairs.parquet", [GOOD] * 8)
    tc = TrainConfig(**(ACCEPTANCE | dict(zero_stage=3, precision="bf16", checkpoint_every=2)))
    summary = train(Config(model=bundled_model, train=tc), data, tmp_path / "model", reference=bundled_model)
    steps = json.loads((tmp_path / "model" / "train_metrics.json").read_text())["steps"]
    assert summary["zero_stage"] == 3 and summary["steps"] == 6
    assert abs(steps[0]["rewards/margins"]) < 0.05 and steps[-1]["loss"] < steps[0]["loss"] - 0.1
    assert json.loads((tmp_path / "model" / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_reference_with_another_tokenizer_is_refused_in_one_line(bundled_model, tmp_path):
    from transformers import AutoTokenizer

    from selfimprove.models import check_reference

    assert check_reference(bundled_model, bundled_model) == bundled_model
    other = tmp_path / "other"
    other.mkdir()
    for f in Path(bundled_model).iterdir():  # the same weights (linked: never written through), another tokenizer
        if f.name in ("config.json", "generation_config.json") or f.suffix == ".safetensors":
            (other / f.name).symlink_to(f)
    tokenizer = AutoTokenizer.from_pretrained(bundled_model)
    tokenizer.add_tokens(["<step>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(UserError) as e:
        check_reference(str(other), bundled_model)
    assert str(e.value) == (f"{other} (models.reference) has another tokenizer than the policy {bundled_model} (49153 "
                            "vs 49152 tokens, vocabularies differ): a DPO reference scores the policy's token ids; use "
                            "a reference with the policy's tokenizer")


@pytest.mark.engine
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(extensions_dir, ray_local, bundled_model,
                                                                         tmp_path):
    """lr = 1e30: after step 1 the LoRA weights overflow bf16, so step 2's loss is not finite."""
    data = write_pairs(tmp_path / "pairs.parquet", [GOOD] * 8)
    # No restart: a NaN comes again from the same checkpoint, and restarts are another test's subject.
    tc = TrainConfig(**(ACCEPTANCE | dict(lr=1e30, checkpoint_every=1, report_every=100, worker_restarts=0)))
    with pytest.raises(UserError, match=r"loss is (nan|inf|-inf) at step 2: training stopped; the last good "
                                        r"checkpoint \(step 1\) is kept in .*model.ray/train-\w+/step-000001"):
        train(Config(model=bundled_model, train=tc), data, tmp_path / "model")
    assert not (tmp_path / "model").exists()
    kept = list((tmp_path / "model.ray").glob("train-*/step-000001"))
    assert len(kept) == 1 and (kept[0] / "latest").is_file() and (kept[0] / "reference-1.pt").is_file()


@pytest.mark.engine
@pytest.mark.faults
def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint(extensions_dir, ray_local, bundled_model, tmp_path,
                                                                     capfd):
    """SIGKILL one of the two Ray Train workers once a checkpoint is persisted: Ray Train starts the workers again
    from it (train.worker_restarts), the steps before it are not redone, and the model is saved whole."""
    import threading
    import time

    from processes import checkpoint_registered, named

    data = write_pairs(tmp_path / "pairs.parquet", [GOOD] * 8)
    tc = TrainConfig(**(ACCEPTANCE | dict(checkpoint_every=1, report_every=100)))
    killed = []

    def kill_one_worker_after_a_checkpoint():
        deadline = time.monotonic() + 600
        while not killed and time.monotonic() < deadline:
            if checkpoint_registered(tmp_path / "model.ray"):
                if workers := named("ray::RayTrainWorker"):
                    workers[-1].kill()
                    killed.append(workers[-1].pid)
            time.sleep(0.1)

    killer = threading.Thread(target=kill_one_worker_after_a_checkpoint, daemon=True)
    killer.start()
    summary = train(Config(model=bundled_model, train=tc), data, tmp_path / "model")
    killer.join()
    assert killed, "no worker was killed: training ended before its second checkpoint"
    out = capfd.readouterr().out
    assert re.search(r"resuming from the checkpoint of step [1-5]\b", out), out[-3000:]
    assert summary["steps"] == 6 and is_done(tmp_path / "model")
    assert len(json.loads((tmp_path / "model" / "train_metrics.json").read_text())["steps"]) == 6


@pytest.mark.faults
def test_workers_that_cannot_be_placed_fail_in_one_line_after_the_restarts(tmp_path):
    """Ray Train retries a worker group it cannot start without end by default; `run_workers` bounds it by
    train.worker_restarts. (Ray Train's own start timeout, 60 s, is cut to 3 s here, in a process of its own.)"""
    script = textwrap.dedent(f"""
        import os
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "3"
        from selfimprove.config import TrainConfig
        from selfimprove.errors import UserError
        from selfimprove.runtime import init_ray
        from selfimprove.train.launch import run_workers

        init_ray()
        try:
            run_workers(print, {{}}, TrainConfig(num_workers=1, worker_restarts=1), False, {{"CPU": 64}}, "unplaceable",
                        {str(tmp_path)!r})
        except UserError as e:
            print("refused:", e)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert "refused: training failed: WorkerGroupStartupTimeoutError: The worker group startup timed out" in done.stdout, (
        done.stdout[-2000:] + done.stderr[-2000:])
    assert done.stderr.count("[FailurePolicy] RETRY") == 1


def test_progress_line_shows_rewards_only_for_preference_losses(capsys):
    row = {"step": 10, "loss": 0.5, "rewards/accuracies": 0.75, "rewards/margins": 1.25, "tokens_per_s": 200.4}
    _print_row(row, 50, preference=True)
    _print_row(row, 50, preference=False)
    assert capsys.readouterr().out.splitlines() == [
        "step 10/50  loss 0.5000  reward acc 0.75  margin 1.2500  200 tokens/s",
        "step 10/50  loss 0.5000  200 tokens/s",
    ]


def test_checkpoint_storage_is_absolute_for_a_relative_run_dir(tmp_path, monkeypatch):
    """`make demo` writes to run_dir=runs/local: Ray Train read the relative checkpoint folder as a URI and failed."""
    monkeypatch.chdir(tmp_path)
    storage = checkpoint_storage(None, Path("runs/local/iter_1/train.partial"), Path("runs/local/iter_1/train.ray"))
    assert storage == str(tmp_path / "runs" / "local" / "iter_1" / "train.ray")
    assert (tmp_path / "runs" / "local" / "iter_1" / "train.ray" / ".selfimprove").is_file()
    # With a storage_path, every worker's node reaches them there.
    assert checkpoint_storage("shared", Path("o"), None) == str(tmp_path / "shared" / "checkpoints")
    assert checkpoint_storage("s3://bucket/run/", Path("o"), None) == "s3://bucket/run/checkpoints"


def test_cpu_workers_reduce_through_torch_without_building_deepspeeds_shm_op(tmp_path):
    """One gloo process (loopback): DeepSpeed's all-reduce works, and nothing was JIT-built into the extensions
    folder (DeepSpeed alone would compile its shared-memory op there first)."""
    from processes import free_ports

    script = textwrap.dedent("""
        import os, torch, torch.distributed as dist
        dist.init_process_group("gloo", rank=0, world_size=1)
        from selfimprove.train.worker import init_distributed
        init_distributed(use_gpu=False)
        import deepspeed.comm
        t = torch.tensor([3.0])
        deepspeed.comm.all_reduce(t)
        print(t.item(), sorted(os.listdir(os.environ["TORCH_EXTENSIONS_DIR"])))
    """)
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_ports(1)[0]), "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "3.0 []"

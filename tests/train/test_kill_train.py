"""SIGKILL `selfimprove train` (its whole process group) once Ray Train has registered a checkpoint, then rerun it:
the rerun resumes from that checkpoint, for a loss that keeps reference log-probs in its checkpoints (rpo) and for
the two that keep none (sft, orpo), with LoRA and with full fine-tuning."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from processes import checkpoint_registered, kill_when, start_command

pytestmark = [pytest.mark.engine, pytest.mark.faults]

PROMPT = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
CHOSEN, REJECTED = "2 + 3 = 5. The answer is 5.", "2 + 3 = 6. The answer is 6."
STEPS = 4  # 8 rows, 4 a step, 2 epochs; a checkpoint after each step, so that a kill comes before the last
TRAIN = {"num_workers": 2, "zero_stage": 2, "batch_size": 4, "micro_batch_size": 1, "epochs": 2, "max_len": 64,
         "lr": 1e-4, "report_every": 1, "checkpoint_every": 1}


def write_rows(path, loss: str):
    """SFT rows (prompt, response) for sft, as STaR writes them; preference pairs for the others."""
    columns = {"prompt": [PROMPT] * 8, "response": [CHOSEN] * 8} if loss == "sft" else \
        {"prompt": [PROMPT] * 8, "chosen": [CHOSEN] * 8, "rejected": [REJECTED] * 8}
    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize("loss, lora", [("sft", False), ("rpo", True), ("orpo", True)])
def test_a_killed_training_resumes_from_its_checkpoint(tmp_path, bundled_model, loss, lora):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": bundled_model, "train": TRAIN | {"loss": loss, "lora": lora}}))
    out = tmp_path / "model"
    args = ["train", config, "--data", write_rows(tmp_path / "rows.parquet", loss), "--out", out]

    killed_log = tmp_path / "killed.log"
    kill_when(start_command(args, killed_log), killed_log, lambda: checkpoint_registered(tmp_path / "model.ray"),
              "a registered checkpoint")
    assert not out.exists(), "the kill came after the model was saved"

    log = tmp_path / "rerun.log"
    assert start_command(args, log).wait(timeout=1200) == 0, log.read_text()[-3000:]
    text = log.read_text()
    resumed = re.search(r"resuming from the checkpoint of step (\d+)\b", text)
    assert resumed, text[-3000:]
    resumed = int(resumed.group(1))
    # The rerun trains only the steps after the checkpoint, and computes no reference log-probs again.
    assert 1 <= resumed < STEPS
    assert [int(s) for s in re.findall(rf"\bstep (\d+)/{STEPS} ", text)] == list(range(resumed + 1, STEPS + 1))
    assert "reference log-probs" not in text
    # The saved model's record holds every step once: the checkpoint's history, then the rerun's.
    steps = json.loads((out / "train_metrics.json").read_text())["steps"]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert (out / "_SUCCESS").is_file() and not (tmp_path / "model.ray").exists()

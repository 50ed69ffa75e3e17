"""The train stage: preference pairs (or SFT rows) -> a Hugging Face model folder, on Ray Train + DeepSpeed.

This module is the driver's side; the workers run `worker.py`, launched by `launch.py` (which the PRM's
training shares).

1. Everything that can be wrong with the input fails on the driver before Ray starts: the
   settings are cross-checked, the data is read, checked and tokenised (drops and truncations
   counted, see data.py), and LoRA targets are looked up among the model's module names (the
   model is built on the meta device: no weights are read).
2. The driver shuffles the examples once (seeded) and keeps a whole number of optimizer steps (`whole_steps`).
3. A NaN or inf loss stops every worker at the same micro-step; the driver names the step and the last good
   checkpoint, which it keeps.
4. The model the workers save is copied into the stage output, with every step's metrics in
   `train_metrics.json`; the summary is returned.
"""

from __future__ import annotations

from pathlib import Path

from selfimprove.config import Config, check_knobs, to_dict
from selfimprove.errors import UserError
from selfimprove.io import check_replaceable
from selfimprove.models import check_lora_targets, check_reference
from selfimprove.resources import check_resources
from selfimprove.storage import shared
from selfimprove.train.data import padding_id, read_rows, tokenize, whole_steps
from selfimprove.train.launch import fingerprint, launch
from selfimprove.train.loss_names import needs_rejected
from selfimprove.train.worker import METRICS_FILE, NonFiniteLoss, checkpoint_name, train_worker


def train(cfg: Config, data: str | Path, out: str | Path, checkpoints: Path | None = None,
          reference: str | None = None) -> dict:
    """Train `cfg.model` on the pairs or SFT rows at `data`; write the model folder `out`. Returns the summary.

    `reference`: the model a DPO-style loss measures against (default: `cfg.model` as it starts).

    Checkpoints go to `<storage_path>/checkpoints`, else to `checkpoints` (default: `<out>.ray`), which is
    removed once the model is saved. A caller whose `out` is a scratch folder passes a `checkpoints`
    outside it, so a killed stage resumes from them.
    """
    from transformers import AutoTokenizer

    from selfimprove.models import resolve_model

    tc, out = cfg.train, Path(out).resolve()
    check_knobs(cfg)
    check_resources(cfg, rollout=False)
    # A folder that is not ours is refused now, not after the training that would replace it.
    check_replaceable(out)
    model_path = resolve_model(cfg.model)
    kind, table = read_rows(data)
    if kind == "sft" and needs_rejected(tc.loss):
        raise UserError(f"{data} holds SFT rows (prompt, response) but train.loss={tc.loss} needs pairs; "
                        "use train.loss=sft")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    examples, counts = tokenize(table, tokenizer, tc.max_len, tc.truncation)
    if len(examples) < tc.batch_size:
        raise UserError(f"only {len(examples)} usable examples in {data}, fewer than train.batch_size={tc.batch_size}")
    if tc.lora:
        check_lora_targets(model_path, tc.lora_targets)
    examples = whole_steps(examples, tc.batch_size, tc.seed)
    reference = reference and check_reference(reference, model_path)
    run = "train-" + fingerprint(model_path, to_dict(tc), examples, reference)
    worker_config = {
        "train": tc, "model": shared(model_path), "reference": reference and shared(reference),
        "pad_id": padding_id(tokenizer),
        "counts": vars(counts) | {"unused": counts.examples - len(examples)},
    }

    def explain(cause: BaseException, folder: str) -> str | None:
        if not isinstance(cause, NonFiniteLoss):
            return None
        where = (f"the last good checkpoint (step {cause.checkpoint_step}) is kept in "
                 f"{folder}/{checkpoint_name(cause.checkpoint_step)}" if cause.checkpoint_step else
                 f"no checkpoint was saved before it (train.checkpoint_every={tc.checkpoint_every})")
        return f"{cause}: training stopped; {where}"

    return launch(train_worker, worker_config, examples, run, cfg, out, checkpoints, METRICS_FILE, explain=explain)

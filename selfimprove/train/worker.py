"""The DeepSpeed worker of the policy's training, run by Ray Train on each worker (`launch.py`).

1. Each worker wraps the model in `deepspeed.initialize` (ZeRO stage, optimizer offload and bf16 from the
   config), reusing the process group Ray Train set up (NCCL on GPUs, gloo on CPUs).
2. Worker r takes every num_workers-th example from r, and reshuffles its shard each epoch with a seed all
   workers share. Every worker does the same number of micro-steps, as the collectives of DeepSpeed need.
3. Reference log-probs are computed once, before the first step, over the worker's shard, and
   kept beside it (and in every checkpoint): never per step. Full fine-tuning reads them off the
   model before it moves; with LoRA they come from the same model inside `disable_adapter()`,
   so no second copy of the model exists either way. A separate reference model (`reference`)
   is loaded for that pass only, then dropped: whole on each worker, or sharded under ZeRO-3 as
   the policy is. Losses that need none (sft, orpo) skip it.
4. One forward pass per micro-batch, a row per pair holding its prompt once, then chosen and
   rejected, padded to the batch's longest (data.py, point 6). Logits are computed only from
   the first response position on (`logits_to_keep`): prompt positions need none, and a
   49k-word head is a fifth of a 135M model's work. Token
   log-probs are gathered and summed in float32.
5. Every micro-step all-reduces [loss, rewards, tokens] over the workers: the metrics are global,
   and a NaN or inf on any worker stops all of them at the same micro-step, before its backward
   pass (`NonFiniteLoss`, which names the step and the last good checkpoint).
6. Every `checkpoint_every` steps a DeepSpeed checkpoint (with the reference log-probs and the
   position in the data) goes through `ray.train.report`; a worker given one back resumes there.
7. Metrics (loss, rewards, reward accuracy, margin, tokens/s) go to `ray.train.report` every
   `report_every` steps: a report costs ~2 s. Every step's metrics are kept in
   `train_metrics.json` in the saved folder.
8. The saved model: rank 0 loads the base model on CPU, puts the trained weights in (gathered
   one tensor at a time under ZeRO-3; with LoRA only the adapter is gathered, the base is the
   base), merges LoRA (`merge_and_unload`, in float32), saves bf16 safetensors with tokenizer and
   chat template, and reports the folder as the final checkpoint.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import resource
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from selfimprove.config import TrainConfig
from selfimprove.train.data import Example, collate, row_length, training_order
from selfimprove.train.launch import worker_print
from selfimprove.train.loss_names import needs_reference, needs_rejected
from selfimprove.train.losses import LOSSES, SequenceLogps, reward_metrics

DEFAULT_LR = {"full": 2e-5, "lora": 2e-4}
METRICS_FILE = "train_metrics.json"  # also marks a checkpoint as the finished model
STAT_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


class NonFiniteLoss(Exception):
    """Raised by every worker at the same micro-step when the global loss is NaN or inf."""

    def __init__(self, step: int, loss: float, checkpoint_step: int):
        super().__init__(step, loss, checkpoint_step)
        self.step, self.loss, self.checkpoint_step = step, loss, checkpoint_step

    def __str__(self) -> str:
        return f"loss is {self.loss} at step {self.step}"


def learning_rate(tc: TrainConfig) -> float:
    return tc.lr if tc.lr is not None else DEFAULT_LR["lora" if tc.lora else "full"]


def deepspeed_config(tc: TrainConfig, world: int, use_gpu: bool) -> dict:
    """The DeepSpeed config of a run: batch arithmetic, ZeRO, precision, AdamW, warm-up."""
    lr = learning_rate(tc)
    zero = {"stage": tc.zero_stage}
    if tc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    config = {
        "train_batch_size": tc.batch_size,
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.batch_size // (tc.micro_batch_size * world),
        "gradient_clipping": tc.grad_clip,
        "bf16": {"enabled": tc.precision == "bf16"},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": optimizer_params(tc, lr)},
        "steps_per_print": 10**9,  # we report metrics ourselves
        "wall_clock_breakdown": False,
    }
    if tc.warmup_steps:
        config["scheduler"] = {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": tc.warmup_steps, "warmup_type": "linear"}}
    return config


def optimizer_params(tc: TrainConfig, lr: float) -> dict:
    """AdamW's DeepSpeed `optimizer.params`, which also choose its implementation, on CPU and GPU alike.

    Without offload: torch's fused AdamW (`torch_adam`; DeepSpeed builds `torch.optim.AdamW(fused=True)`, for
    ZeRO 0-3 alike, on the fp32 master weights). DeepSpeed's default there, FusedAdam, is a CUDA op it compiles
    with nvcc at first use: a GPU node without nvcc, or with one of another CUDA version than torch's, failed
    the first training stage. On CPU torch's per-tensor loop took a third of a full fine-tuning step (measured).
    With `offload_optimizer` the step runs on the CPU copy, and DeepSpeed's ZeRO-Offload wants its own
    DeepSpeedCPUAdam (what the plain AdamW config gives there): a C++ op built with g++ and ninja into
    TORCH_EXTENSIONS_DIR, no nvcc (deepspeed 0.19.8 builds it with its CPU builder on CUDA nodes too).
    """
    params = {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": tc.weight_decay}
    if not tc.offload_optimizer:
        params.update(torch_adam=True, fused=True)
    return params


def loss_kwargs(tc: TrainConfig) -> dict:
    """The hyperparameters the configured loss takes, by keyword (the trainer never branches on the loss)."""
    offered = {"beta": tc.beta, "alpha": tc.alpha, "lam": tc.orpo_lambda, "label_smoothing": tc.label_smoothing,
               "nll_norm": tc.nll_norm}
    accepted = inspect.signature(LOSSES[tc.loss]).parameters
    return {k: v for k, v in offered.items() if k in accepted}


def sequence_logps(model, batch, device):
    """Summed response-token log-probs (float32) and response lengths of a `Batch`: [pairs] each for SFT rows,
    [2 x pairs] for pairs (chosen ones first, then rejected).

    Logits are kept from position `start - 1` on: the one predicting the first response token.
    """
    import torch

    dtype = next(model.parameters()).dtype
    # Additive, in the model's type: what both SDPA and eager attention take as a custom 4D mask.
    mask = torch.zeros(batch.attention.shape, dtype=dtype).masked_fill_(~batch.attention, torch.finfo(dtype).min)
    # Positions as an index tensor, not a count: the model slices its hidden states with it, and an
    # index makes a contiguous copy, while a partial slice makes the head's matmul broadcast its
    # 49k x 576 weight per sequence (2-3x slower for short batches on CPU, measured).
    keep = torch.arange(batch.start - 1, batch.input_ids.shape[1], device=device)
    out = model(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device),
                attention_mask=mask.to(device), use_cache=False, logits_to_keep=keep)
    logits = out.logits.float()
    at = (batch.predictors - (batch.start - 1)).to(device)
    rows = torch.arange(batch.pairs, device=device).unsqueeze(1)
    token_logps = logits[rows, at, batch.targets.to(device)] - torch.logsumexp(logits, dim=-1).gather(1, at)
    segments = batch.segments.to(device)
    masks = [segments == s for s in range(batch.completions)]
    return (torch.cat([(token_logps * m).sum(-1) for m in masks]),
            torch.cat([m.sum(-1) for m in masks]))


def init_distributed(use_gpu: bool) -> None:
    """DeepSpeed's communication on the process group Ray Train set up.

    On CPU DeepSpeed would first JIT-compile a shared-memory all-reduce: 25-30 s of a 2-core box's training stage,
    again for each venv (the build's hash holds its source paths), for an op only its inference tensor parallelism
    calls. Training reduces through torch.distributed, so the op is not built.
    """
    import importlib

    import deepspeed
    import torch.distributed as dist

    if not use_gpu:
        # By module path: the attribute deepspeed.comm.torch is the torch package, not this module.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=dist.get_backend())


def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker: set up, then optimizer steps in the data's order, epoch by epoch, with
    metrics reported and checkpoints taken on the way, then the model saved."""
    import ray.train

    worker = PolicyWorker(config)
    if not worker.setup():
        return  # a previous attempt finished and saved the model: nothing left to do
    tc, micro = worker.tc, worker.tc.micro_batch_size
    report = _Window()  # the steps since the last report
    while worker.epoch < tc.epochs and worker.steps < worker.total_steps:
        order = training_order(worker.shard, micro, tc.seed * 100_003 + worker.epoch, tc.group_by_length)
        for m in range(worker.start_micro, worker.micro_per_epoch, worker.accumulation):
            metrics = worker.step([order[i * micro:(i + 1) * micro] for i in range(m, m + worker.accumulation)])
            report.add(metrics)
            step = worker.steps
            if step % tc.report_every == 0 or step == worker.total_steps:
                row = {"step": step, "epoch": worker.epoch, **report.means()}
                ray.train.report(row)
                if worker.rank == 0:
                    _print_row(row, worker.total_steps, worker.use_rejected)
                report = _Window()
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < worker.total_steps:
                worker.checkpoint(micro=m + worker.accumulation)
            if step >= worker.total_steps:
                break
        else:
            worker.epoch, worker.start_micro = worker.epoch + 1, 0
    worker.save()


class PolicyWorker:
    """The policy's training on one Ray Train worker, in the parts torchtune's recipe classes have: `setup` (the
    DeepSpeed engine, this worker's shard, the checkpoint it resumes or the reference pass), `step` (one optimizer
    step), `checkpoint` and `save`. `train_worker` runs them in order."""

    def __init__(self, config: dict):
        self.config = config

    def setup(self) -> bool:
        """Everything before the first step; False if a previous attempt of this training saved the model."""
        import deepspeed
        import ray
        import ray.train
        import torch
        from ray.train.torch import get_device

        from selfimprove.models import home
        from selfimprove.precision import concrete
        from selfimprove.storage import local

        config = self.config
        tc: TrainConfig = config["train"]
        self.tc = tc = dataclasses.replace(tc, precision=concrete("train.precision", tc.precision))
        # Models fetched into this node's cache, if they came from storage_path.
        self.config = config = dict(config, model=local(config["model"]),
                                    reference=config["reference"] and local(config["reference"]))
        ctx = ray.train.get_context()
        self.rank, self.world = rank, world = ctx.get_world_rank(), ctx.get_world_size()
        # Ops DeepSpeed JIT-builds (its CPU Adam, with offload) are built once per machine and venv.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(home() / "torch_extensions"))
        if not config["use_gpu"]:
            torch.set_num_threads(config["cores"])
        torch.manual_seed(tc.seed)
        self.device = device = get_device()
        init_distributed(config["use_gpu"])
        self.ds_config = ds_config = deepspeed_config(tc, world, config["use_gpu"])
        model, zero3_loading = _load_model(config["model"], tc, ds_config)
        self.engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                               model_parameters=[p for p in model.parameters() if p.requires_grad])
        if zero3_loading is not None:
            # Rank 0 loads the base model again to save: a whole one, not a zero.Init collective
            # the other ranks would never join.
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            del zero3_loading

        self.shard = shard = ray.get(config["examples"])[rank::world]
        self.accumulation = ds_config["gradient_accumulation_steps"]
        self.micro_per_epoch = len(shard) // tc.micro_batch_size  # a multiple of `accumulation`: whole steps
        self.total_steps = min(tc.max_steps or math.inf, self.micro_per_epoch // self.accumulation * tc.epochs)
        self.steps, self.epoch, self.start_micro, self.references, self.reference_seconds = 0, 0, 0, None, 0.0
        self.checkpoint_step = 0  # the step of the newest checkpoint: a NaN names it
        self.history = []  # every optimizer step's metrics, for train_metrics.json; checkpoints carry it
        self.train_seconds, self.train_tokens, self.padded_tokens = 0.0, 0.0, 0

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                if (Path(folder) / METRICS_FILE).is_file():
                    return False
                _, state = self.engine.load_checkpoint(folder, tag="ds", load_module_strict=not tc.lora)
                # Saved only by a loss that reads them; the run's fingerprint holds the loss, so this is that loss.
                if needs_reference(tc.loss):
                    self.references = torch.load(Path(folder) / f"reference-{rank}.pt")
            self.steps, self.epoch, self.start_micro = state["step"], state["epoch"], state["micro"]
            self.history = state.get("history", [])
            self.checkpoint_step = self.steps
            if rank == 0:
                worker_print(f"resuming from the checkpoint of step {self.steps}")
        elif needs_reference(tc.loss):
            t0 = time.perf_counter()
            if config.get("reference"):
                self.references = _separate_reference_logps(config["reference"], shard, tc, config["pad_id"], device,
                                                            ds_config)
            else:
                self.references = _reference_logps(self.engine, shard, tc, config["pad_id"], device,
                                                   self.engine.module.disable_adapter() if tc.lora else nullcontext())
            self.reference_seconds = time.perf_counter() - t0
            if rank == 0:
                worker_print(f"reference log-probs of {len(shard)} examples per worker in "
                             f"{self.reference_seconds:.1f} s")

        self.loss_fn, self.hyper = LOSSES[tc.loss], loss_kwargs(tc)
        self.use_rejected = needs_rejected(tc.loss) and shard[0].rejected is not None
        self.engine.train()
        return True

    def step(self, batch: list[list[int]]) -> dict:
        """One optimizer step over `batch`, its micro-batches (positions in the shard), each a forward pass, its
        loss's metrics all-reduced over the workers, and a backward pass. Returns the step's global metrics (their
        means over its micro-batches), tokens and seconds; kept in the history too.

        A NaN or inf loss on any worker stops every worker at the same micro-batch, before its backward pass
        (`NonFiniteLoss`)."""
        import torch
        import torch.distributed as dist

        engine, device, window = self.engine, self.device, _Window()
        for idx in batch:
            t0 = time.perf_counter()
            rows = collate([self.shard[i] if self.use_rejected else _chosen_only(self.shard[i]) for i in idx],
                           self.config["pad_id"])
            self.padded_tokens += rows.input_ids.numel()
            logps, lengths = sequence_logps(engine, rows, device)
            n = rows.pairs
            fields = dict(policy_chosen=logps[:n], chosen_lengths=lengths[:n])
            if self.use_rejected:
                fields.update(policy_rejected=logps[n:], rejected_lengths=lengths[n:])
            if self.references is not None:
                ref = self.references[idx].to(device)
                fields.update(ref_chosen=ref[:, 0], ref_rejected=ref[:, 1])
            out = self.loss_fn(SequenceLogps(**fields), **self.hyper)
            loss = out.losses.mean()
            stats = torch.tensor([loss.item(), *reward_metrics(out).values(), rows.tokens], device=device)
            dist.all_reduce(stats)  # one collective: global metrics, and every worker sees a NaN
            stats[:-1] /= self.world
            if not math.isfinite(stats[0].item()):
                raise NonFiniteLoss(self.steps + 1, stats[0].item(), self.checkpoint_step)
            engine.backward(loss)
            engine.step()
            seconds = time.perf_counter() - t0
            window.add(dict(zip(STAT_KEYS, stats[:-1].tolist())) | {"tokens": stats[-1].item(), "seconds": seconds})
        metrics = window.summary()
        self.steps += 1
        self.train_seconds += metrics["seconds"]
        self.train_tokens += metrics["tokens"]
        self.history.append({"step": self.steps, "epoch": self.epoch, "lr": engine.get_lr()[0], **window.means()})
        return metrics

    def checkpoint(self, micro: int) -> None:
        """A DeepSpeed checkpoint at this step, the next micro-batch of the epoch `micro`, with this worker's
        reference log-probs, persisted by Ray Train."""
        position = {"step": self.steps, "epoch": self.epoch, "micro": micro, "history": self.history}
        _save_checkpoint(self.engine, self.references, self.rank, position, self.history[-1])
        self.checkpoint_step = self.steps

    def save(self) -> None:
        """The summary of the training, and the trained model (rank 0 writes it) as the final checkpoint."""
        import ray.train
        import torch
        import torch.distributed as dist

        tc, world, step = self.tc, self.world, self.steps
        peaks = [None] * world
        dist.all_gather_object(peaks, _peak_memory_gib(self.device))
        padded = torch.tensor([self.padded_tokens], dtype=torch.float64, device=self.device)
        dist.all_reduce(padded)
        summary = {
            "steps": step, "epochs": tc.epochs, "workers": world, "tokens": int(self.train_tokens),
            "train_seconds": round(self.train_seconds, 2), "reference_seconds": round(self.reference_seconds, 2),
            "seconds_per_step": round(self.train_seconds / max(step, 1), 3),
            "tokens_per_s": round(self.train_tokens / max(self.train_seconds, 1e-9), 1),
            "padding_share": round(1 - self.train_tokens / padded.item(), 4) if padded.item() else 0.0,
            "peak_memory_gib": peaks, "lr": learning_rate(tc), "loss": tc.loss, "lora": tc.lora,
            "zero_stage": tc.zero_stage, "precision": tc.precision, **self.config["counts"],
            "final": self.history[-1] if self.history else {},
        }
        with tempfile.TemporaryDirectory() as folder:
            _save_model(self.engine, tc, self.config["model"], Path(folder), self.rank,
                        {"summary": summary, "steps": self.history})
            ray.train.report(summary, checkpoint=ray.train.Checkpoint.from_directory(folder) if self.rank == 0 else None,
                             checkpoint_dir_name="model")


class _Window:
    """Sums of global metrics over some micro-batches or steps, with their tokens and seconds."""

    def __init__(self):
        self._sums, self.count = dict.fromkeys((*STAT_KEYS, "tokens", "seconds"), 0.0), 0

    def add(self, metrics: dict) -> None:
        for k in self._sums:
            self._sums[k] += metrics[k]
        self.count += 1

    def summary(self) -> dict:
        """The means of the metrics, and the tokens and seconds in all: what a step returns, and adds to a report's
        window of steps (each of as many micro-batches, so the means of its steps' means are its micro-batches')."""
        return {k: v / self.count if k in STAT_KEYS else v for k, v in self._sums.items()}

    def means(self) -> dict:
        """The means of the metrics, and tokens per second."""
        return {k: self._sums[k] / self.count for k in STAT_KEYS} | {
            "tokens_per_s": self._sums["tokens"] / max(self._sums["seconds"], 1e-9)}


def _load_model(path: str, tc: TrainConfig, ds_config: dict):
    """The policy (LoRA-wrapped if asked) and, under ZeRO-3, the object that must outlive loading."""
    import torch
    from transformers import AutoModelForCausalLM

    keep = None
    if tc.zero_stage == 3:
        # While this object lives, from_pretrained loads each rank's partition only (zero.Init):
        # a model too big for one device never sits whole on one.
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)
    dtype = torch.bfloat16 if tc.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.config.use_cache = False
    if tc.gradient_checkpointing:
        # Non-reentrant checkpointing needs no inputs that require grad, so LoRA's frozen embeddings are fine.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tc.lora:
        from peft import get_peft_model

        # Adapters in the base weights' type, not PEFT's default float32: DeepSpeed casts a model to bf16 at
        # initialize, but not one zero.Init built (ZeRO-3), whose fp32 adapters then sat beside bf16 weights.
        # Under bf16 the optimizer keeps float32 master copies of the adapters either way.
        model = get_peft_model(model, lora_config(tc), autocast_adapter_dtype=False)
    return model, keep


def lora_config(tc: TrainConfig):
    from peft import LoraConfig

    targets = "all-linear" if tc.lora_targets == ["all-linear"] else list(tc.lora_targets)
    return LoraConfig(r=tc.lora_r, lora_alpha=tc.lora_alpha, lora_dropout=tc.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")


def _chosen_only(e: Example) -> Example:
    return Example(e.prompt, e.chosen, None)


def _load_reference(path: str, tc: TrainConfig, device, ds_config: dict):
    """A separate reference model in the type training computes in: whole on this worker, or, when ZeRO-3 shards
    the policy, sharded as it is (loaded under zero.Init, in a DeepSpeed engine without optimizer whose forward
    gathers each layer's weights in turn), so a reference too big for one device never sits whole on one."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if tc.precision == "bf16" else torch.float32
    if tc.zero_stage != 3:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    loading = HfDeepSpeedConfig(ds_config)  # noqa: F841 (from_pretrained shards while it lives)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    finally:
        unset_hf_deepspeed_config()
    engine, *_ = deepspeed.initialize(model=model, config=inference_config(ds_config))
    return engine


def inference_config(ds_config: dict) -> dict:
    """The training config without what an engine that only runs forward passes has no use for: the optimizer,
    its schedule and its offload."""
    zero = {k: v for k, v in ds_config["zero_optimization"].items() if k != "offload_optimizer"}
    return {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")} | {"zero_optimization": zero}


def _separate_reference_logps(path: str, shard: list[Example], tc: TrainConfig, pad_id: int, device, ds_config: dict):
    """`_reference_logps` by the separate reference model at `path`, whose memory is freed before training takes
    it (a ZeRO-3 engine's hooks removed, the CUDA cache emptied)."""
    import gc

    import torch

    model = _load_reference(path, tc, device, ds_config)
    try:
        return _reference_logps(model, shard, tc, pad_id, device)
    finally:
        if hasattr(model, "destroy"):
            model.destroy()
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _reference_logps(model, shard: list[Example], tc: TrainConfig, pad_id: int, device, adapter_off=nullcontext()):
    """[len(shard), 2] summed reference log-probs of chosen and rejected, in shard order, by `model` (the policy's
    engine before its first step, inside `adapter_off`, or a separate reference).

    Micro-batches taken in length order, to pad little (larger batches were slower on CPU,
    measured). Every worker runs the same number of them: ZeRO-3 gathers in each forward.
    """
    import torch

    order = sorted(range(len(shard)), key=lambda i: row_length(shard[i]))
    size = tc.micro_batch_size
    out = torch.zeros(len(shard), 2)
    model.eval()
    with torch.no_grad(), adapter_off:
        for i in range(0, len(shard), size):
            idx = order[i:i + size]
            batch = collate([shard[j] for j in idx], pad_id)
            logps, _ = sequence_logps(model, batch, device)
            out[idx] = torch.stack([logps[:batch.pairs], logps[batch.pairs:]], dim=1).float().cpu()
    model.train()
    return out


def _save_checkpoint(engine, references, rank: int, position: dict, metrics: dict) -> None:
    """A DeepSpeed checkpoint plus this worker's reference log-probs, persisted by Ray Train."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag="ds", client_state=position,
                               exclude_frozen_parameters=bool(getattr(engine.module, "peft_config", None)))
        if references is not None:
            torch.save(references, Path(folder) / f"reference-{rank}.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=checkpoint_name(position["step"]))


def _save_model(engine, tc: TrainConfig, base: str, folder: Path, rank: int, log: dict) -> None:
    """Rank 0 writes the trained model as a bf16 HF folder; every rank takes part in ZeRO-3 gathers."""
    import deepspeed
    import torch

    state = {}
    for name, p in engine.module.named_parameters():
        if tc.lora and not p.requires_grad:
            continue  # the frozen base is the base model's own weights
        with deepspeed.zero.GatheredParameters([p], enabled=tc.zero_stage == 3):
            if rank == 0:
                state[name] = p.detach().to("cpu", copy=True)
    if rank != 0:
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if tc.lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(tc))
    named = dict(model.named_parameters())  # tied weights appear once
    loaded = model.load_state_dict(state, strict=False)
    lost = [k for k in loaded.missing_keys if k in named and (not tc.lora or "lora_" in k)]
    if loaded.unexpected_keys or lost:
        raise RuntimeError(f"trained weights do not fit the base model: unexpected {loaded.unexpected_keys[:3]}, "
                           f"missing {lost[:3]}")
    if tc.lora:
        model = model.merge_and_unload()  # W + (alpha/r)·BA in float32, then one rounding to bf16
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)  # tokenizer and chat template
    (folder / METRICS_FILE).write_text(json.dumps(log, indent=1))


def _peak_memory_gib(device) -> float:
    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB on Linux


def _print_row(row: dict, total: int, preference: bool) -> None:
    # SFT has no rejected response, so its reward accuracy and margin say nothing.
    rewards = f"reward acc {row['rewards/accuracies']:.2f}  margin {row['rewards/margins']:.4f}  " if preference else ""
    worker_print(f"step {row['step']}/{total}  loss {row['loss']:.4f}  {rewards}{row['tokens_per_s']:.0f} tokens/s")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"

"""The train stage: preference pairs (or SFT rows) -> a Hugging Face model folder, on Ray Train + DeepSpeed.

1. Everything that can be wrong with the input fails on the driver before Ray starts: the
   settings are cross-checked, the data is read, checked and tokenised (drops and truncations
   counted, see data.py), and LoRA targets are looked up among the model's module names (the
   model is built on the meta device: no weights are read).
2. A `TorchTrainer` runs `num_workers` workers, one GPU each on a GPU cluster (NCCL) or a share
   of the cores on a CPU node (gloo). Each wraps the model in `deepspeed.initialize` (ZeRO
   stage, optimizer offload and bf16 from the config), reusing the process group Ray Train set up.
3. The driver shuffles the examples once (seeded) and keeps a whole number of optimizer steps;
   worker r takes every num_workers-th example from r, and reshuffles its shard each epoch with
   a seed all workers share. Every worker does the same number of micro-steps, as the
   collectives of DeepSpeed need.
4. Reference log-probs are computed once, before the first step, over the worker's shard, and
   kept beside it (and in every checkpoint): never per step. Full fine-tuning reads them off the
   model before it moves; with LoRA they come from the same model inside `disable_adapter()`,
   so no second copy of the model exists either way. A separate reference model (`reference`)
   is loaded for that pass only, then dropped: whole on each worker, or sharded under ZeRO-3 as
   the policy is. Losses that need none (sft, orpo) skip it.
5. One forward pass per micro-batch, a row per pair holding its prompt once, then chosen and
   rejected, padded to the batch's longest (data.py, point 6). Logits are computed only from
   the first response position on (`logits_to_keep`): prompt positions need none, and a
   49k-word head is a fifth of a 135M model's work. Token
   log-probs are gathered and summed in float32.
6. Every micro-step all-reduces [loss, rewards, tokens] over the workers: the metrics are global,
   and a NaN or inf on any worker stops all of them at the same micro-step, before its backward
   pass. The driver then names the step and the last good checkpoint, which it keeps.
7. Every `checkpoint_every` steps a DeepSpeed checkpoint (with the reference log-probs and the
   position in the data) goes through `ray.train.report`; Ray Train persists it under
   `<storage_path>/checkpoints`, keeps the newest, and hands it back (`get_checkpoint`) when a run of the same
   model, data and settings starts again, which resumes there.
8. Metrics (loss, rewards, reward accuracy, margin, tokens/s) go to `ray.train.report` every
   `report_every` steps: a report costs ~2 s. Every step's metrics are kept in
   `train_metrics.json` in the saved folder.
9. The saved model: rank 0 loads the base model on CPU, puts the trained weights in (gathered
   one tensor at a time under ZeRO-3; with LoRA only the adapter is gathered, the base is the
   base), merges LoRA (`merge_and_unload`, in float32), saves bf16 safetensors with tokenizer and
   chat template, and reports the folder as the final checkpoint; the driver copies it into the
   stage output (a scratch folder renamed when complete).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import pickle
import resource
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from selfimprove.config import Config, TrainConfig, check_knobs, to_dict
from selfimprove.errors import UserError
from selfimprove.io import check_replaceable, claim_folder, model_digest, remove_ours, stage_output
from selfimprove.resources import check_resources
from selfimprove.storage import shared
from selfimprove.train.data import Example, collate, padding_id, read_rows, row_length, tokenize, training_order
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

    import ray

    from selfimprove.runtime import init_ray

    init_ray()
    use_gpu, cores, resources = worker_resources(tc)
    reference = reference and check_reference(reference, model_path)
    run = "train-" + fingerprint(model_path, to_dict(tc), examples, reference)
    storage = checkpoint_storage(cfg.storage_path, out, checkpoints)
    worker_config = {
        "train": tc, "model": shared(model_path), "reference": reference and shared(reference),
        "examples": ray.put(examples), "use_gpu": use_gpu,
        "cores": cores,
        "pad_id": padding_id(tokenizer),
        "counts": vars(counts) | {"unused": counts.examples - len(examples)},
    }

    def explain(cause: BaseException) -> str | None:
        if not isinstance(cause, NonFiniteLoss):
            return None
        where = (f"the last good checkpoint (step {cause.checkpoint_step}) is kept in "
                 f"{storage}/{run}/{_checkpoint_name(cause.checkpoint_step)}" if cause.checkpoint_step else
                 f"no checkpoint was saved before it (train.checkpoint_every={tc.checkpoint_every})")
        return f"{cause}: training stopped; {where}"

    checkpoint = launch(train_worker, worker_config, tc, use_gpu, resources, run, storage, explain).checkpoint
    with stage_output(out) as scratch:
        if checkpoint is None:
            raise UserError("training ended without a saved model")
        checkpoint.to_directory(str(scratch))
        if not (scratch / METRICS_FILE).is_file():
            raise UserError(f"training ended without a saved model ({checkpoint.path} is not one)")
        summary = json.loads((scratch / METRICS_FILE).read_text())["summary"]
    release_storage(cfg.storage_path, storage, run)
    return summary


def worker_resources(tc: TrainConfig) -> tuple[bool, int, dict]:
    """(use_gpu, cores per worker, Ray resources per worker) of `tc.num_workers` Ray Train workers on this cluster."""
    import ray

    from selfimprove.runtime import node_cpus

    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    cores = tc.cpus_per_worker or (1 if use_gpu else max(node_cpus() // tc.num_workers, 1))
    return use_gpu, cores, {"CPU": cores, **({"GPU": 1} if use_gpu else {})}


def checkpoint_storage(storage_path: str | None, out: Path, checkpoints: Path | None) -> str:
    """Where Ray Train keeps a training's checkpoints: `<storage_path>/checkpoints` (every worker's node reaches it),
    else `checkpoints`, else `<out>.ray`. A folder is given as an absolute path: Ray Train reads a relative one
    (`run_dir=runs/local`) as a URI, and fails."""
    from selfimprove.storage import location

    if storage_path:
        return f"{location(storage_path)}/checkpoints"
    return str(claim_folder(checkpoints or out.with_name(out.name + ".ray")).resolve())


def release_storage(storage_path: str | None, storage: str, run: str) -> None:
    """Remove the checkpoints once the model is saved: our scratch folder, or the training's own folder in
    `storage_path` (named by its fingerprint, so no other training's)."""
    from selfimprove.storage import release

    if storage_path is None:
        remove_ours(Path(storage))
    else:
        release(storage, run)


def launch(worker, worker_config: dict, tc: TrainConfig, use_gpu: bool, resources: dict, run: str, storage: str,
           explain=None):
    """Run `worker(worker_config)` on `tc.num_workers` Ray Train workers; return Ray Train's result.

    Checkpoints go to `storage/run`, the newest kept. A worker group that fails (a worker's process, or its node,
    lost) starts again from that checkpoint, at most `train.worker_restarts` times, and so does one that could not
    be started (Ray Train would retry that without end); then the failure is one line (`fit`).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        worker,
        train_loop_config=worker_config,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run, storage_path=storage, checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=tc.worker_restarts,
                                                          controller_failure_limit=tc.worker_restarts)),
    )
    return fit(trainer, explain)


def fit(trainer, explain=None):
    """`trainer.fit()`, a worker's failure made one `UserError` line: `explain(cause)`'s text if it gives one,
    a worker's own `UserError`, or the exception's type and last line."""
    import ray.train

    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        cause = _worker_exception(e)
        message = explain(cause) if explain else None
        if message:
            raise UserError(message) from None
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        lines = str(cause).strip().splitlines()
        raise UserError(f"training failed: {type(cause).__name__}: {lines[-1] if lines else ''}"[:300]) from e


def check_lora_targets(model_path: str, targets: list[str]) -> None:
    """Every LoRA target must name a module of the model (PEFT's rule: the name or its last dotted parts)."""
    if targets == ["all-linear"]:
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):  # module names only: no memory, no weights read
        model = AutoModelForCausalLM.from_config(config)
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(f"train.lora_targets: {', '.join(missing)} not in {type(model).__name__} "
                        f"(its linear layers: {', '.join(linear)}; or use [all-linear])")


def check_reference(reference: str, policy: str) -> str:
    """The resolved reference model; UserError if it reads text as other token ids than the policy."""
    from selfimprove.models import check_tokenizer, resolve_model

    path = resolve_model(reference)
    if path != policy:
        check_tokenizer(path, policy, "(models.reference) has",
                        "a DPO reference scores the policy's token ids; use a reference with the policy's tokenizer")
    return path


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


# ---------------------------------------------------------------------------------------------
# On each Ray Train worker.


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
    """Ray Train's train_loop_per_worker: DeepSpeed set-up, reference pass, training loop, save."""
    import deepspeed
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.torch import get_device

    from selfimprove.models import home
    from selfimprove.precision import concrete
    from selfimprove.storage import local

    tc: TrainConfig = config["train"]
    tc = dataclasses.replace(tc, precision=concrete("train.precision", tc.precision))
    # Models fetched into this node's cache, if they came from storage_path.
    config = dict(config, model=local(config["model"]), reference=config["reference"] and local(config["reference"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Ops DeepSpeed JIT-builds (its CPU Adam, with offload) are built once per machine and venv.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(home() / "torch_extensions"))
    if not config["use_gpu"]:
        torch.set_num_threads(config["cores"])
    torch.manual_seed(tc.seed)
    device = get_device()
    init_distributed(config["use_gpu"])
    ds_config = deepspeed_config(tc, world, config["use_gpu"])
    model, zero3_loading = _load_model(config["model"], tc, ds_config)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    if zero3_loading is not None:
        # Rank 0 loads the base model again to save: a whole one, not a zero.Init collective
        # the other ranks would never join.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        del zero3_loading

    shard: list[Example] = ray.get(config["examples"])[rank::world]
    micro, accumulation = tc.micro_batch_size, ds_config["gradient_accumulation_steps"]
    micro_per_epoch = len(shard) // micro  # a multiple of `accumulation`: the driver kept whole steps
    total_steps = min(tc.max_steps or math.inf, micro_per_epoch // accumulation * tc.epochs)
    step, epoch, start_micro, references, reference_seconds = 0, 0, 0, None, 0.0
    checkpoint_step = 0  # the step of the newest checkpoint: a NaN names it
    history = []  # every optimizer step's metrics, for train_metrics.json; checkpoints carry it

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            if (Path(folder) / METRICS_FILE).is_file():
                return  # a previous attempt finished and saved the model: nothing left to do
            _, state = engine.load_checkpoint(folder, tag="ds", load_module_strict=not tc.lora)
            # Saved only by a loss that reads them; the run's fingerprint holds the loss, so this is that loss.
            if needs_reference(tc.loss):
                references = torch.load(Path(folder) / f"reference-{rank}.pt")
        step, epoch, start_micro, history = state["step"], state["epoch"], state["micro"], state.get("history", [])
        checkpoint_step = step
        if rank == 0:
            worker_print(f"resuming from the checkpoint of step {step}")
    elif needs_reference(tc.loss):
        t0 = time.perf_counter()
        if config.get("reference"):
            references = _separate_reference_logps(config["reference"], shard, tc, config["pad_id"], device, ds_config)
        else:
            references = _reference_logps(engine, shard, tc, config["pad_id"], device,
                                          engine.module.disable_adapter() if tc.lora else nullcontext())
        reference_seconds = time.perf_counter() - t0
        if rank == 0:
            worker_print(f"reference log-probs of {len(shard)} examples per worker in {reference_seconds:.1f} s")

    loss_fn, hyper = LOSSES[tc.loss], loss_kwargs(tc)
    use_rejected = needs_rejected(tc.loss) and shard[0].rejected is not None
    window, report = _Window(), _Window()  # this optimizer step's micro-steps; since the last report
    train_seconds, train_tokens, padded_tokens = 0.0, 0.0, 0
    engine.train()
    while epoch < tc.epochs and step < total_steps:
        order = training_order(shard, micro, tc.seed * 100_003 + epoch, tc.group_by_length)
        for m in range(start_micro, micro_per_epoch):
            t0 = time.perf_counter()
            idx = order[m * micro:(m + 1) * micro]
            batch = collate([shard[i] if use_rejected else _chosen_only(shard[i]) for i in idx], config["pad_id"])
            padded_tokens += batch.input_ids.numel()
            logps, lengths = sequence_logps(engine, batch, device)
            n = batch.pairs
            fields = dict(policy_chosen=logps[:n], chosen_lengths=lengths[:n])
            if use_rejected:
                fields.update(policy_rejected=logps[n:], rejected_lengths=lengths[n:])
            if references is not None:
                ref = references[idx].to(device)
                fields.update(ref_chosen=ref[:, 0], ref_rejected=ref[:, 1])
            out = loss_fn(SequenceLogps(**fields), **hyper)
            loss = out.losses.mean()
            stats = torch.tensor([loss.item(), *reward_metrics(out).values(), batch.tokens], device=device)
            dist.all_reduce(stats)  # one collective: global metrics, and every worker sees a NaN
            stats[:-1] /= world
            if not math.isfinite(stats[0].item()):
                raise NonFiniteLoss(step + 1, stats[0].item(), checkpoint_step)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.backward(loss)
            engine.step()
            train_seconds += time.perf_counter() - t0
            train_tokens += stats[-1].item()
            for w in (window, report):
                w.add(stats, time.perf_counter() - t0)
            if not boundary:
                continue
            step += 1
            history.append({"step": step, "epoch": epoch, "lr": engine.get_lr()[0], **window.means(),
                             "tokens_per_s": window.tokens_per_s()})
            window = _Window()
            if step % tc.report_every == 0 or step == total_steps:
                row = {"step": step, "epoch": epoch, **report.means(), "tokens_per_s": report.tokens_per_s()}
                ray.train.report(row)
                if rank == 0:
                    _print_row(row, total_steps, use_rejected)
                report = _Window()
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < total_steps:
                _save_checkpoint(engine, references, rank,
                                 {"step": step, "epoch": epoch, "micro": m + 1, "history": history}, history[-1])
                checkpoint_step = step
            if step >= total_steps:
                break
        else:
            epoch, start_micro = epoch + 1, 0

    peaks = [None] * world
    dist.all_gather_object(peaks, _peak_memory_gib(device))
    padded = torch.tensor([padded_tokens], dtype=torch.float64, device=device)
    dist.all_reduce(padded)
    summary = {
        "steps": step, "epochs": tc.epochs, "workers": world, "tokens": int(train_tokens),
        "train_seconds": round(train_seconds, 2), "reference_seconds": round(reference_seconds, 2),
        "seconds_per_step": round(train_seconds / max(step, 1), 3),
        "tokens_per_s": round(train_tokens / max(train_seconds, 1e-9), 1),
        "padding_share": round(1 - train_tokens / padded.item(), 4) if padded.item() else 0.0,
        "peak_memory_gib": peaks, "lr": learning_rate(tc), "loss": tc.loss, "lora": tc.lora,
        "zero_stage": tc.zero_stage, "precision": tc.precision, **config["counts"],
        "final": history[-1] if history else {},
    }
    with tempfile.TemporaryDirectory() as folder:
        _save_model(engine, tc, config["model"], Path(folder), rank, {"summary": summary, "steps": history})
        ray.train.report(summary, checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None,
                         checkpoint_dir_name="model")


class _Window:
    """Sums of the global metrics over some micro-steps, and their tokens and seconds."""

    def __init__(self):
        self.sums, self.count, self.tokens, self.seconds = None, 0, 0.0, 0.0

    def add(self, stats, seconds: float) -> None:
        values = stats[:-1].tolist()
        self.sums = values if self.sums is None else [a + b for a, b in zip(self.sums, values)]
        self.count += 1
        self.tokens += stats[-1].item()
        self.seconds += seconds

    def means(self) -> dict:
        return {k: v / self.count for k, v in zip(STAT_KEYS, self.sums)}

    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


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
                         checkpoint_dir_name=_checkpoint_name(position["step"]))


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


def worker_print(line: str) -> None:
    """One line from a Ray Train worker to the driver's console.

    Ray Train replaces `print` on its workers with one that writes the line and also logs it, and the log
    reaches the console as well: every printed line showed twice. A plain write goes out once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def whole_steps(examples: list, batch_size: int, seed: int) -> list:
    """A seeded shuffle, cut to a whole number of optimizer steps (fewer than batch_size left out, counted)."""
    import random

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    usable = len(examples) - len(examples) % batch_size
    return [examples[i] for i in order[:usable]]


def fingerprint(model: str, settings: dict, data, reference: str | None = None) -> str:
    """Same model (and reference), settings and data -> same Ray Train run name, so a restarted run resumes its
    checkpoints.

    A model counts by its files' bytes, not its path (`io.model_digest`): a model rewritten at the same path (a
    redone train stage) is another model, whose training must not resume the old one's checkpoints; the same files
    at another path (a moved run dir, a copy in another node's cache) are the same model, whose checkpoints fit it.
    """
    models = [model_digest(model), reference and model_digest(reference)]
    h = hashlib.sha256(json.dumps([models, settings], sort_keys=True).encode())
    h.update(pickle.dumps(data))
    return h.hexdigest()[:12]


def _checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def _worker_exception(e: Exception) -> BaseException:
    """The exception a worker's code raised, out of Ray Train's wrappers."""
    failures = getattr(e, "worker_failures", None)
    inner = next(iter(failures.values())) if failures else getattr(e, "controller_failure", e)
    # Ray Train V2 wraps a worker's exception with its traceback text (`_base_exc`).
    while getattr(inner, "_base_exc", None) is not None or getattr(inner, "cause", None) is not None:
        inner = getattr(inner, "_base_exc", None) or inner.cause
    return inner

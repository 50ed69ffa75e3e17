"""A trained process reward model (PRM): a token classifier that values steps without simulation.

1. Training data are the Monte Carlo step values (`mc_prm.py`) of earlier iterations. A sample
   is one sequence: the prompt as the rollout templated it (`prompt_text`, tokenised without
   special tokens: the template holds them), then the sample text tokenised on its own, as
   `train/data.py` does. A step's label sits on the token holding the step's last character,
   its target the step's value (soft, or 0/1 from hard labels and first-error search). Steps
   with no value (too long for MC) give no label. Last steps (value = the sample's outcome) are
   labels too: they teach the PRM what a finished right path looks like.
2. Model: `AutoModelForTokenClassification` with one label on the backbone (`process.
   prm_backbone`, default the run's starting model): the backbone's weights and a new linear
   head. The loss is binary cross-entropy with logits at the labelled tokens only, their mean.
3. A sequence is cut to `process.prm_max_len` tokens; a step whose last token is past it is no
   label (counted), and a sample left with no label is dropped (counted). The model is causal:
   the logit at a step's last token never sees later text, so one pass labels every step.
4. Training runs on Ray Train's `TorchTrainer`: `train.num_workers` workers (gloo on CPU; NCCL
   and one GPU each on a GPU cluster), `prepare_model` (DDP across workers), AdamW at
   `process.prm_lr`, `process.prm_batch_size` samples a step summed over the workers, a seeded
   shuffle each epoch, whole steps only. Rank 0 saves a Hugging Face folder: bf16 weights, the
   tokenizer, and `prm.json` (backbone, max_len, tokenizer hash, per-step losses).
5. Scoring writes `steps.parquet` in mc_prm's STEP_SCHEMA, so path scores and pairs downstream are
   unchanged: source "trained", rollouts 0, reached null. As in mc_prm, the last step's value is
   the sample's own outcome (source "outcome"): the verifier knows it exactly, and scores stay
   comparable with the MC iterations'. So a single-step sample is its outcome alone and costs no
   forward pass; a sample with no step has no row. A step past `prm_max_len`: value null, source
   `skipped=too_long`, counted.
6. The PRM reads the policy's token ids, so it must share the policy's tokenizer: a checkpoint
   whose tokenizer's vocabulary differs is refused with one line when it is loaded.
7. Scoring is one Ray task (one GPU if the cluster has one, else a node's cores), in a worker process that
   exits after it, so the next stage finds the GPU free (`scoring_task`): sequences
   sorted by length, `prm_batch_size` to a forward pass, right-padded, each cut after its last
   step that is scored.
"""

from __future__ import annotations

import bisect
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from selfimprove.config import Config, ProcessConfig
from selfimprove.errors import UserError
from selfimprove.io import read_table
from selfimprove.models import check_tokenizer, tokenizer_hash
from selfimprove.reward.mc_prm import OUTCOME, scorable_samples, write_stage
from selfimprove.rollout.generator import SKIPPED
from selfimprove.storage import local, shared

TRAINED = "trained"  # a step's source: the PRM's prediction
PRM_FILE = "prm.json"  # beside the weights: backbone, max_len, tokenizer hash, training log


@dataclass(frozen=True)
class PRMExample:
    """One sample as a sequence: token ids, and the positions of its labelled steps with their targets."""

    ids: list[int]
    positions: list[int]
    targets: list[float]


# -- the math: pure functions ----------------------------------------------------------------

def token_at(offsets: list[tuple[int, int]], char_end: int) -> int:
    """Index of the token holding character `char_end - 1`: the last token starting before `char_end`.

    `offsets` are the (start, end) character spans of a text's tokens, in order.
    """
    return bisect.bisect_left([start for start, _ in offsets], char_end) - 1


def step_positions(prompt_len: int, offsets: list[tuple[int, int]], ends: list[int], max_len: int) -> list[int | None]:
    """Sequence position of each step's last token (steps ending at characters `ends` of the sample text),
    after a prompt of `prompt_len` tokens; None for one at or past `max_len`."""
    positions = [prompt_len + token_at(offsets, end) for end in ends]
    return [p if p < max_len else None for p in positions]


def masked_bce(logits, targets, mask):
    """Mean binary cross-entropy with logits over the positions `mask` marks ([B, T] tensors); 0 with none."""
    import torch

    losses = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return (losses * mask).sum() / mask.sum().clamp(min=1)


def collate(examples: list[PRMExample], pad_id: int):
    """(input_ids, attention_mask, targets, label mask) [B, longest]: right-padded; targets 0 where no label."""
    import torch

    length = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    targets = torch.zeros((len(examples), length))
    mask = torch.zeros((len(examples), length))
    for b, e in enumerate(examples):
        ids[b, :len(e.ids)] = torch.tensor(e.ids)
        attention[b, :len(e.ids)] = 1
        targets[b, e.positions] = torch.tensor(e.targets)
        mask[b, e.positions] = 1
    return ids, attention, targets, mask


# -- tokens ----------------------------------------------------------------------------------

class Encoder:
    """(prompt ids, sample text ids, the text's token character spans) of a sample, as the rollout tokenised it."""

    def __init__(self, tokenizer):
        if not tokenizer.is_fast:
            raise UserError(f"the trained PRM needs a fast tokenizer (character offsets); {tokenizer.name_or_path} has none")
        self.tokenizer = tokenizer

    def __call__(self, prompt_text: str, text: str) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        prompt = self.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        body = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return prompt, body["input_ids"], [tuple(o) for o in body["offset_mapping"]]


# -- training data ---------------------------------------------------------------------------

def training_examples(samples: list[dict], steps: list[dict], encode, max_len: int) -> tuple[list[PRMExample], dict]:
    """PRM examples from one iteration's sample rows and its MC step rows (STEP_SCHEMA), and counts.

    Counts: samples with step rows, labels kept, labels with no value, labels past max_len,
    samples dropped for having no label left, examples.
    """
    by_sample: dict[tuple[str, int], list[dict]] = {}
    for row in steps:
        by_sample.setdefault((row["problem_id"], row["sample_index"]), []).append(row)
    counts = {"samples": 0, "labels": 0, "unvalued": 0, "too_long": 0, "no_label": 0, "examples": 0}
    examples = []
    for s in sorted(samples, key=lambda s: (s["problem_id"], s["sample_index"])):
        rows = sorted(by_sample.get((s["problem_id"], s["sample_index"]), []), key=lambda r: r["step_index"])
        if not rows:
            continue
        counts["samples"] += 1
        prompt, body, offsets = encode(s["prompt_text"], s["text"])
        positions = step_positions(len(prompt), offsets, [r["end"] for r in rows], max_len)
        kept = []
        for r, p in zip(rows, positions):
            if r["value"] is None:
                counts["unvalued"] += 1
            elif p is None:
                counts["too_long"] += 1
            else:
                kept.append((p, r["value"]))
        if not kept:
            counts["no_label"] += 1
            continue
        counts["labels"] += len(kept)
        ids = (prompt + body)[:max(p for p, _ in kept) + 1]
        examples.append(PRMExample(ids, [p for p, _ in kept], [v for _, v in kept]))
    counts["examples"] = len(examples)
    return examples, counts


def read_iteration(it: Path) -> tuple[list[dict], list[dict]]:
    """An iteration folder's sample rows (rollout stage) and step rows (process stage)."""
    return read_table(it / "rollout" / "samples").to_pylist(), pq.read_table(it / "process" / "steps.parquet").to_pylist()


# -- training --------------------------------------------------------------------------------

def train_prm(cfg: Config, backbone: str, iterations: list[Path], out: str | Path,
              checkpoints: Path | None = None) -> dict:
    """Train a PRM on `backbone` from the MC-scored `iterations` folders; write the model folder `out`. Returns the
    summary. Launched as the policy's training is, checkpoints and all (`selfimprove.train.launch`)."""
    from transformers import AutoConfig, AutoTokenizer

    from selfimprove.config import to_dict
    from selfimprove.train.data import padding_id, whole_steps
    from selfimprove.train.launch import fingerprint, launch

    pc, tc, out = cfg.process, cfg.train, Path(out).resolve()
    context = getattr(AutoConfig.from_pretrained(backbone), "max_position_embeddings", None)
    if context is not None and pc.prm_max_len > context:
        raise UserError(f"process.prm_max_len={pc.prm_max_len} is longer than the context of the PRM backbone "
                        f"{backbone} ({context} tokens)")
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    encode = Encoder(tokenizer)
    examples, counts = [], {}
    for it in iterations:
        got, c = training_examples(*read_iteration(it), encode, pc.prm_max_len)
        examples += got
        counts = {k: counts.get(k, 0) + v for k, v in c.items()}
    if len(examples) < pc.prm_batch_size:
        raise UserError(f"only {len(examples)} samples with a labelled step in {', '.join(map(str, iterations))}, "
                        f"fewer than process.prm_batch_size={pc.prm_batch_size}; lower it, or raise rollout.n or "
                        "process.prm_mc_iterations")
    examples = whole_steps(examples, pc.prm_batch_size, tc.seed)

    settings = {k: v for k, v in to_dict(pc).items() if k.startswith("prm_")} | {"seed": tc.seed, "precision": tc.precision}
    run = "prm-" + fingerprint(backbone, settings, examples)
    worker_config = {
        "process": pc, "seed": tc.seed, "precision": tc.precision, "backbone": shared(backbone),
        "pad_id": padding_id(tokenizer),
        "tokenizer_hash": tokenizer_hash(tokenizer), "counts": counts | {"unused": counts["examples"] - len(examples)},
    }
    return launch(prm_worker, worker_config, examples, run, cfg, out, checkpoints, PRM_FILE, what="PRM training")


def prm_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker: the backbone with a one-label head, BCE at step tokens, save on rank 0."""
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.torch import get_device, prepare_model
    from transformers import AutoModelForTokenClassification

    from selfimprove.precision import concrete
    from selfimprove.train.launch import worker_print

    pc: ProcessConfig = config["process"]
    precision = concrete("train.precision", config["precision"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not config["use_gpu"]:
        torch.set_num_threads(config["cores"])
    torch.manual_seed(config["seed"])
    device = get_device()
    config = dict(config, backbone=local(config["backbone"]))  # into this node's cache, if from storage_path
    model = AutoModelForTokenClassification.from_pretrained(config["backbone"], num_labels=1, dtype=torch.float32)
    model = prepare_model(model)  # to the worker's device; DDP when there are several workers
    optimizer = torch.optim.AdamW(model.parameters(), lr=pc.prm_lr)
    shard: list[PRMExample] = ray.get(config["examples"])[rank::world]
    per_worker = pc.prm_batch_size // world
    steps_per_epoch = len(shard) // per_worker  # equal on every worker: the driver kept whole steps
    history, step = [], 0
    model.train()
    for epoch in range(pc.prm_epochs):
        order = torch.randperm(len(shard), generator=torch.Generator().manual_seed(config["seed"] * 100_003 + epoch))
        for m in range(steps_per_epoch):
            batch = [shard[i] for i in order[m * per_worker:(m + 1) * per_worker].tolist()]
            ids, attention, targets, mask = (t.to(device) for t in collate(batch, config["pad_id"]))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(input_ids=ids, attention_mask=attention).logits[..., 0]
            loss = masked_bce(logits, targets, mask)
            mean = loss.detach().clone()
            dist.all_reduce(mean)  # the global loss, and every worker stops at the same step on a NaN
            mean = mean.item() / world
            step += 1
            if not math.isfinite(mean):
                raise UserError(f"PRM loss is {mean} at step {step}: training stopped; lower process.prm_lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            history.append({"step": step, "epoch": epoch, "loss": mean})
            if rank == 0 and (step % 10 == 0 or step == 1):
                worker_print(f"PRM step {step}/{steps_per_epoch * pc.prm_epochs}  loss {mean:.4f}")

    summary = {"steps": step, "epochs": pc.prm_epochs, "workers": world, "lr": pc.prm_lr, **config["counts"],
               "first_loss": history[0]["loss"] if history else None, "last_loss": history[-1]["loss"] if history else None}
    with tempfile.TemporaryDirectory() as folder:
        if rank == 0:
            _save(model, config, Path(folder), {"summary": summary, "steps": history})
        ray.train.report(summary, checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None,
                         checkpoint_dir_name="model")


def _save(model, config: dict, folder: Path, log: dict) -> None:
    """The trained PRM as a bf16 Hugging Face folder with the backbone's tokenizer and `prm.json`."""
    import torch
    from transformers import AutoTokenizer

    model = getattr(model, "module", model).to("cpu", torch.bfloat16)  # DDP wraps it in .module
    model.config.dtype = torch.bfloat16
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(config["backbone"]).save_pretrained(folder)
    meta = {"backbone": config["backbone"], "max_len": config["process"].prm_max_len,
            "tokenizer_hash": config["tokenizer_hash"], **log}
    (folder / PRM_FILE).write_text(json.dumps(meta, indent=1))


# -- scoring ---------------------------------------------------------------------------------

def score_samples(predict, encode, samples: list[dict], cfg: ProcessConfig) -> tuple[list[dict], dict[str, int]]:
    """(step rows, stats) for sample rows (problem_id, sample_index, prompt_text, text, status, correct).

    `predict([(ids, positions), ...])` gives the PRM's probability at each position of each
    sequence, in one call (`predict` in a Ray task). Rows follow STEP_SCHEMA, in sample
    then step order.
    """
    todo, stats = scorable_samples(samples, cfg)
    stats |= {"steps": 0, "too_long": 0, "predicted": 0}
    queries, where = [], []  # where[q] = (sample, the step indices its positions are)
    positions: dict[int, list[int | None]] = {}
    for t, (s, steps) in enumerate(todo):
        if len(steps) == 1:
            continue
        prompt, body, offsets = encode(s["prompt_text"], s["text"])
        positions[t] = step_positions(len(prompt), offsets, [step.end for step in steps[:-1]], cfg.prm_max_len)
        scored = [(i, p) for i, p in enumerate(positions[t]) if p is not None]
        if scored:
            queries.append(((prompt + body)[:scored[-1][1] + 1], [p for _, p in scored]))
            where.append((t, [i for i, _ in scored]))
    values: dict[tuple[int, int], float] = {}
    for (t, indices), probs in zip(where, predict(queries) if queries else []):
        values.update(((t, i), float(v)) for i, v in zip(indices, probs))

    rows = []
    for t, (s, steps) in enumerate(todo):
        last = len(steps) - 1
        for i, step in enumerate(steps):
            if i == last:
                value, source = float(s["correct"]), OUTCOME
            elif (t, i) in values:
                value, source = values[t, i], TRAINED
                stats["predicted"] += 1
            else:
                value, source = None, SKIPPED
                stats["too_long"] += 1
            rows.append({"problem_id": s["problem_id"], "sample_index": s["sample_index"], "step_index": i,
                         "start": step.start, "end": step.end, "text": step.text, "value": value,
                         "reached": None, "rollouts": 0, "source": source})
    stats["steps"] = len(rows)
    return rows, stats


def predict(prm_dir: str, queries: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
            cores: int = 0) -> list[list[float]]:
    """The PRM's probability (sigmoid of its logit) at each position of each (ids, positions) query, in query order.

    Queries go to the model longest first, `batch_size` at a time, right-padded.
    """
    import torch
    from transformers import AutoModelForTokenClassification

    if cores:
        torch.set_num_threads(cores)
    prm_dir = local(prm_dir)  # into this node's cache, if from storage_path
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForTokenClassification.from_pretrained(prm_dir, dtype=dtype).to(device).eval()
    order = sorted(range(len(queries)), key=lambda q: -len(queries[q][0]))
    out: list[list[float]] = [[] for _ in queries]
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            batch = [PRMExample(queries[q][0], queries[q][1], [0.0] * len(queries[q][1])) for q in idx]
            ids, attention, _, _ = (t.to(device) for t in collate(batch, pad_id))
            probs = torch.sigmoid(model(input_ids=ids, attention_mask=attention).logits[..., 0].float()).cpu()
            for row, q in enumerate(idx):
                out[q] = probs[row, queries[q][1]].tolist()
    return out


def scoring_task(use_gpu: bool, cores: int):
    """`predict` as a Ray task whose worker process exits after its one call (`max_calls=1`), so its GPU memory
    goes with it. Ray reuses a task's worker by default, and `.options(num_gpus=1)` cannot change that (Ray
    sets max_calls=1 for GPU tasks only when num_gpus is given to `ray.remote` itself): the idle worker kept its
    CUDA context and cached memory on a GPU Ray counted free again, and the next vLLM engine's free-memory
    check could fail. On CPU the exit frees the model's memory for the next stage too, for a second's start-up."""
    import ray

    return ray.remote(num_cpus=cores, num_gpus=1 if use_gpu else 0, max_calls=1)(predict)


def run_trained_prm(prm_dir: str | Path, policy: str, cfg: ProcessConfig, samples: list[dict], out: Path
                    ) -> dict[str, int]:
    """The process stage with a trained PRM: score `samples` (written by `policy`); write `out/steps.parquet`
    and `out/stats.json`."""
    import ray
    from transformers import AutoTokenizer

    from selfimprove.runtime import init_ray, node_cpus
    from selfimprove.train.data import padding_id

    prm_dir = str(prm_dir)
    check_tokenizer(prm_dir, policy)
    tokenizer = AutoTokenizer.from_pretrained(prm_dir)
    pad_id = padding_id(tokenizer)
    init_ray()
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    cores = 1 if use_gpu else node_cpus()
    task = scoring_task(use_gpu, cores)
    stored = shared(prm_dir)  # what the task's node can fetch

    def remote_predict(queries):
        try:
            return ray.get(task.remote(stored, queries, cfg.prm_batch_size, pad_id, 0 if use_gpu else cores))
        except Exception as e:
            from selfimprove.rollout.stage import root_cause

            raise UserError(f"process scoring with the PRM {prm_dir} failed: {root_cause(e)}") from e

    return write_stage(*score_samples(remote_predict, Encoder(tokenizer), samples, cfg), out)

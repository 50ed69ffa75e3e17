"""Preference training: selfimprove's trainer against TRL's DPOTrainer, same pairs, model and loss.

    .venv/bin/python benchmarks/train.py [--pairs 64] [--epochs 1] [--workers 1 2]

Prints both trainers' loss on the same first batch, their training throughput, and last
`train_speedup_vs_trl=<x>` (our best worker count over TRL).

1. Pairs: the arithmetic task's training problems with the one-shot chat prompt the rollout
   stage builds; chosen = the gold worked solution, rejected = the same with a wrong final
   result. Full fine-tuning of the bundled SmolLM2-135M-Instruct.
2. One loss: RPO = DPO (β = 0.1) + α·NLL of the winner, α = 1. TRL spells it
   `loss_type=["sigmoid", "sft"]`, `loss_weights=[1, 1]`; its NLL is a token mean over the
   batch, which ours gives with `nll_norm="batch_tokens"` (see selfimprove/train/losses.py).
3. First-batch loss: each library's own code (tokenising, collating, log-probs, loss) on the same
   4 pairs at the initial weights in float32, so the policy is the reference. They must agree
   within 1e-4.
4. Throughput: the pairs' tokens as TRL counts them (chosen and rejected sequences, each with its
   prompt: the work of training on these pairs) per second of the training work, for both. Ours
   computes each prompt once (prefix sharing), so it computes fewer tokens than that count.
   TRL: `train_runtime` of `trainer.train()`, which runs a reference forward every step. Ours:
   the loop plus its once-per-run reference pass (`train_seconds + reference_seconds`). Start-up
   (Ray, model loading, DeepSpeed) is printed apart and counted in neither. Same batch (4 pairs a
   step), lr 2e-5, clipping 1.0, bf16 (TRL: autocast over fp32 weights; ours: DeepSpeed bf16 with
   fp32 master weights), all cores.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

BETA, ALPHA, LR, BATCH, MAX_LEN = 0.1, 1.0, 2e-5, 4, 512


def make_pairs(tokenizer, n: int) -> list[dict]:
    from selfimprove.config import TaskConfig
    from selfimprove.tasks import build_task

    task = build_task(TaskConfig(generated_train=max(n, 20)))
    pairs = []
    for row in task.load("train")[:n]:
        prompt = tokenizer.apply_chat_template(task.prompt(row), tokenize=False, add_generation_prompt=True)
        wrong = str(int(row["answer"]) + 1)
        rejected = row["solution"].replace(f"= {row['answer']}.", f"= {wrong}.").replace(
            f"The answer is {row['answer']}.", f"The answer is {wrong}.")
        pairs.append({"prompt": prompt, "chosen": row["solution"], "rejected": rejected})
    return pairs


def trl_trainer(model, tokenizer, pairs: list[dict], out: str, bf16: bool, epochs: int = 1):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=BETA,
        loss_type=["sigmoid", "sft"], loss_weights=[1.0, ALPHA], max_length=MAX_LEN, bf16=bf16, use_cpu=True,
        num_train_epochs=epochs, logging_steps=10, save_strategy="no", report_to="none", seed=0,
        dataloader_num_workers=0,
    )
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)


def first_batch_losses(model_path: str, pairs: list[dict]) -> tuple[float, float]:
    """Both libraries' loss on the first 4 pairs at the initial weights, float32."""
    import pyarrow as pa
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfimprove.train.data import collate, tokenize
    from selfimprove.train.losses import SequenceLogps, rpo
    from selfimprove.train.worker import sequence_logps

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    batch_pairs = pairs[:BATCH]
    examples, _ = tokenize(pa.Table.from_pylist(batch_pairs), tokenizer, MAX_LEN, "response")
    with torch.no_grad():
        batch = collate(examples, tokenizer.pad_token_id)
        logps, lengths = sequence_logps(model, batch, torch.device("cpu"))
        n = batch.pairs
        ours = rpo(SequenceLogps(logps[:n], logps[n:], logps[:n], logps[n:], lengths[:n], lengths[n:]),
                   beta=BETA, alpha=ALPHA, nll_norm="batch_tokens").losses.mean().item()

        with tempfile.TemporaryDirectory() as out:
            trainer = trl_trainer(model, tokenizer, batch_pairs, out, bf16=False)
            rows = [trainer.train_dataset[i] for i in range(len(batch_pairs))]
            for row, e in zip(rows, examples, strict=True):  # same token ids, or the comparison means nothing
                assert row["prompt_ids"] + row["chosen_ids"] == e.prompt + e.chosen, "chosen ids differ from TRL's"
                assert row["prompt_ids"] + row["rejected_ids"] == e.prompt + e.rejected, "rejected ids differ"
            trl = trainer.compute_loss(trainer.model, trainer.data_collator(rows)).item()
    return ours, trl


def run_trl(model_path: str, pairs: list[dict], epochs: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out:
        trainer = trl_trainer(model, tokenizer, pairs, out, bf16=True, epochs=epochs)
        startup = time.perf_counter() - t0
        metrics = trainer.train().metrics
    tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
                 for r in trainer.train_dataset) * epochs
    seconds = metrics["train_runtime"]
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "startup_s": startup,
            "steps": metrics.get("global_step", trainer.state.global_step)}


def run_ours(model_path: str, pairs: list[dict], workers: int, epochs: int, precision: str = "bf16") -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from selfimprove.config import Config, TrainConfig
    from selfimprove.train.trainer import train

    with tempfile.TemporaryDirectory() as root:
        data = Path(root) / "pairs.parquet"
        pq.write_table(pa.Table.from_pylist(pairs), data)
        cfg = Config(model=model_path, train=TrainConfig(
            loss="rpo", beta=BETA, alpha=ALPHA, nll_norm="batch_tokens", lr=LR, grad_clip=1.0, batch_size=BATCH,
            micro_batch_size=BATCH // workers, num_workers=workers, zero_stage=2, precision=precision,
            max_len=MAX_LEN, epochs=epochs, report_every=10**6, checkpoint_every=0))
        t0 = time.perf_counter()
        s = train(cfg, data, Path(root) / "model")
        total = time.perf_counter() - t0
    seconds = s["train_seconds"] + s["reference_seconds"]
    return {"seconds": seconds, "computed_tokens": s["tokens"], "loop_computed_tokens_per_s": s["tokens_per_s"],
            "reference_s": s["reference_seconds"],
            "startup_and_save_s": total - seconds, "steps": s["steps"], "seconds_per_step": s["seconds_per_step"],
            "peak_memory_gib": s["peak_memory_gib"], "padding_share": s["padding_share"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from transformers import AutoTokenizer

    from selfimprove.models import home, resolve_model

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(home() / "torch_extensions"))
    model_path = resolve_model("smollm2-135m-instruct")
    pairs = make_pairs(AutoTokenizer.from_pretrained(model_path), args.pairs)

    ours_loss, trl_loss = first_batch_losses(model_path, pairs)
    print(f"first-batch loss: ours {ours_loss:.6f}  TRL {trl_loss:.6f}  |diff| {abs(ours_loss - trl_loss):.2e}")

    trl = run_trl(model_path, pairs, args.epochs)
    print("TRL DPOTrainer:", json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in trl.items()}))
    ours = {}
    for w in args.workers:
        ours[w] = run_ours(model_path, pairs, w, args.epochs)
        ours[w]["tokens_per_s"] = trl["tokens"] / ours[w]["seconds"]
        print(f"ours, {w} worker(s):", json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                                  for k, v in ours[w].items()}))
    best = max(ours, key=lambda w: ours[w]["tokens_per_s"])
    print(f"tokens/s: TRL {trl['tokens_per_s']:.0f}; " + "; ".join(
        f"ours x{w} {r['tokens_per_s']:.0f}" for w, r in ours.items()))
    print(f"first_batch_loss_diff={abs(ours_loss - trl_loss):.2e}")
    print(f"train_speedup_vs_trl={ours[best]['tokens_per_s'] / trl['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()

"""Generation and training throughput in bfloat16 against float32 on this machine, and what `auto` picks.

    .venv/bin/python benchmarks/dtype.py [--prompts 16] [--n 4] [--max-tokens 64] [--pairs 16]

1. Generation: raw `vllm.LLM` (built as the rollout stage builds it, on all cores) in a fresh
   process per dtype; the arithmetic val prompts with the chat template, n samples each, exactly
   `max_tokens` new tokens per sample (EOS ignored, no stop strings), so both dtypes make the same
   number of tokens. One untimed warm-up call, then one timed `generate`.
2. Training: `selfimprove.train.trainer.train` (Ray Train + DeepSpeed ZeRO-2, one worker on all
   cores, RPO) on `--pairs` pairs of benchmarks/train.py, 4 pairs a step; tokens/s of the loop.
3. The CPU's bf16 flags are printed first: the figures mean nothing without them.

The last line is `auto_speedup=<tokens/s generating in auto's dtype / in the other dtype>`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DTYPES = (("bfloat16", "bf16"), ("float32", "fp32"))


def generate(dtype: str, prompts: int, n: int, max_tokens: int) -> dict:
    """Tokens/s of one timed `generate` in `dtype` (run in a child process: one engine per process)."""
    import dataclasses

    from transformers import AutoTokenizer

    from selfimprove.config import Config
    from selfimprove.models import resolve_model
    from selfimprove.rollout.engine import build_llm, chat_prompts
    from selfimprove.tasks import build_task

    cfg = Config()
    model = resolve_model(cfg.model)
    task = build_task(cfg.task)
    texts = chat_prompts(AutoTokenizer.from_pretrained(model), [task.prompt(p) for p in task.load("val")[:prompts]])
    rcfg = dataclasses.replace(cfg.rollout, dtype=dtype, max_model_len=1024)
    start = time.perf_counter()
    llm = build_llm(model, rcfg, cpu_cores=f"0-{(os.cpu_count() or 1) - 1}")
    startup = time.perf_counter() - start
    from vllm import SamplingParams

    params = SamplingParams(n=n, temperature=0.8, max_tokens=max_tokens, ignore_eos=True, seed=0)
    llm.generate(texts[:2], SamplingParams(max_tokens=8), use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(texts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    llm.llm_engine.engine_core.shutdown()
    return {"startup_s": round(startup, 1), "tokens": tokens, "seconds": round(seconds, 2),
            "tok_s": round(tokens / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--generate-only", metavar="DTYPE", help=argparse.SUPPRESS)  # the child process's job
    args = ap.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.generate_only:
        print(json.dumps(generate(args.generate_only, args.prompts, args.n, args.max_tokens)))
        return

    from selfimprove.precision import NATIVE_CPU_FLAGS, choose, local_machine

    machine = local_machine()
    flags = sorted(machine.cpu_flags & {*NATIVE_CPU_FLAGS["bfloat16"], "avx2", "avx512f"})
    auto = choose("rollout.dtype", "auto", machine)
    print(f"machine: {machine.device}, {os.cpu_count()} cores, flags {' '.join(flags) or 'none of note'}; {auto}")

    sys.path.insert(0, str(Path(__file__).parent))
    from train import make_pairs, run_ours
    from transformers import AutoTokenizer

    from selfimprove.models import home, resolve_model

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(home() / "torch_extensions"))
    model_path = resolve_model("smollm2-135m-instruct")
    pairs = make_pairs(AutoTokenizer.from_pretrained(model_path), args.pairs)
    results = {}
    for dtype, precision in DTYPES:
        child = subprocess.run([sys.executable, __file__, "--generate-only", dtype, "--prompts", str(args.prompts),
                                "--n", str(args.n), "--max-tokens", str(args.max_tokens)],
                               capture_output=True, text=True, check=True)
        gen = json.loads(child.stdout.strip().splitlines()[-1])
        train = run_ours(model_path, pairs, workers=1, epochs=1, precision=precision)
        results[dtype] = {"generate": gen, "train": {k: round(train[k], 2) for k in
                                                      ("loop_tokens_per_s", "seconds_per_step", "steps")}}
        print(json.dumps({dtype: results[dtype]}), flush=True)
    other = next(d for d, _ in DTYPES if d != auto.value)
    for kind, figure in (("generate", "tok_s"), ("train", "loop_tokens_per_s")):
        print(f"{kind} tokens/s: " + "; ".join(f"{d} {results[d][kind][figure]}" for d, _ in DTYPES))
    print(f"auto_speedup={results[auto.value]['generate']['tok_s'] / results[other]['generate']['tok_s']:.2f}")


if __name__ == "__main__":
    main()

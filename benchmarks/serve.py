"""Serving throughput: `selfimprove serve` under concurrent clients, against raw vLLM on the same prompts.

1. served: `selfimprove serve` of the bundled model on loopback (one replica: an engine bound to --cores cores).
   --clients clients (the official `openai` client, streaming, usage included) share --requests chat requests,
   each one arithmetic val question with its own seed: time to first token, latency and completion tokens of
   every request; tokens/s over the whole wall time.
2. raw: `vllm.LLM` in this process once the server is gone, with the same engine settings and cores, on the same
   prompts (the chat template applied), sampling parameters and seeds, in one `generate` call: the ceiling.
The ratio is what HTTP, Serve's routing, the gateway and the clients' arrival (at most --clients requests in the
engine at once) cost. The clients, gateway and Serve's proxy run on the machine's other cores.

Usage: python benchmarks/serve.py [--requests 64] [--clients 8] [--max-tokens 128] [--cores 1]
The last line is `serve_efficiency=<served tokens/s / raw tokens/s>`; a failed request fails the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"
TEMPERATURE = 0.8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64, help="chat requests in all")
    ap.add_argument("--clients", type=int, default=8, help="clients sending them at once")
    ap.add_argument("--max-tokens", type=int, default=128, help="most new tokens per request")
    ap.add_argument("--cores", type=int, default=1, help="cores of the engine, served and raw")
    ap.add_argument("--port", type=int, default=8431, help="loopback port of the server")
    args = ap.parse_args()

    from selfimprove.config import TaskConfig
    from selfimprove.tasks import build_task

    task = build_task(TaskConfig())
    chats = [task.prompt(p) for p in task.load("val")[:args.requests]]
    settings = ["rollout.max_model_len=1024", "rollout.cpu_kvcache_gib=2", f"serve.cpus_per_replica={args.cores}",
                f"serve.max_tokens={args.max_tokens}", f"serve.max_ongoing_requests={args.clients}"]

    served = serve_and_load(chats, args, settings)
    done = served["done"]
    tokens, wall = sum(d["tokens"] for d in done), served["wall"]
    latency, ttft = [d["latency"] for d in done], [d["ttft"] for d in done]
    print(f"served: {len(done)} requests by {args.clients} clients in {wall:.1f} s: {len(done) / wall:.2f} requests/s, "
          f"{tokens / wall:.1f} tokens/s ({tokens} tokens); latency p50 {pct(latency, 50):.2f} s p95 "
          f"{pct(latency, 95):.2f} s; time to first token p50 {pct(ttft, 50):.2f} s p95 {pct(ttft, 95):.2f} s")
    raw_tokens, raw_s = raw(chats, args)
    print(f"raw vLLM: {len(chats)} prompts in one generate call, {raw_s:.1f} s: {raw_tokens / raw_s:.1f} tokens/s "
          f"({raw_tokens} tokens); engine: {args.cores} core(s)")
    print(f"serve_efficiency={(tokens / wall) / (raw_tokens / raw_s):.2f}")


def serve_and_load(chats: list[list[dict]], args, settings: list[str]) -> dict:
    """Start the server, send the requests, stop it: {"done": per-request figures, "wall": seconds of the load}."""
    log = Path(tempfile.mkdtemp(prefix="serve-bench-")) / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "selfimprove", "serve", MODEL, "--name=bench",
                                   f"--port={args.port}", *settings], stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        while "serving " not in log.read_text():
            if server.poll() is not None:
                raise SystemExit(f"the server ended:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        return asyncio.run(load(chats, args))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=300)


async def load(chats: list[list[dict]], args) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="none", max_retries=0,
                                timeout=600)
    queue: asyncio.Queue = asyncio.Queue()
    for i, chat in enumerate(chats):
        queue.put_nowait((i, chat))
    done: list[dict] = []

    async def one_client():
        while not queue.empty():
            i, chat = queue.get_nowait()
            started, first = time.monotonic(), None
            stream = await client.chat.completions.create(
                model="bench", messages=chat, max_tokens=args.max_tokens, temperature=TEMPERATURE, seed=i,
                stream=True, stream_options={"include_usage": True})
            usage = None
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.monotonic()
                usage = chunk.usage or usage
            end = time.monotonic()
            done.append({"latency": end - started, "ttft": (first or end) - started,
                         "tokens": usage.completion_tokens})

    started = time.monotonic()
    await asyncio.gather(*(one_client() for _ in range(args.clients)))  # any failed request raises here
    return {"done": done, "wall": time.monotonic() - started}


def raw(chats: list[list[dict]], args) -> tuple[int, float]:
    """(completion tokens, seconds) of one `generate` call over the same prompts, seeds and sampling parameters."""
    from selfimprove.config import RolloutConfig
    from selfimprove.models import resolve_model
    from selfimprove.rollout.engine import build_llm, chat_prompts
    from selfimprove.rollout.generator import claim_cores

    cfg = RolloutConfig(max_model_len=1024, cpu_kvcache_gib=2, max_tokens=args.max_tokens, temperature=TEMPERATURE)
    cores, _lock = claim_cores(args.cores)
    llm = build_llm(resolve_model(MODEL), cfg, cpu_cores=cores)
    from vllm import SamplingParams

    params = [SamplingParams(temperature=TEMPERATURE, max_tokens=args.max_tokens, seed=i) for i in range(len(chats))]
    prompts = chat_prompts(llm.get_tokenizer(), chats)
    started = time.monotonic()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.monotonic() - started
    return sum(len(o.outputs[0].token_ids) for o in outputs), seconds


def pct(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) > 1 else values[0]


if __name__ == "__main__":
    main()

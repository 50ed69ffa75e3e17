"""Serving throughput: `selfimprove serve` under concurrent clients, against raw vLLM, or against vLLM's own server.

1. served: `selfimprove serve` of the bundled model on loopback (one replica: an engine bound to --cores cores).
   --clients clients (the official `openai` client, streaming, usage included) share --requests chat requests,
   each one arithmetic val question with its own seed: time to first token, latency and completion tokens of
   every request; tokens/s over the whole wall time.
2. raw: `vllm.LLM` in this process once the server is gone, with the same engine settings and cores, on the same
   prompts (the chat template applied), sampling parameters and seeds, in one `generate` call: the ceiling.
The ratio is what HTTP, Serve's routing, the gateway and the clients' arrival (at most --clients requests in the
engine at once) cost. The clients, gateway and Serve's proxy run on the machine's other cores.

3. --against-vllm: in place of raw, vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`) on
   loopback, with the same engine settings, its engine bound to the same cores (VLLM_CPU_OMP_THREADS_BIND, as the
   replica binds its engine; its front end, like the replica's, on any core), under the same clients and load.
   --rounds rounds, each starting both servers in turn (vLLM's first in even rounds, ours first in odd ones) and
   loading each with every --clients count; per count, the median of the rounds' ratios.

Usage: python benchmarks/serve.py [--requests 64] [--clients 8] [--max-tokens 128] [--cores 1]
       python benchmarks/serve.py --against-vllm [--clients 8 32] [--rounds 3]
The last line is `serve_efficiency=<served tokens/s / raw tokens/s>`, or with --against-vllm
`serve_vs_vllm=<ours / theirs>` (the lowest median over the client counts); a failed request fails the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
    ap.add_argument("--clients", type=int, nargs="+", default=[8], help="clients sending them at once: one load each "
                    "with --against-vllm, else the first")
    ap.add_argument("--max-tokens", type=int, default=128, help="most new tokens per request")
    ap.add_argument("--cores", type=int, default=1, help="cores of the engine, served and raw")
    ap.add_argument("--port", type=int, default=8431, help="loopback port of the server")
    ap.add_argument("--against-vllm", action="store_true", help="compare with vLLM's own OpenAI server, not raw vLLM")
    ap.add_argument("--rounds", type=int, default=3, help="--against-vllm: rounds of both servers")
    args = ap.parse_args()

    from selfimprove.config import TaskConfig
    from selfimprove.tasks import build_task

    task = build_task(TaskConfig())
    chats = [task.prompt(p) for p in task.load("val")[:args.requests]]
    if args.against_vllm:
        return against_vllm(chats, args)
    clients = args.clients[0]
    done, wall = with_server(ours(args), "serving ", chats, args, [clients])[clients]
    tokens = report("served", done, wall, clients)
    raw_tokens, raw_s = raw(chats, args)
    print(f"raw vLLM: {len(chats)} prompts in one generate call, {raw_s:.1f} s: {raw_tokens / raw_s:.1f} tokens/s "
          f"({raw_tokens} tokens); engine: {args.cores} core(s)")
    print(f"serve_efficiency={(tokens / wall) / (raw_tokens / raw_s):.2f}")


def against_vllm(chats: list[list[dict]], args) -> None:
    from selfimprove.rollout.generator import claim_cores

    cores, _lock = claim_cores(args.cores)  # the replica's engine, in its own Ray node, binds the same first cores
    servers = {"ours": (ours(args), "serving "), "vLLM": (theirs(args, cores), "Application startup complete")}
    ratios: dict[int, list[float]] = {c: [] for c in args.clients}
    for r in range(args.rounds):
        rate = {}
        for who in sorted(servers, reverse=r % 2 == 0):  # "vLLM" first in even rounds
            cmd, ready = servers[who]
            for clients, (done, wall) in with_server(cmd, ready, chats, args, args.clients).items():
                rate[who, clients] = report(f"round {r} {who}", done, wall, clients) / wall
        for clients in args.clients:
            ratios[clients].append(rate["ours", clients] / rate["vLLM", clients])
            print(f"round {r}, {clients} clients: ours / vLLM = {ratios[clients][-1]:.3f}", flush=True)
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for clients, rs in ratios.items():
        print(f"{clients} clients: ours / vLLM by round {' '.join(f'{x:.3f}' for x in rs)}, "
              f"median {statistics.median(rs):.3f}")
    print(f"serve_vs_vllm={min(statistics.median(rs) for rs in ratios.values()):.3f}")


def engine_config(args):
    """The engine settings both servers run (and raw vLLM): `selfimprove serve`'s overrides and their RolloutConfig."""
    from selfimprove.config import RolloutConfig

    cfg = RolloutConfig(max_model_len=1024, cpu_kvcache_gib=2, max_tokens=args.max_tokens, temperature=TEMPERATURE)
    return cfg, ["rollout.max_model_len=1024", "rollout.cpu_kvcache_gib=2"]


def ours(args) -> tuple[list[str], dict]:
    settings = engine_config(args)[1] + [f"serve.cpus_per_replica={args.cores}", f"serve.max_tokens={args.max_tokens}",
                                         f"serve.max_ongoing_requests={max(args.clients)}"]
    return [sys.executable, "-m", "selfimprove", "serve", MODEL, "--name=bench", f"--port={args.port}", *settings], {}


def theirs(args, cores: str) -> tuple[list[str], dict]:
    """vLLM's OpenAI server with the engine arguments and CPU environment our replica's engine gets."""
    from selfimprove.models import resolve_model
    from selfimprove.rollout.engine import cpu_engine_env, engine_args

    cfg = engine_config(args)[0]
    flags = [f"--{k.replace('_', '-')}" if v is True else f"--no-{k.replace('_', '-')}" if v is False
             else f"--{k.replace('_', '-')}={v}" for k, v in engine_args(cfg, cpu=True).items() if v is not None]
    env = {"VLLM_CPU_OMP_THREADS_BIND": cores, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_CPU_KVCACHE_SPACE": str(cfg.cpu_kvcache_gib), **cpu_engine_env()}
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", f"--model={resolve_model(MODEL)}",
            "--served-model-name=bench", "--host=127.0.0.1", f"--port={args.port}", *flags], env


def with_server(server: tuple[list[str], dict], ready: str, chats, args, clients: list[int]) -> dict:
    """Start `server` (command, environment), wait for `ready` in its output, send the requests once per count of
    `clients`, stop it: {clients: (per-request figures, seconds of the load)}."""
    with running(*server, ready):
        return {c: asyncio.run(load(chats, args.port, c, args.max_tokens)) for c in clients}


@contextlib.contextmanager
def running(cmd: list[str], env: dict, ready: str):
    log = Path(tempfile.mkdtemp(prefix="serve-bench-")) / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, **env})
    try:
        while ready not in log.read_text():
            if server.poll() is not None:
                raise SystemExit(f"the server ended:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=300)


async def load(chats: list[list[dict]], port: int, clients: int, max_tokens: int) -> tuple[list[dict], float]:
    """(per-request figures, seconds) of `clients` streaming clients sharing `chats`."""
    import openai

    queue: asyncio.Queue = asyncio.Queue()
    for i, chat in enumerate(chats):
        queue.put_nowait((i, chat))
    done: list[dict] = []

    async def one_client(client):
        while not queue.empty():
            i, chat = queue.get_nowait()
            started, first = time.monotonic(), None
            stream = await client.chat.completions.create(
                model="bench", messages=chat, max_tokens=max_tokens, temperature=TEMPERATURE, seed=i,
                stream=True, stream_options={"include_usage": True})
            usage = None
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.monotonic()
                usage = chunk.usage or usage
            end = time.monotonic()
            done.append({"latency": end - started, "ttft": (first or end) - started,
                         "tokens": usage.completion_tokens})

    # Closed in this event loop: each load runs in one of its own.
    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                  timeout=600) as client:
        started = time.monotonic()
        await asyncio.gather(*(one_client(client) for _ in range(clients)))  # any failed request raises here
        return done, time.monotonic() - started


def report(who: str, done: list[dict], wall: float, clients: int) -> int:
    """Print one load's figures; its completion tokens."""
    tokens = sum(d["tokens"] for d in done)
    latency, ttft = [d["latency"] for d in done], [d["ttft"] for d in done]
    print(f"{who}: {len(done)} requests by {clients} clients in {wall:.1f} s: {len(done) / wall:.2f} requests/s, "
          f"{tokens / wall:.1f} tokens/s ({tokens} tokens); latency p50 {pct(latency, 50):.2f} s p95 "
          f"{pct(latency, 95):.2f} s; time to first token p50 {pct(ttft, 50):.2f} s p95 {pct(ttft, 95):.2f} s",
          flush=True)
    return tokens


def raw(chats: list[list[dict]], args) -> tuple[int, float]:
    """(completion tokens, seconds) of one `generate` call over the same prompts, seeds and sampling parameters."""
    from selfimprove.models import resolve_model
    from selfimprove.rollout.engine import build_llm, chat_prompts
    from selfimprove.rollout.generator import claim_cores

    cores, _lock = claim_cores(args.cores)
    llm = build_llm(resolve_model(MODEL), engine_config(args)[0], cpu_cores=cores)
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

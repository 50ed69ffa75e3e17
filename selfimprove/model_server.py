"""One served model: a Serve application running Ray Serve LLM's `LLMServer` (vLLM's async engine, continuous
batching, vLLM's own OpenAI request handling), built from plain arguments so that a Serve config file can name it.

On CPU each replica binds its engine to cores of its own, as rollout engines do: two replicas of one node (an old
and a new model during a promotion) then never spin on the same cores.
"""

from __future__ import annotations

import os

from ray.serve.llm import LLMConfig, LLMServer, build_llm_deployment

from selfimprove.rollout.generator import claim_cores


class ModelServer(LLMServer):
    async def __init__(self, llm_config: LLMConfig, *, cores: int = 0, **kwargs):
        if cores:  # vLLM's CPU worker reads its binding from the environment when the engine starts
            os.environ["VLLM_CPU_OMP_THREADS_BIND"], self._cores = claim_cores(cores)
        await super().__init__(llm_config, **kwargs)


def replica_resources(args: dict) -> dict[str, float]:
    """CPU and GPU one replica of `model_app(args)` holds: the bundles of its placement group, in which Serve LLM
    puts the replica actor and its engine."""
    bundles = ModelServer.get_deployment_options(LLMConfig(**args["llm_config"]))["placement_group_bundles"]
    return {r: float(sum(b.get(r, 0) for b in bundles)) for r in ("CPU", "GPU")}


def model_app(args: dict):
    """Serve application builder: `llm_config` (LLMConfig's fields), `cores` (CPU cores per replica, 0 on GPU)."""
    return build_llm_deployment(LLMConfig(**args["llm_config"]), deployment_cls=ModelServer,
                                bind_kwargs={"cores": args.get("cores", 0)})

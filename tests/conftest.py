"""Shared fixtures. Engines start once per session: a vLLM start-up costs 15-60 s on CPU."""

import os

import pytest

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def bundled_model() -> str:
    """Folder of the bundled SmolLM2-135M-Instruct, converted on first use (`make model` does it up front)."""
    from selfimprove.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def llm(bundled_model):
    """One real vLLM engine on the bundled model, shared by every test that generates in-process."""
    from selfimprove.config import RolloutConfig
    from selfimprove.rollout.engine import build_llm

    engine = build_llm(bundled_model, RolloutConfig(max_model_len=1024))
    yield engine
    del engine


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the session, as `selfimprove` starts it."""
    import ray

    from selfimprove.runtime import init_ray

    init_ray()
    yield ray
    ray.shutdown()

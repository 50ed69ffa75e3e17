"""Shared fixtures. Engines start once per session: a vLLM start-up costs 15-60 s on CPU."""

import os

import pytest
import yaml

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


TINY_RUN = {
    "iterations": 1,
    "task": {"train_size": 8, "test_size": 6},
    "rollout": {"n": 4, "max_tokens": 64, "batch_size": 8, "max_model_len": 512, "cpu_kvcache_gib": 1},
    "eval": {"k": 2},
    "pairs": {"pairs_per_problem": 1, "include_gold": True},
    "train": {"batch_size": 2, "micro_batch_size": 1, "max_steps": 2, "report_every": 1, "checkpoint_every": 0},
}


@pytest.fixture
def tiny_config(tmp_path):
    """`tmp_path/tiny.yaml`: a real run of every stage, sized to take minutes (one iteration, 8 problems, 2 steps)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_RUN))
    return path


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

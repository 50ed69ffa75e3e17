"""Shared fixtures. Engines start once per session: a vLLM start-up costs 15-60 s on CPU."""

import os
import time

import psutil
import pytest
import yaml
from processes import POOL_ACTOR, TINY_RUN

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


@pytest.fixture(scope="module")
def llm(bundled_model):
    """A real vLLM engine on the bundled model in this process, for a module's tests; its engine-core process
    is stopped when the module ends (dropping the `LLM` object alone left it running, 3 GB, for the session)."""
    from selfimprove.config import RolloutConfig
    from selfimprove.rollout.engine import build_llm

    engine = build_llm(bundled_model, RolloutConfig(max_model_len=1024))
    yield engine
    engine.llm_engine.engine_core.shutdown()


# vLLM's engine-core processes, and the rollout pool's actors, whose engines run in their own process on CPU.
ENGINE_PROCESSES = ("VLLM::EngineCore", POOL_ACTOR)


def engine_processes(since: float) -> list[psutil.Process]:
    """vLLM engine processes of this test session: descendants of pytest, or orphans (parent init) started
    after `since` (an engine whose Ray actor was killed is re-parented). Other runs' engines on the machine are not."""
    me = psutil.Process()
    # process_iter with attrs skips processes that end while it reads them; a bare p.ppid() raised NoSuchProcess.
    candidates = me.children(recursive=True) + [p for p in psutil.process_iter(["ppid"]) if p.info["ppid"] == 1]
    found = []
    for p in candidates:
        try:
            if " ".join(p.cmdline()).startswith(ENGINE_PROCESSES) and (p.ppid() != 1 or p.create_time() >= since):
                found.append(p)
        except psutil.Error:  # it ended while we looked
            pass
    return found


@pytest.fixture(scope="module", autouse=True)
def no_engine_outlives_its_module():
    """Every vLLM engine a test module starts is gone (waited for up to a minute) once the module ends."""
    started = time.time()
    before = {p.pid for p in engine_processes(started)}
    yield
    deadline = time.monotonic() + 60
    while (left := [p for p in engine_processes(started) if p.pid not in before]) and time.monotonic() < deadline:
        time.sleep(1)
    for p in left:
        p.kill()  # so that later modules run on a clean machine
    assert not left, f"vLLM engine processes outlived their test module: {[(p.pid, p.ppid()) for p in left]}"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the session, as `selfimprove` starts it."""
    import ray

    from selfimprove.runtime import init_ray

    init_ray()
    yield ray
    ray.shutdown()

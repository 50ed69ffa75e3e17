"""Connect to Ray: the cluster a job runs in, or a local one started here."""

from __future__ import annotations

import os


def init_ray() -> None:
    """`ray job submit` sets RAY_ADDRESS and we join that cluster; otherwise start a local one."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in ("VLLM_LOGGING_LEVEL", "TOKENIZERS_PARALLELISM", "SELFIMPROVE_HOME",
                                      "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE") if k in os.environ}
    kwargs = {"runtime_env": {"env_vars": env}, "log_to_driver": True}
    if not os.environ.get("RAY_ADDRESS"):
        kwargs.update(include_dashboard=False, num_cpus=os.cpu_count())
    ray.init(**kwargs)
    from ray.data import DataContext

    # Samples come back in problem order, so a run with the same seed reads the same.
    DataContext.get_current().execution_options.preserve_order = True

"""Connect to Ray: the cluster a job runs in, or a local one started here."""

from __future__ import annotations

import json
import os
import signal
import threading


def init_ray() -> None:
    """`ray job submit` sets RAY_ADDRESS and we join that cluster; otherwise start a local one."""
    import ray

    if ray.is_initialized():
        return
    # Ray refuses a driver env var that the submitted job's runtime env also sets: the job's wins.
    job_env = (json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}).get("env_vars") or {}
    env = {k: os.environ[k] for k in ("VLLM_LOGGING_LEVEL", "TOKENIZERS_PARALLELISM", "SELFIMPROVE_HOME",
                                      "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE") if k in os.environ and k not in job_env}
    kwargs = {"runtime_env": {"env_vars": env}, "log_to_driver": True}
    if not os.environ.get("RAY_ADDRESS"):
        kwargs.update(include_dashboard=False, num_cpus=os.cpu_count())
        bind_to_loopback()
    # Ray's core worker replaces the process's SIGTERM handler with one that aborts (exit -6, no clean-up):
    # the handler this process had (the CLI's: stop as Ctrl-C does) is put back.
    on_term = signal.getsignal(signal.SIGTERM)
    ray.init(**kwargs)
    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        signal.signal(signal.SIGTERM, on_term)
    from ray.data import DataContext

    # Samples come back in problem order, so a run with the same seed reads the same.
    DataContext.get_current().execution_options.preserve_order = True


def bind_to_loopback() -> None:
    """Make a local Ray instance listen on 127.0.0.1 only: no other machine needs to reach it.

    Ray binds its servers (GCS, raylet, workers) to every interface unless the node's address is loopback, and
    it takes loopback as the address only where it treats clusters as disabled (its macOS and Windows default,
    this switch). Set in the environment for the processes Ray starts, and on the module of a Ray imported already.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def node_cpus() -> int:
    """CPUs of the cluster's largest node: the most one node can give a pool's actors or workers.

    From Ray's view of the nodes, not this process's machine: a driver in a Kubernetes pod sees
    the host's core count.
    """
    import ray

    return int(max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=0)) or os.cpu_count() or 1

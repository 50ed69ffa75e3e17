"""Refuse, before any Ray work, what a machine running Ray alone can never hold: engines and trainers that ask
for more cores, GPUs or memory than it has."""

from __future__ import annotations

import os

from selfimprove.errors import UserError
from selfimprove.precision import engine_machine


def check_resources(cfg, rollout: bool = True, train: bool = True, guides: int = 0) -> None:
    """Refuse, before any Ray work, an engine pool or trainer this machine can never hold, when Ray runs on it
    alone (no RAY_ADDRESS). A cluster is not checked: its autoscaler may still add nodes, and a rollout waits for
    its engines at most rollout.start_timeout. `guides`: engines of a guide pool beside the rollout's (a recipe with
    a solver runs guide.num_actors of them in the same pipeline)."""
    if os.environ.get("RAY_ADDRESS"):
        return
    cpus = os.cpu_count() or 1
    gpus = _local_gpus() if engine_machine().device == "cuda" else 0
    r, t = cfg.rollout, cfg.train
    engines, pools = r.num_actors + guides, f"rollout.num_actors={r.num_actors}" + (
        f" + guide.num_actors={guides}" if guides else "")
    asks = []  # (what is asked, how many, this machine's number, of what)
    if rollout and gpus:
        asks.append((f"{pools} engine(s) x rollout.tensor_parallel_size={r.tensor_parallel_size} GPU(s)",
                     engines * r.tensor_parallel_size, gpus, "GPUs"))
    elif rollout:
        cores = r.cpus_per_actor or max(cpus // engines, 1)
        asks.append((f"{pools} engine(s) x {cores} core(s) (rollout.cpus_per_actor={r.cpus_per_actor})",
                     engines * cores, cpus, "cores"))
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        asks.append((f"{pools} engine(s) x rollout.cpu_kvcache_gib={r.cpu_kvcache_gib} GiB of KV cache",
                     engines * r.cpu_kvcache_gib, round(memory, 1), "GiB of memory"))
    if train and gpus:
        asks.append((f"train.num_workers={t.num_workers} worker(s) x 1 GPU", t.num_workers, gpus, "GPUs"))
    elif train:
        cores = t.cpus_per_worker or max(cpus // t.num_workers, 1)
        asks.append((f"train.num_workers={t.num_workers} worker(s) x {cores} core(s) (train.cpus_per_worker="
                     f"{t.cpus_per_worker})", t.num_workers * cores, cpus, "cores"))
    for what, need, have, unit in asks:
        if need > have:
            raise UserError(f"{what} = {need}, but this machine has {have} {unit} and Ray runs on it alone "
                            "(RAY_ADDRESS is not set): ask for less, or run on a Ray cluster")


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()

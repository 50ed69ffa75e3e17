"""Helpers for tests that run `selfimprove` as a real process and kill it."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

# A real run of every stage, sized to take minutes (one iteration, 8 problems, 2 steps); `tiny_config` writes it.
TINY_RUN = {
    "iterations": 1,
    "task": {"train_size": 8, "test_size": 6},
    "rollout": {"n": 4, "max_tokens": 64, "batch_size": 8, "max_model_len": 512, "cpu_kvcache_gib": 1},
    "eval": {"k": 2},
    "pairs": {"pairs_per_problem": 1, "include_gold": True},
    "train": {"batch_size": 2, "micro_batch_size": 1, "max_steps": 2, "report_every": 1, "checkpoint_every": 0},
}
# Sums of numbers up to 9, which the base model gets right in some samples and wrong in others, so that process
# pairs exist: on the default problems it got all 32 samples of the 8 wrong (an AVX-512 box), all scores 0, no pair.
MIXED_OUTCOMES = ("task.operations=+", "task.max_value=9", "task.generated_train=64", "task.generated_val=32",
                  "task.generated_test=32")


def start(config, run_dir, log, *overrides, env: dict | None = None) -> subprocess.Popen:
    """`selfimprove run` in its own process group, its output into the file `log`; `env`: variables to set in its
    environment."""
    return start_command(["run", config, f"run_dir={run_dir}", *overrides], log, env)


def start_command(args: list, log, env: dict | None = None) -> subprocess.Popen:
    """`selfimprove ARGS` in its own process group, its output into the file `log` (a pipe could be held open
    by processes that outlive a kill); `env`: variables to set in its environment."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "selfimprove", *map(str, args)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})})


def kill_when(proc: subprocess.Popen, log: Path, ready, what: str, timeout: float = 900) -> None:
    """SIGKILL `proc`'s whole process group as soon as `ready()` is true; fail if the run ends or `timeout`
    passes first. Polled every few milliseconds, so that short stages are caught while they run."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def named(prefix: str, root: int | None = None) -> list[psutil.Process]:
    """Descendants of the process `root` (default: this one) whose command line starts with `prefix`; Ray names
    its workers by what they run (`ray::RayTrainWorker...`, `ray::MapWorker(...)`)."""
    return [p for p in alive(psutil.Process(root).children(recursive=True)) if " ".join(p.cmdline()).startswith(prefix)]


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of `processes` still running whose command line can be read."""
    out = []
    for p in processes:
        try:
            p.cmdline()
            out.append(p)
        except psutil.Error:
            pass
    return out


# A rollout pool actor's process; on CPU its vLLM engine runs in it.
POOL_ACTOR = "ray::MapWorker(MapBatches(VLLMGenerator"


def free_ports(n: int) -> list[int]:
    """`n` distinct ports on 127.0.0.1 that nothing listens on now: bound together, read, closed again."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def checkpoint_registered(storage: Path) -> bool:
    """Whether Ray Train has registered a checkpoint of a training that keeps them in `storage`: its controller
    writes this file then, and a restarted or rerun training resumes from it. (A checkpoint's folder appears
    earlier, when a worker persists it: a kill between the two leaves nothing to resume from.)"""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    return any(Path(storage).glob(f"train-*/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}"))

"""Which floating-point type engines and trainers compute in: `auto` picks it for the machine.

1. bf16 pays only where the hardware computes it: a GPU of compute capability >= 8.0, or a
   CPU with AVX-512 BF16 or AMX (x86) or the BF16 extension (Arm). Elsewhere it is emulated:
   on an AVX2-only box vLLM generated 4.8x and training ran 13x slower in bf16 than in float32
   (issue 7). So `auto` is bf16 where native, float32 otherwise.
2. The rule is a pure function of the machine's facts (`Machine`), so it is tested on the flag
   sets of both kinds of CPU. The facts come from the machine the engines run on: this one, or
   in a Ray cluster a node of the kind they use (a GPU node when the cluster has GPUs).
3. An explicit choice the machine cannot run (bf16 on a GPU without it) is refused in one line;
   one it runs slowly (bf16 or float16 emulated on a CPU) is warned about in one line. Both
   happen before any engine starts.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path

from selfimprove.errors import UserError

# CPU flags (x86 /proc/cpuinfo `flags`, Arm `Features`) under which each type is computed natively.
NATIVE_CPU_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16", "bf16"), "float16": ("avx512_fp16", "amx_fp16")}
PROBE_SECONDS = 300
# Each knob's own spelling of a type.
SPELLING = {"rollout.dtype": {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"},
            "train.precision": {"bfloat16": "bf16", "float32": "fp32"}}


@dataclass(frozen=True)
class Machine:
    device: str  # "cpu" or "cuda"
    cpu_flags: frozenset[str] = frozenset()
    gpu_name: str = ""
    gpu_capability: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class Choice:
    key: str  # the config key, e.g. "rollout.dtype"
    value: str  # in the key's own spelling: "bfloat16" / "bf16"
    reason: str
    warning: str | None = None

    def __str__(self) -> str:
        return f"{self.key}={self.value} ({self.reason})"


def native(dtype: str, machine: Machine) -> tuple[bool, str]:
    """Whether `machine` computes `dtype` (bfloat16, float16 or float32) in hardware, and why."""
    if dtype == "float32":
        return True, "float32 runs natively everywhere"
    if machine.device == "cuda":
        if dtype == "float16" or machine.gpu_capability >= (8, 0):
            return True, f"{machine.gpu_name or 'the GPU'} computes {dtype}"
        major, minor = machine.gpu_capability
        return False, f"{machine.gpu_name or 'the GPU'} has no bf16 (compute capability {major}.{minor} < 8.0)"
    found = sorted(set(NATIVE_CPU_FLAGS[dtype]) & machine.cpu_flags)
    if found:
        return True, f"this CPU computes {dtype} natively ({', '.join(found)})"
    return False, f"this CPU has no {' / '.join(NATIVE_CPU_FLAGS[dtype])}: {dtype} is emulated"


def choose(key: str, requested: str, machine: Machine) -> Choice:
    """The type `key` (rollout.dtype or train.precision) computes in on `machine`, from the config's value.

    `auto`: bfloat16 where native, else float32. An explicit type is kept; refused where the device
    cannot run it, warned about where it is emulated.
    """
    spelled = SPELLING[key]
    canonical = {v: k for k, v in spelled.items()}
    if requested == "auto":
        fast, why = native("bfloat16", machine)
        dtype = "bfloat16" if fast else "float32"
        return Choice(key, spelled[dtype], f"auto: {why}")
    if requested not in canonical:
        raise UserError(f"{key}={requested} is unknown: use auto, {', '.join(spelled.values())}")
    dtype = canonical[requested]
    fast, why = native(dtype, machine)
    if fast:
        return Choice(key, requested, why)
    if machine.device == "cuda":
        raise UserError(f"{key}={requested} cannot run here: {why}; use {key}=auto")
    return Choice(key, requested, why, warning=f"{key}={requested}: {why}, several times slower than float32 "
                  f"(4.8x to generate, 13x to train on an AVX2 box); {key}=auto picks float32 here")


def resolve(cfg, machine: Machine | None = None):
    """`cfg` with rollout.dtype and train.precision made concrete for the machine, and the two choices."""
    machine = machine or engine_machine()
    rollout = choose("rollout.dtype", cfg.rollout.dtype, machine)
    train = choose("train.precision", cfg.train.precision, machine)
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, dtype=rollout.value),
                              train=dataclasses.replace(cfg.train, precision=train.value))
    return cfg, (rollout, train)


def concrete(key: str, value: str) -> str:
    """`value` as this process computes it: `auto` is resolved here, on the machine doing the work.

    Entry points resolve up front (to refuse, announce and record); this covers engines and
    workers built by other callers.
    """
    return value if value != "auto" else choose(key, value, local_machine()).value


def announce(choices) -> None:
    """One line on stdout for the choices (with the reason), and one on stderr per warning (stderr stays
    for what went wrong)."""
    import sys

    by_reason: dict[str, list[str]] = {}
    for c in choices:
        by_reason.setdefault(c.reason, []).append(f"{c.key}={c.value}")
    print("selfimprove: computing in " + "; ".join(f"{', '.join(keys)} ({why})" for why, keys in by_reason.items()),
          flush=True)
    for c in choices:
        if c.warning:
            print(f"selfimprove: warning: {c.warning}", file=sys.stderr)


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor in /proc/cpuinfo's text (x86 `flags`, Arm `Features`)."""
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def local_machine() -> Machine:
    """This process's machine: its GPU if torch sees one, else its CPU's flags."""
    import torch

    if torch.cuda.is_available():
        return Machine("cuda", gpu_name=torch.cuda.get_device_name(0),
                       gpu_capability=tuple(torch.cuda.get_device_capability(0)))
    try:
        return Machine("cpu", cpu_flags(Path("/proc/cpuinfo").read_text()))
    except OSError:  # not Linux: no flags known, so bf16 counts as emulated
        return Machine("cpu")


@functools.cache
def engine_machine() -> Machine:
    """The machine engines and trainers run on: this one, or in a Ray cluster one of its nodes of that kind."""
    if not os.environ.get("RAY_ADDRESS"):  # a local Ray instance runs on this machine
        return local_machine()
    from selfimprove.runtime import init_ray

    init_ray()  # first: an address nothing answers at fails before Ray is imported
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) > 0
    probe = ray.remote(num_cpus=0 if gpus else 1, num_gpus=1 if gpus else 0)(local_machine)
    try:
        return ray.get(probe.remote(), timeout=PROBE_SECONDS)
    except ray.exceptions.GetTimeoutError:
        raise UserError(f"no {'GPU' if gpus else 'CPU'} of the Ray cluster came free in {PROBE_SECONDS} s to tell "
                        "which dtype it computes fast; is the cluster busy?") from None

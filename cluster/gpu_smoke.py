"""`make gpu-smoke`: the GPU first run's known breakages, checked in one command on one GPU.

NOT YET RUN ON A GPU. Written on a CPU box, where its parsing and checks are unit-tested with hand-written
inputs (tests/test_gpu_smoke.py) and it stops at step 1.

    .venv/bin/python cluster/gpu_smoke.py [--model FOLDER] [--out DIR] [--config configs/gpu-smoke.yaml]

1. Before anything: torch sees a CUDA device, vLLM's platform is CUDA, and the installed vLLM is the version
   the installed selfimprove's `gpu` extra pins. A failure is one line and exit 1.
2. A tiny SIPF run (`configs/gpu-smoke.yaml`: ZeRO-3 + LoRA, a checkpoint every step, a trained PRM) on one
   GPU (CUDA_VISIBLE_DEVICES=0 unless set), so every stage takes the same GPU from the one before. No network:
   HF_HUB_OFFLINE=1, the bundled model (prepared here, as `make model` does) or a local folder. Ray's temp
   folder, with its logs, is under --out. The run is stopped after LIMIT_S (9 minutes).
3. While it runs, `nvidia-smi --query-compute-apps` every POLL_S seconds, each row with the poll's time, into
   `gpu-apps.csv`.
4. It fails, one line per finding, if: the run fails or overruns; a GPU process is still listed more than
   GRACE_S after the end of the stage it appeared in (before the first stage, the next one's start); the
   driver itself holds GPU memory; a GPU stage of at least 3 polls shows no process at all (nvidia-smi cannot
   see this container's processes: nothing would be checked); the run's output or Ray's logs hold a vLLM
   memory-check error, a CUDA out-of-memory, a Ray Train worker-group retry, or an actor restarted or
   force-killed (it did not exit within 30 s of being asked) before Ray shut down. Last line: `gpu_smoke=PASS` or `gpu_smoke=FAIL`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIMIT_S = 9 * 60  # the bound for one H100
POLL_S = 2.0
# A stage's processes end after its marker is written: Ray kills its actors and Ray Train workers, vLLM
# engines stop their core process. Three polls and then some, for that and nvidia-smi's own lag.
GRACE_S = 10.0
GPU_STAGES = ("eval", "rollout", "process", "prm", "train")  # pairs computes on the driver's CPU
QUERY = ["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader,nounits"]

# vLLM 0.32 (vllm/v1/worker/utils.py, v1/core/kv_cache_utils.py): an engine that finds less free GPU memory
# than gpu_memory_utilization asks for, or none left for its KV cache. Its info line that begins "Free memory
# on device ... on startup. Desired ..." is not an error and matches none of these.
MEMORY_ERRORS = re.compile(r"on startup is less than|exceed the desired GPU memory utilization|"
                           r"No available memory for the cache blocks|CUDA out of memory|OutOfMemoryError")
TRAIN_RETRY = re.compile(r"\[FailurePolicy\] RETRY")  # Ray Train V2 restarting a failed worker group
# Ray's GCS (gcs_actor_manager.cc) on an actor's death; it is restarted when need_reschedule = 1 and restarts
# are left (-1: no limit). On shutdown every actor dies so, after the node unregisters: those are not restarts.
ACTOR_FAILED = re.compile(r"Actor is failed on worker .*need_reschedule = 1.*remaining_restarts = (-?\d+)")
NODE_GONE = re.compile(r"HandleUnregisterNode|Node is dead")
# Ray's GCS when an actor asked to exit (a finished stage's engine, say) is still there 30 s later: it outlived
# its stage by more than GRACE_S whatever nvidia-smi saw. Seen on CPU for a VLLMGenerator pool actor.
FORCE_KILLED = re.compile(r"Graceful shutdown timeout .* exceeded")


@dataclass(frozen=True)
class Sighting:
    """One row of one nvidia-smi poll: a process holding GPU memory at `time` (epoch seconds)."""

    time: float
    pid: int
    name: str
    mib: float | None  # None where nvidia-smi may not say ("[N/A]", as in some containers)


@dataclass(frozen=True)
class Window:
    """A stage of the run, e.g. `iter_1/train`, from its start to its end (epoch seconds)."""

    name: str
    start: float
    end: float


# -- pure: parsing and checks ----------------------------------------------------------------


def parse_compute_apps(text: str, at: float) -> list[Sighting]:
    """The rows of `nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader,nounits`
    polled at `at`. ValueError naming the line for anything else (an NVML error, say): the watch must work."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("No running"):
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 3 or not fields[0].isdigit():
            raise ValueError(f"nvidia-smi printed {line!r}, not pid, process_name, used_memory")
        memory = fields[-1]
        try:
            mib = float(memory)
        except ValueError:
            if not memory.startswith("["):  # [N/A], [Not Supported], [Insufficient Permissions]
                raise ValueError(f"nvidia-smi printed {line!r}: used_memory {memory!r} is not a number") from None
            mib = None
        rows.append(Sighting(at, int(fields[0]), ", ".join(fields[1:-1]), mib))
    return rows


def stage_windows(timings: dict[str, dict]) -> list[Window]:
    """Windows of the finished stages, by start, from their `timing.json` contents ({"started", "seconds"})."""
    return sorted((Window(name, t["started"], t["started"] + t["seconds"]) for name, t in timings.items()),
                  key=lambda w: w.start)


def lingering(sightings: list[Sighting], windows: list[Window], driver_pid: int, grace: float = GRACE_S) -> list[str]:
    """A line for each GPU process listed after its stage: seen more than `grace` seconds after the end of the
    last stage that had started when it was first seen (one first seen before any stage must be gone `grace`
    after the first one starts); and for the driver, which should hold no GPU memory at all."""
    seen: dict[int, list[Sighting]] = {}
    for s in sorted(sightings, key=lambda s: s.time):
        seen.setdefault(s.pid, []).append(s)
    problems = []
    for pid, rows in seen.items():
        first, last = rows[0], rows[-1]
        mib = max((r.mib for r in rows if r.mib is not None), default=None)
        what = f"pid {pid} ({first.name}{f', {mib:.0f} MiB' if mib is not None else ''})"
        if pid == driver_pid:
            problems.append(f"the driver, {what}, holds GPU memory: the stages' processes should, not it")
            continue
        started = [w for w in windows if w.start <= first.time]
        if started:
            where, since, after = f"in {started[-1].name}", started[-1].end, "that stage ended"
        elif windows:
            where, since, after = "before the first stage", windows[0].start, "the first stage started"
        else:
            continue
        if last.time > since + grace:
            problems.append(f"{what}, first seen {where}, was still on the GPU {last.time - since:.0f} s after {after}")
    return problems


def unwatched(sightings: list[Sighting], windows: list[Window], poll: float = POLL_S) -> list[str]:
    """A line for each GPU stage that lasted at least 3 polls with no process listed while it ran."""
    problems = []
    for w in windows:
        if w.name.rsplit("/", 1)[-1] in GPU_STAGES and w.end - w.start >= 3 * poll and not any(
                w.start <= s.time <= w.end for s in sightings):
            problems.append(f"nvidia-smi listed no process during {w.name} ({w.end - w.start:.0f} s): it cannot see "
                            "this machine's GPU processes (a container without the host's PID namespace?), so "
                            "nothing was checked")
    return problems


def log_findings(name: str, lines) -> list[str]:
    """A line for each vLLM memory-check error, CUDA out-of-memory, Ray Train retry, actor restart or actor killed
    after not exiting, in one log."""
    found, node_gone = [], False
    for n, line in enumerate(lines, 1):
        node_gone = node_gone or bool(NODE_GONE.search(line))
        restart = ACTOR_FAILED.search(line)
        if MEMORY_ERRORS.search(line):
            found.append(f"{name}:{n}: GPU memory: {line.strip()[:240]}")
        elif TRAIN_RETRY.search(line):
            found.append(f"{name}:{n}: Ray Train restarted its worker group")
        elif restart and not node_gone and int(restart.group(1)) != 0:
            found.append(f"{name}:{n}: an actor died and was restarted: {line.strip()[:240]}")
        elif FORCE_KILLED.search(line) and not node_gone:
            found.append(f"{name}:{n}: an actor did not exit when asked and was killed 30 s later: {line.strip()[:240]}")
    return found


def vllm_pin(requirements: list[str]) -> str | None:
    """The vLLM version the `gpu` extra pins, from the installed package's requirements
    (`importlib.metadata.requires`: 'vllm==0.32.0; extra == "gpu"'); None if it pins none."""
    for r in requirements:
        m = re.fullmatch(r"vllm==([^\s;]+)\s*;\s*extra\s*==\s*['\"]gpu['\"]", r.strip())
        if m:
            return m.group(1)
    return None


# -- on the GPU machine ----------------------------------------------------------------------


def preflight() -> str | None:
    """Why this machine cannot run the smoke test, in one line; None if it can."""
    import importlib.metadata

    import torch

    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} sees no CUDA device: make gpu-smoke needs an NVIDIA GPU and the gpu "
                "extra (make install EXTRAS=gpu,dev)")
    try:
        import vllm
        from vllm.platforms import current_platform
    except Exception as e:  # any import failure is the finding
        return f"vLLM does not import: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not current_platform.is_cuda():
        return f"vLLM {vllm.__version__} runs on {type(current_platform).__name__}, not CUDA: install the gpu extra"
    pin = vllm_pin(importlib.metadata.requires("selfimprove") or [])
    if pin != vllm.__version__:
        return f"vLLM {vllm.__version__} is installed, but selfimprove's gpu extra pins {pin}: make install EXTRAS=gpu,dev"
    if subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode != 0:
        return "nvidia-smi does not run: the smoke test watches GPU processes with it"
    return None


class Watch(threading.Thread):
    """Polls nvidia-smi every POLL_S seconds into `csv` until stopped; keeps the rows and any failure."""

    def __init__(self, csv: Path):
        super().__init__(daemon=True)
        self.csv, self.rows, self.errors, self.stopped = csv, [], [], threading.Event()

    def run(self) -> None:
        with open(self.csv, "w") as out:
            out.write("time,pid,process_name,used_mib\n")
            while not self.stopped.wait(POLL_S):
                at = time.time()
                done = subprocess.run(QUERY, capture_output=True, text=True, timeout=30)
                try:
                    if done.returncode:
                        raise ValueError(f"nvidia-smi exited {done.returncode}: {done.stderr.strip()[:200]}")
                    rows = parse_compute_apps(done.stdout, at)
                except ValueError as e:
                    self.errors.append(str(e))
                    continue
                self.rows += rows
                out.writelines(f"{r.time:.2f},{r.pid},{r.name},{'' if r.mib is None else r.mib}\n" for r in rows)
                out.flush()


def run(config: Path, model: str | None, out: Path) -> tuple[int | None, int, list[Sighting], list[str], Path]:
    """The smoke run under watch: (exit code or None if stopped at the limit, driver pid, sightings, watch errors,
    its output log)."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "RAY_TMPDIR": str(out / "ray")}
    env.setdefault("CUDA_VISIBLE_DEVICES", "0")
    command = [sys.executable, "-m", "selfimprove", "run", str(config), f"run_dir={out / 'run'}",
               *([f"model={model}"] if model else [])]
    log = out / "run.log"
    watch = Watch(out / "gpu-apps.csv")
    watch.start()
    with open(log, "w") as output:
        proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=LIMIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # the CLI stops its local Ray on SIGTERM
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = None
    time.sleep(GRACE_S + POLL_S)  # whatever outlives the run shows in the last polls
    watch.stopped.set()
    watch.join()
    return code, proc.pid, watch.rows, watch.errors, log


def read_windows(run_dir: Path) -> list[Window]:
    return stage_windows({f"{t.parent.parent.name}/{t.parent.name}": json.loads(t.read_text())
                          for t in run_dir.glob("iter_*/*/timing.json")})


def findings(code: int | None, driver: int, sightings: list[Sighting], watch_errors: list[str], windows: list[Window],
             out: Path) -> list[str]:
    """Every reason the smoke test fails, one line each."""
    problems = [f"nvidia-smi: {e}" for e in dict.fromkeys(watch_errors)]
    if code is None:
        problems.append(f"the run did not end within {LIMIT_S // 60} minutes; stopped")
    elif code:
        problems.append(f"the run failed (exit {code}); its output: {out / 'run.log'}")
    problems += lingering(sightings, windows, driver) + unwatched(sightings, windows)
    logs = [out / "run.log", *sorted((out / "ray").glob("session_*/logs/*"))]
    for path in logs:
        if path.is_file():
            with open(path, errors="replace") as f:
                problems += log_findings(str(path.relative_to(out)), f)
    return problems


def summary(sightings: list[Sighting], windows: list[Window]) -> list[str]:
    """Per stage: seconds, and the most GPU memory one poll showed in use (MiB)."""
    lines = []
    for w in windows:
        polls: dict[float, float] = {}
        for s in sightings:
            if w.start <= s.time <= w.end and s.mib is not None:
                polls[s.time] = polls.get(s.time, 0.0) + s.mib
        lines.append(f"{w.name:<18} {w.end - w.start:7.1f} s  peak {max(polls.values(), default=0):8.0f} MiB")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "gpu-smoke.yaml")
    parser.add_argument("--model", default=os.environ.get("SMOKE_MODEL") or None,
                        help="a local model folder instead of the bundled model")
    parser.add_argument("--out", type=Path, default=None, help="where the run, its logs and gpu-apps.csv go")
    args = parser.parse_args()
    why = preflight()
    if why:
        print(f"gpu-smoke: {why}")
        return 1
    from selfimprove.models import resolve_model

    model = resolve_model(args.model or "smollm2-135m-instruct")  # before the clock starts; cached once made
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-smoke-"))  # short: Ray's socket paths must stay short
    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu-smoke: a tiny SIPF run on one GPU, at most {LIMIT_S // 60} min; everything in {out}", flush=True)
    start = time.time()
    code, driver, sightings, errors, _ = run(args.config, model, out)
    windows = read_windows(out / "run")
    problems = findings(code, driver, sightings, errors, windows, out)
    print("\n".join(summary(sightings, windows)))
    print(f"run: {time.time() - start:.0f} s, {len({s.pid for s in sightings})} GPU processes seen")
    for p in problems:
        print(f"FAIL {p}")
    print(f"gpu_smoke={'FAIL' if problems else 'PASS'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

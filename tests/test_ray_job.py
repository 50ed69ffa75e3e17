"""`ray job submit` of `selfimprove eval` (and, under `make test-slow`, of a tiny run) to a `ray start --head` on
loopback, as the README shows it.

1. Token auth, as in the README: the head and every Ray command run with RAY_AUTH_MODE=token; the
   token is RAY_AUTH_TOKEN, made up here so ~/.ray/auth_token is left alone. Ray 2.60's `ray start`
   turns token auth on by itself when ~/.ray/auth_token exists, but `ray job submit` sends the token
   only under RAY_AUTH_MODE=token. RAY_AUTH_MODE=disabled would work too, but the GCS listens on every
   interface even with --node-ip-address=127.0.0.1: only the dashboard stays on loopback.
2. The head has its own --temp-dir (and TMPDIR), ports and process tree, and teardown stops only that
   tree: `ray stop` would stop every Ray process on the machine, other people's runs included.
3. The job finds `selfimprove` on PATH (the venv's bin first, as with an activated venv); Ray leaves
   `.git`, `.venv` and what `.gitignore` lists (`runs/`) out of the `--working-dir` upload.
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
from processes import free_ports

from selfimprove.models import home

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head():
    """(dashboard address, env for Ray commands, token) of a `ray start --head --block` on 127.0.0.1."""
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Unix socket paths hold < 108 bytes
    token = secrets.token_hex(16)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM stops the node at once, no 30 s drain
           "TMPDIR": temp_dir}  # the rollout's CPU-slot locks too: a run elsewhere on the box must not hold them
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, agent, client = free_ports(4)  # agent and client would default to 52365 and 10001
    log = open(Path(temp_dir) / "head.log", "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
         f"--ray-client-server-port={client}", "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 180
        while True:
            assert head.poll() is None, (Path(temp_dir) / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "the Ray head's dashboard never answered"
            try:
                version = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
                urllib.request.urlopen(version, timeout=5)
                break
            except OSError:
                time.sleep(1)
        yield address, env, token
    finally:
        stop_cluster(head, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_cluster(head: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM the blocking `ray start` (it stops its node's processes), then SIGKILL what is left of its tree."""
    ours = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    try:
        ours += [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    head.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(ours, timeout=30)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=10)
    head.wait()


def submit(ray_head, *argv: str) -> str:
    """`ray job submit` of `argv` to the head, as the README shows it: the job's output, once it succeeded."""
    address, env, token = ray_head
    job_id = f"selfimprove-test-{uuid.uuid4().hex[:8]}"
    submitted = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", job_id, "--working-dir", str(REPO),
         # A job env var the driver also forwards to its workers: Ray refuses to merge the two
         # unless init_ray leaves it to the job.
         "--runtime-env-json", json.dumps({"env_vars": {"SELFIMPROVE_HOME": str(home())}}), "--", *argv],
        env=env, capture_output=True, text=True, timeout=1800)
    out = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, out[-4000:]

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
    # init_ray joined the head through RAY_ADDRESS rather than starting a cluster of its own.
    assert "Connected to Ray cluster" in out and "Started a local Ray instance" not in out
    return out


@pytest.mark.engine
def test_ray_job_submit_evaluates_on_the_cluster(ray_head, tmp_path, bundled_model):
    """One engine, on the head's node, through the job: what every stage of a run does (a whole run: slow)."""
    out_dir = tmp_path / "eval"
    submit(ray_head, "selfimprove", "eval", "smollm2-135m-instruct", "--limit", "4", "--n", "1", "--out", str(out_dir))
    metrics = json.loads((out_dir / "metrics.json").read_text())["metrics"]
    assert metrics["problems"] == 4 and 0 <= metrics["pass@1"] <= 1


@pytest.mark.engine
@pytest.mark.slow
def test_ray_job_submit_runs_a_tiny_run(ray_head, tiny_config, tmp_path, bundled_model):
    run_dir = tmp_path / "run"
    submit(ray_head, "selfimprove", "run", str(tiny_config), f"run_dir={run_dir}")
    for stage in ("iter_0/eval", "iter_1/rollout", "iter_1/pairs", "iter_1/train", "iter_1/eval"):
        assert (run_dir / stage / "_SUCCESS").is_file(), stage
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(isinstance(r["pass@1"], float) and 0 <= r["pass@1"] <= 1 for r in rows)

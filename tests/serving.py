"""Helpers for tests that run `selfimprove serve` as a real process and talk to it over loopback HTTP."""

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from processes import free_ports

from selfimprove.io import MARKER, SUCCESS

# Small enough to start in a minute and to test the limits: 4 samples, 48 new tokens, a 384-token context.
SMALL = ["rollout.max_model_len=384", "rollout.cpu_kvcache_gib=1", "rollout.enable_prefix_caching=false",
         "serve.max_n=4", "serve.max_tokens=48", "serve.max_prompt_tokens=400", "serve.max_body_kb=16"]


class Server:
    """`selfimprove serve ARGS` in its own process group, its output in `log`; `url` once it says it serves."""

    def __init__(self, log: Path, *args, env: dict | None = None):
        (self.port,) = free_ports(1)
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "selfimprove", "serve", *map(str, args),
                                          f"--port={self.port}"], stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, env={**os.environ, **(env or {})})
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def wait_serving(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while "serving " not in self.log.read_text():
            assert self.proc.poll() is None, f"the server ended:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not serving after {timeout} s:\n{self.log.read_text()[-3000:]}"
            time.sleep(1)

    def stop(self) -> int:
        """Ctrl-C, as a user stops it: the exit code."""
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise

    def request(self, method: str, path: str, body=None, key: str | None = None, headers: dict | None = None):
        """(status, JSON body) of one raw HTTP request; `body` a dict (sent as JSON) or bytes (sent as they are)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        sent = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
                **(headers or {})}
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        raw = response.read()
        conn.close()
        return response.status, json.loads(raw) if raw else None


def fake_run(tmp_path, evaluated: int, iterations: int = 2, name: str = "myrun"):
    """A run folder as `selfimprove run` leaves it after `evaluated` eval stages (their outputs are not read), with
    the trained models as empty folders: the layout only, for what `serve` reads."""
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / MARKER).write_text("")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"recipe": "irpo", "iterations": iterations,
                                                         "run_dir": str(run_dir)}))
    for t in range(evaluated):
        (run_dir / f"iter_{t}" / "eval").mkdir(parents=True)
        (run_dir / f"iter_{t}" / "eval" / SUCCESS).write_text("{}")
        if t:
            (run_dir / f"iter_{t}" / "train" / "model").mkdir(parents=True)
    return run_dir

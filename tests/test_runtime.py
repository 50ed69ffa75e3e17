"""The local Ray instance `selfimprove` starts: reachable from this machine only; its failures one line."""

import os
import subprocess
import sys

import psutil

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def test_local_ray_listens_on_loopback_only(ray_local):
    """Every TCP port a process of the local Ray instance listens on (GCS, raylet, workers) is bound to loopback."""

    @ray_local.remote
    def worker_pid() -> int:
        import os

        return os.getpid()

    ray_local.get(worker_pid.remote())  # at least one worker up, with its own server
    listening = []
    for p in psutil.Process().children(recursive=True):
        try:
            listening += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections("tcp")
                          if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            pass
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, names
    assert [entry for entry in listening if entry[1] not in LOOPBACK] == []


def test_a_local_ray_that_cannot_start_is_one_line(tmp_path):
    """Ray's own start-up failures (here: a temp dir whose socket paths pass the 107-byte limit) are one line."""
    deep = tmp_path / ("x" * 120)
    deep.mkdir()
    script = ("from selfimprove.errors import UserError\nfrom selfimprove.runtime import init_ray\n"
              "try:\n    init_ray()\nexcept UserError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "RAY_TMPDIR": str(deep)},
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.startswith("could not start Ray on this machine: OSError: validate_socket_filename failed: "
                                  "AF_UNIX path length cannot exceed 107 bytes"), done.stdout + done.stderr[-2000:]

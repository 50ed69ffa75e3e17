"""The local Ray instance `selfimprove` starts: reachable from this machine only."""

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

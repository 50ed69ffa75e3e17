"""Connect to Ray: the cluster a job runs in, or a local one started here."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import threading

from selfimprove.errors import UserError, first_line

CONNECT_SECONDS = 10


def init_ray() -> None:
    """`ray job submit` sets RAY_ADDRESS and we join that cluster; otherwise start a local one.

    A cluster that cannot be joined is one line naming RAY_ADDRESS, in bounded time: Ray itself retries an
    address with nothing listening forever, and logs each retry on stderr.
    """
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_listening(address)
    import ray

    # Ray refuses a driver env var that the submitted job's runtime env also sets: the job's wins.
    job_env = (json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}).get("env_vars") or {}
    env = {k: os.environ[k] for k in ("VLLM_LOGGING_LEVEL", "TOKENIZERS_PARALLELISM", "SELFIMPROVE_HOME",
                                      "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE") if k in os.environ and k not in job_env}
    kwargs = {"runtime_env": {"env_vars": env}, "log_to_driver": True}
    # Ray's core worker replaces the process's SIGTERM handler with one that aborts (exit -6, no clean-up):
    # the handler this process had (the CLI's: stop as Ctrl-C does) is put back.
    on_term = signal.getsignal(signal.SIGTERM)
    if not address:
        bind_to_loopback()
        try:
            ray.init(**kwargs, include_dashboard=False, num_cpus=os.cpu_count())
        except Exception as e:  # e.g. its GCS or raylet not up within Ray's minute on an overloaded machine
            raise UserError(f"could not start Ray on this machine: {type(e).__name__}: "
                            f"{first_line(e, 300)}") from None
    else:  # joining starts no process here, so none inherits the held stderr
        with _stderr_held() as held:
            try:
                ray.init(**kwargs)
            except Exception as e:
                said = held.drop()
                why = ("the cluster refused this process's authentication token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
                       "or ~/.ray/auth_token)" if "Unauthenticated" in said or "InvalidAuthToken" in said
                       else f"{type(e).__name__}: {first_line(e)}")
                raise UserError(f"cannot join the Ray cluster at RAY_ADDRESS={address}: {why}") from None
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


def check_listening(address: str) -> None:
    """Refuse a RAY_ADDRESS (host:port, after any scheme) where nothing accepts a connection within
    CONNECT_SECONDS. Other forms (auto, local) are left to Ray."""
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as e:
        raise UserError(f"nothing answers at RAY_ADDRESS={address} ({e.strerror or e}): start the cluster, fix the "
                        "address, or unset RAY_ADDRESS to run Ray on this machine") from None


class _Held:
    def __init__(self, file):
        self.file, self.dropped = file, False

    def text(self) -> str:
        sys.stderr.flush()
        self.file.seek(0)
        return self.file.read().decode(errors="replace")

    def drop(self) -> str:
        """What was held, which is then not written out."""
        self.dropped = True
        return self.text()


@contextlib.contextmanager
def _stderr_held():
    """Hold what this process writes on stderr (Ray's C++ core writes there too) while the block runs, then write
    it out unless the block dropped it: a failure can so be one line instead of many."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as file:
        os.dup2(file.fileno(), 2)
        held = _Held(file)
        try:
            yield held
        finally:
            said = held.text()
            os.dup2(saved, 2)
            os.close(saved)
            if not held.dropped:
                sys.stderr.write(said)
                sys.stderr.flush()

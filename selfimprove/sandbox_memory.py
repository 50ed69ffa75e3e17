"""A memory cap on a sandbox zygote and all it runs, as a whole: a memory cgroup of our own.

RLIMIT_AS caps each process of a program apart: 16 processes of 1 GiB each are 16 GiB. Where the machine lets us
make a memory cgroup (root, and our own memory cgroup writable: cgroup v1's `memory` hierarchy, or v2 with the
memory controller delegated to our group), each zygote starts in one of its own, capped at the program's
`memory_mb` plus `HEADROOM_MB` for the zygote's own processes. The kernel then kills within the group; the zygote
makes programs the first to go (`oom_score_adj`), and a job during which it killed is a `memory` verdict. Where the
machine does not, `available()` says why, in one line, and limits stay per process.
"""

from __future__ import annotations

import functools
import os
import secrets
import time
from pathlib import Path

HEADROOM_MB = 128  # the judge, the program zygote and the test process, beside the program's own processes
CGROUP_ROOT = Path("/sys/fs/cgroup")


@functools.cache
def parent() -> tuple[Path | None, str]:
    """(the cgroup folder our groups go in, its version "v1"/"v2"), or (None, why not)."""
    if os.getuid() != 0:
        return None, "not root"
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError as e:
        return None, f"no /proc/self/cgroup ({e.strerror})"
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder, version = CGROUP_ROOT / "memory" / path.lstrip("/"), "v1"
        elif controllers == "" and "memory" in _read(CGROUP_ROOT / "cgroup.controllers").split():
            folder, version = CGROUP_ROOT / path.lstrip("/"), "v2"
            if "memory" not in _read(folder / "cgroup.subtree_control").split():
                return None, f"the memory controller is not delegated below {folder}"
        else:
            continue
        probe = folder / f"selfimprove-probe-{os.getpid()}"
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError as e:
            return None, f"cannot make a memory cgroup in {folder} ({e.strerror})"
        return folder, version
    return None, "no memory cgroup controller"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@functools.cache
def available() -> str | None:
    """None if zygotes get a memory cgroup, else why not, said once on stderr by the caller."""
    return parent()[1] if parent()[0] is None else None


def _remove_left(folder: Path) -> None:
    """Remove the groups a killed process of ours left (named with its pid; rmdir takes only an empty group)."""
    for group in folder.glob("selfimprove-sandbox-*-*"):
        pid = group.name.split("-")[2]
        if pid.isdigit() and not Path("/proc", pid).exists():
            try:
                group.rmdir()
            except OSError:  # processes still in it, or another process removed it first
                pass


class MemoryCap:
    """A memory cgroup of `mb` MiB plus headroom that a process joins with `wrap(command)`; removed by `close`."""

    def __init__(self, mb: int):
        folder, self.version = parent()
        _remove_left(folder)
        self.path = folder / f"selfimprove-sandbox-{os.getpid()}-{secrets.token_hex(4)}"
        self.path.mkdir()
        limit = str((mb + HEADROOM_MB) << 20)
        if self.version == "v1":
            (self.path / "memory.limit_in_bytes").write_text(limit)
        else:
            (self.path / "memory.max").write_text(limit)
            (self.path / "memory.swap.max").write_text("0")

    def wrap(self, command: list[str]) -> list[str]:
        """`command` run after its shell joined the group: every process it starts is in it from its first page."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *command]

    def kills(self) -> int:
        """How many processes the kernel has killed in the group for want of memory."""
        events = _read(self.path / ("memory.oom_control" if self.version == "v1" else "memory.events"))
        return next((int(line.split()[1]) for line in events.splitlines() if line.startswith("oom_kill ")), 0)

    def close(self) -> None:
        """Remove the group once its processes are gone (at most 2 s after they were killed)."""
        until = time.monotonic() + 2
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > until:
                    return
                time.sleep(0.01)

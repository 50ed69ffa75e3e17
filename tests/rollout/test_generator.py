"""The generators' host-side helpers that need no engine: the private folder of the CPU-slot locks."""

import os
import subprocess
import sys
import tempfile

import pytest

from selfimprove.rollout.generator import private_folder


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_private_folder_is_made_mode_0700_and_reused(temp_dir):
    folder = private_folder()
    assert folder == str(temp_dir / f"selfimprove-{os.getuid()}")
    assert os.stat(folder).st_mode & 0o777 == 0o700
    assert private_folder() == folder


def test_a_link_or_an_open_folder_under_our_name_is_refused(temp_dir):
    name = temp_dir / f"selfimprove-{os.getuid()}"
    (temp_dir / "elsewhere").mkdir(mode=0o700)
    name.symlink_to(temp_dir / "elsewhere")
    with pytest.raises(RuntimeError, match=r"is not a private folder of this user"):
        private_folder()
    name.unlink()
    name.mkdir()
    name.chmod(0o777)
    with pytest.raises(RuntimeError, match=r"is not a private folder of this user"):
        private_folder()


def test_cpu_engines_preload_tcmalloc_by_name_where_this_machine_has_it(monkeypatch):
    import ctypes.util

    from selfimprove.rollout.engine import cpu_engine_env

    found = {"tcmalloc_minimal": "libtcmalloc_minimal.so.4"}
    monkeypatch.setattr(ctypes.util, "find_library", found.get)
    assert cpu_engine_env() == {"LD_PRELOAD": "libtcmalloc_minimal.so.4"}
    found.clear()
    assert cpu_engine_env() == {}


def test_an_in_process_engine_binds_every_thread_of_its_process_to_its_cores():
    """In a process of its own (the binding is process-wide): a thread started before the binding, one started
    after, and torch's thread count all follow the cores given."""
    script = """
import os, threading
from selfimprove.rollout.engine import bind_process
import torch
stop = threading.Event()
before = threading.Thread(target=stop.wait); before.start()
bind_process("0")
after = threading.Thread(target=stop.wait); after.start()
print(sorted({frozenset(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}, key=sorted),
      torch.get_num_threads())
stop.set()
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[-2] == "[frozenset({0})] 1"

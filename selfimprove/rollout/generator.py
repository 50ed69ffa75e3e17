"""Ray Data callable classes that turn prompt rows into sample rows.

Input batch columns: `problem_id`, `prompt` (chat messages as JSON), and optionally `n`,
`temperature` and `seed` per row (so one engine serves greedy and sampled passes in one
go, and a row's samples do not depend on the actor that drew them); any other column is
passed through to every sample of its row.
A row with a non-empty `skip` column is not generated: its n samples get that status (a guidance the
solver must not be given). Output: one row per sample with `sample_index`, `text`, `prompt_tokens`,
`completion_tokens`, `finish_reason` and `status` ("ok", the row's `skip`, or "skipped=too_long" for a
prompt that leaves no room in the context: kept, with empty text, so counts add up).

`VLLMGenerator` builds one vLLM engine per actor in `__init__`. `HFGenerator` has the same
interface over transformers `generate`: for machines without vLLM, and the baseline of
benchmarks/rollout.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import tempfile
import time
from collections.abc import Callable

import numpy as np

from selfimprove.config import RolloutConfig

SKIPPED = "skipped=too_long"
STARTUP = "engine_startups"  # a column: the start-up record (JSON) of each engine a row passed through, one a line
# Sequences per transformers `generate` call: larger batches barely help on CPU and cost memory.
HF_CHUNK = 64


class _Generator:
    """What both generators share: chat templating, context checks, fanning out n samples."""

    def __init__(self, cfg: RolloutConfig, stop: tuple[str, ...]):
        self.cfg = cfg
        self.stop = tuple(stop)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        size = len(batch["problem_id"])
        ns = [int(x) for x in batch["n"]] if "n" in batch else [self.cfg.n] * size
        temps = [float(x) for x in batch["temperature"]] if "temperature" in batch else [self.cfg.temperature] * size
        seeds = [int(x) for x in batch["seed"]] if "seed" in batch else [None] * size
        skips = [str(x or "") for x in batch["skip"]] if "skip" in batch else [""] * size
        prompts = [self.tokenizer.apply_chat_template(json.loads(p), tokenize=False, add_generation_prompt=True)
                   for p in batch["prompt"]]
        lengths, results = self.generate_raw(prompts, ns, temps, seeds, [not s for s in skips])
        # The chat-message JSON is replaced by the templated text the model actually saw.
        keep = [k for k in batch if k not in ("prompt", "skip")]
        out: dict[str, list] = {k: [] for k in (*keep, "prompt_text", "sample_index", "text",
                                                "prompt_tokens", "completion_tokens", "finish_reason", "status")}
        for i in range(size):
            status = skips[i] or ("ok" if i in results else SKIPPED)
            samples = results.get(i) or [("", 0, status)] * ns[i]
            for j, (text, tokens, reason) in enumerate(samples):
                for key in keep:
                    value = batch[key][i]
                    out[key].append(value.item() if isinstance(value, np.generic) else value)
                out["prompt_text"].append(prompts[i])
                out["sample_index"].append(j)
                out["text"].append(text)
                out["prompt_tokens"].append(lengths[i])
                out["completion_tokens"].append(tokens)
                out["finish_reason"].append(reason)
                out["status"].append(status)
        return out

    def generate_raw(self, prompts: list[str], ns: list[int], temps: list[float], seeds: list[int | None],
                     drawn: list[bool] | None = None) -> tuple[list[int], dict[int, list[tuple[str, int, str]]]]:
        """(prompt tokens of each, {index: its samples}) for prompt texts as the model sees them.

        A prompt that leaves no room for one new token in `max_model_len`, or is not `drawn`, gets no entry.
        """
        lengths = [len(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        fits = [i for i in range(len(prompts)) if lengths[i] < self.cfg.max_model_len and (drawn is None or drawn[i])]
        samples = self.generate([prompts[i] for i in fits], [ns[i] for i in fits], [temps[i] for i in fits],
                                [seeds[i] for i in fits]) if fits else []
        return lengths, dict(zip(fits, samples, strict=True))

    def generate(self, prompts: list[str], ns: list[int], temps: list[float],
                 seeds: list[int | None]) -> list[list[tuple[str, int, str]]]:
        """For each prompt, its samples as (text, completion tokens, finish reason)."""
        raise NotImplementedError


class VLLMGenerator(_Generator):
    """One vLLM engine per Ray actor, built once.

    `model` may be a `stored:` reference (`storage.shared`): it is fetched into this node's cache first.
    With `startups`, every row it returns carries in the column `STARTUP` when its actor began and when the engine
    was ready (wall clock), after any earlier pool's record the row held: the driver keeps them, so that a stage can
    tell its fixed cost from its work (`overhead.py`). No file is written here: the run dir is the driver's.
    With `then` (a function of a batch), each batch of samples passes through it before leaving the actor.
    """

    def __init__(self, model: str, cfg: RolloutConfig, stop: tuple[str, ...] = (), cores_per_actor: int = 0,
                 startups: bool = False, then: Callable[[dict], dict] | None = None):
        began = time.time()
        super().__init__(cfg, stop)
        self.then = then
        from selfimprove.rollout.engine import build_llm, on_cpu
        from selfimprove.storage import local

        model = local(model)

        # CPU actors of one node bind their engines to disjoint cores: each holds a lock on
        # its slot for its whole life, and the OS drops the lock if the actor dies.
        cores = None
        if on_cpu() and cores_per_actor:
            cores, self._slot_lock = claim_cores(cores_per_actor)
        self.llm = build_llm(model, cfg, cpu_cores=cores, in_process=cores is not None)
        self.tokenizer = self.llm.get_tokenizer()
        self.startup = json.dumps({"engine": f"{socket.gethostname()}-{os.getpid()}", "began": round(began, 2),
                                   "ready": round(time.time(), 2)}) if startups else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out = super().__call__(batch)
        if self.startup:
            out[STARTUP] = [f"{before}\n{self.startup}" if before else self.startup
                            for before in out.get(STARTUP) or [""] * len(out["text"])]
        return self.then(out) if self.then else out

    def generate(self, prompts, ns, temps, seeds):
        from selfimprove.rollout.engine import sampling_params

        params = [sampling_params(self.cfg, n, t, self.stop, seed) for n, t, seed in zip(ns, temps, seeds, strict=True)]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [[(c.text, len(c.token_ids), c.finish_reason or "") for c in o.outputs] for o in outputs]


class HFGenerator(_Generator):
    """transformers `generate` on left-padded batches: the same rows, no vLLM needed."""

    def __init__(self, model: str, cfg: RolloutConfig, stop: tuple[str, ...] = ()):
        super().__init__(cfg, stop)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(cfg.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
        from selfimprove.precision import concrete

        dtype = getattr(torch, concrete("rollout.dtype", cfg.dtype))
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()

    def generate(self, prompts, ns, temps, seeds):
        """All samples of the batch, in padded chunks of `HF_CHUNK` sequences of one temperature."""
        import torch

        seqs = [(i, prompt, temp) for i, (prompt, n, temp) in enumerate(zip(prompts, ns, temps, strict=True))
                for _ in range(n)]
        results: list[list] = [[] for _ in prompts]
        if seeds and seeds[0] is not None:
            torch.manual_seed(seeds[0])
        for temp in sorted({t for _, _, t in seqs}):
            same = [s for s in seqs if s[2] == temp]
            for start in range(0, len(same), HF_CHUNK):
                chunk = same[start:start + HF_CHUNK]
                enc = self.tokenizer([p for _, p, _ in chunk], return_tensors="pt", padding=True,
                                     add_special_tokens=False)
                sample = temp > 0
                with torch.no_grad():
                    out = self.model.generate(
                        **enc, max_new_tokens=self.cfg.max_tokens, do_sample=sample,
                        temperature=temp if sample else None, top_p=self.cfg.top_p if sample else None,
                        stop_strings=list(self.stop) or None, tokenizer=self.tokenizer,
                        pad_token_id=self.tokenizer.pad_token_id,
                    )
                for (i, _, _), ids in zip(chunk, out[:, enc["input_ids"].shape[1]:], strict=True):
                    results[i].append(self._finish(ids))
        return results

    def _finish(self, ids) -> tuple[str, int, str]:
        """Text up to the first stop string or end-of-sequence, as vLLM reports it."""
        ids = ids.tolist()
        eos = self.tokenizer.eos_token_id
        reason = "length"
        if eos in ids:
            ids, reason = ids[: ids.index(eos)], "stop"
        while ids and ids[-1] == self.tokenizer.pad_token_id:
            ids.pop()
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for s in self.stop:
            if s in text:
                text, reason = text[: text.index(s)], "stop"
        return text, len(ids), reason


def private_folder() -> str:
    """This user's own folder in the machine's temp dir (mode 0700), for per-node lock files.

    The temp dir is per machine (a home folder may be shared between nodes) but open to every user: a folder
    another user made, or a link, under our name is refused rather than used.
    """
    folder = os.path.join(tempfile.gettempdir(), f"selfimprove-{os.getuid()}")
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise RuntimeError(f"{folder} is not a private folder of this user (a link, another owner, or open to "
                           "others): remove it and run again")
    return folder


def claim_cores(per_engine: int):
    """(the cores an engine of this process binds to, e.g. "2,3"; the lock that holds them for the process's life):
    the first free group of `per_engine` cores of this Ray node."""
    usable = sorted(os.sched_getaffinity(0))  # in a container, not necessarily 0..n-1
    slot, lock = _claim_slot(len(usable) // per_engine)
    return ",".join(map(str, usable[slot * per_engine:(slot + 1) * per_engine])), lock


def _claim_slot(slots: int, wait_s: float = 60.0):
    """(slot index, open lock file) for the first free CPU slot of this Ray node.

    Slots are per Ray node, not per machine: two Ray clusters on one machine (a run and a test)
    each bind their own engines and merely share the cores. Waits a while when all are taken:
    an actor being replaced may not have exited yet.
    """
    import ray

    node = ray.get_runtime_context().get_node_id()[:16] if ray.is_initialized() else "no-ray"
    folder = private_folder()
    deadline = time.monotonic() + wait_s
    while True:
        for slot in range(max(slots, 1)):
            # O_NOFOLLOW: a link planted at this name must not make us open (and truncate) another file.
            f = os.fdopen(os.open(os.path.join(folder, f"cpu-slot-{node}-{slot}.lock"),
                                  os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600), "r+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return slot, f
            except BlockingIOError:
                f.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"all {slots} CPU slots stayed taken for {wait_s:.0f} s: "
                               "the pool has more actors than the node has core groups")
        time.sleep(0.5)

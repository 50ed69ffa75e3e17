"""Typed run configuration: dataclasses with defaults and one-line help.

1. Every knob is a dataclass field made by `knob(default, help, check)`.
2. A config is loaded from YAML, then dotted overrides (`rollout.n=8`) are applied;
   override values are parsed as YAML scalars, so `8` is an int and `[1, 2]` a list.
3. Unknown keys, wrong types and values a field's check rejects raise `UserError`
   naming the key and the file, before any Ray or engine work starts.
4. This module is the bottom of the package: it knows the knobs, not the recipes or the trainer that read
   them. Loading a config under its recipe's defaults, and the recipe's checks, are `selfimprove.recipes`'.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from selfimprove.errors import UserError

# The losses of selfimprove/train/losses.py (`LOSSES`, a test holds them equal): the choices of train.loss.
LOSS_NAMES = ("sft", "dpo", "rpo", "orpo", "ipo")


def knob(default: Any, help: str, check: Callable[[Any], str | None] | None = None, path: bool = False):
    """A config field: default, one-line help, a check returning an error text or None, and whether it is a
    path (a leading `~` is expanded)."""
    metadata = {"help": help, "check": check, "path": path}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def positive(v) -> str | None:
    return None if v > 0 else "must be > 0"


# Upper bounds no real run comes near: a bigger value is a typo (an extra 0, 1e12), and would otherwise fail late,
# run out of memory or run for years. Each is far past what any published recipe or dataset uses.
MAX_SAMPLES = 100_000  # per problem (rollout.n, eval.k, process.k): repeated-sampling studies go to 10,000
MAX_TOKENS = 1 << 24  # rollout.max_model_len (so any max_tokens): 16.8 M, past the longest context of any model (10 M)
MAX_PROBLEMS = 10**8  # task.train_size / test_size: a split is held in the driver's memory, ~1 KB a problem
MAX_GENERATED = 10**6  # task.generated_*: the generator makes ~25,000 a second and keeps them all to find repeats;
# GSM8K has 7,473 training problems and MATH 7,500


def up_to(limit: int) -> Callable[[Any], str | None]:
    """> 0 and at most `limit`."""
    return lambda v: positive(v) or (None if v <= limit else f"must be at most {limit:,}")


def optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """`check`, for a field that may also be None."""
    return lambda v: None if v is None else check(v)


def non_negative(v) -> str | None:
    return None if v >= 0 else "must be >= 0"


def unit_interval(v) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def one_of(*choices) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(map(str, choices))}"


@dataclass
class SandboxConfig:
    isolation: str = knob("auto", "how code tasks isolate a program: bwrap (bubblewrap; auto means it), or, only with "
                          "allow_weak, unshare (namespaces, the host's files) or none (limits only)",
                          one_of("auto", "bwrap", "unshare", "none"))
    allow_weak: bool = knob(False, "allow an isolation weaker than bwrap (said in one line when used); with auto, "
                            "the first of unshare and none that runs where bwrap cannot")
    timeout: float = knob(10.0, "seconds of wall time a program and its tests get before the sandbox is killed", positive)
    cpu_seconds: int = knob(5, "seconds of CPU time a program gets", positive)
    memory_mb: int = knob(1024, "address space a program may map, MiB", positive)
    file_mb: int = knob(16, "largest file a program may write, MiB (and its whole working directory under bwrap)",
                        positive)
    open_files: int = knob(64, "files a program may hold open at once", positive)
    processes: int = knob(16, "processes and threads a program may run at once", positive)
    output_kb: int = knob(256, "output a program may print, KiB; more ends it", positive)
    workers: int = knob(2, "verification tasks (each one core, one program at a time) running at once", positive)
    flagged: str = knob("count", "a passing program the reward-hacking monitor flags (selfimprove/monitor.py): count "
                        "it in stats.json, metrics.json and report.md, or fail it", one_of("count", "fail"))


@dataclass
class TaskConfig:
    name: str = knob("arithmetic", "task: arithmetic, gsm8k, math, arc; code: functions, mbpp, humaneval")
    data: str | None = knob(None, "local file/folder (JSONL or Parquet) or Hugging Face dataset name; none = built-in")
    train_size: int | None = knob(None, "use at most this many training problems (none = all)", optional(up_to(MAX_PROBLEMS)))
    test_size: int | None = knob(None, "use at most this many held-out problems (none = all)", optional(up_to(MAX_PROBLEMS)))
    seed: int = knob(0, "seed of the arithmetic generator and of any subsampling")
    step_weights: list[float] = knob([0.7, 0.3], "arithmetic: relative frequency of problems with 1, 2, 3, 4 steps",
                                     lambda v: None if 1 <= len(v) <= 4 and all(w >= 0 for w in v) and sum(v) > 0
                                     else "must be 1-4 non-negative weights with a positive sum")
    min_value: int = knob(1, "arithmetic: smallest number in a problem", non_negative)
    max_value: int = knob(15, "arithmetic: largest number in a problem", positive)
    operations: str = knob("+-", "arithmetic: operations used, a subset of '+-*'",
                           lambda v: None if v and set(v) <= set("+-*") else "must be a non-empty subset of '+-*'")
    variety: int = knob(4, "arithmetic: how many phrasings of each operation to draw from (1 = one template)", positive)
    generated_train: int = knob(2000, "arithmetic: problems generated for the train split", up_to(MAX_GENERATED))
    generated_val: int = knob(200, "arithmetic: problems generated for the val split (choose knobs on it)",
                              up_to(MAX_GENERATED))
    generated_test: int = knob(200, "arithmetic: problems generated for the test split", up_to(MAX_GENERATED))
    holdout: str = knob("structure", "generated tasks, what test holds out: structure (problems never trained on, of "
                        "every kind) or families (kinds never trained on: a quarter of them, held out of train and val)",
                        one_of("structure", "families"))
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


@dataclass
class RolloutConfig:
    n: int = knob(8, "samples per problem", up_to(MAX_SAMPLES))
    temperature: float = knob(0.8, "sampling temperature (0 = greedy)", non_negative)
    top_p: float = knob(1.0, "nucleus sampling mass", unit_interval)
    max_tokens: int = knob(256, "most new tokens per sample", positive)
    seed: int = knob(0, "engine seed: same config and seed give the same samples, nearly always (README)")
    max_model_len: int = knob(1024, "context length the engine reserves per sequence", up_to(MAX_TOKENS))
    enforce_eager: bool = knob(True, "skip torch.compile/CUDA graphs: faster start, slightly slower generation")
    dtype: str = knob("auto", "weights and activations dtype (auto: bfloat16 where the GPU or CPU computes it natively, "
                      "else float32)", one_of("auto", "bfloat16", "float16", "float32"))
    gpu_memory_utilization: float = knob(0.85, "GPU only: share of GPU memory vLLM may take", unit_interval)
    tensor_parallel_size: int = knob(1, "GPUs per engine (GPU only)", positive)
    cpu_kvcache_gib: int = knob(2, "CPU only: GiB of KV cache per engine", positive)
    cpus_per_actor: int = knob(0, "CPU only: cores each engine binds to (0 = the node's cores / num_actors)", non_negative)
    num_actors: int = knob(1, "vLLM engines in the Ray Data actor pool", positive)
    batch_size: int = knob(64, "prompts per Ray Data batch sent to an engine", positive)
    start_timeout: int = knob(900, "seconds a rollout (or an MC process stage) waits for all its engines to be "
                              "scheduled and started before it fails", positive)
    actor_restarts: int = knob(2, "times a dead engine actor is restarted, and its batch retried, before the "
                               "rollout fails", non_negative)
    enable_prefix_caching: bool = knob(True, "reuse KV cache of shared prompt prefixes")
    draw_ahead: bool = knob(True, "an iteration's eval engines also draw the next iteration's training samples "
                            "(same model): one engine start fewer per iteration")
    temperature_schedule: list[float] = knob([], "training rollouts: temperature of iteration 1, 2, ... (empty = temperature)",
                                             lambda v: None if all(t >= 0 for t in v) else "must be temperatures >= 0")


@dataclass
class EvalConfig:
    split: str = knob("val", "held-out split each eval scores first: val, the one to choose knobs on (test is "
                      "scored beside it for the report: eval.test)", one_of("train", "val", "test"))
    k: int = knob(8, "samples per problem for maj@k (1 = greedy pass@1 only)", up_to(MAX_SAMPLES))
    temperature: float = knob(0.8, "sampling temperature of the maj@k samples", non_negative)
    test: bool = knob(True, "when eval.split is not test, also score the task's test split, as the report's set "
                      "'test': nothing chooses on it")
    extra: dict[str, TaskConfig] = knob({}, "further held-out sets, each scored on its test split for the report (out "
                                        "of domain, transfer): name -> task keys that differ from the run's task, "
                                        "e.g. {wide: {min_value: 16}}")
    extra_k: int = knob(1, "samples per problem on the report's sets, 'test' and eval.extra's (1 = greedy pass@1 "
                        "only)", up_to(MAX_SAMPLES))
    optional: list[str] = knob([], "eval.extra sets skipped, with a one-line note, where their data path is not on "
                               "this machine (a dataset another machine lacks)")


LORA_DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    loss: str = knob("rpo", "loss: sft, dpo, rpo (DPO + winner NLL, IRPO), orpo or ipo", one_of(*LOSS_NAMES))
    beta: float = knob(0.1, "dpo/rpo/ipo: strength of the pull towards the reference", positive)
    alpha: float = knob(1.0, "rpo: weight of the winner's length-normalised NLL", non_negative)
    orpo_lambda: float = knob(0.1, "orpo: weight of the odds-ratio term", non_negative)
    label_smoothing: float = knob(0.0, "dpo/rpo: probability a pair's label is wrong (cDPO)",
                                  lambda v: None if 0 <= v < 0.5 else "must be in [0, 0.5)")
    nll_norm: str = knob("sequence", "rpo/orpo/sft: NLL per winner ('sequence', the paper) or per batch token ('batch_tokens', TRL)",
                         one_of("sequence", "batch_tokens"))
    lr: float | None = knob(None, "peak learning rate (none: 2e-5 for full fine-tuning, 2e-4 with LoRA)",
                            optional(positive))
    warmup_steps: int = knob(0, "optimizer steps of linear warm-up from 0 to lr, then constant", non_negative)
    weight_decay: float = knob(0.0, "AdamW weight decay", non_negative)
    grad_clip: float = knob(1.0, "clip the global gradient norm to this (0 = no clipping)", non_negative)
    batch_size: int = knob(4, "pairs (or SFT rows) per optimizer step, summed over workers", positive)
    micro_batch_size: int = knob(2, "pairs per forward pass on one worker (batch_size must divide by it x num_workers)", positive)
    epochs: int = knob(1, "passes over the training pairs", positive)
    group_by_length: bool = knob(True, "put pairs of similar length in one forward pass (random order otherwise): "
                                 "less padding to compute on")
    max_steps: int | None = knob(None, "stop after this many optimizer steps (none = all epochs)",
                                 optional(positive))
    max_len: int = knob(512, "most tokens of prompt + response; longer ones are cut as train.truncation says", lambda v: None if v >= 2 else "must be >= 2")
    truncation: str = knob("response", "over max_len: cut the response's end, the prompt's start, or drop the pair",
                           one_of("response", "prompt", "drop"))
    num_workers: int = knob(2, "Ray Train workers (one per GPU on GPU nodes)", positive)
    cpus_per_worker: int = knob(0, "CPU cores per worker (0: the node's cores / num_workers on CPU, 1 on GPU)", non_negative)
    zero_stage: int = knob(2, "DeepSpeed ZeRO stage: 0 none, 1 optimizer, 2 + gradients, 3 + parameters sharded",
                           lambda v: None if v in (0, 1, 2, 3) else "must be 0, 1, 2 or 3")
    offload_optimizer: bool = knob(False, "ZeRO 1-3: keep optimizer states in CPU memory (DeepSpeed CPU Adam)")
    precision: str = knob("auto", "bf16 mixed precision (fp32 master weights), plain fp32, or auto (bf16 where the "
                          "GPU or CPU computes it natively, else fp32); the PRM trainer follows it too",
                          one_of("auto", "bf16", "fp32"))
    gradient_checkpointing: bool = knob(False, "recompute activations in the backward pass: less memory, ~30% slower")
    lora: bool = knob(False, "train a LoRA adapter (merged into the saved model) instead of all weights")
    lora_r: int = knob(8, "LoRA rank", positive)
    lora_alpha: int = knob(16, "LoRA scaling numerator (scale = lora_alpha / lora_r)", positive)
    lora_dropout: float = knob(0.0, "dropout on the LoRA input", lambda v: None if 0 <= v < 1 else "must be in [0, 1)")
    lora_targets: list[str] = knob(LORA_DEFAULT_TARGETS, "module names LoRA wraps ('all-linear' = every linear layer but the head)",
                                   lambda v: None if v else "must name at least one module")
    report_every: int = knob(10, "optimizer steps between metric reports (a report costs ~2 s)", positive)
    checkpoint_every: int = knob(50, "optimizer steps between resumable checkpoints (0 = none)", non_negative)
    worker_restarts: int = knob(1, "times the workers start again from the last checkpoint after one of them (or its "
                                "node) is lost, or could not be started, before training fails", non_negative)
    seed: int = knob(0, "seed of the pair order, LoRA initialisation and dropout")


@dataclass
class PairsConfig:
    pairs_per_problem: int = knob(2, "most preference pairs built from one problem's samples", positive)
    include_gold: bool = knob(False, "add the problem's gold chain of thought as a winner")
    source: str = knob("outcome", "rank samples by their final answer (outcome, IRPO) or by their process score "
                       "from step values (process, SIPF: adds a process stage)", one_of("outcome", "process"))
    accumulate: bool = knob(False, "train iteration t on its pairs plus all earlier iterations' (D_t = D_t-1 + new, SIPF)")


@dataclass
class ProcessConfig:
    scorer: str = knob("mc", "step scorer: mc (Monte Carlo rollouts from each step) or trained (MC for the first "
                       "prm_mc_iterations iterations, then a PRM trained on their labels)", one_of("mc", "trained"))
    split: str = knob("newline", "how a sample is cut into steps: newline, sentence (newlines and '. '), step_marker ('Step k')",
                      one_of("newline", "sentence", "step_marker"))
    max_steps: int = knob(8, "most steps per sample; the steps past it are scored as one last step", positive)
    k: int = knob(4, "mc: completions rolled out from each step prefix",
                  lambda v: "must be >= 1" if v < 1 else up_to(MAX_SAMPLES)(v))
    temperature: float = knob(0.8, "mc: sampling temperature of those completions", non_negative)
    max_tokens: int = knob(128, "mc: most new tokens per completion (a completion only finishes the solution)", positive)
    label: str = knob("soft", "mc full scan: a step's value is the share of completions that reach the gold answer "
                      "(soft) or 1 if any does (hard)", one_of("soft", "hard"))
    search: str = knob("full", "mc: roll out from every step (full), or search each wrong sample for its first step of "
                       "value 0 (galloping from step 0, then halving; a step's draws stop at the first success) and "
                       "label steps 1 before it, 0 from it (first_error: fewer rollouts)",
                       one_of("full", "first_error"))
    path_score: str = knob("mean", "a sample's score from its step values: mean or min", one_of("mean", "min"))
    eta: float = knob(0.1, "process pairs: least score gap between chosen and rejected", non_negative)
    prm_mc_iterations: int = knob(1, "trained: iterations scored by MC whose step labels train the PRM; later "
                                  "iterations are scored by the PRM", positive)
    prm_backbone: str | None = knob(None, "trained: model the PRM is a classifier on (none = the run's starting model); "
                                    "must share the policy's tokenizer")
    prm_epochs: int = knob(2, "trained: passes over the MC-labelled samples", positive)
    prm_lr: float = knob(2e-5, "trained: AdamW learning rate of the PRM", positive)
    prm_batch_size: int = knob(8, "trained: samples per PRM optimizer step, summed over train.num_workers workers "
                               "(also samples per scoring forward pass)", positive)
    prm_max_len: int = knob(1024, "trained: most tokens of prompt + sample the PRM reads; steps ending past it are "
                            "neither trained on nor scored", lambda v: None if v >= 2 else "must be >= 2")


@dataclass
class ModelsConfig:
    policy: str | None = knob(None, "the model a run trains and evaluates (none: `model`, which means the same)")
    guide: str | None = knob(None, "sgft: the guide, which sgft trains (another name for `model`)")
    reference: str | None = knob(None, "the DPO reference of every preference train stage (none: the model the stage "
                                 "starts from, as iterative recipes do); must share the policy's tokenizer")
    teacher: str | None = knob(None, "self_refine: the model that writes demonstrations; sgft: the model that writes "
                               "guidance data (bundled name, HF id, folder or .gguf; or give teacher.data)")
    solver: str | None = knob(None, "sgft: the model that answers with the guide's guidance; it is never trained, "
                              "and may be of another family or size than the guide")


@dataclass
class TeacherConfig:
    data: str | None = knob(None, "ready rows instead of a teacher model (JSONL/Parquet): self_refine's demonstrations "
                            "(question, response), sgft's guidance (question, guidance)", path=True)
    n: int = knob(4, "demonstrations (guidances) the teacher writes per training question", up_to(MAX_SAMPLES))
    temperature: float = knob(0.7, "sampling temperature of the teacher's demonstrations (guidances)", non_negative)
    rows_per_problem: int = knob(2, "most distinct kept demonstrations (guidances) per question the student (guide) "
                                 "is tuned on", positive)


@dataclass
class GuideConfig:
    n: int = knob(4, "sgft rounds: guidances the guide samples per training question", up_to(MAX_SAMPLES))
    temperature: float = knob(0.8, "sgft rounds: sampling temperature of those guidances", non_negative)
    solver_samples: int = knob(4, "sgft rounds: solver samples drawn with each guidance; the share correct is the "
                               "guidance's value", up_to(MAX_SAMPLES))
    solver_temperature: float = knob(0.7, "sgft rounds: sampling temperature of those solver samples", non_negative)
    min_gap: float = knob(0.25, "sgft rounds: least value gap between a guidance pair's chosen and rejected",
                          unit_interval)
    max_tokens: int = knob(160, "most new tokens of a guidance", positive)
    num_actors: int = knob(1, "vLLM engines in the guide's pool (the solver's pool has rollout.num_actors)", positive)
    cot_baseline: bool = knob(False, "sgft: also fine-tune the solver on the gold chains of thought of the guidance "
                              "data's questions, and evaluate it (the paper's baseline)")


RECIPE_NAMES = ("irpo", "star", "dpo", "sipf", "self_refine", "sgft")  # selfimprove/recipes/<name>.py


@dataclass
class TrackingConfig:
    folder: str = knob("tensorboard", "TensorBoard event files of the run (relative: inside run_dir)", path=True)
    mlflow: bool = knob(False, "also log to MLflow, a local file store in run_dir/mlruns (needs `pip install mlflow`)")


@dataclass
class ServeConfig:
    name: str | None = knob(None, "model name clients ask for (none: the run folder's or the model's name)")
    host: str = knob("127.0.0.1", "address the HTTP server binds (127.0.0.1: this machine only)")
    port: int = knob(8000, "HTTP port", lambda v: None if 0 < v < 65536 else "must be a port number, 1-65535")
    cpus_per_replica: int = knob(1, "CPU only: cores each engine replica binds to", positive)
    num_replicas: int = knob(1, "engine replicas of each model (fixed; see max_replicas for autoscaling)", positive)
    min_replicas: int = knob(1, "autoscaling: fewest engine replicas (used when max_replicas > num_replicas)",
                             non_negative)
    max_replicas: int | None = knob(None, "autoscaling: most engine replicas (none: no autoscaling)", optional(positive))
    target_ongoing_requests: int = knob(8, "autoscaling: requests per replica Serve aims for", positive)
    max_ongoing_requests: int = knob(32, "requests one replica takes at once; more wait in Serve's queue", positive)
    max_queued_requests: int = knob(64, "requests that may wait for a model's replicas, all busy; more get a 503",
                                    positive)
    request_timeout_s: float | None = knob(600.0, "seconds a request may take, waiting included, before it gets a "
                                                  "504 (none: no limit)", optional(positive))
    max_tokens: int = knob(512, "largest max_tokens a request may ask for", positive)
    max_n: int = knob(8, "largest n a request may ask for", positive)
    max_request_tokens: int | None = knob(None, "most new tokens one request may ask for, prompts x n x max_tokens "
                                                "(none: max_n x max_tokens, one prompt's worth)", optional(positive))
    max_prompt_tokens: int | None = knob(None, "longest prompt (tokens, chat template applied) a request may send "
                                               "(none: what the context leaves after max_tokens)", optional(positive))
    max_body_kb: int = knob(256, "largest request body, KiB", positive)
    drain_seconds: int = knob(300, "seconds a replaced or stopped replica may finish its requests in", positive)
    promote_timeout: float = knob(600.0, "--follow: seconds a newly evaluated model may take to start before the old "
                                         "one is kept", positive)


@dataclass
class Config:
    recipe: str | None = knob(None, "irpo, star, dpo, sipf, self_refine or sgft: the stages a run makes, and defaults for "
                              "the knobs it needs (none: the recipe train.loss and pairs.source describe)",
                              optional(one_of(*RECIPE_NAMES)))
    model: str = knob("smollm2-135m-instruct", "policy model: bundled name, HF id, local folder or .gguf file")
    models: ModelsConfig = field(default_factory=ModelsConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)
    run_dir: str = knob("runs/local", "where a run writes its stages, models and metrics", path=True)
    storage_path: str | None = knob(None, "the one place all nodes share (models, checkpoints): a folder every node "
                                    "mounts at the same path, or a URI (s3://, gs://); none: this machine only",
                                    path=True)
    iterations: int = knob(2, "self-improvement iterations (each: rollout, pairs, train, evaluate)", positive)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def read_config(path: str | Path | None = None, overrides: list[str] = ()) -> tuple[dict, str]:
    """The keys of a YAML file (none when path is None) with `a.b=value` overrides applied, and where they came
    from, for errors. `selfimprove.recipes.load_config` puts them over the recipe's and builds the `Config`."""
    raw = _read_yaml(Path(path).expanduser()) if path is not None else {}
    where = str(path) if path is not None else "defaults"
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}' must look like key.sub=value")
        try:
            parsed = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            parsed = value
        if isinstance(parsed, (dict, list)) and not value.lstrip().startswith(("{", "[")):
            parsed = value  # block YAML read from one word (`serve.host=::` is a mapping): the text was meant
        _set_dotted(raw, key.strip(), parsed)
    return raw, where


def build_config(raw: dict, where: str) -> Config:
    """The `Config` of `raw`'s keys, each of the right type and passing its own check (`where` names their file);
    combinations of knobs are checked by `check_knobs`, and the recipe's by `selfimprove.recipes.check`."""
    raw = _policy_as_model(raw, where)
    extra = (raw.get("eval") or {}).get("extra")
    if isinstance(extra, dict):  # an extra set is the run's task but for the keys it gives
        raw["eval"]["extra"] = {name: overlay(raw.get("task") or {}, keys) if isinstance(keys, dict) else keys
                                for name, keys in extra.items()}
    return _build(Config, raw, "", where)


def _policy_as_model(raw: dict, where: str) -> dict:
    """`models.policy` is another name for `model`, and so is `models.guide` in recipe sgft, whose trained model is
    the guide: the config keeps it in `model` alone."""
    models = raw.get("models") if isinstance(raw.get("models"), dict) else {}
    if models.get("guide") is not None and raw.get("recipe") != "sgft":
        raise UserError(f"{where}: models.guide is the guide of recipe sgft; " + (
            f"recipe {raw['recipe']} has none" if raw.get("recipe") else "set recipe: sgft"))
    for role in ("policy", "guide"):
        policy = models.get(role)
        if policy is None:
            continue
        if raw.get("model") not in (None, policy):
            raise UserError(f"{where}: 'model' ({raw['model']!r}) and 'models.{role}' ({policy!r}) name two "
                            "policies; give one of them")
        raw = dict(raw, model=policy)
    return dict(raw, models={k: v for k, v in models.items() if k not in ("policy", "guide")}) if models else raw


def check_knobs(cfg: Config, where: str = "config") -> None:
    """Refuse a combination of knobs that each pass their own check: `selfimprove.recipes.check` without the
    recipe's part, what a trainer given one stage's settings checks (self_refine tunes with SFT before its DPO
    rounds)."""
    if problem := _cross_check(cfg):
        raise UserError(f"{where}: {problem}")


def _cross_check(cfg: Config) -> str | None:
    """What is wrong with a combination of knobs that each pass their own check, naming the keys; None if nothing."""
    p, r, tc = cfg.process, cfg.rollout, cfg.train
    if tc.batch_size % (tc.micro_batch_size * tc.num_workers):
        return (f"train.batch_size={tc.batch_size} must be a multiple of train.micro_batch_size x "
                f"train.num_workers = {tc.micro_batch_size} x {tc.num_workers}")
    if "test" in cfg.eval.extra:
        return "eval.extra.test: 'test' names the task's own test split among the report's sets; call it otherwise"
    if unknown := [name for name in cfg.eval.optional if name not in cfg.eval.extra]:
        return f"eval.optional names {', '.join(unknown)}, which eval.extra does not hold"
    if tc.offload_optimizer and tc.zero_stage == 0:
        return "train.offload_optimizer needs train.zero_stage 1, 2 or 3"
    if r.temperature_schedule and len(r.temperature_schedule) < cfg.iterations:
        return (f"rollout.temperature_schedule gives {len(r.temperature_schedule)} temperature(s) for "
                f"iterations={cfg.iterations}: give one per iteration")
    for key, tokens in (("rollout.max_tokens", r.max_tokens), ("process.max_tokens", p.max_tokens)):
        if tokens >= r.max_model_len:
            return f"{key}={tokens} leaves no room for a prompt in rollout.max_model_len={r.max_model_len}"
    if cfg.tracking.mlflow and importlib.util.find_spec("mlflow") is None:
        return "tracking.mlflow=true needs MLflow, which is not installed: pip install mlflow (or mlflow-skinny)"
    if p.scorer == "trained":
        if cfg.pairs.source != "process":
            return "process.scorer=trained scores steps for process pairs: it needs pairs.source=process"
        if p.prm_mc_iterations >= cfg.iterations:
            return (f"process.scorer=trained with process.prm_mc_iterations={p.prm_mc_iterations} and "
                    f"iterations={cfg.iterations} would never score with the trained PRM; lower "
                    "process.prm_mc_iterations or raise iterations (or use process.scorer=mc)")
        if p.prm_batch_size % cfg.train.num_workers:
            return (f"process.prm_batch_size={p.prm_batch_size} must be a multiple of "
                    f"train.num_workers={cfg.train.num_workers} (the PRM trains on those workers)")
    return None


def knob_problem(key: str, value: Any) -> str | None:
    """What the check of the knob at the dotted `key` finds wrong with `value` (None: nothing), for a command-line
    flag that sets that knob: its error names the flag the user typed."""
    *sections, name = key.split(".")
    cls = Config
    for section in sections:
        cls = typing.get_type_hints(cls)[section]
    check = next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("check")
    return check(value) if check and value is not None else None


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file's mapping; `extends: other.yaml` (relative to the file) is read first and overlaid."""
    if not path.exists():
        raise UserError(f"config file not found: {path}" + (f" (extended by {seen[-1]})" if seen else ""))
    if path.resolve() in seen:
        raise UserError(f"{path}: 'extends' goes round in a circle ({' -> '.join(map(str, seen))})")
    try:
        text = path.read_bytes().decode("utf-8")
        raw = yaml.safe_load(text)
    except OSError as e:  # a folder, no permission, an I/O error
        raise UserError(f"cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a YAML text file (not UTF-8: {e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        why = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}: not valid YAML{where} ({why})") from None
    except RecursionError:
        raise UserError(f"{path}: not valid YAML (nested too deeply)") from None
    if raw is None:  # an empty file, or only comments: most likely not the file meant
        raise UserError(f"{path}: the file holds no settings; to use every default, write {{}} in it")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys to values")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    return overlay(_read_yaml(path.parent / str(base), (*seen, path.resolve())), raw)


def overlay(base: dict, top: dict) -> dict:
    """`base` with `top`'s keys put over it, section by section."""
    out = dict(base)
    for key, value in top.items():
        out[key] = overlay(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def describe(cls=Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every knob: the source of `selfimprove config --help`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((prefix + f.name, default, f.metadata.get("help", "")))
    return rows


# Keys that moved: old dotted key -> (new one, what it is now).
MOVED = {"train.storage_path": ("storage_path", "the storage all nodes share: models and checkpoints")}


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{key}': '{part}' is not a section")
    node[parts[-1]] = value


def _build(cls, raw: dict, prefix: str, where: str):
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if prefix + key in MOVED:
            new, what = MOVED[prefix + key]
            raise UserError(f"{where}: '{prefix}{key}' is now '{new}' ({what})")
        if key not in names:
            raise UserError(f"{where}: unknown key '{prefix}{key}' (known: {', '.join(names)})")
    kwargs = {}
    for name, value in raw.items():
        typ, dotted = hints[name], prefix + name
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise UserError(f"{where}: '{dotted}' must be a section of keys, got {value!r}")
            kwargs[name] = _build(typ, value, dotted + ".", where)
            continue
        value = _coerce(value, typ, dotted, where)
        if names[name].metadata.get("path") and value is not None:
            value = os.path.expanduser(value)  # no shell expands `~` in YAML, nor in a quoted override
        check = names[name].metadata.get("check")
        problem = check(value) if check and value is not None else None
        if problem:
            raise UserError(f"{where}: '{dotted}' {problem}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def _coerce(value: Any, typ, dotted: str, where: str) -> Any:
    """Check `value` against a field type; ints are accepted where floats are expected."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        typ = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: '{dotted}' must be a list, got {value!r}")
        return [_coerce(v, args[0], dotted, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: '{dotted}' must be a section of names, got {value!r}")
        out = {}
        for name, item in value.items():
            if dataclasses.is_dataclass(args[1]):
                if not isinstance(item, dict):
                    raise UserError(f"{where}: '{dotted}.{name}' must be a section of keys, got {item!r}")
                out[str(name)] = _build(args[1], item, f"{dotted}.{name}.", where)
            else:
                out[str(name)] = _coerce(item, args[1], f"{dotted}.{name}", where)
        return out
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        # YAML 1.1 reads `1e-4` (no dot) as a string; users mean the number.
        try:
            value = float(value)
        except ValueError:
            pass
    if typ is float and isinstance(value, float) and not math.isfinite(value):
        # YAML reads `.inf` and `.nan` as floats, and every check compares: nan passes `v >= 0`, inf passes `v > 0`.
        raise UserError(f"{where}: '{dotted}' must be a finite number, got {value!r}")
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise UserError(f"{where}: '{dotted}' must be {typ.__name__}, got {type(value).__name__} {value!r}")
    return value

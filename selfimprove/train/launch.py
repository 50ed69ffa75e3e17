"""The Ray Train launch path of a training, the same for the policy's (`trainer.py`) and the PRM's
(`selfimprove/reward/trained_prm.py`): the worker function and the examples go in, a model folder comes out.

1. A `TorchTrainer` runs `train.num_workers` workers, one GPU each on a GPU cluster (NCCL) or a share of the
   cores on a CPU node (gloo); a worker's config gets `use_gpu` and `cores` (its share) beside the caller's keys,
   and the examples through the object store.
2. Checkpoints a worker reports go through `ray.train.report`; Ray Train persists them under
   `<storage_path>/checkpoints` (else a folder beside the output), keeps the newest, and hands it back
   (`get_checkpoint`) when a run of the same name starts again, which resumes there: the name is a fingerprint of
   the model, the settings and the data.
3. A worker group that fails starts again from that checkpoint, at most `train.worker_restarts` times; then the
   failure is one line (`fit`).
4. The model a worker saves with its final report is copied into the stage output (a scratch folder renamed when
   complete), and the checkpoints are removed.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import sys
from pathlib import Path

from selfimprove.config import Config, TrainConfig
from selfimprove.errors import UserError
from selfimprove.io import claim_folder, model_digest, remove_ours, stage_output


def launch(worker, config: dict, examples: list, run: str, cfg: Config, out: Path, checkpoints: Path | None,
           saved: str, what: str = "training", explain=None) -> dict:
    """Run `worker(config)` on the Ray Train workers of `cfg.train`, `config` given `examples` (each worker takes
    every num_workers-th from its rank), `use_gpu` and `cores`; copy the model folder of the final report, which
    holds the file `saved`, into `out`. Returns the "summary" in `saved`.

    `run` names the training's checkpoints: a run of the same name resumes them. `checkpoints`: their folder when
    there is no `storage_path` (default: `<out>.ray`), removed with them once the model is saved. `explain(cause,
    folder)`: a one-line text for a worker's exception, given the folder of the run's checkpoints, or None.
    """
    import ray

    from selfimprove.runtime import init_ray

    init_ray()
    use_gpu, cores, resources = worker_resources(cfg.train)
    storage = checkpoint_storage(cfg.storage_path, out, checkpoints)
    config = config | {"examples": ray.put(examples), "use_gpu": use_gpu, "cores": cores}
    why = explain and (lambda cause: explain(cause, f"{storage}/{run}"))
    checkpoint = run_workers(worker, config, cfg.train, use_gpu, resources, run, storage, why).checkpoint
    with stage_output(out) as scratch:
        if checkpoint is None:
            raise UserError(f"{what} ended without a saved model")
        checkpoint.to_directory(str(scratch))
        if not (scratch / saved).is_file():
            raise UserError(f"{what} ended without a saved model ({checkpoint.path} is not one)")
        summary = json.loads((scratch / saved).read_text())["summary"]
    release_storage(cfg.storage_path, storage, run)
    return summary


def worker_resources(tc: TrainConfig) -> tuple[bool, int, dict]:
    """(use_gpu, cores per worker, Ray resources per worker) of `tc.num_workers` Ray Train workers on this cluster."""
    import ray

    from selfimprove.runtime import node_cpus

    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    cores = tc.cpus_per_worker or (1 if use_gpu else max(node_cpus() // tc.num_workers, 1))
    return use_gpu, cores, {"CPU": cores, **({"GPU": 1} if use_gpu else {})}


def checkpoint_storage(storage_path: str | None, out: Path, checkpoints: Path | None) -> str:
    """Where Ray Train keeps a training's checkpoints: `<storage_path>/checkpoints` (every worker's node reaches it),
    else `checkpoints`, else `<out>.ray`. A folder is given as an absolute path: Ray Train reads a relative one
    (`run_dir=runs/local`) as a URI, and fails."""
    from selfimprove.storage import location

    if storage_path:
        return f"{location(storage_path)}/checkpoints"
    return str(claim_folder(checkpoints or out.with_name(out.name + ".ray")).resolve())


def release_storage(storage_path: str | None, storage: str, run: str) -> None:
    """Remove the checkpoints once the model is saved: our scratch folder, or the training's own folder in
    `storage_path` (named by its fingerprint, so no other training's)."""
    from selfimprove.storage import release

    if storage_path is None:
        remove_ours(Path(storage))
    else:
        release(storage, run)


def run_workers(worker, worker_config: dict, tc: TrainConfig, use_gpu: bool, resources: dict, run: str, storage: str,
                explain=None):
    """Run `worker(worker_config)` on `tc.num_workers` Ray Train workers; return Ray Train's result.

    Checkpoints go to `storage/run`, the newest kept. A worker group that fails (a worker's process, or its node,
    lost) starts again from that checkpoint, at most `train.worker_restarts` times, and so does one that could not
    be started (Ray Train would retry that without end); then the failure is one line (`fit`).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        worker,
        train_loop_config=worker_config,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run, storage_path=storage, checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=tc.worker_restarts,
                                                          controller_failure_limit=tc.worker_restarts)),
    )
    return fit(trainer, explain)


def fit(trainer, explain=None):
    """`trainer.fit()`, a worker's failure made one `UserError` line: `explain(cause)`'s text if it gives one,
    a worker's own `UserError`, or the exception's type and last line."""
    import ray.train

    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        cause = _worker_exception(e)
        message = explain(cause) if explain else None
        if message:
            raise UserError(message) from None
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        lines = str(cause).strip().splitlines()
        raise UserError(f"training failed: {type(cause).__name__}: {lines[-1] if lines else ''}"[:300]) from e


def fingerprint(model: str, settings: dict, data, reference: str | None = None) -> str:
    """Same model (and reference), settings and data -> same Ray Train run name, so a restarted run resumes its
    checkpoints.

    A model counts by its files' bytes, not its path (`io.model_digest`): a model rewritten at the same path (a
    redone train stage) is another model, whose training must not resume the old one's checkpoints; the same files
    at another path (a moved run dir, a copy in another node's cache) are the same model, whose checkpoints fit it.
    """
    models = [model_digest(model), reference and model_digest(reference)]
    h = hashlib.sha256(json.dumps([models, settings], sort_keys=True).encode())
    h.update(pickle.dumps(data))
    return h.hexdigest()[:12]


def worker_print(line: str) -> None:
    """One line from a Ray Train worker to the driver's console.

    Ray Train replaces `print` on its workers with one that writes the line and also logs it, and the log
    reaches the console as well: every printed line showed twice. A plain write goes out once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _worker_exception(e: Exception) -> BaseException:
    """The exception a worker's code raised, out of Ray Train's wrappers."""
    failures = getattr(e, "worker_failures", None)
    inner = next(iter(failures.values())) if failures else getattr(e, "controller_failure", e)
    # Ray Train V2 wraps a worker's exception with its traceback text (`_base_exc`).
    while getattr(inner, "_base_exc", None) is not None or getattr(inner, "cause", None) is not None:
        inner = getattr(inner, "_base_exc", None) or inner.cause
    return inner

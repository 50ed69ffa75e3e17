"""Experiment tracking: what a run's stages wrote, also as TensorBoard scalars (always) and MLflow metrics
(`tracking.mlflow`), written with those libraries' own writers as each stage finishes.

1. Read from the finished stage's own files (`timing.json`, a trained model's `train_metrics.json`, `metrics.json`,
   `stats.json`):
   the run folder stays the one record, and `selfimprove report` needs none of this.
2. A stage is logged once, by the process that finished it, and flushed at once: a resumed run logs only what it
   runs, and a killed one has lost nothing it finished.
3. Scalars: `train/<metric>` (loss, rewards/accuracies, rewards/margins, lr, tokens_per_s) at each reported
   optimizer step of the run's train stages of that kind, numbered on across iterations (`<kind>/<metric>` for
   other kinds that train); `seconds/<stage>` and `eval/<metric>` (`eval/<set>/<metric>` for `eval.extra` sets, and
   `<stage>/<metric>` for other evaluations) at the iteration; `<stage>/<count>` for each number a stage's
   `stats.json` holds (a code rollout's `flagged_pass_share`, a pairs stage's `pairs`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from selfimprove.config import TrackingConfig
from selfimprove.errors import UserError
from selfimprove.io import is_done
from selfimprove.overhead import fixed_seconds

STEP_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "lr", "tokens_per_s")


class Tracker:
    """The run's writers; `Tracker(run_dir, cfg)` refuses, in one line, a tracking folder it cannot write."""

    def __init__(self, run_dir: Path, cfg: TrackingConfig):
        folder = run_dir / cfg.folder  # an absolute folder stays itself
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / ".writable").touch()
            (folder / ".writable").unlink()
        except OSError as e:
            raise UserError(f"tracking.folder={cfg.folder}: cannot write {folder} ({e.strerror or e})") from None
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir, self.writer, self.mlflow = run_dir, SummaryWriter(log_dir=str(folder)), None
        if cfg.mlflow:
            # A local file store, as asked for: MLflow 3 keeps it (in maintenance) behind this switch.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            import mlflow

            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
            mlflow.set_experiment("selfimprove")
            name = run_dir.resolve().name  # a resumed run goes on logging into the MLflow run it began
            earlier = mlflow.search_runs(experiment_names=["selfimprove"], output_format="list",
                                         filter_string=f"attributes.run_name = '{name}'")
            self.mlflow = mlflow.start_run(run_id=earlier[0].info.run_id) if earlier else mlflow.start_run(run_name=name)

    def stage_done(self, folder: Path) -> None:
        """Log the finished stage `folder` (`run_dir/iter_<t>/<kind>`)."""
        kind, t = folder.name, int(folder.parent.name.removeprefix("iter_"))
        timing = folder / "timing.json"
        if timing.is_file():
            seconds = json.loads(timing.read_text())["seconds"]
            fixed = fixed_seconds(folder, seconds)
            self._log({f"seconds/{kind}": seconds, **({} if fixed is None else {f"fixed_seconds/{kind}": fixed})}, t)
        trained = folder / "model" / "train_metrics.json"
        if trained.is_file():
            offset = sum(_steps(folder.parent.parent / f"iter_{u}" / kind) for u in range(t))
            prefix = "train" if kind == "train" else kind
            for row in json.loads(trained.read_text())["steps"]:
                self._log({f"{prefix}/{m}": row[m] for m in STEP_METRICS if m in row}, offset + row["step"])
        counted = folder / "stats.json"
        if counted.is_file():
            self._log({f"{kind}/{k}": v for k, v in json.loads(counted.read_text()).items() if _number(v)}, t)
        evaluated = folder / "metrics.json"
        if evaluated.is_file():
            metrics = json.loads(evaluated.read_text())["metrics"]
            self._log({f"{kind}/{k}": v for k, v in metrics.items() if _number(v)}, t)
            for name, extra in (metrics.get("extra") or {}).items():
                self._log({f"{kind}/{name}/{k}": v for k, v in extra.items() if _number(v)}, t)
        self.writer.flush()

    def _log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        if self.mlflow is not None and scalars:
            import mlflow

            # MLflow keys allow letters, digits, _-.:/ and a space, not pass@1's "@".
            mlflow.log_metrics({tag.replace("@", "_at_"): v for tag, v in scalars.items()}, step=step,
                               run_id=self.mlflow.info.run_id)

    def close(self) -> None:
        self.writer.close()
        if self.mlflow is not None:
            import mlflow

            mlflow.end_run()


def _steps(train_stage: Path) -> int:
    """Optimizer steps a finished train stage made (0 if there is none)."""
    metrics = train_stage / "model" / "train_metrics.json"
    return json.loads(metrics.read_text())["summary"]["steps"] if is_done(train_stage) and metrics.is_file() else 0


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

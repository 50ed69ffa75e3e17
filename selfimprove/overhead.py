"""How much of a finished stage was fixed cost rather than work, read back from the stage's own files.

- A stage that samples (rollout, eval, demonstrations, ...) holds an `engines/` folder beside each of its samples
  folders: each engine of that pool that returned samples recorded when its actor began and when the engine was
  ready (the driver writes them: `rollout.stage.write_startups`). Until its last engine is ready a pool is not at
  full speed, so its fixed cost is last ready − first began; a stage's is the
  sum over its pools (an eval with further held-out sets starts a pool per set).
- A train stage: its seconds less its optimizer steps' own (`train_seconds` of the model's `train_metrics.json`):
  Ray Train's workers, DeepSpeed's set-up, the reference pass, saving the model.
Other stages (pairs, labels) count as no fixed cost; a stage made before these records has none to read (None).
"""

from __future__ import annotations

import json
from pathlib import Path

from selfimprove.rollout.stage import STARTUPS

TRAIN_METRICS = Path("model") / "train_metrics.json"


def fixed_seconds(stage: Path, seconds: float) -> float | None:
    """The fixed cost of the finished stage folder `stage`, which took `seconds`; None if it kept no record."""
    pools = [pool_startup(folder) for folder in sorted(stage.rglob(STARTUPS)) if folder.is_dir()]
    if pools:
        return round(sum(pools), 2)
    if (stage / TRAIN_METRICS).is_file():
        summary = json.loads((stage / TRAIN_METRICS).read_text())["summary"]
        return round(max(seconds - summary["train_seconds"], 0.0), 2)
    return None


def pool_startup(folder: Path) -> float:
    """Seconds from the first engine of a pool beginning to the last one ready."""
    engines = [json.loads(f.read_text()) for f in folder.glob("*.json")]
    return max(e["ready"] for e in engines) - min(e["began"] for e in engines) if engines else 0.0


def share(row: dict) -> float | None:
    """The fixed part of a metrics row's stage seconds, over the stages that kept a record; None if none did."""
    fixed = row.get("fixed_seconds", {})
    total = sum(row.get("stage_seconds", {}).get(k, 0.0) for k in fixed)
    return sum(fixed.values()) / total if total else None

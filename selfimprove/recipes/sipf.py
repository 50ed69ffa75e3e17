"""Self-Iterative Process Feedback (Chen et al., 2024): each sample's steps scored by Monte Carlo completions
(or a PRM trained on them), pairs by process score, ORPO, each iteration's pairs added to the earlier ones'."""

from selfimprove.recipes.loop import plan  # noqa: F401
from selfimprove.train.loss_names import needs_rejected

DEFAULTS = {"train": {"loss": "orpo"}, "pairs": {"source": "process", "accumulate": True}}


def check(cfg) -> str | None:
    if cfg.pairs.source != "process":
        return "recipe sipf ranks samples by their steps' values: it needs pairs.source=process"
    if not needs_rejected(cfg.train.loss):
        return f"recipe sipf trains on preference pairs, which train.loss={cfg.train.loss} does not read"
    return None

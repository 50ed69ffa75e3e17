"""Iterative Reasoning Preference Optimization (Pang et al., 2024): outcome pairs (a correct sample against
an incorrect one of the same problem), trained with DPO plus the winner's NLL, the last model as reference."""

from selfimprove.recipes.loop import plan  # noqa: F401
from selfimprove.train.loss_names import needs_rejected

DEFAULTS = {"train": {"loss": "rpo"}, "pairs": {"source": "outcome"}}


def check(cfg) -> str | None:
    if cfg.pairs.source != "outcome":
        return "recipe irpo ranks samples by outcome: it needs pairs.source=outcome (process pairs are recipe sipf)"
    if not needs_rejected(cfg.train.loss):
        return f"recipe irpo trains on preference pairs, which train.loss={cfg.train.loss} does not read (SFT is recipe star)"
    return None

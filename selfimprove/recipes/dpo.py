"""Iterative DPO on outcome pairs (Rafailov et al., 2023; IPO, Azar et al., 2023, with train.loss=ipo): IRPO
without the NLL term."""

from selfimprove.recipes.loop import plan  # noqa: F401

DEFAULTS = {"train": {"loss": "dpo"}, "pairs": {"source": "outcome"}}


def check(cfg) -> str | None:
    if cfg.train.loss not in ("dpo", "ipo") or cfg.pairs.source != "outcome":
        return (f"recipe dpo trains outcome pairs with train.loss=dpo or ipo, got train.loss={cfg.train.loss} and "
                f"pairs.source={cfg.pairs.source}")
    return None

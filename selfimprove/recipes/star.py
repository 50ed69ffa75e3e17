"""STaR (Zelikman et al., 2022), without rationalization: fine-tune on the model's own correct samples
(`train.loss=sft`), sampling from the last model each iteration."""

from selfimprove.recipes.loop import plan  # noqa: F401

DEFAULTS = {"train": {"loss": "sft"}, "pairs": {"source": "outcome"}}


def check(cfg) -> str | None:
    if cfg.train.loss != "sft" or cfg.pairs.source != "outcome":
        return (f"recipe star fine-tunes on correct samples: it needs train.loss=sft and pairs.source=outcome, got "
                f"train.loss={cfg.train.loss} and pairs.source={cfg.pairs.source}")
    return None

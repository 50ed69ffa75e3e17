"""Which inputs each loss reads, without importing torch.

A recipe's checks need these facts at load, before any heavy import; `selfimprove.train.losses.LOSSES` holds the
functions under the names of `config.LOSS_NAMES`.
"""

from selfimprove.config import LOSS_NAMES

_REFERENCE_FREE = {"sft", "orpo"}
_CHOSEN_ONLY = {"sft"}


def _known(name: str) -> str:
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSS_NAMES)}")
    return name


def needs_reference(name: str) -> bool:
    """True when the loss reads ref_chosen/ref_rejected (dpo, rpo, ipo)."""
    return _known(name) not in _REFERENCE_FREE


def needs_rejected(name: str) -> bool:
    """True when the loss reads the rejected response (all but sft)."""
    return _known(name) not in _CHOSEN_ONLY

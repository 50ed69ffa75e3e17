"""The losses by name and which inputs each reads, without importing torch.

Loading and checking a config needs these facts before any heavy import;
`selfimprove.train.losses.LOSSES` holds the functions under the same names.
"""

LOSS_NAMES = ("sft", "dpo", "rpo", "orpo", "ipo")
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

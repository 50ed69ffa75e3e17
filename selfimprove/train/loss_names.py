"""The inputs each loss reads, declared without importing torch.

Each loss of `selfimprove.train.losses.LOSSES` (under the names of `config.LOSS_NAMES`) declares here what it reads
(`INPUTS`): the worker computes exactly that and nothing more (the rejected responses' forward passes and the
reference pass cost as much as the rest of a step), and a recipe's checks read the same facts at load, before any
heavy import. Tests hold each declaration exact: a loss given only its declared fields works, and without any one
of them fails naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

from selfimprove.config import LOSS_NAMES


@dataclass(frozen=True)
class Inputs:
    """What a loss reads besides the policy's summed log-probs of the chosen response, which every loss reads."""

    rejected: bool = False  # the rejected response through the policy: rows must be pairs
    reference: bool = False  # the reference model's log-probs of every response read: a pass before training
    lengths: bool = False  # the token count of every response read

    def fields(self) -> tuple[str, ...]:
        """The `losses.SequenceLogps` fields these inputs fill."""
        responses = ("chosen", "rejected") if self.rejected else ("chosen",)
        names = [f"policy_{r}" for r in responses]
        if self.reference:
            names += [f"ref_{r}" for r in responses]
        if self.lengths:
            names += [f"{r}_lengths" for r in responses]
        return tuple(names)


# ipo reads the lengths unless length_normalize=False: a declaration covers every setting of a loss's knobs.
INPUTS = {
    "sft": Inputs(lengths=True),
    "dpo": Inputs(rejected=True, reference=True),
    "rpo": Inputs(rejected=True, reference=True, lengths=True),
    "orpo": Inputs(rejected=True, lengths=True),
    "ipo": Inputs(rejected=True, reference=True, lengths=True),
}


def inputs(name: str) -> Inputs:
    """The declared inputs of the loss `name`; a ValueError for an unknown one."""
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSS_NAMES)}")
    return INPUTS[name]


def needs_reference(name: str) -> bool:
    """True when the loss reads reference log-probs (dpo, rpo, ipo)."""
    return inputs(name).reference


def needs_rejected(name: str) -> bool:
    """True when the loss reads the rejected response (all but sft)."""
    return inputs(name).rejected

r"""ARC: grade-school science multiple-choice questions (Clark et al., 2018).

Rows are {"question", "choices": {"text": [...], "label": [...]}, "answerKey"} as in
allenai/ai2_arc (default configuration ARC-Challenge). Some ARC rows label their options
"1".."4" instead of "A".."D": options are always shown as A, B, C, ... in their order and
the gold is the letter at the answer key's position, so the model only ever sees letters.
The options are part of the row's question, so the prompt needs nothing task-specific.

A choice is read from the stated answer ("The answer is B", "Answer: (B)", "\boxed{B}"),
else from the last "(B)" in the text.
"""

from __future__ import annotations

import re
import string

from selfimprove.tasks.answers import extract_answer
from selfimprove.tasks.base import Task
from selfimprove.tasks.files import read_rows

HUB_NAME = "allenai/ai2_arc"
HUB_CONFIG = "ARC-Challenge"
# A letter alone, or "(B)", "B.", "B) text", "\text{B}" - but not the "A" of "Apples".
_LEADING_LETTER = re.compile(r"(?:\\text(?:bf)?\{)?\(?([A-Z])\)?(?![A-Za-z])")
_PAREN_LETTER = re.compile(r"\(([A-Z])\)")


def to_row(raw: dict) -> dict:
    """A task row from a raw ARC row; ValueError if its choices or answer key do not fit."""
    choices = raw["choices"]
    texts, labels = (choices.get("text"), choices.get("label")) if isinstance(choices, dict) else (None, None)
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels) or not texts:
        raise ValueError("'choices' must hold lists 'text' and 'label' of the same length")
    if len(texts) > len(string.ascii_uppercase):
        raise ValueError(f"more than {len(string.ascii_uppercase)} choices")
    key = str(raw["answerKey"]).strip()
    labels = [str(label).strip() for label in labels]
    if key not in labels:
        raise ValueError(f"answerKey '{key}' is not one of the labels {', '.join(labels)}")
    letters = string.ascii_uppercase[: len(texts)]
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, texts, strict=True))
    return {"question": f"{raw['question']}\n{options}", "answer": letters[labels.index(key)], "solution": ""}


def extract_choice(text: str | None) -> str | None:
    """The option letter a text chooses, or None."""
    stated = extract_answer(text)
    if stated is not None:
        m = _LEADING_LETTER.match(stated)
        if m:
            return m[1]
    found = _PAREN_LETTER.findall(text) if isinstance(text, str) else []
    return found[-1] if found else None


class ARC(Task):
    name = "arc"
    instruction = 'Answer the multiple-choice question step by step, then write "The answer is X." with the letter X of the correct option.'
    # Hand-written in ARC's style; not a dataset question.
    example = (
        "Which of these is the best conductor of electricity?\nA. rubber\nB. glass\nC. copper\nD. wood",
        "Metals let electric charges move freely, while rubber, glass and wood hold them in place. "
        "Copper is the only metal among the options. The answer is C.",
    )

    def read(self, split: str) -> list[dict]:
        source = self.cfg.data or HUB_NAME
        return read_rows(source, split, ("question", "choices", "answerKey"), to_row, hub_config=HUB_CONFIG)

    def verify(self, text: str, gold: str) -> bool:
        choice = extract_choice(text)
        return choice is not None and isinstance(gold, str) and choice == gold.strip().upper()

    def answer_key(self, text: str) -> str | None:
        return extract_choice(text)

"""Cutting a sample's text into reasoning steps: pure functions over character offsets.

1. A step is a span `[start, end)` of the sample text with its surrounding whitespace left
   out, so `text[start:end] == step.text` and `text[:end]` is the prefix "up to and including
   this step" that process scoring continues from.
2. `newline`: every non-blank line is a step; blank lines and indentation are ignored.
   `sentence`: as newline, and a line is also cut after ". ", "! " or "? " (a dot inside
   "3.5" does not cut). Samples of the built-in arithmetic task are mostly one line, so
   newline splitting gives them a single step.
   `step_marker`: a step starts at each "Step k" marker ("Step 2:", "**Step 2.**",
   "## Step 2)", any case); text before the first marker is a step of its own. A text with
   no marker is one step.
3. A text of only whitespace has no step. A sample with more than `max_steps` steps keeps
   its first `max_steps - 1` and one last step running to the end of the text
   (`cap_steps`), so its path stays whole while its cost is bounded.
"""

from __future__ import annotations

import re
from typing import NamedTuple

SPLITS = ("newline", "sentence", "step_marker")
_LINE = re.compile(r"[^\n]+")
# A sentence runs to its end mark (and any closing quote or bracket) before a space.
_SENTENCE = re.compile(r".+?(?:[.!?][\"')\]]*(?=\s)|$)")
_MARKER = re.compile(r"(?:^|(?<=\s))(?:#{1,6}\s*)?\**\s*step\s+\d+\s*\**\s*[:.)]", re.IGNORECASE)


class Step(NamedTuple):
    start: int
    end: int
    text: str


def split_steps(text: str, how: str = "newline") -> list[Step]:
    """The steps of `text` (see the module docstring), in order; [] for a blank text."""
    if how == "newline":
        pieces = [(m.start(), m.end()) for m in _LINE.finditer(text)]
    elif how == "sentence":
        pieces = [(line.start() + m.start(), line.start() + m.end())
                  for line in _LINE.finditer(text) for m in _SENTENCE.finditer(line.group())]
    elif how == "step_marker":
        cuts = [0] + [m.start() for m in _MARKER.finditer(text)] + [len(text)]
        pieces = list(zip(cuts, cuts[1:]))
    else:
        raise ValueError(f"unknown split '{how}' (known: {', '.join(SPLITS)})")
    steps = []
    for start, end in pieces:
        piece = text[start:end]
        stripped = piece.strip()
        if stripped:
            first = start + len(piece) - len(piece.lstrip())
            steps.append(Step(first, first + len(stripped), stripped))
    return steps


def cap_steps(text: str, steps: list[Step], max_steps: int) -> list[Step]:
    """At most `max_steps` steps: the ones past `max_steps - 1` become one last step."""
    if len(steps) <= max_steps:
        return steps
    start, end = steps[max_steps - 1].start, steps[-1].end
    return [*steps[:max_steps - 1], Step(start, end, text[start:end])]

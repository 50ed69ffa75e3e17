r"""Reading the final answer out of a text, and comparing it with a gold answer.

1. `extract_answer` returns what a text *states* as its answer, trying in order: the last
   balanced `\boxed{...}`, the last `#### N`, the last "answer is N" / "answer: N". It never
   falls back to the last bare number: a sample that states no answer counts as wrong,
   which is what teaches the model to state one.
2. `normalize_number` reads "1,000", "−3", "$3.50", "1/2", "\frac{1}{2}", "50%" and
   "18 dollars." as exact Fractions. A percent sign is dropped ("50%" == 50) because GSM8K
   states percentages as bare numbers.
3. `answers_match` compares as numbers when both sides are numbers, else as strings with
   case, spaces and surrounding `$ * .` ignored; `canonical` gives the same comparison as
   a key ("$18.00" and "18 dollars" -> "18"), for majority voting.
All functions are total: any input (even None) gives a value, never an exception.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_STATED = re.compile(r"answer\s*(?:is\b\s*:?|:)", re.IGNORECASE)
# What follows "answer is": up to the end of the sentence, the line or the text. A period
# ends the sentence only before a space or the end, so "3.5." reads as "3.5".
_STATED_VALUE = re.compile(r"\s*(.*?)(?:\.(?=\s|\Z)|\n|\Z)")

_LATEX = (
    (re.compile(r"\\[dt]?frac\{\s*(\d+)\s*\}\{\s*(\d+)\s*\}"), r"\1/\2"),
    (re.compile(r"\\text\{([^{}]*)\}"), r"\1"),
    (re.compile(r"\{,\}"), ","),
    (re.compile(r"\\([$%])"), r"\1"),
    (re.compile(r"\\[,!; ]"), ""),
)
_SIGN = "-+\u2212\u2013"  # ASCII minus and plus, unicode minus, en dash
# A number, optionally signed and with a currency sign, then anything without digits, "=",
# "+", "^" or LaTeX ("dollars", "km/h.", "%"): "5 - 3", "1, 2", "2\\pi" are not one number.
# Runs of spaces are collapsed to one before matching, so the optional single spaces
# here cannot backtrack badly on long inputs.
_NUMBER = re.compile(
    rf"(?P<sign>[{_SIGN}]?) ?[$€£]? ?(?P<sign2>[{_SIGN}]?) ?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?: ?/ ?(?P<den>\d+))?"
    r"[^\d=+^\\{}]*"
)


def extract_answer(text: str | None) -> str | None:
    """The final answer `text` states (boxed, then ####, then "answer is"), or None."""
    if not isinstance(text, str):
        return None
    for found in (last_boxed(text), _last_hashes(text), _last_stated(text)):
        if found:
            return found
    return None


def last_boxed(text: str | None) -> str | None:
    r"""Content of the last `\boxed{...}` whose braces close (nested braces kept), or None."""
    if not isinstance(text, str) or "box" not in text:
        return None
    closing = _matching_braces(text)
    for m in reversed(list(_BOXED.finditer(text))):
        end = closing.get(m.end() - 1)
        if end is not None and text[m.end() : end].strip():
            return text[m.end() : end].strip()
    return None


def normalize_number(s: str | None) -> Fraction | None:
    """The exact value of a stated number ("$1,000.50", "−3", "1/2", "18 apples."), or None."""
    if not isinstance(s, str):
        return None
    for pattern, replacement in _LATEX:
        s = pattern.sub(replacement, s)
    # Markdown bold ("**18**") is never part of a number.
    m = _NUMBER.fullmatch(" ".join(s.replace("*", " ").split()))
    if not m or (m["sign"] and m["sign2"]):
        return None
    sign = m["sign"] or m["sign2"]
    try:
        value = Fraction(m["num"].replace(",", ""))
        if m["den"]:
            value /= Fraction(m["den"])
    except (ValueError, ZeroDivisionError):  # over Python's digit limit, or "1/0"
        return None
    return -value if sign and sign != "+" else value


def answers_match(pred: str | None, gold: str | None) -> bool:
    """Whether a predicted answer equals the gold one: numerically if both are numbers."""
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    a, b = normalize_number(pred), normalize_number(gold)
    if a is not None and b is not None:
        return a == b
    return _normalize_text(gold) != "" and _normalize_text(pred) == _normalize_text(gold)


def canonical(answer: str | None) -> str | None:
    """A key equal for answers `answers_match` calls equal: the number, else the normalized text."""
    if not isinstance(answer, str):
        return None
    value = normalize_number(answer)
    return str(value) if value is not None else _normalize_text(answer) or None


def is_correct(text: str | None, gold: str | None) -> bool:
    """Whether `text` states an answer equal to `gold`: the verifier of numeric tasks."""
    return answers_match(extract_answer(text), gold)


def _matching_braces(text: str) -> dict[int, int]:
    """Index of each "{" -> index of the "}" that closes it, in one pass (no quadratic rescans)."""
    open_at, closing = [], {}
    for i, c in enumerate(text):
        if c == "{":
            open_at.append(i)
        elif c == "}" and open_at:
            closing[open_at.pop()] = i
    return closing


def _last_hashes(text: str) -> str | None:
    found = [m[1].strip() for m in _HASHES.finditer(text) if m[1].strip()]
    return found[-1] if found else None


def _last_stated(text: str) -> str | None:
    # The last "answer is" keyword, then its value: matching keyword and value in one regex
    # would let "Answer: the answer is 5" swallow the second keyword into the first value.
    keywords = list(_STATED.finditer(text))
    if not keywords:
        return None
    value = _STATED_VALUE.match(text, keywords[-1].end())[1].strip(" \t*")
    return value or None


def _normalize_text(s: str) -> str:
    return "".join(s.split()).casefold().strip("$*.")

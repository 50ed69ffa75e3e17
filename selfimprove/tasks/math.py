r"""MATH: competition problems with LaTeX answers (Hendrycks et al., 2021).

Rows are {"problem", "solution"} with the final answer in the solution's last `\boxed{}`
(Hendrycks' format); {"question", "answer"} is accepted too, where the answer is either a
full boxed solution or the bare final answer, and an explicit "answer" beside a
"solution" (as in MATH-500) is the gold. The default hub dataset is
DigitalLearningGmbH/MATH-lighteval: all seven subjects in one configuration with train
(7,500) and test (5,000) splits, as lighteval uses it.

Verification: the stated answer is compared as a number first (cheap), then by
math_verify, which also accepts equal LaTeX expressions ("\frac12" == "0.5", "\sqrt{18}" ==
"3\sqrt{2}").
"""

from __future__ import annotations

import re
import threading

import math_verify
from math_verify.errors import TimeoutException

from selfimprove.tasks.answers import answers_match, extract_answer, last_boxed
from selfimprove.tasks.base import Task
from selfimprove.tasks.files import read_rows

HUB_NAME = "DigitalLearningGmbH/MATH-lighteval"
# sympy works out some numbers exactly, in C and holding the GIL, where no timeout can stop
# it: power towers, exponents of 7+ digits, factorials of a power, of a factorial or of a
# 6+ digit number. Answers holding one are compared as strings only.
_HUGE = re.compile(r"\^\s*\{[^{}]*\^|\^\s*\w+\s*\^|\^\s*\{?\s*\d{7}|\d{6}\s*!|(?:\^\s*(?:\{[^{}]*\}|\w+)|!)\s*\)*\s*!")


def to_row(raw: dict) -> dict:
    """A task row from a raw MATH row; ValueError if no final answer can be found."""
    solution, answer = str(raw.get("solution") or ""), str(raw.get("answer") or "").strip()
    boxed_answer = last_boxed(answer)
    gold = boxed_answer or answer or last_boxed(solution)
    if not gold:
        raise ValueError("no final answer: the solution has no \\boxed{...} and there is no 'answer'")
    return {
        "question": str(raw.get("problem") or raw.get("question")),
        "answer": gold,
        "solution": solution or (answer if boxed_answer else ""),
    }


def math_equal(pred: str, gold: str) -> bool:
    """Whether two LaTeX answers are mathematically equal, per math_verify; False on any error."""
    if _HUGE.search(pred) or _HUGE.search(gold):
        return False
    # math_verify times out with signal.alarm, which raises outside the main thread (Ray Data
    # may call us from one): keep the timeout where it works, go without it elsewhere.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        return bool(
            math_verify.verify(
                math_verify.parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout),
                math_verify.parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout),
                timeout_seconds=timeout,
            )
        )
    except (Exception, TimeoutException):  # TimeoutException is not an Exception subclass
        return False


class MATH(Task):
    name = "math"
    instruction = "Solve the math problem step by step, then put the final answer in \\boxed{}."
    # Hand-written in MATH's style; not a dataset problem.
    example = (
        "What is the sum of the solutions of $2x^2 - 7x + 3 = 0$?",
        "Factoring gives $(2x - 1)(x - 3) = 0$, so the solutions are $x = \\frac{1}{2}$ and $x = 3$. "
        "Their sum is $\\frac{1}{2} + 3 = \\boxed{\\frac{7}{2}}$.",
    )

    def read(self, split: str) -> list[dict]:
        return read_rows(self.cfg.data or HUB_NAME, split, (("problem", "question"), ("solution", "answer")), to_row)

    def verify(self, text: str, gold: str) -> bool:
        pred = extract_answer(text)
        return pred is not None and isinstance(gold, str) and (answers_match(pred, gold) or math_equal(pred, gold))

"""What every task provides, and the row format problems travel in.

A problem row is a plain dict with (at least) these keys, all strings:
  id        stable identifier, unique within the split
  question  the problem statement shown to the model
  answer    the gold final answer (already extracted, e.g. "18" or "B" or "\\frac{1}{2}")
  solution  a gold chain of thought ending in the answer ("" when the data has none)
Rows are what Ray Data shards and what stage files (Parquet) keep, so no nested objects
other than lists of strings.

A task subclass says where rows come from (`read`), how its one-shot prompt reads
(`instruction`, `example`) and how an answer is checked (`verify`); this base class
numbers the rows, applies the configured split sizes and keys answers for voting.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass

from selfimprove.config import TaskConfig
from selfimprove.errors import UserError
from selfimprove.tasks.answers import canonical, extract_answer


@dataclass(frozen=True)
class Judgement:
    """A task's verdict on one sample."""

    correct: bool
    verdict: str | None = None  # what it says beyond right or wrong, e.g. which test failed; None if nothing
    judged: str | None = None  # where a program's tests were decided (`sandbox.JUDGED`); None if none ran
    flags: tuple[str, ...] = ()  # the reward-hacking monitor's flags on the sample (`Task.flags`)


VAL_SHARE = 8  # a task without a val split of its own gives 1 in VAL_SHARE of its training questions to val


def carved(question: str) -> bool:
    """Whether a training question belongs to the carved val split: by its SHA-256, whitespace and case aside, so
    a question repeated with other spacing lands on the same side."""
    normal = " ".join(question.lower().split())
    return hashlib.sha256(normal.encode()).digest()[0] % VAL_SHARE == 0


class Task(ABC):
    """A task = where problems come from, how they are asked, how answers are checked."""

    name: str = ""
    # Generation stops at these strings: the one-shot prompt format would otherwise make
    # the model write the next "Question:" itself.
    stop: tuple[str, ...] = ("\nQuestion:",)
    # The prompt's first line, and the worked (question, solution) pair shown before the problem.
    instruction: str = ""
    example: tuple[str, str] = ("", "")
    # Cores one batch's verification holds: 0 for answer matching, which must not wait behind the engines; a task
    # whose check runs programs asks for a core.
    verify_cpus: float = 0
    # Verification tasks running at once (None: as many as Ray Data likes).
    verify_concurrency: int | None = None
    # Whether samples vote on their answers (maj@k); a code task's programs do not.
    votes: bool = True
    # Where a code task's programs run (selfimprove/sandbox.py: bwrap, unshare or none); None: no programs.
    isolation: str | None = None
    # Whether `read("val")` gives a val split of the task's own (the generators'); else `load` carves one from train.
    own_val: bool = False

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    def load(self, split: str) -> list[dict]:
        """Problem rows of a split ("train", "val" or "test"), at most train_size (test_size: held-out) of them.

        A task without a val split of its own (`own_val`) carves one from train: the rows whose normalised
        question hashes into `VAL_SHARE`, which its train split then never holds, so knobs chosen on val were
        never trained on.

        Ids are given before the subset is drawn, so a problem keeps its id whatever the size.
        The subset is a seeded random sample kept in source order: the first N rows of a file
        are often one topic or difficulty (MATH is sorted by subject).
        """
        if split in ("train", "val") and not self.own_val:
            read = [row for row in self.read("train") if carved(row["question"]) == (split == "val")]
            if not read:
                raise UserError(f"task {self.name}: no {split} problems: val is 1 in {VAL_SHARE} of the training "
                                f"questions (by hash), and these give none; use more, or eval.split=test")
        else:
            read = self.read(split)
        rows = [dict(row, id=f"{self.name}-{split}-{i:05d}") for i, row in enumerate(read)]
        size = self.cfg.train_size if split == "train" else self.cfg.test_size
        if size is None or size >= len(rows):
            return rows
        keep = sorted(random.Random(self.cfg.seed).sample(range(len(rows)), size))
        return [rows[i] for i in keep]

    @abstractmethod
    def read(self, split: str) -> list[dict]:
        """All rows of a split (question, answer, solution), in source order; UserError on bad data."""

    def prompt(self, row: dict) -> list[dict]:
        """The worked example as a first chat turn, then this row's question.

        On the bundled 135M model a real user/assistant turn for the example beats putting it
        in one message (arithmetic greedy accuracy 0.145 vs 0.120, and 7 vs 34 of 200 answers
        that state no final answer).
        """
        example_question, example_solution = self.example
        return [
            {"role": "user", "content": f"{self.instruction}\n\nQuestion: {example_question}"},
            {"role": "assistant", "content": example_solution},
            {"role": "user", "content": f"Question: {row['question']}"},
        ]

    @abstractmethod
    def verify(self, text: str, gold: str) -> bool:
        """Whether a model's text reaches the gold answer. Pure and total: never raises."""

    def check(self, text: str, problem: dict) -> bool:
        """Whether a model's text solves `problem`, a whole problem row: by default, reaches its answer."""
        return self.verify(text, problem["answer"])

    def judge(self, text: str, problem: dict) -> Judgement:
        """`check`, with what the verdict says beyond right or wrong and the sample's `flags`."""
        return Judgement(self.check(text, problem), flags=tuple(self.flags(text)))

    def flags(self, text: str) -> list[str]:
        """The reward-hacking monitor's flags on a model's text (`selfimprove/monitor.py`): none where no program
        runs."""
        return []

    def guidance(self, row: dict) -> str | None:
        """Number-free solution guidance for `row` written from what the task knows of its structure, or None
        when it knows none (then guidance comes from a teacher or a file)."""
        return None

    def answer_key(self, text: str) -> str | None:
        """What majority voting groups samples by: the stated answer in canonical form, None if none."""
        return canonical(extract_answer(text))

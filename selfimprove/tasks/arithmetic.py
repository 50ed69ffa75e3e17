"""Built-in word problems: a person's count of things changes in 1-4 steps (+, -, *).

1. One seeded stream of problems serves the three splits, train, val and test. A problem belongs to the split
   its structural key chooses: its start count, operations and operands, whatever the person, object or
   phrasing (`splits.py`). So no val or test problem is a training problem in other words, and a split is the
   first `generated_<split>` problems of the stream that fall into it: more training problems never change
   the test set.
2. A problem: a starting count in [min_value, max_value], then steps drawn with
   `step_weights` (relative frequency of 1, 2, 3, 4 steps). Added and subtracted amounts lie
   in [min_value, max_value]; a subtraction never takes more than there is, so every
   intermediate count is non-negative. Multipliers are 2-5 whatever the range: larger ones
   make the numbers hard, not the reasoning.
3. Each operation has five phrasings; `variety` says how many of them are used.
4. The gold solution walks through the steps in the prompt example's form, one equation
   per step, and ends "The answer is N."
5. Solution guidance (SGFT) is written from the solution's steps: each step's event and operation, with only
   the quantities the question states, never a result.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable

from selfimprove.config import TaskConfig
from selfimprove.errors import UserError
from selfimprove.tasks.answers import is_correct
from selfimprove.tasks.base import Task
from selfimprove.tasks.splits import check_split, distinct_problems, held_families

# (name, he, him, his)
PEOPLE = (
    ("Tom", "he", "him", "his"), ("Ann", "she", "her", "her"), ("Liam", "he", "him", "his"),
    ("Mia", "she", "her", "her"), ("Noah", "he", "him", "his"), ("Zoe", "she", "her", "her"),
    ("Sam", "he", "him", "his"), ("Lucy", "she", "her", "her"),
)
# (singular, plural)
THINGS = (
    ("apple", "apples"), ("marble", "marbles"), ("sticker", "stickers"), ("pencil", "pencils"),
    ("book", "books"), ("cookie", "cookies"), ("stamp", "stamps"), ("shell", "shells"),
    ("card", "cards"), ("coin", "coins"),
)
# operation -> (question sentence, solution sentence) pairs. {things} agrees with {n};
# {eq} is the step's equation. Sentences start lower-case: the caller capitalises or
# prefixes "Then ".
TEMPLATES = {
    "+": (
        ("{he} buys {n} more {things}.", "{he} buys {n} more, so {eq}."),
        ("{other} gives {him} {n} {things}.", "{other} gives {him} {n}, so {eq}."),
        ("{he} finds {n} more {things}.", "{he} finds {n} more, so {eq}."),
        ("{he} wins {n} {things} in a game.", "{he} wins {n}, so {eq}."),
        ("{he} gets {n} {things} as a present.", "{he} gets {n} as a present, so {eq}."),
    ),
    "-": (
        ("{he} gives {n} {things} to {other}.", "{he} gives away {n}, so {eq}."),
        ("{he} loses {n} {things}.", "{he} loses {n}, so {eq}."),
        ("{he} sells {n} {things}.", "{he} sells {n}, so {eq}."),
        ("{other} takes {n} {things} from {him}.", "{other} takes {n}, so {eq}."),
        ("{he} donates {n} {things} to a school.", "{he} donates {n}, so {eq}."),
    ),
    "*": (
        ("{he} ends up with {n} times as many {plural} as before.", "{he} now has {n} times as many, so {eq}."),
        ("{other} gives {him} enough {plural} to make {his} pile {n} times as big.", "{his} pile becomes {n} times as big, so {eq}."),
        ("{he} swaps each of {his} {plural} for {n} new ones.", "each one becomes {n}, so {eq}."),
        ("the number of {plural} {he} has grows to {n} times what it was.", "the number grows {n} times, so {eq}."),
        ("{he} trades every one of {his} {plural} for {n} others.", "every one becomes {n}, so {eq}."),
    ),
}
APPLY = {"+": lambda a, n: a + n, "-": lambda a, n: a - n, "*": lambda a, n: a * n}
# How guidance tells a step's operation, and a solution's step as `_problem` writes it: "<event>, so a + n = r."
ACTIONS = {"+": "add {n}", "-": "subtract {n}", "*": "multiply the count by {n}"}
SOLUTION_STEP = re.compile(r"(?:^|\. )([^.]+?), so \d+ ([-+*]) (\d+) = \d+(?=\.)")
MULTIPLIERS = (2, 5)


class Arithmetic(Task):
    name = "arithmetic"
    own_val = True
    instruction = 'Solve the math word problem step by step, then write "The answer is N."'
    # Hand-written with a name, thing and phrasing the generator never uses, so the example
    # is never one of the problems.
    example = (
        "Maria has 12 balloons. 4 of her balloons pop. Then her friend gives her 7 more balloons. "
        "How many balloons does Maria have now?",
        "Maria starts with 12 balloons. 4 pop, so 12 - 4 = 8. Her friend gives her 7 more, so 8 + 7 = 15. "
        "The answer is 15.",
    )

    def __init__(self, cfg: TaskConfig):
        super().__init__(cfg)
        if cfg.min_value > cfg.max_value:
            raise UserError(f"task.min_value ({cfg.min_value}) must not exceed task.max_value ({cfg.max_value})")
        if cfg.variety > len(TEMPLATES["+"]):
            raise UserError(f"task.variety must be at most {len(TEMPLATES['+'])} (phrasings per operation), got {cfg.variety}")

    def read(self, split: str) -> list[dict]:
        check_split(self.name, split)
        return generate(self.cfg, split, generated_count(self.cfg, split))

    def verify(self, text: str, gold: str) -> bool:
        return is_correct(text, gold)

    def guidance(self, row: dict) -> str | None:
        """"1. Tom starts with 3 apples: that is the count to begin with. 2. He buys 5 more: add 5. ..." """
        steps = SOLUTION_STEP.findall(row["solution"])
        if not steps:  # not a solution the generator wrote
            return None
        start = row["solution"].split(". ")[0]
        lines = [f"{start}: that is the count to begin with."]
        lines += [f"{event}: {ACTIONS[op].format(n=n)}." for event, op, n in steps]
        lines.append("The count after the last change is the answer.")
        return "\n".join(f"{i}. {line}" for i, line in enumerate(lines, 1))


def generate(cfg: TaskConfig, split: str, count: int) -> list[dict]:
    """The first `count` distinct problems of the seeded stream that hash into `split`."""
    held = held_families(families(cfg), "arithmetic") if cfg.holdout == "families" else None
    return distinct_problems(lambda rng: _problem(rng, cfg), cfg.seed, split, count,
                             "widen task.min_value..task.max_value, or allow more steps or operations", held)


def families(cfg: TaskConfig) -> list[str]:
    """The kinds of problem `cfg` draws: each sequence of operations ("+-": add, then subtract) of a step count
    with a positive weight."""
    return ["".join(ops) for steps, weight in enumerate(cfg.step_weights, 1) if weight > 0
            for ops in itertools.product(cfg.operations, repeat=steps)]


def generated_count(cfg: TaskConfig, split: str) -> int:
    return {"train": cfg.generated_train, "val": cfg.generated_val, "test": cfg.generated_test}[split]


def _problem(rng: random.Random, cfg: TaskConfig) -> tuple[str, str, Callable[[], dict]] | None:
    """One random problem as (its structural key, its family: its operations, its row), or None when a step cannot
    be drawn (nothing left to subtract)."""
    name, he, him, his = rng.choice(PEOPLE)
    other = rng.choice([p for p in PEOPLE if p[0] != name])[0]
    singular, plural = rng.choice(THINGS)
    steps = rng.choices(range(1, len(cfg.step_weights) + 1), weights=cfg.step_weights)[0]
    have = rng.randint(cfg.min_value, cfg.max_value)
    start = f"{name} has {have} {singular if have == 1 else plural}."
    question, solution, key = [start], [start.replace(" has ", " starts with ", 1)], [str(have)]
    for step in range(steps):
        ops = [op for op in cfg.operations if op != "-" or have >= cfg.min_value]
        if not ops:
            return None
        op = rng.choice(ops)
        n = _amount(rng, op, have, cfg)
        result = APPLY[op](have, n)
        asked, worked = rng.choice(TEMPLATES[op][: cfg.variety])
        words = {"he": he, "him": him, "his": his, "other": other, "n": n, "plural": plural,
                 "things": singular if n == 1 else plural, "eq": f"{have} {op} {n} = {result}"}
        asked = asked.format(**words)
        question.append(f"Then {asked}" if step else _capitalize(asked))
        solution.append(_capitalize(worked.format(**words)))
        key.append(f"{op} {n}")
        have = result
    question.append(f"How many {plural} does {name} have now?")
    solution.append(f"The answer is {have}.")
    row = {"question": " ".join(question), "answer": str(have), "solution": " ".join(solution)}
    return " ".join(key), "".join(step[0] for step in key[1:]), lambda: row


def _amount(rng: random.Random, op: str, have: int, cfg: TaskConfig) -> int:
    if op == "*":
        return rng.randint(*MULTIPLIERS)
    return rng.randint(cfg.min_value, min(have, cfg.max_value) if op == "-" else cfg.max_value)


def _capitalize(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]

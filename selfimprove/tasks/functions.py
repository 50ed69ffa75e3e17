"""Built-in code problems: write a small Python function, judged by hidden tests.

1. A problem is a family (what the function does, e.g. "the sum of the numbers greater than k") with
   constants drawn from a seeded stream, so one family gives many distinct functions. The question
   names the function and its parameters and shows one example call; the tests are `HIDDEN_TESTS`
   other calls, their expected values computed by the reference program.
2. The example's and the tests' arguments are drawn from a generator seeded by the function's
   description, so a question is a function of its description alone: train and test (split by the
   question's hash, as the arithmetic task does) never share a function.
3. `task.generated_train` / `generated_test` set the split sizes, `task.seed` the stream.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from selfimprove.errors import UserError
from selfimprove.tasks.arithmetic import distinct_problems
from selfimprove.tasks.code import CodeTask, fenced

HIDDEN_TESTS = 4
WORDS = ("sun", "river", "apple", "stone", "cloud", "tiger", "lamp", "orange", "bird", "garden", "moon", "sea")


def _ints(rng: random.Random, lo: int = -20, hi: int = 20) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(3, 7))]


def _word(rng: random.Random) -> str:
    return rng.choice(WORDS)


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))


# A parameter's name, by the kind of value it takes: the same function is asked for under several names.
PARAMS = {"int": ("x", "n", "value", "num"), "ints": ("numbers", "values", "nums", "items", "data"),
          "word": ("word", "w", "name", "token"), "text": ("text", "s", "sentence", "line")}
ARGUMENTS = {"int": lambda r: r.randint(-10, 10), "ints": _ints, "word": _word, "text": _sentence}


@dataclass(frozen=True)
class Family:
    """A kind of function: its names, the kind of its one parameter, what it must do and a reference body (both
    templates over the parameter's name `p` and the constants `constants` draws)."""
    names: tuple[str, ...]
    kind: str
    asks: str
    body: str
    constants: Callable[[random.Random], dict]
    arguments: Callable[[random.Random], object] | None = None  # default: ARGUMENTS[kind]


def _span(r: random.Random, lo: tuple[int, int], width: tuple[int, int]) -> dict:
    low = r.randint(*lo)
    return {"lo": low, "hi": low + r.randint(*width)}


FAMILIES = (
    Family(("scale_shift", "linear", "times_plus"), "int", "returns {p} times {a} plus {b}", "return {p} * {a} + {b}",
           lambda r: {"a": r.randint(2, 20), "b": r.randint(1, 60)}),
    Family(("sum_above", "total_above", "sum_greater", "add_large"), "ints",
           "returns the sum of the numbers in {p} that are greater than {k}", "return sum(n for n in {p} if n > {k})",
           lambda r: {"k": r.randint(0, 12)}, lambda r: _ints(r, 0, 20)),
    Family(("count_multiples", "count_divisible", "multiples"), "ints",
           "returns how many numbers in {p} are divisible by {k}", "return sum(1 for n in {p} if n % {k} == 0)",
           lambda r: {"k": r.randint(2, 9)}, lambda r: _ints(r, 0, 40)),
    Family(("repeat_joined", "repeat_word", "copies"), "word",
           "returns {p} repeated {n} times, with {sep!r} between the copies", "return {sep!r}.join([{p}] * {n})",
           lambda r: {"n": r.randint(2, 5), "sep": r.choice("-,+/ ")}),
    Family(("count_letter", "letter_count", "how_many"), "text", "returns how many times the letter {c!r} appears in {p}",
           "return {p}.count({c!r})", lambda r: {"c": r.choice("abcdeghilmnoprstu")}),
    Family(("scale_all", "multiply_all", "times_each"), "ints", "returns a new list with each number of {p} multiplied "
           "by {k}", "return [n * {k} for n in {p}]", lambda r: {"k": r.randint(2, 12)}),
    Family(("keep_below", "smaller_than", "filter_small"), "ints",
           "returns the numbers of {p} that are less than {k}, in the same order", "return [n for n in {p} if n < {k}]",
           lambda r: {"k": r.randint(-5, 15)}),
    Family(("sum_from", "total_from", "add_up_from"), "int", "returns the sum of all whole numbers from {a} up to {p}, "
           "including both", "return sum(range({a}, {p} + 1))", lambda r: {"a": r.randint(0, 20)},
           lambda r: r.randint(20, 40)),
    Family(("last_letters", "word_end", "suffix"), "word", "returns the last {n} letters of {p}", "return {p}[-{n}:]",
           lambda r: {"n": r.randint(1, 4)}),
    Family(("largest_plus", "max_plus", "top_plus"), "ints", "returns the largest number in {p} plus {k}",
           "return max({p}) + {k}", lambda r: {"k": r.randint(1, 99)}),
    Family(("clamp", "limit", "bound"), "int", "returns {p} if it lies between {lo} and {hi}, {lo} if it is smaller "
           "and {hi} if it is larger", "return min(max({p}, {lo}), {hi})", lambda r: _span(r, (-10, 10), (5, 20)),
           lambda r: r.randint(-30, 40)),
    Family(("swap_letter", "replace_letter", "change_letter"), "text", "returns {p} with every {a!r} replaced by {b!r}",
           "return {p}.replace({a!r}, {b!r})", lambda r: dict(zip("ab", r.sample("aeiosnt", 2)))),
    Family(("power_minus", "raise_minus"), "int", "returns {p} to the power {e}, minus {b}", "return {p} ** {e} - {b}",
           lambda r: {"e": r.randint(2, 4), "b": r.randint(1, 99)}, lambda r: r.randint(-6, 6)),
    Family(("in_range", "between", "within"), "int", "returns True if {p} is between {lo} and {hi} (both included), "
           "and False otherwise", "return {lo} <= {p} <= {hi}", lambda r: _span(r, (-50, 50), (3, 60)),
           lambda r: r.randint(-60, 120)),
)


def make_problem(rng: random.Random) -> dict:
    """One problem: a family, name, parameter and constants from `rng`; its example and tests from a generator
    seeded by the question's description."""
    family = rng.choice(FAMILIES)
    name, param = rng.choice(family.names), rng.choice(PARAMS[family.kind])
    constants = {**family.constants(rng), "p": param}
    asks = family.asks.format(**constants)
    program = f"def {name}({param}):\n    {family.body.format(**constants)}\n"
    reference = {}
    exec(program, reference)  # our own reference code, not a model's
    function = reference[name]
    draw = family.arguments or ARGUMENTS[family.kind]
    calls = random.Random(hashlib.sha256(f"{name}({param}) {asks}".encode()).digest())
    example, *hidden = [draw(calls) for _ in range(1 + HIDDEN_TESTS)]

    def call(arg) -> str:
        return f"{name}({arg!r})"

    question = (f"Write a function `{name}({param})` that {asks}. "
                f"For example, {call(example)} == {function(example)!r}.")
    return {"question": question, "answer": program, "solution": fenced(program),
            "tests": [f"assert {call(arg)} == {function(arg)!r}" for arg in hidden],
            "setup": "", "entry_point": name, "stub": ""}


class Functions(CodeTask):
    name = "functions"

    def read(self, split: str) -> list[dict]:
        counts = {"train": self.cfg.generated_train, "test": self.cfg.generated_test}
        if split not in counts:
            raise UserError(f"functions has the splits train and test, not '{split}'")
        return distinct_problems(make_problem, self.cfg.seed, split, counts[split],
                                 "ask for fewer; the families' constants give about 4,000 functions a split")

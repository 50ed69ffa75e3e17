"""Built-in code problems: write a small Python function, judged by hidden tests.

1. A problem is a family (what the function does, e.g. "the sum of the numbers greater than k") with
   constants drawn from a seeded stream, so one family gives many distinct functions. The question
   names the function and its parameter and shows one example call.
2. Splits go by the function, not its wording: the structural key is the reference body with the parameter
   renamed (family and constants, no names), so no val or test function is a training function renamed
   (`splits.py`).
3. `HIDDEN_TESTS` tests, chosen from edge arguments at the constants and random ones (a generator seeded by
   the key) so that the trivial answers (0, False, None, [], the argument, ...) and the same family with
   constants off by one or two, or drawn afresh, fail at least one wherever an argument can tell them apart.
   The example call is never a hidden test.
4. `task.generated_train` / `generated_val` / `generated_test` set the split sizes, `task.seed` the stream.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from selfimprove.tasks.arithmetic import generated_count
from selfimprove.tasks.code import CodeTask, fenced
from selfimprove.tasks.splits import check_split, distinct_problems, held_families

HIDDEN_TESTS = 10
CANDIDATES = 40  # arguments drawn per problem, beside the edge ones, to choose its tests from
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


def make_problem(rng: random.Random) -> tuple[str, str, Callable[[], dict]]:
    """One problem as (its structural key: the reference body with the parameter renamed `x`, its family's first
    name, its row): a family, name, parameter and constants from `rng`; the row's example and tests from a
    generator seeded by the key."""
    family = rng.choice(FAMILIES)
    name, param = rng.choice(family.names), rng.choice(PARAMS[family.kind])
    constants = family.constants(rng)
    key = family.body.format(**constants, p="x")
    return key, family.names[0], lambda: _row(family, name, param, constants, key)


def _row(family: Family, name: str, param: str, constants: dict, key: str) -> dict:
    asks = family.asks.format(**constants, p=param)
    program = f"def {name}({param}):\n    {family.body.format(**constants, p=param)}\n"
    function = _compiled(family, constants)
    calls = random.Random(hashlib.sha256(key.encode()).digest())
    draw = family.arguments or ARGUMENTS[family.kind]
    candidates = _distinct([*edge_arguments(family.kind, constants), *(draw(calls) for _ in range(CANDIDATES))])
    example = calls.choice(candidates)
    hidden = hidden_arguments(function, [a for a in candidates if a != example], confusers(family, constants),
                              calls)

    def call(arg) -> str:
        return f"{name}({arg!r})"

    question = (f"Write a function `{name}({param})` that {asks}. "
                f"For example, {call(example)} == {function(example)!r}.")
    return {"question": question, "answer": program, "solution": fenced(program),
            "tests": [f"assert {call(arg)} == {function(arg)!r}" for arg in hidden],
            "setup": "", "entry_point": name, "stub": ""}


def _compiled(family: Family, constants: dict) -> Callable:
    scope = {}
    exec(f"def f(x):\n    {family.body.format(**constants, p='x')}\n", scope)  # our own code, not a model's
    return scope["f"]


def _distinct(values: list) -> list:
    seen, kept = set(), []
    for value in values:
        if repr(value) not in seen:
            seen.add(repr(value))
            kept.append(value)
    return kept


# Programs a test set must tell from the reference: the trivial answers, and (`confusers`) the same family with
# constants a little or wholly off.
TRIVIAL = (lambda x: 0, lambda x: False, lambda x: True, lambda x: None, lambda x: [], lambda x: "", lambda x: x)
LETTERS = "abcdeghilmnoprstu-,+/ "


def confusers(family: Family, constants: dict) -> list[Callable]:
    """The trivial programs, and the family's function with each constant moved by 1 or 2 (another letter, for a
    letter), or with all constants drawn afresh (eight draws)."""
    others = []
    for name, value in constants.items():
        moved = [value + d for d in (-2, -1, 1, 2)] if type(value) is int else [c for c in LETTERS if c != value]
        others += [{**constants, name: v} for v in moved]
    redraw = random.Random(repr(sorted(constants.items())))
    others += [family.constants(redraw) for _ in range(8)]
    return [*TRIVIAL, *(_compiled(family, c) for c in others if c != constants)]


def edge_arguments(kind: str, constants: dict) -> list:
    """Arguments at the family's constants, where a constant off by one answers differently."""
    ints = [v for v in constants.values() if type(v) is int]
    letters = [v for v in constants.values() if type(v) is str]
    if kind == "int":
        return [c + d for c in ints for d in range(-2, 3)] + [0, 1, -1, 2]
    if kind == "ints":
        return [[c - 1, c, c + 1] for c in ints] + [[c, 2 * c, 3 * c + 1] for c in ints] + [[0, 1, 2, 3, 4, 5, 6]]
    if kind == "word":
        return list(WORDS)
    return [f"{c}{c} sun {c}" for c in letters] + [" ".join(WORDS[i:i + 3]) for i in range(0, len(WORDS), 3)]


def hidden_arguments(function: Callable, candidates: list, confusers: list[Callable], rng: random.Random) -> list:
    """`HIDDEN_TESTS` of `candidates`: first, one at a time, the argument on which the reference's answer tells it
    from most of the confusers not yet told apart (a test passes when the answers are ==, as the judge compares);
    then random ones."""
    expected = [function(a) for a in candidates]
    differs = [[_differs(c, a, e) for a, e in zip(candidates, expected)] for c in confusers]
    chosen, alive = [], set(range(len(confusers)))
    while alive and len(chosen) < HIDDEN_TESTS:
        best = max(range(len(candidates)), key=lambda i: sum(differs[c][i] for c in alive))
        if not any(differs[c][best] for c in alive):
            break
        chosen.append(best)
        alive = {c for c in alive if not differs[c][best]}
    rest = [i for i in range(len(candidates)) if i not in chosen]
    chosen += rng.sample(rest, min(HIDDEN_TESTS - len(chosen), len(rest)))
    return [candidates[i] for i in sorted(chosen)]


def _differs(program: Callable, argument, expected) -> bool:
    try:
        return not program(argument) == expected
    except Exception:  # noqa: BLE001 -- a confuser that raises fails that test
        return True


class Functions(CodeTask):
    name = "functions"
    own_val = True

    def read(self, split: str) -> list[dict]:
        check_split(self.name, split)
        held = held_families((f.names[0] for f in FAMILIES), self.name) if self.cfg.holdout == "families" else None
        return distinct_problems(make_problem, self.cfg.seed, split, generated_count(self.cfg, split),
                                 "ask for fewer; the families' constants give about 3,900 functions for train and "
                                 "2,000 each for val and test; with task.holdout=families, 294 for train, 151 for "
                                 "val and 7,249 for test", held)

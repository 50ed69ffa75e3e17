"""Answer extraction, number normalisation and matching, on hand-written strings."""

from fractions import Fraction

import pytest

from selfimprove.tasks.answers import (
    answers_match,
    canonical,
    extract_answer,
    is_correct,
    last_boxed,
    normalize_number,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Tom has 5 + 3 = 8. The answer is 8.", "8"),
        ("the ANSWER IS 42", "42"),
        ("The answer is: 7.", "7"),
        ("Final answer: 12 apples.", "12 apples"),
        ("Janet sells 9 eggs.\n#### 18", "18"),
        ("#### 1,000", "1,000"),
        ("So it is \\boxed{36}.", "36"),
        ("$\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
        ("\\boxed{\\sqrt{\\frac{a}{b}}} done", "\\sqrt{\\frac{a}{b}}"),
        ("The answer is 3.5.", "3.5"),
        ("The answer is $1,250.", "$1,250"),
        ("The answer is −4.", "−4"),
        ("The answer is **18**.", "18"),
        ("The answer is 5. Then the answer is 6.", "6"),
        ("Answer: the answer is 9.", "9"),
        ("\\boxed{1} and later \\boxed{2}", "2"),
        ("\\boxed{3} then an unclosed \\boxed{4", "3"),
        ("The answer is 7. #### 8", "8"),
        ("#### 8\nThe answer is \\boxed{9}", "9"),
        ("The answer is\n\n10", "10"),
        ("2 + 3 = 5", None),
        ("The answers are below: 5", None),
        ("\\boxed{}", None),
        ("####", None),
        ("", None),
        (None, None),
        ("}}}{{{\\boxed{", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("18", Fraction(18)),
        ("1,000", Fraction(1000)),
        ("1,234,567.5", Fraction(2469135, 2)),
        ("-3", Fraction(-3)),
        ("−3", Fraction(-3)),
        ("+3", Fraction(3)),
        ("3.50", Fraction(7, 2)),
        (".5", Fraction(1, 2)),
        ("$18", Fraction(18)),
        ("-$5", Fraction(-5)),
        ("$-5", Fraction(-5)),
        ("18 dollars", Fraction(18)),
        ("5 cm.", Fraction(5)),
        ("12 apples.", Fraction(12)),
        ("6.", Fraction(6)),
        ("1/2", Fraction(1, 2)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("\\dfrac{3}{4}", Fraction(3, 4)),
        ("50%", Fraction(50)),
        ("50\\%", Fraction(50)),
        ("1{,}000", Fraction(1000)),
        ("**7**", Fraction(7)),
        ("5 - 3", None),
        ("1, 2", None),
        ("2\\pi", None),
        ("x", None),
        ("", None),
        ("1/0", None),
        ("--5", None),
        ("9" * 5000, None),  # beyond Python's int-from-string digit limit
        (None, None),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("3.50", "3.5", True),
        ("1,000", "1000", True),
        ("$18", "18", True),
        ("18 dollars", "18", True),
        ("−4", "-4", True),
        ("0.5", "1/2", True),
        ("50%", "50", True),
        ("18", "19", False),
        ("B", "b", True),
        (" Paris. ", "paris", True),
        ("\\sqrt{2}", "\\sqrt{2}", True),
        ("\\sqrt{2}", "\\sqrt{3}", False),
        ("eighteen", "18", False),
        (None, "18", False),
        ("18", None, False),
        ("", "", False),
    ],
)
def test_answers_match(pred, gold, expected):
    assert answers_match(pred, gold) is expected


@pytest.mark.parametrize(
    "text, gold, expected",
    [
        ("He has 5 + 3 = 8 apples. The answer is 8.", "8", True),
        ("He has 5 + 3 = 8 apples. The answer is 9.", "8", False),
        ("He has 5 + 3 = 8 apples.", "8", False),  # no stated answer: not a guess from the last number
        ("#### 2,125", "2125", True),
    ],
)
def test_is_correct(text, gold, expected):
    assert is_correct(text, gold) is expected


def test_last_boxed_keeps_nested_braces():
    assert last_boxed("\\boxed{\\left\\{1, 2\\right\\}}") == "\\left\\{1, 2\\right\\}"


@pytest.mark.parametrize(
    "garbage",
    ["\\boxed{" * 5000, "{" * 10_000, "}" * 10_000, "answer is " * 2000, " " * 50_000 + "x", "#### " * 5000,
     "\x00\ud800\uffff", "🙂 The answer is 🙂.", "1e400", "-" * 10_000 + "5", "9" * 100_000],
)
def test_functions_are_total_and_fast_on_garbage(garbage):
    assert extract_answer(garbage) is None or isinstance(extract_answer(garbage), str)
    assert normalize_number(garbage) is None or isinstance(normalize_number(garbage), Fraction)
    assert isinstance(answers_match(garbage, garbage), bool)
    assert isinstance(is_correct(garbage, "5"), bool)


@pytest.mark.parametrize(
    "answer, key",
    [("$18.00", "18"), ("18 dollars", "18"), ("1/2", "1/2"), ("0.5", "1/2"), (" Paris. ", "paris"), ("", None), (None, None)],
)
def test_canonical_keys_agree_with_answers_match(answer, key):
    assert canonical(answer) == key

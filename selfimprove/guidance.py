"""Solution guidance (SGFT, Bi et al. 2024): prompts, the number-free rule, and what a guidance is worth. Pure.

1. A guide is asked, with two worked examples, for the steps that solve a question at the level of meaning:
   what to find and which operation gives it, with no computed number. The solver gets the question and that
   guidance in its own task prompt.
2. Number-free: every number a guidance writes (in digits, or as a word from two to a thousand) must be quoted
   from the question. Step labels ("1.", "Step 2:") are not numbers of the solution. Any other number was
   computed, or made up, and a guidance carrying one is dropped from guidance data, and valued 0 in the
   self-improvement rounds (so it is the guide's loser): a guide that leaks the answer must not be rewarded.
3. A guidance is worth its solver's success rate over the m samples drawn with it. Guidance pairs are built
   from those values as process pairs are from path scores (`pairs.process_pairs`): higher beats lower, by a
   gap of at least `guide.min_gap`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from decimal import Decimal, InvalidOperation

INSTRUCTION = ("Write guidance for solving the question: 2 to 6 short numbered steps that say what to find and "
               "which operation gives it. Quote numbers from the question if you need them, but never compute one: "
               "no result, no answer.")
# Hand-written, on names and things no built-in task uses, so an example is never one of the problems.
EXAMPLES = (
    ("Maria has 12 balloons. 4 of her balloons pop. Then her friend gives her 7 more balloons. "
     "How many balloons does Maria have now?",
     "1. Start from the 12 balloons Maria has.\n2. Some balloons pop: subtract the 4 that pop.\n"
     "3. Her friend gives her more: add the 7 she gets.\n4. The count after the last change is the answer."),
    ("A baker makes 24 muffins in the morning and twice as many in the afternoon. He sells 30 muffins. "
     "How many muffins does he have left?",
     "1. Find the afternoon's muffins: double the morning's 24.\n2. Add the morning's and the afternoon's muffins "
     "to get all he made.\n3. Subtract the 30 he sells from all he made.\n4. What is left is the answer."),
)
# Solver sample statuses of a guidance the solver is not given: its samples are not drawn.
SKIPPED_NUMBER, SKIPPED_EMPTY = "skipped=computed_number", "skipped=empty"

_NUMBER = re.compile(r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?|\.\d+")
_STEP_LABEL = re.compile(r"^[ \t]*(?:step[ \t]*)?\d+[ \t]*[.):][ \t]*", re.IGNORECASE | re.MULTILINE)
_STEP_NAME = re.compile(r"\bstep[ \t]+\d+\b", re.IGNORECASE)  # "as in step 2": a step's name, not a number
_WORDS = {w: i for i, w in enumerate(
    "zero _ two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty".split()) if w != "_"}
_WORDS |= {w: 10 * i for i, w in enumerate("_ _ _ thirty forty fifty sixty seventy eighty ninety".split()) if w != "_"}
_WORDS |= {"hundred": 100, "thousand": 1000, "dozen": 12}
# Words of a question that state a number an operation then uses: "twice" allows a 2 in its guidance.
_QUESTION_WORDS = {"twice": 2, "double": 2, "doubles": 2, "triple": 3, "triples": 3, "thrice": 3, "half": 2,
                   "one": 1, "once": 1}
_WORD = re.compile(r"[a-z]+")


def guide_prompt(question: str) -> list[dict]:
    """The guide's chat: the instruction and two worked examples as earlier turns, then the question."""
    turns = []
    for i, (example, guidance) in enumerate(EXAMPLES):
        turns += [{"role": "user", "content": (f"{INSTRUCTION}\n\n" if i == 0 else "") + f"Question: {example}"},
                  {"role": "assistant", "content": guidance}]
    return [*turns, {"role": "user", "content": f"Question: {question}"}]


def solver_prompt(task, problem: dict, guidance: str) -> list[dict]:
    """The solver's own task prompt for `problem`, the guidance's steps as one hint paragraph before the question.

    On the bundled 135M solver, with the arithmetic generator's guidance on 120 training problems (greedy):
    0.358 correct with a "Hint: ..." paragraph before the question, 0.267 with the numbered list there, 0.167
    and 0.125 with either after the question, 0.150 with no guidance: a list after the question is copied, not
    followed.
    """
    return with_hint(task.prompt(problem), guidance)


def with_hint(messages: list[dict], guidance: str) -> list[dict]:
    """`messages` with the guidance's steps as one "Hint: ..." paragraph before the last message's text."""
    last = messages[-1]
    hint = " ".join(line.strip() for line in _STEP_LABEL.sub("", guidance).splitlines() if line.strip())
    return [*messages[:-1], dict(last, content=f"Hint: {hint}\n{last['content']}")]


def numbers(text: str, words: dict[str, int] = _WORDS) -> set[Decimal]:
    """The numbers `text` writes, in digits ("1,200", "3.50") or as one of `words`, as exact values."""
    found = set()
    for digits in _NUMBER.findall(text):
        try:
            found.add(Decimal(digits.replace(",", "")).normalize())
        except InvalidOperation:
            pass
    found |= {Decimal(words[w]) for w in _WORD.findall(text.lower()) if w in words}
    return found


def computed_numbers(guidance: str, question: str) -> list[str]:
    """The numbers of `guidance` (step labels aside) that the question does not state, in increasing order."""
    quoted = numbers(question, _WORDS | _QUESTION_WORDS)
    return [f"{n:f}" for n in sorted(numbers(_STEP_NAME.sub(" ", _STEP_LABEL.sub(" ", guidance))) - quoted)]


def guidance_problem(guidance: str | None, question: str) -> str | None:
    """Why a guidance cannot be used ("empty", "computed_number"), or None."""
    if not guidance or not guidance.strip():
        return "empty"
    return "computed_number" if computed_numbers(guidance, question) else None


def guidance_values(samples: list[dict]) -> tuple[list[dict], dict[tuple[str, int], float | None]]:
    """(one row per guidance, {(problem_id, guidance_index): value}) from guided solver samples (problem_id,
    guidance_index, guide_prompt_text, guidance, guide_status, status, correct).

    A guidance's value is the share of its drawn solver samples that are correct; one skipped for a computed number
    is worth 0; an empty one, or one whose solver samples were all skipped (too long), has none. The rows are
    shaped as `pairs.process_pairs` reads samples: the guidance is the `text` the guide wrote for `prompt_text`.
    """
    by_guidance: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for s in samples:
        by_guidance[s["problem_id"], s["guidance_index"]].append(s)
    rows, values = [], {}
    for (pid, gi), drawn in sorted(by_guidance.items()):
        first = drawn[0]
        if first["guide_status"] != "ok" or first["status"] == SKIPPED_EMPTY:
            continue
        rows.append({"problem_id": pid, "sample_index": gi, "prompt_text": first["guide_prompt_text"],
                     "text": first["guidance"], "status": "ok"})
        ok = [s for s in drawn if s["status"] == "ok"]
        values[pid, gi] = (0.0 if first["status"] == SKIPPED_NUMBER else
                           sum(s["correct"] for s in ok) / len(ok) if ok else None)
    return rows, values


def kept_guidance(samples: list[dict], rows_per_problem: int) -> tuple[list[dict], dict]:
    """(guide SFT rows (problem_id, prompt, response), stats) from guidance data's solver samples: a guidance is
    kept if it is number-free and its solver sample is correct; up to `rows_per_problem` distinct ones a question.
    Stats count guidances by what became of them, and the questions left with none."""
    stats = {"guidances": 0, "rows": 0, "empty": 0, "computed_number": 0, "too_long": 0, "solver_wrong": 0,
             "repeated": 0}
    kept: dict[str, list[dict]] = defaultdict(list)
    seen = set()
    for s in sorted(samples, key=lambda s: (s["problem_id"], s["guidance_index"], s["sample_index"])):
        if s["sample_index"]:  # the first solver sample decides; guidance data draws one
            continue
        stats["guidances"] += 1
        reason = _drop_reason(s)
        if reason is None and ((s["problem_id"], s["guidance"]) in seen
                               or len(kept[s["problem_id"]]) == rows_per_problem):
            reason = "repeated"
        if reason:
            stats[reason] += 1
            continue
        seen.add((s["problem_id"], s["guidance"]))
        kept[s["problem_id"]].append({"problem_id": s["problem_id"], "prompt": s["guide_prompt_text"],
                                      "response": s["guidance"]})
    rows = [r for rs in kept.values() for r in rs]
    stats["rows"] = len(rows)
    stats["questions"] = len({s["problem_id"] for s in samples})
    stats["questions_with_guidance"] = len(kept)
    return rows, stats


def _drop_reason(sample: dict) -> str | None:
    status = sample["status"]
    if status in (SKIPPED_NUMBER, SKIPPED_EMPTY):
        return status.removeprefix("skipped=")
    if status != "ok":  # the guide's prompt, or the solver's with the guidance, does not fit its context
        return "too_long"
    return None if sample["correct"] else "solver_wrong"

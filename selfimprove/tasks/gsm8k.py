"""GSM8K: grade-school math word problems (Cobbe et al., 2021).

`task.data` is a local file or folder (train.jsonl / test.jsonl, as OpenAI ships them) or a
hub dataset with GSM8K's "main" configuration; the default is openai/gsm8k.

A raw row is {"question", "answer"}, where the answer is a worked solution with calculator
annotations ("9 * 2 = <<9*2=18>>18") and a last line "#### 18". A task row keeps:
  answer    the text after "####", commas removed ("2,125" -> "2125")
  solution  the text before "####" without the annotations, plus " The answer is N.", the
            same form the one-shot example shows and the verifier reads
A row with a question and no answer is a question alone (answer and solution ""): recipe
self_refine labels such questions by its teacher's majority answer; the others refuse them.
"""

from __future__ import annotations

import re

from selfimprove.tasks.answers import is_correct
from selfimprove.tasks.base import Task
from selfimprove.tasks.files import read_rows

HUB_NAME = "openai/gsm8k"
_ANNOTATION = re.compile(r"<<.*?>>")


def to_row(raw: dict) -> dict:
    """A task row from a raw GSM8K row; ValueError if the answer has no "#### N"."""
    if raw.get("answer") in (None, ""):
        return {"question": str(raw["question"]), "answer": "", "solution": ""}
    reasoning, marker, final = str(raw["answer"]).rpartition("####")
    answer = final.strip().replace(",", "")
    if not marker or not answer:
        raise ValueError("'answer' has no final '#### N' line")
    solution = _ANNOTATION.sub("", reasoning).strip()
    return {"question": str(raw["question"]), "answer": answer, "solution": f"{solution} The answer is {answer}."}


class GSM8K(Task):
    name = "gsm8k"
    instruction = 'Solve the math word problem step by step, then write "The answer is N."'
    # Hand-written in GSM8K's style; not a dataset problem, so it cannot leak the test set.
    example = (
        "A baker makes 24 muffins in the morning and 18 muffins in the afternoon. "
        "She packs them in boxes of 6 and sells each box for $5. How much money does she make?",
        "The baker makes 24 + 18 = 42 muffins.\nShe fills 42 / 6 = 7 boxes.\n"
        "She makes 7 * 5 = $35. The answer is 35.",
    )

    def read(self, split: str) -> list[dict]:
        return read_rows(self.cfg.data or HUB_NAME, split, ("question",), to_row, hub_config="main")

    def verify(self, text: str, gold: str) -> bool:
        return is_correct(text, gold)

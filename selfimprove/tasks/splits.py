"""Splits of the built-in generators, by what a problem is, not by how it is worded.

1. Every generated problem has a structural key: what stays when names, objects and phrasing are taken away
   (arithmetic: the start count, then each operation and its operand; functions: the reference body with its
   parameter renamed). Two problems with one key are one problem asked twice.
2. A key's SHA-256 puts it in one split: half train, a quarter val, a quarter test. So no val or test problem
   is a training problem in other words, and the split of a key never depends on the sizes asked for.
3. A split is the first `count` problems of one seeded stream whose keys fall into it, each key once.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

from selfimprove.errors import UserError

SPLITS = ("train", "val", "test")


def split_of(key: str) -> str:
    """'train', 'val' or 'test', fixed by the key alone (stable across runs and machines)."""
    return ("train", "train", "val", "test")[hashlib.sha256(key.encode()).digest()[0] % 4]


def check_split(task: str, split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"{task} has the splits {', '.join(SPLITS)}, not '{split}'")


def distinct_problems(draw: Callable[[random.Random], tuple[str, Callable[[], dict]] | None], seed: int,
                      split: str, count: int, remedy: str) -> list[dict]:
    """The first `count` problems of a stream seeded by `seed` whose keys are new and fall into `split`. `draw(rng)`
    gives (key, a function that builds the problem row), or None: no problem from this draw; a row is built only
    once its key is kept. UserError saying `remedy` if the stream runs dry."""
    rng = random.Random(seed)
    rows, seen = [], set()
    # Generous for any reasonable range; only a tiny problem space (say max_value=1) runs out.
    tries = 100 * count + 10_000
    for _ in range(tries):
        drawn = draw(rng)
        if drawn is None or drawn[0] in seen or split_of(drawn[0]) != split:
            continue
        seen.add(drawn[0])
        rows.append({**drawn[1](), "key": drawn[0]})
        if len(rows) == count:
            return rows
    raise UserError(f"could only generate {len(rows)} distinct {split} problems of the {count} asked "
                    f"(task.generated_{split}) in {tries} tries: {remedy}")

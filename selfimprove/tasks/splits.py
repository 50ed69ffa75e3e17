"""Splits of the built-in generators, by what a problem is, not by how it is worded.

1. Every generated problem has a structural key: what stays when names, objects and phrasing are taken away
   (arithmetic: the start count, then each operation and its operand; functions: the reference body with its
   parameter renamed). Two problems with one key are one problem asked twice.
2. A key's SHA-256 puts it in one split: half train, a quarter val, a quarter test. So no val or test problem
   is a training problem in other words, and the split of a key never depends on the sizes asked for.
3. A split is the first `count` problems of one seeded stream whose keys fall into it, each key once.
4. `task.holdout=families` measures problems of a kind never trained on: every problem also has a family (a
   function's kind, an arithmetic problem's sequence of operations), and the quarter of the families whose
   names' SHA-256 come first are held out. The test split holds their problems alone; train and val hold the
   other families' (by key, as above), whose test problems are left unused.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterable

from selfimprove.errors import UserError

SPLITS = ("train", "val", "test")


def split_of(key: str) -> str:
    """'train', 'val' or 'test', fixed by the key alone (stable across runs and machines)."""
    return ("train", "train", "val", "test")[hashlib.sha256(key.encode()).digest()[0] % 4]


def check_split(task: str, split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"{task} has the splits {', '.join(SPLITS)}, not '{split}'")


def held_families(families: Iterable[str], task: str) -> frozenset[str]:
    """The quarter of `families` (rounded up) whose names' SHA-256 come first: `task.holdout=families` keeps them
    out of train and val, and test holds only them."""
    ranked = sorted(set(families), key=lambda f: hashlib.sha256(f.encode()).digest())
    if len(ranked) < 2:
        raise UserError(f"task.holdout=families: {task} as configured has {len(ranked)} kind of problem "
                        f"({', '.join(ranked)}), and holding one out needs another to train on")
    return frozenset(ranked[:math.ceil(len(ranked) / 4)])


def place(key: str, family: str, held: frozenset[str] | None) -> str | None:
    """The split a problem goes to: by its key; with `held` families (task.holdout=families), test if its family is
    held, else train or val by its key, and None (unused) where its key says test."""
    if held is None:
        return split_of(key)
    if family in held:
        return "test"
    split = split_of(key)
    return None if split == "test" else split


def distinct_problems(draw: Callable[[random.Random], tuple[str, str, Callable[[], dict]] | None], seed: int,
                      split: str, count: int, remedy: str, held: frozenset[str] | None = None) -> list[dict]:
    """The first `count` problems of a stream seeded by `seed` whose keys are new and fall into `split` (`place`).
    `draw(rng)` gives (key, family, a function that builds the problem row), or None: no problem from this draw;
    a row is built only once its key is kept. UserError saying `remedy` if the stream runs dry."""
    rng = random.Random(seed)
    rows, seen = [], set()
    # Generous for any reasonable range; only a tiny problem space (say max_value=1) runs out.
    tries = 100 * count + 10_000
    for _ in range(tries):
        drawn = draw(rng)
        if drawn is None or drawn[0] in seen or place(drawn[0], drawn[1], held) != split:
            continue
        seen.add(drawn[0])
        rows.append({**drawn[2](), "key": drawn[0], "family": drawn[1]})
        if len(rows) == count:
            return rows
    raise UserError(f"could only generate {len(rows)} distinct {split} problems of the {count} asked "
                    f"(task.generated_{split}) in {tries} tries: {remedy}")

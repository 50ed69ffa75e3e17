"""95% intervals for accuracies and gains, by the bootstrap over seeds and problems.

1. Data: for each seed (a whole run: its problems, samples and training drawn from that seed), a list of 0/1
   outcomes, one per held-out problem; a gain pairs each problem's outcome after training with its outcome before,
   in the same seed.
2. One draw resamples the seeds with replacement, then within each drawn seed its problems with replacement, and
   takes the mean over everything drawn: the spread covers both which problems were asked and which seed ran.
   With one seed, it is the usual bootstrap over problems.
3. The interval is the 2.5th and 97.5th percentiles of `DRAWS` such means (a fixed generator: the same data give
   the same interval).
"""

from __future__ import annotations

import numpy as np

DRAWS = 2000


def mean_interval(outcomes: list[list[float]], draws: int = DRAWS, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of per-problem `outcomes` given per seed (see the module docstring). ValueError if there
    is no outcome."""
    per_seed = [np.asarray(o, dtype=float) for o in outcomes if len(o)]
    if not per_seed:
        raise ValueError("no outcomes to average")
    mean = float(np.concatenate(per_seed).mean())
    rng = np.random.default_rng(seed)
    means = np.empty(draws)
    for d in range(draws):
        picked = [per_seed[i] for i in rng.integers(len(per_seed), size=len(per_seed))]
        means[d] = np.concatenate([o[rng.integers(len(o), size=len(o))] for o in picked]).mean()
    low, high = np.percentile(means, [2.5, 97.5])
    return mean, float(low), float(high)


def gain_interval(before: list[list[float]], after: list[list[float]], draws: int = DRAWS,
                  seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of after - before, paired by seed and problem (the same problems drawn for both)."""
    if [len(b) for b in before] != [len(a) for a in after]:
        raise ValueError("a gain needs the same problems before and after, seed by seed")
    return mean_interval([np.asarray(a, dtype=float) - np.asarray(b, dtype=float) for b, a in zip(before, after)],
                         draws, seed)

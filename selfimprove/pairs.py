"""Training rows from verified samples: pure functions, no model.

Outcome pairs, as Iterative Reasoning Preference Optimization builds them:
1. Winners are a problem's correct samples (plus, optionally, its gold chain of thought);
   losers are its incorrect ones. Skipped samples (prompt too long) are neither.
2. A problem with no winner or no loser gives no pair; such problems are counted by reason.
3. Up to K pairs per problem: pair k is (winner k mod W, loser k mod L) in sample order, so
   pairs spread over different winners and losers while there are enough of them.
4. A pair whose chosen and rejected texts are equal, or that repeats an earlier pair, is skipped.

SFT rows, as STaR / rejection-sampling fine-tuning builds them: up to K distinct correct
samples per problem, each a (prompt, response) row; a problem needs no loser.

Process pairs, as Self-Iterative Process Feedback builds them from step values (reward/mc_prm.py):
1. A sample's path score is the mean (or min) of its step values; steps with no value (too
   long to score) are left out, and a sample with no valued step has no score (counted).
2. Any two scored samples of a problem pair, the higher score chosen, when their gap is at
   least eta and above 0 (equal scores never pair).
3. Up to K pairs per problem, largest gap first (ties: chosen, then rejected, in sample order),
   first taking pairs of samples not yet in a pair, then the rest: pairs spread over samples.
4. The pair set grows across iterations: D_k+1 = D_k ∪ new, without repeats of
   (prompt, chosen, rejected).
"""

from __future__ import annotations

from collections import defaultdict

# Scores are means of fractions: 0.3 - 0.1 is 0.19999999999999998, and must count as a gap of 0.2.
GAP_TOLERANCE = 1e-9


def outcome_pairs(samples: list[dict], pairs_per_problem: int, gold: dict[str, str] | None = None
                  ) -> tuple[list[dict], dict[str, int]]:
    """(pairs, stats) from sample rows with problem_id, sample_index, prompt_text, text, status, correct.

    `gold` maps a problem id to its gold solution text, added as the first winner.
    """
    by_problem = _usable_by_problem(samples)
    pairs, stats = [], {"problems": len(by_problem), "no_winner": 0, "no_loser": 0, "pairs": 0}
    for pid, rows in by_problem.items():
        winners = [s["text"] for s in rows if s["correct"]]
        if gold and gold.get(pid):
            winners.insert(0, gold[pid])
        losers = [s["text"] for s in rows if not s["correct"]]
        if not winners:
            stats["no_winner"] += 1
            continue
        if not losers:
            stats["no_loser"] += 1
            continue
        seen = set()
        for k in range(pairs_per_problem):
            chosen, rejected = winners[k % len(winners)], losers[k % len(losers)]
            if chosen == rejected or (chosen, rejected) in seen:
                continue
            seen.add((chosen, rejected))
            pairs.append({"problem_id": pid, "prompt": rows[0]["prompt_text"], "chosen": chosen, "rejected": rejected})
    stats["pairs"] = len(pairs)
    return pairs, stats


def winner_rows(samples: list[dict], rows_per_problem: int, gold: dict[str, str] | None = None
                ) -> tuple[list[dict], dict[str, int]]:
    """(SFT rows, stats): the first `rows_per_problem` distinct correct texts of each problem.

    Same sample rows and `gold` as `outcome_pairs`; stats count problems, those with no correct
    sample, and rows.
    """
    by_problem = _usable_by_problem(samples)
    out, stats = [], {"problems": len(by_problem), "no_winner": 0, "rows": 0}
    for pid, rows in by_problem.items():
        winners = ([gold[pid]] if gold and gold.get(pid) else []) + [s["text"] for s in rows if s["correct"]]
        if not winners:
            stats["no_winner"] += 1
            continue
        for text in list(dict.fromkeys(winners))[:rows_per_problem]:
            out.append({"problem_id": pid, "prompt": rows[0]["prompt_text"], "response": text})
    stats["rows"] = len(out)
    return out, stats


def path_score(values: list[float | None], how: str = "mean") -> float | None:
    """The mean or min of the step values that exist; None if none does."""
    known = [v for v in values if v is not None]
    if not known:
        return None
    return min(known) if how == "min" else sum(known) / len(known)


def sample_scores(steps: list[dict], how: str = "mean") -> dict[tuple[str, int], float | None]:
    """Path score of each sample of step rows (problem_id, sample_index, value), keyed by (problem_id, sample_index)."""
    values: dict[tuple[str, int], list[float | None]] = defaultdict(list)
    for row in steps:
        values[row["problem_id"], row["sample_index"]].append(row["value"])
    return {key: path_score(vs, how) for key, vs in values.items()}


def process_pairs(samples: list[dict], scores: dict[tuple[str, int], float | None], pairs_per_problem: int,
                  eta: float) -> tuple[list[dict], dict[str, int]]:
    """(pairs, stats) from sample rows (problem_id, sample_index, prompt_text, text, status) and their path scores.

    Stats count problems, samples with no score, problems where no two samples are eta apart, and pairs.
    """
    by_problem = _usable_by_problem(samples)
    pairs, stats = [], {"problems": len(by_problem), "unscored": 0, "no_gap": 0, "pairs": 0}
    for pid, rows in by_problem.items():
        scored = [(s, scores[pid, s["sample_index"]]) for s in rows if scores.get((pid, s["sample_index"])) is not None]
        stats["unscored"] += len(rows) - len(scored)
        candidates = sorted(
            ((hi - lo, i, j) for i, (_, hi) in enumerate(scored) for j, (_, lo) in enumerate(scored)
             if hi - lo > 0 and hi - lo >= eta - GAP_TOLERANCE),
            key=lambda c: (-c[0], c[1], c[2]))
        if not candidates:
            stats["no_gap"] += 1
            continue
        chosen_pairs: list[tuple[int, int]] = []
        seen, used = set(), set()
        for fresh_only in (True, False):
            for _, i, j in candidates:
                texts = (scored[i][0]["text"], scored[j][0]["text"])
                if len(chosen_pairs) == pairs_per_problem or texts[0] == texts[1] or texts in seen:
                    continue
                if fresh_only and (i in used or j in used):
                    continue
                seen.add(texts)
                used.update((i, j))
                chosen_pairs.append((i, j))
        for i, j in chosen_pairs:
            (win, win_score), (lose, lose_score) = scored[i], scored[j]
            pairs.append({"problem_id": pid, "prompt": rows[0]["prompt_text"], "chosen": win["text"],
                          "rejected": lose["text"], "chosen_score": win_score, "rejected_score": lose_score})
    stats["pairs"] = len(pairs)
    return pairs, stats


def accumulate_pairs(previous: list[dict], new: list[dict]) -> list[dict]:
    """D_k+1 = D_k ∪ new: the previous pairs, then each new pair whose (prompt, chosen, rejected) is not there yet."""
    out, seen = [], set()
    for row in [*previous, *new]:
        key = (row["prompt"], row["chosen"], row["rejected"])
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def _usable_by_problem(samples: list[dict]) -> dict[str, list[dict]]:
    """Each problem's samples that were generated (not skipped), in sample order."""
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        if s["status"] == "ok":
            by_problem[s["problem_id"]].append(s)
    for rows in by_problem.values():
        rows.sort(key=lambda s: s["sample_index"])
    return by_problem

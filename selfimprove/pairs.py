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
"""

from __future__ import annotations

from collections import defaultdict


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


def _usable_by_problem(samples: list[dict]) -> dict[str, list[dict]]:
    """Each problem's samples that were generated (not skipped), in sample order."""
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        if s["status"] == "ok":
            by_problem[s["problem_id"]].append(s)
    for rows in by_problem.values():
        rows.sort(key=lambda s: s["sample_index"])
    return by_problem

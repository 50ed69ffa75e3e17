"""Process pairs: path scores from step values, the eta gap, K per problem, accumulation across iterations."""

import pytest

from selfimprove.pairs import accumulate_pairs, path_score, process_pairs, sample_scores


def s(pid, i, text, status="ok"):
    return {"problem_id": pid, "sample_index": i, "prompt_text": f"P-{pid}", "text": text, "status": status}


def test_path_score_mean_and_min_leave_out_unvalued_steps():
    """[0.5, 1, 0]: mean 1.5/3 = 0.5, min 0. [None, 0.25, 0.75]: the too-long step is left out, mean 0.5, min 0.25."""
    assert path_score([0.5, 1.0, 0.0], "mean") == 0.5 and path_score([0.5, 1.0, 0.0], "min") == 0.0
    assert path_score([None, 0.25, 0.75], "mean") == 0.5 and path_score([None, 0.25, 0.75], "min") == 0.25
    assert path_score([None], "mean") is None and path_score([], "min") is None


def test_sample_scores_group_step_rows_by_sample():
    """p/0: mean of 1, 0.5, 0 = 0.5; p/1: 0.75 alone; q/0: no valued step."""
    steps = [{"problem_id": "p", "sample_index": 0, "value": v} for v in (1.0, 0.5, 0.0)] + [
        {"problem_id": "p", "sample_index": 1, "value": 0.75}, {"problem_id": "q", "sample_index": 0, "value": None}]
    assert sample_scores(steps, "mean") == {("p", 0): 0.5, ("p", 1): 0.75, ("q", 0): None}
    assert sample_scores(steps, "min") == {("p", 0): 0.0, ("p", 1): 0.75, ("q", 0): None}


SAMPLES = [
    s("p1", 0, "a"), s("p1", 1, "b"), s("p1", 2, "c"), s("p1", 3, "d"), s("p1", 4, "e"), s("p1", 5, "", "skipped=too_long"),
    s("p2", 0, "f"), s("p2", 1, "g"),      # equal scores
    s("p3", 0, "h"), s("p3", 1, "i"),      # gap 0.25 < eta
]
SCORES = {("p1", 0): 1.0, ("p1", 1): 0.75, ("p1", 2): 0.5, ("p1", 3): 0.0, ("p1", 4): None,
          ("p2", 0): 0.5, ("p2", 1): 0.5, ("p3", 0): 0.75, ("p3", 1): 0.5}


def test_pairs_respect_eta_and_spread_over_samples():
    """p1 with eta 0.3: gaps a-d 1.0, b-d 0.75, a-c 0.5, c-d 0.5 qualify (a-b, b-c are 0.25; e has no score).
    Largest first, fresh samples first: a-d; b-d, a-c, c-d each reuse a or d, so they follow in gap order
    up to K = 3: b-d, a-c. p2 (equal) and p3 (0.25) have no pair."""
    pairs, stats = process_pairs(SAMPLES, SCORES, pairs_per_problem=3, eta=0.3)
    assert [(p["chosen"], p["rejected"], p["chosen_score"], p["rejected_score"]) for p in pairs] == [
        ("a", "d", 1.0, 0.0), ("b", "d", 0.75, 0.0), ("a", "c", 1.0, 0.5)]
    assert all(p["problem_id"] == "p1" and p["prompt"] == "P-p1" for p in pairs)
    assert stats == {"problems": 3, "unscored": 1, "no_gap": 2, "pairs": 3}
    assert all(p["chosen_score"] - p["rejected_score"] >= 0.3 for p in pairs)


def test_fresh_samples_are_paired_before_reused_ones():
    """Scores a=b=1, x=y=0, all four gaps 1: a-x takes a and x, so b-y comes next, not a-y."""
    samples = [s("p", 0, "a"), s("p", 1, "b"), s("p", 2, "x"), s("p", 3, "y")]
    scores = {("p", 0): 1.0, ("p", 1): 1.0, ("p", 2): 0.0, ("p", 3): 0.0}
    pairs, _ = process_pairs(samples, scores, pairs_per_problem=2, eta=0.5)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a", "x"), ("b", "y")]
    pairs, _ = process_pairs(samples, scores, pairs_per_problem=4, eta=0.5)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a", "x"), ("b", "y"), ("a", "y"), ("b", "x")]


def test_gap_equal_to_eta_counts_despite_float_rounding():
    """0.3 - 0.1 is 0.19999999999999998 in floats: still a gap of 0.2."""
    samples = [s("p", 0, "hi"), s("p", 1, "lo")]
    pairs, _ = process_pairs(samples, {("p", 0): 0.3, ("p", 1): 0.1}, pairs_per_problem=1, eta=0.2)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("hi", "lo")]
    pairs, stats = process_pairs(samples, {("p", 0): 0.3, ("p", 1): 0.1}, pairs_per_problem=1, eta=0.21)
    assert pairs == [] and stats["no_gap"] == 1


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_equal_scores_and_identical_texts_never_pair(eta):
    samples = [s("p", 0, "same"), s("p", 1, "same"), s("p", 2, "other")]
    scores = {("p", 0): 1.0, ("p", 1): 0.0, ("p", 2): 1.0}
    pairs, _ = process_pairs(samples, scores, pairs_per_problem=5, eta=eta)
    # same(1)-same(0) has equal texts; other(1)-same(0) is the one pair; the two 1.0 samples tie.
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("other", "same")]


def test_accumulation_keeps_old_pairs_first_and_drops_repeats():
    """D1 = {A, B}; the new set repeats B (other scores, same texts) and C twice: D2 = A, B, C. D2 ∪ {A, D} = A, B, C, D."""
    def pair(prompt, chosen, rejected, score=1.0):
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_score": score}

    a, b, c, d = pair("P1", "w", "l"), pair("P1", "w2", "l"), pair("P2", "w", "l"), pair("P1", "l", "w")
    d2 = accumulate_pairs([a, b], [pair("P1", "w2", "l", 0.5), c, c])
    assert d2 == [a, b, c]
    assert accumulate_pairs(d2, [a, d]) == [a, b, c, d]
    assert accumulate_pairs([], [a, a]) == [a]

"""Outcome pairs: winners against losers, K per problem by cycling, problems without either counted."""

from selfimprove.pairs import outcome_pairs, winner_rows


def s(pid, i, text, correct, status="ok"):
    return {"problem_id": pid, "sample_index": i, "prompt_text": f"P-{pid}", "text": text, "status": status,
            "correct": correct}


SAMPLES = [
    # p1: winners a, b; losers x, y, z (given out of order: pairs follow sample_index)
    s("p1", 4, "z", False), s("p1", 0, "a", True), s("p1", 1, "x", False), s("p1", 2, "b", True), s("p1", 3, "y", False),
    s("p2", 0, "c", True), s("p2", 1, "d", True),                # no loser
    s("p3", 0, "e", False), s("p3", 1, "", False, "skipped=too_long"),  # no winner
    s("p4", 0, "w", True), s("p4", 1, "l", False),               # one of each
]


def test_cycles_through_winners_and_losers():
    """p1 with K=4: (a,x) (b,y) (a,z) then k=3 gives (b,x); p4 gives (w,l) once: its repeats are skipped."""
    pairs, stats = outcome_pairs(SAMPLES, pairs_per_problem=4)
    assert [(p["problem_id"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("p1", "a", "x"), ("p1", "b", "y"), ("p1", "a", "z"), ("p1", "b", "x"), ("p4", "w", "l")]
    assert pairs[0]["prompt"] == "P-p1"
    assert stats == {"problems": 4, "no_winner": 1, "no_loser": 1, "pairs": 5}


def test_k_limits_pairs_per_problem():
    pairs, stats = outcome_pairs(SAMPLES, pairs_per_problem=1)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a", "x"), ("w", "l")]
    assert stats["pairs"] == 2


def test_gold_solution_is_the_first_winner_and_rescues_problems_without_one():
    pairs, stats = outcome_pairs(SAMPLES, pairs_per_problem=2, gold={"p3": "gold3", "p1": "gold1"})
    assert [(p["problem_id"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("p1", "gold1", "x"), ("p1", "a", "y"), ("p3", "gold3", "e"), ("p4", "w", "l")]
    assert stats == {"problems": 4, "no_winner": 0, "no_loser": 1, "pairs": 4}


def test_identical_texts_never_pair():
    pairs, _ = outcome_pairs([s("p", 0, "same", True), s("p", 1, "same", False)], pairs_per_problem=3)
    assert pairs == []


def test_winner_rows_take_distinct_correct_samples_and_need_no_loser():
    """K=2: p1 gives a, b; p2 (no loser) gives c, d; p3 has no winner; p4 gives w."""
    rows, stats = winner_rows(SAMPLES, rows_per_problem=2)
    assert [(r["problem_id"], r["prompt"], r["response"]) for r in rows] == [
        ("p1", "P-p1", "a"), ("p1", "P-p1", "b"), ("p2", "P-p2", "c"), ("p2", "P-p2", "d"), ("p4", "P-p4", "w")]
    assert stats == {"problems": 4, "no_winner": 1, "rows": 5}


def test_winner_rows_put_gold_first_and_drop_repeated_texts():
    samples = [s("p", 0, "same", True), s("p", 1, "same", True), s("p", 2, "other", True), s("q", 0, "x", False)]
    rows, stats = winner_rows(samples, rows_per_problem=3, gold={"p": "gold", "q": "gq"})
    assert [(r["problem_id"], r["response"]) for r in rows] == [("p", "gold"), ("p", "same"), ("p", "other"), ("q", "gq")]
    assert stats == {"problems": 2, "no_winner": 0, "rows": 4}

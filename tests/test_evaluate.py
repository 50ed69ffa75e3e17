"""pass@1, maj@k and pass@k from verified samples, worked out by hand."""

import pytest

from selfimprove.evaluate import aggregate, majority, problem_results


@pytest.mark.parametrize("keys, expected", [
    (["3", "4", "4", "3"], 0),      # 2-2 tie: the answer seen first wins
    ([None, "4", "5", "5"], 2),     # samples without an answer do not vote
    ([None, None], None),
    (["7"], 0),
])
def test_majority(keys, expected):
    assert majority(keys) == expected


def sample(pid, pass_, index, extracted, correct, answer="5"):
    return {"problem_id": pid, "pass": pass_, "sample_index": index, "extracted": extracted,
            "correct": correct, "answer": answer}


def test_problem_results_and_aggregate():
    """p1: greedy right; samples 5, 6, 6 -> majority 6 wrong, pass@3 right.
    p2: greedy wrong; samples 5, 5, None -> majority 5 right.
    pass@1 = 1/2, maj@3 = 1/2, pass@3 = 2/2."""
    rows = problem_results([
        sample("p1", "greedy", 0, "5", True),
        sample("p1", "sample", 2, "6", False), sample("p1", "sample", 0, "5", True), sample("p1", "sample", 1, "6", False),
        sample("p2", "greedy", 0, None, False),
        sample("p2", "sample", 0, "5", True), sample("p2", "sample", 1, "5", True), sample("p2", "sample", 2, None, False),
    ])
    assert rows == [
        {"id": "p1", "gold": "5", "greedy_answer": "5", "greedy_correct": True,
         "majority_answer": "6", "majority_correct": False, "any_correct": True},
        {"id": "p2", "gold": "5", "greedy_answer": None, "greedy_correct": False,
         "majority_answer": "5", "majority_correct": True, "any_correct": True},
    ]
    assert aggregate(rows, 3) == {"problems": 2, "pass@1": 0.5, "maj@3": 0.5, "pass@3": 1.0}


def test_greedy_only():
    rows = problem_results([sample("p1", "greedy", 0, "5", True), sample("p2", "greedy", 0, "4", False),
                            sample("p3", "greedy", 0, "5", True)])
    assert aggregate(rows, 1) == {"problems": 3, "pass@1": 2 / 3}

"""Labels and demonstrations from a teacher's samples, for Self-Refine Instruction-Tuning: pure functions.

1. A question with a gold answer is labelled by it; the teacher's samples that reach it are its demonstrations.
2. A question without one (from a question-only task file) is labelled by the teacher's majority answer: the
   paper's "ground truths from the LLMs". Samples stating no answer do not vote and ties go to the answer seen
   first (`evaluate.majority`); the samples stating the winner are its demonstrations. A question no sample
   answers gets no label: it is counted and left out.
3. Up to K distinct demonstrations per question become the student's instruction-tuning rows.
4. A labelled question without a gold chain of thought takes its first demonstration as one, so that
   `pairs.include_gold` has a winner to add in the self-refine rounds.
"""

from __future__ import annotations

from collections import defaultdict

from selfimprove.evaluate import majority


def teacher_labels(problems: list[dict], samples: list[dict], rows_per_problem: int
                   ) -> tuple[list[dict], list[dict], dict]:
    """(labelled problems, demonstration rows, stats) from problem rows and the teacher's sample rows (problem_id,
    sample_index, text, status, extracted, correct).

    A labelled problem is its row with `answer` set to the label; a demonstration row is (problem_id, response).
    """
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: s["sample_index"]):
        if s["status"] == "ok":
            by_problem[s["problem_id"]].append(s)
    labelled, demonstrations = [], []
    stats = {"problems": len(problems), "gold_labels": 0, "majority_labels": 0, "no_answer": 0, "no_correct": 0}
    for p in problems:
        mine = by_problem.get(p["id"], [])
        if p["answer"]:
            label, kept = p["answer"], [s for s in mine if s["correct"]]
            stats["gold_labels"] += 1
            stats["no_correct"] += not kept
        else:
            winner = majority([s["extracted"] for s in mine])
            if winner is None:
                stats["no_answer"] += 1
                continue
            label = mine[winner]["extracted"]
            kept = [s for s in mine if s["extracted"] == label]
            stats["majority_labels"] += 1
        labelled.append(dict(p, answer=label, solution=p.get("solution") or (kept[0]["text"] if kept else "")))
        demonstrations += [{"problem_id": p["id"], "response": text}
                           for text in list(dict.fromkeys(s["text"] for s in kept))[:rows_per_problem]]
    graded = [s for p in problems if p["answer"] for s in by_problem.get(p["id"], [])]
    if graded:  # how often the teacher is right where the task knows the answer
        stats["demonstration_accuracy"] = round(sum(s["correct"] for s in graded) / len(graded), 4)
    stats["rows"] = len(demonstrations)
    return labelled, demonstrations, stats

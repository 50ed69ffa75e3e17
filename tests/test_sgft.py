"""Solution-Guidance Fine-Tuning: the number-free rule, guidance values and pairs, guidance data's bookkeeping, the
solver's requests, the plan and its checks without engines; then the guide -> solver pipeline on real engines."""

import json
from pathlib import Path

import numpy as np
import pytest

from selfimprove.errors import UserError
from selfimprove.guidance import computed_numbers, guidance_values, kept_guidance, solver_prompt
from selfimprove.pairs import process_pairs
from selfimprove.recipes import load_config, recipe
from selfimprove.recipes.guided_stages import guidance_data
from selfimprove.recipes.stages import Model, Run
from selfimprove.rollout.guided import solver_requests
from selfimprove.rollout.stage import request_seed
from selfimprove.tasks import build_task
from tests.test_recipes import GENERATE, TRAIN

SGFT = ["recipe=sgft", "models.solver=/solver"]
QUESTION = ("Ann has 12 pens. She buys 5 more pens. Then she gives twice that many to Tom. "
            "How many pens does she have now?")


@pytest.mark.parametrize("guidance, computed", [
    ("1. Start from the pens Ann has.\n2. Add the pens she buys.\n3. Subtract what she gives.", []),
    ("1. Start from Ann's 12 pens.\n2. Add the 5 she buys.", []),  # quoted from the question
    ("Step 1: Add 5 to 12.\nStep 2: Subtract the pens she gives.", []),  # step labels are not numbers
    ("1) Add 5.\n2) Subtract twice the 5.", []),
    ("First add 5 to 12, as in step 1 of any count.", []),
    ("1. Add the 5 pens: 12 + 5 = 17.", ["17"]),  # a result
    ("2. She now has 17 pens.", ["17"]),
    ("The answer is 7.", ["7"]),
    ("Subtract 10, which is twice 5.", ["10"]),
    ("Double the 5 she buys: that is 2 times 5.", []),  # the question's "twice" states a 2
    ("She ends with seven pens.", ["7"]),  # a number word is a number
    ("Multiply by one hundred.", ["100"]),
    ("Twelve pens at first, and five more.", []),  # words for the question's numbers
    ("Add 5.0 to the 12.", []),  # the same value written otherwise
    ("Take 1,200 away.", ["1200"]),
    ("1. Add 0.5 of them.", ["0.5"]),
    ("Add 5 and 12, then take 34 and 17 away.", ["17", "34"]),  # in increasing order
])
def test_a_guidance_may_quote_the_questions_numbers_but_not_compute_one(guidance, computed):
    assert computed_numbers(guidance, QUESTION) == computed


def test_the_arithmetic_generator_writes_number_free_guidance_from_its_solution():
    task = build_task(load_config(None, ["task.operations=+-*"]).task)
    row = {"question": "Sam has 14 apples. He sells 4 apples. Then Zoe gives him enough apples to make his pile 2 "
                       "times as big. How many apples does Sam have now?",
           "solution": "Sam starts with 14 apples. He sells 4, so 14 - 4 = 10. His pile becomes 2 times as big, so "
                       "10 * 2 = 20. The answer is 20.", "answer": "20"}
    assert task.guidance(row) == ("1. Sam starts with 14 apples: that is the count to begin with.\n"
                                  "2. He sells 4: subtract 4.\n"
                                  "3. His pile becomes 2 times as big: multiply the count by 2.\n"
                                  "4. The count after the last change is the answer.")
    assert task.guidance({**row, "solution": "The answer is 20."}) is None
    generated = task.load("train")[:50]
    assert all(task.guidance(p) and not computed_numbers(task.guidance(p), p["question"]) for p in generated)


def solver_sample(pid, gi, si, correct, status="ok", guidance=None, guide_status="ok"):
    return {"problem_id": pid, "guidance_index": gi, "sample_index": si, "correct": correct, "status": status,
            "guide_status": guide_status, "guidance": guidance or f"{pid} guidance {gi}",
            "guide_prompt_text": f"<{pid}>"}


def test_guidance_pairs_come_from_the_solvers_success_rates():
    """p1: guidance 0 is right 3 of 4 times (0.75), 1 once (0.25), 2 carries a computed number (worth 0, never
    drawn), 3 was too long for the solver (no value). With min_gap 0.5 and 2 pairs: (0 over 2, gap 0.75) first,
    then (0 over 1, gap 0.5) -- 1 over 2 (0.25) is under the gap. p2: 0.5 and 0.5: no pair."""
    samples = [solver_sample("p1", 0, i, c) for i, c in enumerate([True, True, False, True])]
    samples += [solver_sample("p1", 1, i, c) for i, c in enumerate([False, False, True, False])]
    samples += [solver_sample("p1", 2, i, False, "skipped=computed_number") for i in range(4)]
    samples += [solver_sample("p1", 3, i, False, "skipped=too_long") for i in range(4)]
    samples += [solver_sample("p2", g, i, c) for g in (0, 1) for i, c in enumerate([True, False, True, False])]
    samples += [solver_sample("p2", 2, i, False, "skipped=too_long", "", "skipped=too_long") for i in range(4)]
    rows, values = guidance_values(samples)
    assert values == {("p1", 0): 0.75, ("p1", 1): 0.25, ("p1", 2): 0.0, ("p1", 3): None, ("p2", 0): 0.5,
                      ("p2", 1): 0.5}
    assert [r["text"] for r in rows if r["problem_id"] == "p1"] == [f"p1 guidance {i}" for i in range(4)]
    pairs, stats = process_pairs(rows, values, 2, 0.5)
    assert [(p["chosen"], p["rejected"], p["chosen_score"], p["rejected_score"]) for p in pairs] == [
        ("p1 guidance 0", "p1 guidance 2", 0.75, 0.0), ("p1 guidance 0", "p1 guidance 1", 0.75, 0.25)]
    assert pairs[0]["prompt"] == "<p1>"
    assert stats == {"problems": 2, "unscored": 1, "no_gap": 1, "pairs": 2}


def test_guidance_data_keeps_number_free_guidance_the_solver_follows_and_counts_the_rest():
    samples = [solver_sample("p1", 0, 0, True, guidance="add"), solver_sample("p1", 1, 0, True, guidance="add"),
               solver_sample("p1", 2, 0, True, guidance="add, then subtract"),
               solver_sample("p1", 3, 0, True, guidance="a third"),  # past rows_per_problem
               solver_sample("p2", 0, 0, False), solver_sample("p2", 1, 0, False, "skipped=computed_number"),
               solver_sample("p2", 2, 0, False, "skipped=empty", guidance=" "),
               solver_sample("p3", 0, 0, False, "skipped=too_long")]
    rows, stats = kept_guidance(samples, rows_per_problem=2)
    assert rows == [{"problem_id": "p1", "prompt": "<p1>", "response": "add"},
                    {"problem_id": "p1", "prompt": "<p1>", "response": "add, then subtract"}]
    assert stats == {"guidances": 8, "rows": 2, "empty": 1, "computed_number": 1, "too_long": 1, "solver_wrong": 1,
                     "repeated": 2, "questions": 3, "questions_with_guidance": 1}


def test_each_guidance_becomes_one_solver_request_per_pass_and_a_bad_one_is_not_given():
    task = build_task(load_config(None).task)
    problem = {"id": "p", "question": QUESTION, "answer": "7", "solution": ""}
    batch = {"problem_id": np.array(["p"] * 3), "question": np.array([QUESTION] * 3), "answer": np.array(["7"] * 3),
             "problem": np.array([json.dumps(problem)] * 3), "sample_index": np.array([0, 1, 2]),
             "text": np.array(["Add the 5.", "12 + 5 = 17.", ""], dtype=object),
             "prompt_text": np.array(["<g>"] * 3), "status": np.array(["ok", "ok", "skipped=too_long"]),
             "completion_tokens": np.array([4, 6, 0])}
    out = solver_requests(batch, task, {"greedy": (1, 0.0), "sample": (3, 0.8)}, seed=7, number_free=True)
    assert list(zip(out["pass"], out["guidance_index"], out["n"], out["skip"])) == [
        ("greedy", 0, 1, ""), ("sample", 0, 3, ""), ("greedy", 1, 1, "skipped=computed_number"),
        ("sample", 1, 3, "skipped=computed_number"), ("greedy", 2, 1, "skipped=too_long"),
        ("sample", 2, 3, "skipped=too_long")]
    assert out["seed"][1] == request_seed(7, "sample", "p", 0) != out["seed"][3]
    assert json.loads(out["prompt"][0]) == solver_prompt(task, problem, "Add the 5.")
    assert solver_prompt(task, problem, "1. Add the 5.\nStep 2: Take away twice that.\n") == [
        *task.prompt(problem)[:-1], {"role": "user", "content": f"Hint: Add the 5. Take away twice that.\nQuestion: {QUESTION}"}]
    assert out["guide_tokens"][:3:2] == [4, 6] and out["guide_prompt_text"][0] == "<g>"
    kept = solver_requests(batch, task, {"greedy": (1, 0.0)}, seed=7, number_free=False)
    assert kept["skip"] == ["", "", "skipped=too_long"]  # evaluation gives the solver what the guide wrote


def plan(*overrides, teacher=None, task=None, problems=()):
    cfg = load_config(None, list(overrides))
    run = Run(cfg, Path("/r"), task, list(problems), [], Model("/guide", "/guide"), GENERATE, TRAIN,
              teacher=teacher, solver=Model("/solver", "/solver"))
    return recipe("sgft").plan(run)


def test_the_plan_evaluates_the_solver_alone_and_guided_tunes_the_guide_then_improves_it_from_the_solver():
    task = build_task(load_config(None).task)
    problems = task.load("train")[:3]
    stages = plan(*SGFT, "iterations=1", "guide.cot_baseline=true", task=task, problems=problems)
    assert [(s.iteration, s.kind) for s in stages] == [
        (0, "solver_eval"), (0, "eval"), (1, "guidance"), (1, "train"), (1, "eval"), (1, "cot_train"),
        (1, "cot_eval"), (2, "rollout"), (2, "pairs"), (2, "train"), (2, "eval")]
    reads = {(s.iteration, s.kind): s.reads for s in stages}
    assert reads[(0, "solver_eval")]["guide"] is None and reads[(0, "eval")]["guide"] == "/guide"
    assert reads[(1, "guidance")]["structure"] == [(p["id"], task.guidance(p)) for p in problems]
    assert reads[(1, "train")]["loss"] == "sft" and reads[(1, "eval")]["guide"] == Path("/r/iter_1/train")
    assert (reads[(1, "cot_train")]["model"], reads[(1, "cot_train")]["subfolder"]) == ("/solver", "cot")
    assert reads[(2, "rollout")]["guide"] == Path("/r/iter_1/train")
    assert reads[(2, "train")]["model"] == Path("/r/iter_1/train") and reads[(2, "train")]["loss"] is None
    assert reads[(2, "eval")]["model"] == "/solver" and reads[(2, "eval")]["guide"] == Path("/r/iter_2/train")


def test_guidance_rows_come_from_a_file_when_given_and_a_task_without_structure_needs_one(tmp_path):
    task = build_task(load_config(None).task)
    problems = task.load("train")[:2]
    path = tmp_path / "guidance.jsonl"
    path.write_text(json.dumps({"question": problems[1]["question"], "guidance": "Add them."}) + "\n"
                    + json.dumps({"question": "elsewhere", "guidance": "Add them."}) + "\n")
    stage = plan(*SGFT, f"teacher.data={path}", task=task, problems=problems)[2]
    assert stage.reads["data"] == [(problems[1]["id"], "Add them.")]
    path.write_text(json.dumps({"question": problems[0]["question"], "guidance": " "}) + "\n")
    with pytest.raises(UserError) as e:
        plan(*SGFT, f"teacher.data={path}", task=task, problems=problems)
    assert str(e.value) == (f"{path}: no usable guidance among its 1 rows (1 no guidance); each row needs a `question` "
                            "that is one of the training problems' and a `guidance`")
    gsm8k = build_task(load_config(None, ["task.name=gsm8k"]).task)
    cfg = load_config(None, SGFT)
    run = Run(cfg, Path("/r"), gsm8k, [{"id": "g", "question": "q", "answer": "1", "solution": ""}], [],
              Model("/guide", "/guide"), GENERATE, TRAIN, solver=Model("/solver", "/solver"))
    with pytest.raises(UserError, match="^task gsm8k cannot write guidance from its problems' structure: give "
                                        r"recipe sgft a teacher \(models.teacher\) or guidance rows"):
        guidance_data(run, 1)


@pytest.mark.parametrize("overrides, message", [
    (["recipe=sgft"], "recipe sgft needs a solver: set models.solver"),
    ([*SGFT, "models.teacher=/t", "teacher.data=/g.jsonl"], "recipe sgft takes its guidance data from models.teacher "
                                                           "or from teacher.data: give one of them"),
    ([*SGFT, "train.loss=sft"], "recipe sgft's rounds train guidance pairs: it needs a preference train.loss, got sft"),
    ([*SGFT, "guide.max_tokens=700", "rollout.max_tokens=400"],
     "guide.max_tokens=700 of guidance and rollout.max_tokens=400 of answer leave no room for the question in the "
     "solver's rollout.max_model_len=1024"),
    (["models.solver=/s"], "recipe irpo has no solver: models.solver is read by recipe sgft"),
    (["models.guide=/g"], "models.guide is the guide of recipe sgft; set recipe: sgft"),
    (["recipe=star", "models.guide=/g"], "models.guide is the guide of recipe sgft; recipe star has none"),
    ([*SGFT, "model=a", "models.guide=b"], "'model' ('a') and 'models.guide' ('b') name two policies"),
    ([*SGFT, "guide.min_gap=0"], "'guide.min_gap' must be in (0, 1], got 0"),
])
def test_bad_sgft_settings_fail_at_load(overrides, message):
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_models_guide_is_the_model_sgft_trains():
    cfg = load_config(None, [*SGFT, "models.guide=/g"])
    assert (cfg.model, cfg.models.guide, cfg.models.solver) == ("/g", None, "/solver")

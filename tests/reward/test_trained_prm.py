"""The trained PRM: label positions and targets worked out by hand, the loss, scoring bookkeeping with a
scripted predictor, the tokenizer check, and one real run (Ray Train on CPU, then scoring with the saved PRM).

The scripted predictor says, for each asked position p, p / 100: values show which token was read.
"""

import json

import pyarrow.parquet as pq
import pytest
import torch

from selfimprove.config import ProcessConfig
from selfimprove.errors import UserError
from selfimprove.models import check_tokenizer
from selfimprove.reward.mc_prm import STEP_SCHEMA
from selfimprove.reward.trained_prm import (
    Encoder,
    PRMExample,
    collate,
    masked_bce,
    score_samples,
    step_positions,
    token_at,
    training_examples,
)
from selfimprove.rollout.generator import SKIPPED


def chars(prompt_text, text):
    """An encoder of one token per character: a step ending at character e is read at len(prompt) + e - 1."""
    return [ord(c) for c in prompt_text], [ord(c) for c in text], [(i, i + 1) for i in range(len(text))]


def sample(pid, i, text, correct, status="ok", prompt="Q:"):
    return {"problem_id": pid, "sample_index": i, "prompt_text": prompt, "text": text, "answer": "8",
            "status": status, "correct": correct}


def test_token_at_is_the_token_holding_the_last_character():
    """Tokens "ab" [0,2), " cd" [2,5), "\\n" [5,6), "ef" [6,8). A step "ab cd" ends at 5: its last character
    (4, 'd') is in " cd", token 1. "ef" ends at 8: token 3. A step ending inside a token ("a", end 1) is read
    at that token, 0. After a 10-token prompt: positions 11 and 13; with max_len 13 the second is past it."""
    offsets = [(0, 2), (2, 5), (5, 6), (6, 8)]
    assert [token_at(offsets, e) for e in (5, 8, 1)] == [1, 3, 0]
    assert step_positions(10, offsets, [5, 8], max_len=14) == [11, 13]
    assert step_positions(10, offsets, [5, 8], max_len=13) == [11, None]


def test_positions_with_the_bundled_tokenizer(bundled_model):
    """The chat-templated prompt of "Q?" is 32 tokens. "Tom has 3 apples.\\nHe buys 2 more.\\nThe answer is 5."
    is Tom| has| |3| apples|.|\\n|He| buys| |2| more|.|\\n|The| answer| is| |5|. (tokens 0-19): the steps end
    on the '.' tokens 5, 12 and 19, so at positions 32 + 5 = 37, 44 and 51."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Q?"}], tokenize=False,
                                           add_generation_prompt=True)
    text = "Tom has 3 apples.\nHe buys 2 more.\nThe answer is 5."
    ids, body, offsets = Encoder(tokenizer)(prompt, text)
    assert len(ids) == 32 and len(body) == 20
    assert step_positions(len(ids), offsets, [17, 33, 50], max_len=1024) == [37, 44, 51]
    assert tokenizer.decode((ids + body)[44]) == "." and tokenizer.decode((ids + body)[43]) == " more"


def test_training_examples_by_hand():
    """Prompt "Q:" is 2 tokens; one token a character. s0 = "a=1\\nb=2\\nThe answer is 3." has steps ending at
    3, 7, 24: positions 4, 8, 25, targets .75, 0 (first step .75, second 0), last 1 (its outcome).
    With max_len 20, position 25 is past it: s0 keeps 2 labels and its ids are cut after position 8 (9 ids).
    s1's only step has no value (null: too long for MC): no label, the sample is dropped. s2 has no step rows
    (no step, or not generated): not counted at all."""
    samples = [sample("p", 0, "a=1\nb=2\nThe answer is 3.", False), sample("p", 1, "x", False),
               sample("p", 2, " ", False)]
    steps = [
        {"problem_id": "p", "sample_index": 0, "step_index": 2, "end": 24, "value": 1.0},  # out of order on purpose
        {"problem_id": "p", "sample_index": 0, "step_index": 0, "end": 3, "value": 0.75},
        {"problem_id": "p", "sample_index": 0, "step_index": 1, "end": 7, "value": 0.0},
        {"problem_id": "p", "sample_index": 1, "step_index": 0, "end": 1, "value": None},
    ]
    examples, counts = training_examples(samples, steps, chars, max_len=20)
    (e,) = examples
    assert e.positions == [4, 8] and e.targets == [0.75, 0.0]
    assert e.ids == [ord(c) for c in "Q:a=1\nb=2"]
    assert chr(e.ids[4]) == "1" and chr(e.ids[8]) == "2"  # each step's last character
    assert counts == {"samples": 2, "labels": 2, "unvalued": 1, "too_long": 1, "no_label": 1, "examples": 1}
    examples, counts = training_examples(samples, steps, chars, max_len=1024)
    assert examples[0].positions == [4, 8, 25] and examples[0].targets == [0.75, 0.0, 1.0]
    assert len(examples[0].ids) == 26 and counts["too_long"] == 0


def test_masked_bce_by_hand():
    """Labels at positions 0 and 2 only. Logit 0, target 1: -log(sigmoid 0) = log 2 = 0.693147.
    Logit -1, target 0: -log(1 - sigmoid(-1)) = log(1 + e^-1) = 0.313262. Mean 0.503205; position 1 (logit 2)
    does not count. Row 2 has no label. With no label at all the loss is 0, not NaN."""
    logits = torch.tensor([[0.0, 2.0, -1.0], [5.0, 5.0, 5.0]])
    targets = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(masked_bce(logits, targets, mask), torch.tensor(0.503205), atol=1e-5, rtol=1e-5)
    assert masked_bce(logits, targets, torch.zeros_like(mask)).item() == 0.0


def test_collate_pads_right_and_marks_labels():
    ids, attention, targets, mask = collate([PRMExample([5, 6, 7], [1, 2], [0.5, 1.0]), PRMExample([8], [0], [0.0])],
                                            pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and attention.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert targets.tolist() == [[0.0, 0.5, 1.0], [0.0, 0.0, 0.0]] and mask.tolist() == [[0, 1, 1], [1, 0, 0]]


SAMPLES = [
    sample("p0", 0, "a=1\nb=2\nThe answer is 3.", False),    # 3 steps: positions 4, 8 predicted; last its outcome
    sample("p0", 1, "The answer is 8.", True),                # one step: its outcome, no forward pass
    sample("p1", 0, " \n", False),                            # no step
    sample("p2", 0, "", False, SKIPPED),                      # never generated
    sample("p3", 0, "c=1\n" + "x" * 30 + "\nd=2\nThe answer is 8.", True),  # step 1 ends past max_len 30
    sample("p4", 0, "y" * 40 + "\nThe answer is 1.", False),  # its only other step is past max_len: no query
]


class Scripted:
    def __init__(self):
        self.calls = []

    def __call__(self, queries):
        self.calls.append(queries)
        return [[p / 100 for p in positions] for _, positions in queries]


def test_scoring_with_a_scripted_predictor():
    """p0/0: steps end at 3 and 7 -> positions 4, 8 -> .04, .08; last step: outcome 0. p0/1: outcome 1.
    p3/0: step 0 ends at 3 -> position 4 (.04); step 1 ends at 34 -> position 35 >= 30: skipped; step 2 ends
    at 38 -> position 39: skipped; last: outcome 1. p4/0: step 0 at position 41: skipped, nothing to ask.
    One call, two queries, each cut after its last asked position."""
    predict = Scripted()
    rows, stats = score_samples(predict, chars, SAMPLES, ProcessConfig(prm_max_len=30))
    got = {}
    for r in rows:
        got.setdefault((r["problem_id"], r["sample_index"]), []).append(r)
    assert list(got) == [("p0", 0), ("p0", 1), ("p3", 0), ("p4", 0)]
    assert [r["value"] for r in got["p0", 0]] == [0.04, 0.08, 0.0]
    assert [r["source"] for r in got["p0", 0]] == ["trained", "trained", "outcome"]
    assert [(r["value"], r["source"]) for r in got["p0", 1]] == [(1.0, "outcome")]
    assert [r["value"] for r in got["p3", 0]] == [0.04, None, None, 1.0]
    assert [r["source"] for r in got["p3", 0]] == ["trained", SKIPPED, SKIPPED, "outcome"]
    assert [(r["value"], r["source"]) for r in got["p4", 0]] == [(None, SKIPPED), (0.0, "outcome")]
    assert all(r["rollouts"] == 0 and r["reached"] is None for r in rows)
    assert (rows[1]["start"], rows[1]["end"], rows[1]["text"]) == (4, 7, "b=2")
    (call,) = predict.calls
    assert call == [([ord(c) for c in "Q:a=1\nb=2"], [4, 8]), ([ord(c) for c in "Q:c=1"], [4])]
    assert stats == {"samples": 4, "not_generated": 1, "no_steps": 1, "single_step": 1, "capped": 0,
                     "steps": 10, "too_long": 3, "predicted": 3}


def test_no_query_no_call():
    predict = Scripted()
    rows, stats = score_samples(predict, chars, [SAMPLES[1], SAMPLES[2]], ProcessConfig())
    assert predict.calls == [] and [r["value"] for r in rows] == [1.0] and stats["predicted"] == 0


@pytest.mark.parametrize("use_gpu, cores, gpus", [(True, 1, 1), (False, 2, 0)])
def test_scoring_runs_in_a_worker_that_exits_after_its_one_call(use_gpu, cores, gpus):
    """max_calls=1 set on the function itself. Scoring was `ray.remote(predict).options(num_gpus=1)`: Ray takes
    max_calls from `ray.remote` alone, 0 there (no limit: the worker is reused), and it kept the PRM's CUDA memory on
    a GPU Ray counted free."""
    import ray

    from selfimprove.reward.trained_prm import predict, scoring_task

    task = scoring_task(use_gpu, cores)
    assert (task._function, task._max_calls, task._num_gpus, task._num_cpus) == (predict, 1, gpus, cores)
    assert ray.remote(predict)._max_calls == 0


def test_a_checkpoint_with_another_tokenizer_is_refused_in_one_line(bundled_model, tmp_path):
    from transformers import AutoTokenizer

    check_tokenizer(bundled_model, bundled_model)  # the same: accepted
    other = AutoTokenizer.from_pretrained(bundled_model)
    other.add_tokens(["<step>"])
    other.save_pretrained(tmp_path / "prm")
    with pytest.raises(UserError, match=r"prm was trained with another tokenizer than the policy .* \(49153 vs 49152 "
                                        r"tokens, vocabularies differ\)") as e:
        check_tokenizer(tmp_path / "prm", bundled_model)
    assert "\n" not in str(e.value)


def test_predict_batches_pad_without_changing_a_query(bundled_model):
    """The bundled model with a fresh (seeded) head: a query's probabilities are the same alone and padded into a
    batch of longer ones, and come back in query order. No Ray, no training: one CPU forward pass a batch."""
    from selfimprove.reward.trained_prm import predict

    queries = [([1, 2, 3, 4, 5], [1, 4]), ([7, 8, 9], [2]), ([5, 6], [0, 1])]
    torch.manual_seed(0)
    batched = predict(bundled_model, queries, batch_size=2, pad_id=2, cores=1)
    torch.manual_seed(0)
    alone = predict(bundled_model, [queries[2], queries[0]], batch_size=1, pad_id=2, cores=1)
    assert [len(v) for v in batched] == [2, 1, 2]
    torch.testing.assert_close(torch.tensor(batched[2]), torch.tensor(alone[0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(batched[0]), torch.tensor(alone[1]), atol=1e-5, rtol=1e-5)
    assert all(0 < v < 1 for vs in batched for v in vs)


# -- a real run ---------------------------------------------------------------------------------

def _iteration(root, t, samples, steps):
    """An iteration folder with finished rollout and process stages holding these rows, as the driver leaves them."""
    import pyarrow as pa

    from selfimprove.reward.mc_prm import write_steps

    it = root / f"iter_{t}"
    (it / "rollout" / "samples").mkdir(parents=True)
    (it / "process").mkdir()
    pq.write_table(pa.Table.from_pylist(samples), it / "rollout" / "samples" / "part.parquet")
    write_steps(steps, it / "process" / "steps.parquet")
    return it


RIGHT = "Tom has 3 apples.\nHe buys 2 more.\nThe answer is 5."
WRONG = "Tom has 3 apples.\nHe sells 2 of them.\nThe answer is 1."


@pytest.fixture(scope="module")
def trained_prm(ray_local, bundled_model, tmp_path_factory):
    """Two MC iterations of two samples each (one right, one wrong: its second step has value 0), a PRM
    trained on them on 2 Ray Train workers (1 sample each a step, 4 epochs: 4 steps), then scoring."""
    import time

    from transformers import AutoTokenizer

    from selfimprove.config import Config, TrainConfig
    from selfimprove.reward.steps import split_steps
    from selfimprove.reward.trained_prm import run_trained_prm, train_prm

    root = tmp_path_factory.mktemp("prm")
    tokenizer = AutoTokenizer.from_pretrained(bundled_model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Tom has 3 apples and buys 2 more. How many?"}],
                                           tokenize=False, add_generation_prompt=True)

    def rows(t):
        samples = [sample(f"q{t}", 0, RIGHT, True, prompt=prompt), sample(f"q{t}", 1, WRONG, False, prompt=prompt)]
        steps = [{"problem_id": s["problem_id"], "sample_index": s["sample_index"], "step_index": i, "start": st.start,
                  "end": st.end, "text": st.text, "value": v, "reached": None, "rollouts": 0, "source": "rollout"}
                 for s, values in zip(samples, ([1.0, 1.0, 1.0], [1.0, 0.0, 0.0]))
                 for i, (st, v) in enumerate(zip(split_steps(s["text"]), values))]
        return samples, steps

    its = [_iteration(root, t, *rows(t)) for t in (1, 2)]
    cfg = Config(model=bundled_model,
                 process=ProcessConfig(scorer="trained", prm_epochs=4, prm_lr=1e-4, prm_batch_size=2, prm_max_len=128),
                 train=TrainConfig(num_workers=2, precision="fp32"))
    t0 = time.perf_counter()
    summary = train_prm(cfg, bundled_model, its, root / "prm" / "model")
    train_seconds = time.perf_counter() - t0
    # Scored: the two training samples, one with a middle step past prm_max_len, one of one step.
    long = "Tom has 3 apples.\n" + "He thinks. " * 60 + "\nThe answer is 5."
    to_score = [*rows(1)[0], sample("q9", 0, long, True, prompt=prompt), sample("q9", 1, "The answer is 5.", True, prompt=prompt)]
    t0 = time.perf_counter()
    stats = run_trained_prm(root / "prm" / "model", bundled_model, cfg.process, to_score, root)
    print(f"PRM: trained in {train_seconds:.1f} s, scored in {time.perf_counter() - t0:.1f} s", summary)
    return root, summary, stats


@pytest.mark.engine
def test_engine_trains_a_prm_with_ray_train_and_scores_with_it(trained_prm, bundled_model):
    root, summary, stats = trained_prm
    folder = root / "prm" / "model"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForTokenClassification"] and len(config["id2label"]) == 1
    assert config["dtype"] == "bfloat16" and (folder / "tokenizer.json").is_file()
    meta = json.loads((folder / "prm.json").read_text())
    assert meta["max_len"] == 128 and meta["backbone"] == bundled_model
    # 4 samples, 3 labels each; 2 a step, 4 epochs: 8 steps on 2 workers.
    assert (summary["examples"], summary["labels"], summary["steps"], summary["workers"]) == (4, 12, 8, 2)
    losses = [s["loss"] for s in meta["steps"]]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2]), losses

    table = pq.read_table(root / "steps.parquet")
    assert table.schema == STEP_SCHEMA
    got = {}
    for r in table.to_pylist():
        got.setdefault((r["problem_id"], r["sample_index"]), []).append(r)
    right, wrong = got["q1", 0], got["q1", 1]
    assert [r["source"] for r in right] == [r["source"] for r in wrong] == ["trained", "trained", "outcome"]
    assert [r["value"] for r in right][-1] == 1.0 and [r["value"] for r in wrong][-1] == 0.0
    assert all(0 < r["value"] < 1 for r in right[:2] + wrong[:2])
    # The steps the PRM was taught: the right second step above the wrong one.
    assert right[1]["value"] > wrong[1]["value"], (right, wrong)
    long = got["q9", 0]
    assert [r["source"] for r in long] == ["trained", SKIPPED, "outcome"] and long[1]["value"] is None
    assert [(r["value"], r["source"]) for r in got["q9", 1]] == [(1.0, "outcome")]
    assert stats["too_long"] == 1 and stats["predicted"] == 5 and stats["single_step"] == 1

"""Reading, tokenising, truncating and padding training rows, with the bundled model's real tokenizer.

The running example, token ids from SmolLM2's tokenizer:
  prompt "<|im_start|>user\\n2+3?<|im_end|>\\n<|im_start|>assistant\\n"
         -> [1, 4093, 198, 34, 27, 35, 47, 2, 198, 1, 520, 9531, 198]   (13 tokens)
  "It is 5." -> [1589, 314, 216, 37, 30];  "6" -> [38];  EOS (<|im_end|>) = pad = 2
"""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from selfimprove.errors import UserError
from selfimprove.train.data import Example, collate, fit, read_rows, tokenize, training_order

PROMPT = "<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n"
P = [1, 4093, 198, 34, 27, 35, 47, 2, 198, 1, 520, 9531, 198]
LONG = [1589, 314, 216, 37, 30, 2]  # "It is 5." + EOS
SHORT = [38, 2]  # "6" + EOS


@pytest.fixture(scope="module")
def tokenizer(bundled_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_model)


def pairs(*rows):
    return pa.table({"prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows], "rejected": [r[2] for r in rows]})


def test_pair_ids_prompt_then_completion_then_eos(tokenizer):
    examples, counts = tokenize(pairs((PROMPT, "It is 5.", "6")), tokenizer, max_len=64, truncation="response")
    assert examples == [Example(P, LONG, SHORT)]
    assert vars(counts) == {"rows": 1, "identical": 0, "too_long": 0, "truncated": 0, "examples": 1}


def test_eos_is_not_added_twice(tokenizer):
    examples, _ = tokenize(pairs((PROMPT, "It is 5.<|im_end|>", "6")), tokenizer, 64, "response")
    assert examples[0].chosen == LONG


def test_collate_one_row_per_pair_with_the_prompt_once(tokenizer):
    """P (13) + LONG (6) + SHORT (2) = 21 tokens; SHORT's tokens sit at 19-20 but at positions 13-14, as after P."""
    batch = collate([Example(P, LONG, SHORT)], pad_id=2)
    assert batch.input_ids.tolist() == [P + LONG + SHORT]
    assert batch.position_ids.tolist() == [list(range(19)) + [13, 14]]
    # LONG's first token is predicted at 12 (P's end) and so is SHORT's; SHORT's second at 19.
    assert batch.predictors.tolist() == [[12, 13, 14, 15, 16, 17, 12, 19]]
    assert batch.targets.tolist() == [LONG + SHORT] and batch.segments.tolist() == [[0] * 6 + [1] * 2]
    seen = batch.attention[0, 0]
    assert seen[20].tolist() == [True] * 13 + [False] * 6 + [True] * 2  # rejected sees P and itself, not LONG
    assert seen[18].tolist() == [True] * 19 + [False] * 2  # chosen: causal
    assert (batch.start, batch.pairs, batch.completions, batch.tokens) == (13, 1, 2, 21)


def test_collate_two_pairs_and_sft_rows():
    a, b = Example([5, 6, 7], [8, 2], [9, 9, 2]), Example([5], [3, 2], [4, 2])
    batch = collate([a, b], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 2, 9, 9, 2], [5, 3, 2, 4, 2, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 2, 1, 2, 0, 0, 0]]
    # b's padding slot: predicted at start - 1 = 0 (any valid position), in no segment.
    assert batch.predictors.tolist() == [[2, 3, 2, 5, 6], [0, 1, 0, 3, 0]]
    assert batch.targets.tolist() == [[8, 2, 9, 9, 2], [3, 2, 4, 2, 0]]
    assert batch.segments.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, -1]]
    assert batch.attention[1, 0, 3].tolist() == [True, False, False, True, False, False, False, False]
    assert batch.attention[1, 0, 7].tolist() == [True, False, False, True, True, True, True, True]  # a pad: no NaN
    assert (batch.start, batch.pairs, batch.completions, batch.tokens) == (1, 2, 2, 13)
    sft = collate([Example([5, 6], [8, 2])], pad_id=0)
    assert sft.input_ids.tolist() == [[5, 6, 8, 2]] and sft.predictors.tolist() == [[1, 2]]
    assert sft.segments.tolist() == [[0, 0]] and sft.completions == 1 and sft.input_ids.dtype == torch.long


@pytest.mark.parametrize(
    "truncation, expected",
    [
        # 13 + 6 = 19 > 16: keep the prompt, cut both completions to 16 - 13 = 3 tokens.
        ("response", (P, [LONG[:3], SHORT])),
        # keep the prompt's last 16 - 6 = 10 tokens, completions whole.
        ("prompt", (P[-10:], [LONG, SHORT])),
        ("drop", None),
    ],
)
def test_fit_modes(truncation, expected):
    assert fit(P, [LONG, SHORT], max_len=16, truncation=truncation) == expected
    assert fit(P, [LONG, SHORT], max_len=19, truncation=truncation) == (P, [LONG, SHORT])


def test_fit_edges():
    assert fit(P, [LONG], max_len=13, truncation="response") is None  # no room for one response token
    assert fit(P, [LONG], max_len=4, truncation="prompt") == (P[-1:], [LONG[:3]])  # one prompt token kept


def test_truncation_counted(tokenizer):
    table = pairs((PROMPT, "It is 5.", "6"), (PROMPT, "5", "6"))
    examples, counts = tokenize(table, tokenizer, max_len=16, truncation="response")
    assert [e.chosen for e in examples] == [LONG[:3], [37, 2]]
    assert (counts.truncated, counts.too_long, counts.examples) == (1, 0, 2)
    examples, counts = tokenize(table, tokenizer, max_len=16, truncation="drop")
    assert (counts.truncated, counts.too_long, counts.examples) == (0, 1, 1)


def test_identical_pairs_dropped_and_counted(tokenizer):
    table = pairs((PROMPT, "5", "5"), (PROMPT, "It is 5.", "6"), (PROMPT, "It is 5. Yes", "It is 5. No"))
    examples, counts = tokenize(table, tokenizer, 64, "response")
    assert (counts.rows, counts.identical, counts.examples) == (3, 1, 2)
    # Cut to 13 + 4 tokens both read "It is 5" and no longer differ: dropped as identical too.
    examples, counts = tokenize(table, tokenizer, 17, "response")
    assert (counts.identical, counts.truncated, counts.examples) == (2, 1, 1)
    with pytest.raises(UserError, match=r"nothing left to train on: of 1 rows, 1 have chosen == rejected"):
        tokenize(pairs((PROMPT, "5", "5")), tokenizer, 64, "response")


def test_sft_rows(tmp_path, tokenizer):
    pq.write_table(pa.table({"prompt": [PROMPT], "response": ["It is 5."], "id": [7]}), tmp_path / "sft.parquet")
    kind, table = read_rows(tmp_path)
    assert kind == "sft" and table.column_names == ["prompt", "response"]
    examples, _ = tokenize(table, tokenizer, 64, "response")
    assert examples == [Example(P, LONG, None)]


def test_folder_of_parts_is_one_table(tmp_path):
    for i in range(2):
        pq.write_table(pairs((PROMPT, f"a{i}", "b"), (PROMPT, f"c{i}", "d")), tmp_path / f"part-{i}.parquet")
    kind, table = read_rows(tmp_path)
    assert kind == "pairs" and table.column("chosen").to_pylist() == ["a0", "c0", "a1", "c1"]


def test_bad_inputs(tmp_path, tokenizer):
    with pytest.raises(UserError, match="training data not found"):
        read_rows(tmp_path / "nope.parquet")
    with pytest.raises(UserError, match="no .parquet files in"):
        read_rows(tmp_path)
    pq.write_table(pairs(), tmp_path / "pairs.parquet")
    with pytest.raises(UserError, match=r"pairs.parquet: no rows to train on \(an empty pairs file\)"):
        read_rows(tmp_path / "pairs.parquet")
    pq.write_table(pa.table({"prompt": ["p"], "answer": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(UserError, match=r"x.parquet: columns prompt, answer; expected prompt, chosen, rejected"):
        read_rows(tmp_path / "x.parquet")
    pq.write_table(pa.table({"prompt": ["p", None], "chosen": ["a", "b"], "rejected": ["c", "d"]}), tmp_path / "n.parquet")
    with pytest.raises(UserError, match=r"column 'prompt' has 1 null value"):
        read_rows(tmp_path / "n.parquet")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="not readable Parquet"):
        read_rows(tmp_path / "bad.parquet")
    with pytest.raises(UserError, match="empty prompt"):
        tokenize(pairs(("", "a", "b")), tokenizer, 64, "response")


def padded_tokens(examples, order, micro):
    """Tokens computed on, pads included: each forward pass is its pairs' two rows padded to the longest."""
    return sum(2 * len(group) * max(len(examples[i].prompt) + max(len(examples[i].chosen), len(examples[i].rejected))
                                    for i in group)
               for group in (order[m:m + micro] for m in range(0, len(order), micro)))


def test_training_order_grouped_by_length_pads_less_and_keeps_every_pair():
    # 80 pairs, chosen responses of 1..80 tokens in a shuffled order, rejected of 1: transformers groups
    # them in 4 groups of min(80 // (2 x 4), 50) = 10 micro-batches of 2, i.e. 20 examples each.
    lengths = torch.randperm(80, generator=torch.Generator().manual_seed(3)).tolist()
    examples = [Example([1, 2], [7] * (n + 1), [8]) for n in lengths]
    grouped = training_order(examples, 2, seed=5, group_by_length=True)
    plain = training_order(examples, 2, seed=5, group_by_length=False)
    assert sorted(grouped) == sorted(plain) == list(range(80))
    assert grouped == training_order(examples, 2, seed=5, group_by_length=True)  # the seed decides
    assert grouped != training_order(examples, 2, seed=6, group_by_length=True)
    assert max(len(examples[i].chosen) for i in grouped[:2]) == 80  # the longest pass comes first
    for start in range(0, 80, 20):  # each group of 20 examples is sorted longest first (but the swapped head)
        group = [len(examples[i].chosen) for i in grouped[start:start + 20]][1:]
        assert group == sorted(group, reverse=True)
    # The real tokens are the same in any order; grouping saves padding between pairs (not within one: a
    # rejected row is padded to its chosen row's length).
    assert padded_tokens(examples, grouped, 2) < padded_tokens(examples, plain, 2) * 0.85

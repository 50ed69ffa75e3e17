"""Training rows -> token ids -> padded batches, checked on the driver before Ray starts.

1. Input is a Parquet file or a folder of them (a finished stage folder, or one holding
   `pairs.parquet` / `sft.parquet`). The columns decide the kind: `prompt, chosen, rejected`
   are preference pairs, `prompt, response` are SFT rows (the response becomes `chosen`, with
   no rejected). Other columns are ignored; a null in a used column is an error.
2. `prompt` is the chat-templated text the model saw (the rollout stage's `prompt_text`), so it
   is tokenised without special tokens: the template already holds them. Completions are
   tokenised on their own, as TRL does, so chosen and rejected share the prompt's exact ids.
3. Every completion ends with the tokenizer's EOS (not added twice): the model learns to stop.
4. Pairs whose chosen and rejected texts are equal, or become equal when truncated, carry no
   preference: they are dropped and counted. Nothing left is an error.
5. Longer than `max_len` (prompt + the longer completion): `response` keeps the prompt and cuts
   the completions' ends; `prompt` cuts the prompt's start, one cut for both completions so they
   keep the same context (and the completions too if even one prompt token does not fit);
   `drop` drops the pair. A prompt that leaves no room for one response token is dropped in
   every mode. All counted.
6. A batch holds one row per pair: the prompt once, then the chosen response, then the rejected
   one (prefix sharing, as in Wang et al., 2024, "Accelerating Direct Preference Optimization
   with Prefix Sharing"). An attention mask hides the chosen tokens from the rejected ones, whose
   positions go on from the prompt's end: every token sees what it would in a row of its own,
   and the prompt, about 70% of the tokens of a demo pair, is computed once instead of twice.
   Rows are right-padded to the longest in the batch (not to max_len).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from selfimprove.errors import UserError, first_line

KINDS = {"pairs": ("prompt", "chosen", "rejected"), "sft": ("prompt", "response")}
TRUNCATIONS = ("response", "prompt", "drop")


@dataclass(frozen=True)
class Example:
    """One training pair as token ids; `rejected` is None for an SFT row."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int] | None = None


@dataclass
class Counts:
    rows: int = 0  # rows read
    identical: int = 0  # dropped: chosen == rejected (as text, or as ids after truncation)
    too_long: int = 0  # dropped: over max_len (truncation=drop, or no room left after the prompt)
    truncated: int = 0  # kept, cut to max_len
    examples: int = 0  # kept


@dataclass(frozen=True)
class Batch:
    """`pairs` examples, a right-padded row each: prompt, chosen, then rejected (absent for SFT rows).

    Response token j of a row is `targets[:, j]`, predicted by the logits at position
    `predictors[:, j]`, and belongs to the chosen response (`segments` 0), the rejected one (1) or
    to no response (-1, padding).
    """

    input_ids: object  # LongTensor [pairs, length]
    position_ids: object  # LongTensor [pairs, length]: the rejected tokens' positions go on from the prompt's end
    attention: object  # BoolTensor [pairs, 1, length, length]: query position i may see key position j
    predictors: object  # LongTensor [pairs, responses' length]
    targets: object  # LongTensor [pairs, responses' length]
    segments: object  # LongTensor [pairs, responses' length]
    start: int  # the first position any row has a response token at (the shortest prompt's length)
    pairs: int
    completions: int  # 2 for pairs, 1 for SFT rows
    tokens: int  # real (non-pad) tokens, each prompt counted once


def read_rows(path: str | Path) -> tuple[str, pa.Table]:
    """The kind ("pairs" or "sft") and the used columns of a Parquet file or folder."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise UserError(f"no .parquet files in {path} (expected pairs.parquet or sft.parquet)")
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"training data not found: {path}")
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f))
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{f}: not readable Parquet ({first_line(e)})") from None
    try:
        table = pa.concat_tables(tables, promote_options="default")
    except pa.ArrowException as e:
        raise UserError(f"{path}: files that do not fit together ({str(e).splitlines()[0][:200]})") from None
    kind = next((k for k, cols in KINDS.items() if set(cols) <= set(table.column_names)), None)
    if kind is None:
        raise UserError(f"{path}: columns {', '.join(table.column_names) or '(none)'}; expected "
                        f"{', '.join(KINDS['pairs'])} (pairs) or {', '.join(KINDS['sft'])} (SFT rows)")
    if table.num_rows == 0:
        raise UserError(f"{path}: no rows to train on (an empty {kind} file)")
    table = table.select(list(KINDS[kind]))
    for name in table.column_names:
        nulls = table.column(name).null_count
        if nulls:
            raise UserError(f"{path}: column '{name}' has {nulls} null value(s)")
    return kind, table


def tokenize(table: pa.Table, tokenizer, max_len: int, truncation: str) -> tuple[list[Example], Counts]:
    """Examples from `read_rows`' table, with counts of what was dropped and truncated."""
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    cols = table.to_pydict()
    prompts = cols["prompt"]
    chosen = cols.get("chosen", cols.get("response"))
    rejected = cols.get("rejected")
    counts = Counts(rows=len(prompts))
    if rejected is not None:
        keep = [i for i in range(len(prompts)) if chosen[i] != rejected[i]]
        counts.identical = len(prompts) - len(keep)
        prompts, chosen, rejected = ([xs[i] for i in keep] for xs in (prompts, chosen, rejected))
    empty = sum(1 for p in prompts if not p)
    if empty:
        raise UserError(f"{empty} row(s) have an empty prompt: a response needs a prompt to be scored against")

    ids = _encode(tokenizer, prompts)
    chosen_ids = [_with_eos(x, tokenizer.eos_token_id) for x in _encode(tokenizer, chosen)]
    rejected_ids = [_with_eos(x, tokenizer.eos_token_id) for x in _encode(tokenizer, rejected)] if rejected is not None else None

    examples = []
    for i, prompt in enumerate(ids):
        completions = [chosen_ids[i]] + ([rejected_ids[i]] if rejected_ids is not None else [])
        fitted = fit(prompt, completions, max_len, truncation)
        if fitted is None:
            counts.too_long += 1
            continue
        prompt_cut, (c, *r) = fitted
        if r and r[0] == c:  # truncation cut away everything that told them apart
            counts.identical += 1
            continue
        if fitted[0] != prompt or fitted[1] != completions:
            counts.truncated += 1
        examples.append(Example(prompt_cut, c, r[0] if r else None))
    counts.examples = len(examples)
    if not examples:
        raise UserError(f"nothing left to train on: of {counts.rows} rows, {counts.identical} have chosen == "
                        f"rejected and {counts.too_long} do not fit train.max_len={max_len}")
    return examples, counts


def fit(prompt: list[int], completions: list[list[int]], max_len: int,
        truncation: str) -> tuple[list[int], list[list[int]]] | None:
    """Prompt and completions cut so each prompt + completion is at most max_len; None to drop the pair."""
    longest = max(len(c) for c in completions)
    if len(prompt) + longest <= max_len:
        return prompt, completions
    if truncation == "drop" or (truncation == "response" and len(prompt) >= max_len):
        return None
    if truncation == "response":
        room = max_len - len(prompt)
        return prompt, [c[:room] for c in completions]
    keep = max(max_len - longest, 1)  # truncation == "prompt": keep the prompt's end
    room = max_len - keep
    return prompt[-keep:], [c[:room] for c in completions]


def padding_id(tokenizer) -> int:
    """The token id batches are padded with: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def training_order(examples: list[Example], micro: int, seed: int, group_by_length: bool) -> list[int]:
    """The order a worker trains on its `examples` in, a forward pass being each `micro` of it in turn: random from
    `seed`, or with `group_by_length` transformers' length grouping (random groups of 50 micro-batches or fewer,
    sorted by length within, the longest micro-batch first), so that a forward pass pads little."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    generator = torch.Generator().manual_seed(seed)
    if not group_by_length:
        return torch.randperm(len(examples), generator=generator).tolist()
    return get_length_grouped_indices([row_length(e) for e in examples], micro, generator=generator)


def row_length(e: Example) -> int:
    return len(e.prompt) + len(e.chosen) + len(e.rejected or ())


def collate(examples: list[Example], pad_id: int) -> Batch:
    """One row per example (see the module's point 6), right-padded to the longest."""
    import torch

    completions = 1 if examples[0].rejected is None else 2
    length = max(row_length(e) for e in examples)
    responses = max(len(e.chosen) + len(e.rejected or ()) for e in examples)
    start = min(len(e.prompt) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(examples), length), dtype=torch.long)
    # Causal everywhere, padding queries included (a query that sees no key would make NaNs); pads come
    # last, so no real query sees one.
    attention = torch.ones((len(examples), 1, length, length), dtype=torch.bool).tril()
    predictors = torch.full((len(examples), responses), start - 1, dtype=torch.long)
    targets = torch.full((len(examples), responses), pad_id, dtype=torch.long)
    segments = torch.full((len(examples), responses), -1, dtype=torch.long)
    for i, e in enumerate(examples):
        p, c, r = len(e.prompt), len(e.chosen), len(e.rejected or ())
        input_ids[i, :p + c + r] = torch.tensor(e.prompt + e.chosen + (e.rejected or []), dtype=torch.long)
        position_ids[i, :p + c] = torch.arange(p + c)
        position_ids[i, p + c:p + c + r] = torch.arange(p, p + r)
        attention[i, 0, p + c:, p:p + c] = False
        predictors[i, :c] = torch.arange(p - 1, p + c - 1)
        if r:  # the rejected response's first token is predicted from the prompt's end, as the chosen one's
            predictors[i, c:c + r] = torch.tensor([p - 1] + list(range(p + c, p + c + r - 1)))
        targets[i, :c + r] = input_ids[i, p:p + c + r]
        segments[i, :c], segments[i, c:c + r] = 0, 1
    return Batch(input_ids, position_ids, attention, predictors, targets, segments, start=start,
                 pairs=len(examples), completions=completions, tokens=sum(row_length(e) for e in examples))


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _with_eos(ids: list[int], eos: int) -> list[int]:
    return ids if ids and ids[-1] == eos else ids + [eos]


def whole_steps(examples: list, batch_size: int, seed: int) -> list:
    """A seeded shuffle, cut to a whole number of optimizer steps (fewer than batch_size left out, counted)."""
    import random

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    usable = len(examples) - len(examples) % batch_size
    return [examples[i] for i in order[:usable]]

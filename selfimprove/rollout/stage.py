"""The rollout stage: problem rows -> scored sample rows, on Ray Data over a vLLM actor pool.

1. Problems become one Ray Data row each (prompt as chat-message JSON, gold answer, the whole
   problem row as JSON for the verifier, and the pass's `n` and `temperature`, so one engine
   start serves several passes).
2. `map_batches(VLLMGenerator, compute=ActorPoolStrategy(size=num_actors))`: one engine per
   actor; on GPU an actor asks for `tensor_parallel_size` GPUs, on CPU for its cores. A batch is a
   block, and the blocks are as many as the engines or a multiple of it, each taken by an engine only once it
   is free (see `batch_count`).
3. `verify_batch` adds the extracted answer and the task's judgement of each sample against its whole problem
   row (a task may verify against tests or a label, not only a gold string): `correct`, and for a program its
   verdict, where its tests were decided and the reward-hacking monitor's flags; then it drops that row. A light
   check (an answer compared) runs in the engine actor's own call; a task that runs programs (`verify_cpus` > 0)
   gets a `map_batches` step of its own, with those cores.
4. The driver streams the samples into Parquet in a scratch folder that becomes `samples/` with `_SUCCESS`
   last. Why not Ray Data's own write, or a verify step for every task: each is a task that needs a worker
   process, and at a pool's end Ray started them only once the engines let go, 7 s here (issue 18).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from selfimprove.config import RolloutConfig
from selfimprove.errors import UserError
from selfimprove.io import digest, is_done, read_table, stage_output, write_atomic
from selfimprove.rollout.engine import cpu_engine_env
from selfimprove.rollout.generator import STARTUP, VLLMGenerator
from selfimprove.runtime import node_cpus
from selfimprove.storage import shared
from selfimprove.tasks.base import Judgement, Task

AHEAD = "ahead.json"  # beside a samples folder that also holds a later stage's requests, drawn ahead
STARTUPS = "engines"  # beside a samples folder: when each engine of its pool began and was ready
SAMPLE_ORDER = ("pass", "problem_id", "sample_index")
# The one schema of samples/ (every file, whatever its batch held: a batch where no sample
# states an answer must not write `extracted` as a null column).
SAMPLE_SCHEMA = pa.schema([
    ("pass", pa.string()), ("problem_id", pa.string()), ("question", pa.string()), ("answer", pa.string()),
    ("n", pa.int64()), ("temperature", pa.float64()), ("seed", pa.int64()), ("prompt_text", pa.string()),
    ("sample_index", pa.int64()), ("text", pa.string()), ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()), ("finish_reason", pa.string()), ("status", pa.string()),
    ("extracted", pa.string()), ("correct", pa.bool_()), ("verdict", pa.string()), ("judged", pa.string()),
    ("flags", pa.list_(pa.string())),
])


def request_rows(task: Task, problems: list[dict], passes: dict[str, tuple[int, float]], seed: int) -> list[dict]:
    """One row per (pass, problem): `passes` maps a pass name to its (n, temperature).

    Each row's sampling seed is a hash of (seed, pass, problem id): the same problem gets the
    same samples whatever else is in the run. A problem's passes are next to each other, so that every
    batch cut from the rows holds about as many samples as the next.
    """
    if not problems:
        raise UserError(f"no problems to roll out for task '{task.name}'")
    return [
        {"pass": name, "problem_id": p["id"], "question": p["question"], "answer": p["answer"],
         "problem": json.dumps(p), "prompt": json.dumps(task.prompt(p)), "n": n, "temperature": temperature,
         "seed": request_seed(seed, name, p["id"])}
        for p in problems for name, (n, temperature) in passes.items()
    ]


def request_seed(*parts) -> int:
    """A request's sampling seed in [0, 2**31): a hash of `parts` (run seed first), stable across runs."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little") >> 1


def verify_batch(batch: dict[str, np.ndarray], task: Task) -> dict[str, np.ndarray]:
    """Add `extracted` (the stated answer, canonical), `correct`, and a code task's `verdict` (what its tests said),
    `judged` (where they were decided) and `flags` (the reward-hacking monitor's) to a batch of samples, and drop the
    problem rows they were checked against."""
    texts, problems, status = batch["text"], batch.pop("problem"), batch["status"]
    batch["extracted"] = np.array([task.answer_key(t) if s == "ok" else None for t, s in zip(texts, status)],
                                  dtype=object)
    judgements = [task.judge(t, json.loads(p)) if s == "ok" else Judgement(False)
                  for t, p, s in zip(texts, problems, status)]
    batch["correct"] = np.array([j.correct for j in judgements], dtype=bool)
    batch["verdict"] = np.array([j.verdict for j in judgements], dtype=object)
    batch["judged"] = np.array([j.judged for j in judgements], dtype=object)
    # Filled one by one: numpy makes equal-length lists (all empty, say) a 2-D array.
    batch["flags"] = np.empty(len(judgements), dtype=object)
    for i, j in enumerate(judgements):
        batch["flags"][i] = list(j.flags)
    return batch


def rollout(model: str, cfg: RolloutConfig, task: Task, rows: list[dict], out: Path):
    """Generate and verify samples for `rows` (from `request_rows`) into `out`; return them as an Arrow table."""
    ds = generate_verified(request_dataset(rows, cfg), model, cfg, task, *engine_resources(cfg), startups=True)
    return write_samples(ds, out, SAMPLE_SCHEMA, SAMPLE_ORDER, expected_samples(rows))


def request_dataset(rows: list[dict], cfg: RolloutConfig):
    """Request `rows` as a Ray dataset whose blocks are the batches of a pool of `cfg`'s engines (`batch_count`),
    each asking for about as many samples as the next (`batch_bounds`)."""
    import ray

    samples = [r.get("n", 1) for r in rows]
    schema = pa.Table.from_pylist(rows).schema  # one schema for all: a column may be all-null in one batch
    # Each batch built on its own: a pickled slice of one table can carry the whole table's buffers.
    return ray.data.from_arrow([pa.Table.from_pylist(rows[start:end], schema=schema) for start, end in
                                batch_bounds(samples, batch_count(samples, cfg.num_actors, cfg.batch_size))])


def batch_bounds(samples: list[int], count: int) -> list[tuple[int, int]]:
    """`count` runs of consecutive rows, as (start, end), where rows ask for `samples[i]` samples each: a run ends
    at the first row that brings its samples to its share of the total.

    Why not runs of equal rows (Ray Data's own cut): an eval with the next rollout drawn ahead has 2.5 samples per
    row in its eval part and 8 in its training part, and one engine sampled the last, largest batch alone for
    minutes while the other idled (issue 18).
    """
    bounds, start, done = [], 0, 0
    total = sum(samples)
    for k in range(1, count + 1):
        end = start
        # Leave a row for each run still to cut.
        while end < len(samples) - (count - k) and (end == start or done < total * k / count):
            done += samples[end]
            end += 1
        bounds.append((start, end))
        start = end
    return bounds


def batch_count(samples: list[int], engines: int, batch_size: int) -> int:
    """How many engine batches (Ray Data blocks) request rows asking for `samples[i]` samples each are cut into: a
    multiple of `engines`, so that every engine of a pool draws the same share, each batch holding at most
    `batch_size` prompts' worth of samples at the largest n (fewer batches only when rows are fewer).

    Why: an engine samples a batch as one `generate` call. Ray Data lets an actor hold two tasks by default and
    gives queued blocks to whichever actor is ready first, so with few blocks the first engine up took the
    second's share too while the other idled (issue 18: 0.51 of raw vLLM on an AVX2 box). `generate` holds
    each actor to one block at a time, and this evens out the blocks. Counting samples rather than rows keeps an
    eval's greedy rows (n = 1) from making batches too small to fill an engine.
    """
    per_batch = batch_size * max(samples, default=1)
    return max(min(engines * math.ceil(sum(samples) / (engines * per_batch)), len(samples)), 1)


def ahead_record(model: str, rows: list[dict]) -> str:
    """What a stage that drew `rows` of a later stage ahead, from `model`, keeps beside its samples (`AHEAD`)."""
    return json.dumps({"model": model, "requests": digest(rows)})


def drawn_ahead(folder: Path, model: str, rows: list[dict]) -> pa.Table | None:
    """The samples of request `rows` an earlier stage (`folder`) drew ahead from `model`, in order; None unless it
    drew exactly these requests from that model, every sample of them once."""
    record = folder / AHEAD
    if not is_done(folder) or not record.is_file() or record.read_text() != ahead_record(model, rows):
        return None
    passes = pa.array(sorted({r["pass"] for r in rows}))
    samples = read_table(folder / "samples", SAMPLE_ORDER)
    samples = samples.filter(pc.is_in(samples.column("pass"), value_set=passes))
    try:
        check_complete(samples, SAMPLE_ORDER, expected_samples(rows))
    except UserError:
        return None
    return samples


def expected_samples(rows: list[dict]) -> set[tuple]:
    """The (pass, problem id, sample index) of each sample request rows ask for."""
    return {(r["pass"], r["problem_id"], i) for r in rows for i in range(r["n"])}


def generate_verified(ds, model: str, cfg: RolloutConfig, task: Task, resources: dict, cores: int,
                      startups: bool = False):
    """`generate` with `task`'s stop strings, each sample then checked by `verify_batch`: in the engine's own call
    if the check is light, else in a step of its own with the task's `verify_cpus` (running programs is not
    light: a core each, a bounded number at once, so hostile samples cannot crowd out the engines or the
    driver)."""
    if not task.verify_cpus:
        return generate(ds, model, cfg, task.stop, resources, cores, startups,
                        then=functools.partial(verify_batch, task=task))
    return verify_step(generate(ds, model, cfg, task.stop, resources, cores, startups), task)


def verify_step(ds, task: Task):
    """`verify_batch` over `ds` (sample rows) as a Ray Data step of its own, on the task's `verify_cpus`."""
    return ds.map_batches(verify_batch, fn_kwargs={"task": task}, batch_size=None, num_cpus=task.verify_cpus,
                          concurrency=task.verify_concurrency)


def generate(ds, model: str, cfg: RolloutConfig, stop: tuple[str, ...], resources: dict, cores: int,
             startups: bool = False, then=None):
    """`ds` (request rows) mapped to sample rows by a pool of `cfg.num_actors` vLLM actors of `model` (handed on as
    `storage.shared` makes it), each with `resources` and bound to `cores` cores on CPU; with `startups`, each
    engine records its start-up in its rows (`write_samples` keeps them); each batch of samples passes through
    `then` (a function of the batch), if given."""
    import ray

    # Bounded failure: Ray Data would wait for its actors forever and restart a dying one without end.
    ray.data.DataContext.get_current().wait_for_min_actors_s = cfg.start_timeout
    return ds.map_batches(
        VLLMGenerator,
        fn_constructor_kwargs={"model": shared(model), "cfg": cfg, "stop": stop, "cores_per_actor": cores,
                               "startups": startups, "then": then},
        batch_size=None,  # a block is a batch: its size is set by `batch_count`
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors, max_tasks_in_flight_per_actor=1),
        max_restarts=cfg.actor_restarts,
        max_task_retries=cfg.actor_restarts,
        **resources,
    )


def write_samples(ds, out: Path, schema: pa.Schema, order: tuple[str, ...], expected: set[tuple]):
    """Write the verified samples of `ds` to `out` as Parquet of `schema`; the folder is marked done only if it
    holds each key of `expected` (values of the `order` columns) exactly once. Returns the samples, in order.
    The engines' start-up records the rows carry go to `<out>/../engines/<engine>.json`."""
    startups = set()
    try:
        with stage_output(out) as scratch:
            with pq.ParquetWriter(scratch / "samples.parquet", schema) as writer:
                # The schema, not each batch's guess: a batch where no sample states an answer has an all-null
                # `extracted`, typed null.
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    if STARTUP in batch.column_names:
                        startups.update(pc.unique(batch.column(STARTUP)).to_pylist())
                    writer.write_table(batch.select(schema.names).cast(schema))
            samples = read_table(scratch, order)
            check_complete(samples, order, expected)
        write_startups(out.with_name(STARTUPS), startups)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"rollout failed: {root_cause(e)}") from e
    return samples


def write_startups(folder: Path, startups: set[str | None]) -> None:
    """One `<engine>.json` in `folder` per engine named in `startups` (values of the `STARTUP` column)."""
    records = {json.loads(line)["engine"]: json.loads(line) for value in startups if value
               for line in value.splitlines()}
    if records:
        folder.mkdir(parents=True, exist_ok=True)
    for engine, record in records.items():
        write_atomic(folder / f"{engine}.json", json.dumps({"began": record["began"], "ready": record["ready"]}))


def check_complete(samples: pa.Table, order: tuple[str, ...], expected: set[tuple]) -> None:
    """Refuse to mark a rollout done unless it holds each expected key (e.g. pass, problem, sample index) once."""
    got = list(zip(*(samples.column(c).to_pylist() for c in order)))
    if len(got) != len(expected) or set(got) != expected:
        raise UserError(f"rollout wrote {len(got)} samples ({len(set(got) & expected)} of the {len(expected)} "
                        "expected, problems x n, each once): not marked done; rerun to redo it")


def engine_resources(cfg: RolloutConfig, actors: int | None = None) -> tuple[dict, int]:
    """(Ray resources of one engine actor, cores it binds to on CPU or 0 on GPU), for `actors` engines at once
    (default: a pool of `num_actors`)."""
    if cpu_only():
        cores = cfg.cpus_per_actor or max(node_cpus() // (actors or cfg.num_actors), 1)
        env = cpu_engine_env()
        return {"num_cpus": cores, **({"runtime_env": {"env_vars": env}} if env else {})}, cores
    return {"num_cpus": 1, "num_gpus": cfg.tensor_parallel_size}, 0


def cpu_only() -> bool:
    """Whether this cluster has no GPUs: decided from Ray's resources, not the driver's own device."""
    import ray

    return ray.cluster_resources().get("GPU", 0) == 0


def root_cause(e: BaseException) -> str:
    """The innermost exception's last line: Ray wraps an actor's error several times. Not Ray Data's
    `SystemException`: an empty marker it raises an internal error from (e.g. its actor pool's start timeout)."""
    from ray.data.exceptions import SystemException

    while (cause := getattr(e, "cause", None) or e.__cause__) is not None and not isinstance(cause, SystemException):
        e = cause
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"[:300]

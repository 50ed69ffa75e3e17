"""Stage outputs: a folder that appears complete or not at all, and never at the cost of a user's files.

A stage writes into `<final>.partial/`, then renames it to `<final>/` and writes `_SUCCESS`
last, whole or not at all (a JSON record, written atomically). A reader that sees a readable
`_SUCCESS` knows every file is there; a crash at any point leaves at most a `.partial` folder,
which the next attempt clears, or a folder whose `_SUCCESS` is missing or damaged (a disk that
lost its last write), which is redone.

Every folder the project makes carries the marker file `.selfimprove`. Only an empty folder or
one of ours is ever deleted or replaced; anything else is refused, naming it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from selfimprove.errors import UserError

SUCCESS = "_SUCCESS"
MARKER = ".selfimprove"


def is_done(folder: Path) -> bool:
    return _record(folder) is not None


def is_damaged(folder: Path) -> bool:
    """Whether `folder` has a `_SUCCESS` that is not a whole record (empty, cut short): it is not finished."""
    return (folder / SUCCESS).is_file() and not is_done(folder)


def _record(folder: Path) -> dict | None:
    """The JSON object in `folder`'s `_SUCCESS`, or None if it is absent or not a whole JSON object."""
    try:
        record = json.loads((folder / SUCCESS).read_bytes())
    except (OSError, ValueError):  # absent; empty, cut short or not text (UnicodeDecodeError is a ValueError)
        return None
    return record if isinstance(record, dict) else None


def is_ours(folder: Path) -> bool:
    """Whether selfimprove wrote `folder`: it has our marker, or a `_SUCCESS` of any content (stages finished before
    the marker existed)."""
    return (folder / MARKER).is_file() or (folder / SUCCESS).is_file()


def check_replaceable(folder: Path) -> None:
    """Refuse `folder` unless it is absent, an empty folder or one of ours: all that selfimprove may delete."""
    if not os.path.lexists(folder):
        return
    # A symlink is someone's pointer to somewhere: never ours, even if its target is.
    if folder.is_dir() and not folder.is_symlink() and (is_ours(folder) or not any(folder.iterdir())):
        return
    raise UserError(f"{folder} exists and was not written by selfimprove; move it away or choose another path")


def claim_folder(folder: Path) -> Path:
    """Create and mark `folder` as ours, after `check_replaceable`; returns it."""
    check_replaceable(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).touch()
    return folder


def remove_ours(folder: Path) -> None:
    """Delete `folder` if it exists, after `check_replaceable`."""
    check_replaceable(folder)
    if os.path.lexists(folder):
        shutil.rmtree(folder)


@contextmanager
def stage_output(final: Path, record: dict | None = None):
    """Yield a scratch folder; on normal exit it becomes `final` with a `_SUCCESS` marker holding `record` (JSON).

    A `final` that is not ours is refused before the stage does any work, not after it.
    """
    final = Path(final)
    partial = final.with_name(final.name + ".partial")
    check_replaceable(final)
    remove_ours(partial)
    yield claim_folder(partial)
    remove_ours(final)
    partial.rename(final)
    write_atomic(final / SUCCESS, json.dumps(record if record is not None else {}))


def success_record(folder: Path) -> dict:
    """What a finished stage recorded in its `_SUCCESS` marker."""
    record = _record(folder)
    if record is None:
        raise ValueError(f"{folder} is not finished: no whole {SUCCESS} record")
    return record


def digest(value) -> str:
    """16 hex digits that change when what a stage read changes: a finished stage folder by its `_SUCCESS` record
    (which holds its own inputs and finishing time), any other folder (a model) by its files' bytes, anything
    else (problems, settings) by its JSON."""
    if isinstance(value, Path) and is_done(value):
        return hashlib.sha256((value / SUCCESS).read_bytes()).hexdigest()[:16]
    if isinstance(value, Path) and value.is_dir():
        return folder_digest(value)
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_digest(model: str) -> str:
    """What a model is: a folder by its files' bytes wherever it lies (`folder_digest`), a hub id by its name."""
    return folder_digest(Path(model)) if Path(model).is_dir() else model


def folder_digest(folder: Path) -> str:
    """16 hex digits of every file's path and bytes under `folder`.

    Cached by the files' paths, sizes and modification times: a run reads its starting model's digest at several
    stages (a 270 MB model took 0.7-1.7 s on a busy 2-core box), and a folder rewritten in place is read again.
    """
    folder = Path(folder).resolve()
    stats = tuple((str(f.relative_to(folder)), s.st_size, s.st_mtime_ns)
                  for f in sorted(p for p in folder.rglob("*") if p.is_file()) for s in [f.stat()])
    return _bytes_digest(str(folder), stats)


@functools.lru_cache(maxsize=8)
def _bytes_digest(folder: str, stats: tuple) -> str:
    """The digest of the files `stats` names under `folder`; `stats` is the cache key."""
    h = hashlib.sha256()
    for name, _, _ in stats:
        h.update(name.encode() + b"\0")
        with open(Path(folder) / name, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write the file `path` whole or not at all: a reader, or a process killed mid-write, never sees half of it.

    The data goes to a temp file in the same folder (a rename is atomic only within one file system), then
    replaces `path`.
    """
    path = Path(path)
    # Named by our pid: no live process can own a leftover of that name, so it is safe to clear.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        with open(tmp, "xb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_table(folder: Path, sort_by: tuple[str, ...] = ()) -> pa.Table:
    """All Parquet files of a finished stage folder as one Arrow table.

    Ray Data names its files by write task, so row order across files means nothing:
    `sort_by` gives a stable order.
    """
    table = pa.concat_tables([pq.read_table(f) for f in sorted(Path(folder).glob("*.parquet"))])
    return table.sort_by([(c, "ascending") for c in sort_by]) if sort_by else table

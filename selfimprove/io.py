"""Stage outputs: a folder that appears complete or not at all.

A stage writes into `<final>.partial/`, then renames it to `<final>/` and writes `_SUCCESS`
last. A reader that sees `_SUCCESS` knows every file is there; a crash at any point leaves
at most a `.partial` folder, which the next attempt clears.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SUCCESS = "_SUCCESS"


def is_done(folder: Path) -> bool:
    return (folder / SUCCESS).is_file()


@contextmanager
def stage_output(final: Path):
    """Yield a scratch folder; on normal exit it becomes `final` with a `_SUCCESS` marker."""
    final = Path(final)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    yield partial
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    (final / SUCCESS).touch()


def read_table(folder: Path, sort_by: tuple[str, ...] = ()) -> pa.Table:
    """All Parquet files of a finished stage folder as one Arrow table.

    Ray Data names its files by write task, so row order across files means nothing:
    `sort_by` gives a stable order.
    """
    table = pa.concat_tables([pq.read_table(f) for f in sorted(Path(folder).glob("*.parquet"))])
    return table.sort_by([(c, "ascending") for c in sort_by]) if sort_by else table

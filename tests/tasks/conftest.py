"""Small data files written into tmp_path, shared by the task tests."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfimprove.config import TaskConfig


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(name, rows) -> path of a JSONL file with one JSON object per row."""

    def write(name, rows):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path

    return write


@pytest.fixture
def write_parquet(tmp_path):
    """write_parquet(name, rows) -> path of a Parquet file holding the rows."""

    def write(name, rows):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path

    return write


@pytest.fixture
def task_config():
    """task_config(**fields) -> a TaskConfig; paths may be given as Path objects."""

    def make(**fields):
        if "data" in fields:
            fields["data"] = str(fields["data"])
        return TaskConfig(**fields)

    return make

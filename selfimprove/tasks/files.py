"""Problem rows from a local file or folder, or from the Hugging Face hub.

1. A `source` that exists locally is a file or a folder. A file (.jsonl, .json holding a
   list of objects, or .parquet) is used as is, for whichever split is asked. A folder
   holds the split as `<split>.jsonl`, `<split>.json`, `<split>.parquet` or Parquet shards
   `<split>-*.parquet` (the Hugging Face layout).
2. A source that does not exist and looks like a path (starts with / . ~ or ends in a data
   suffix) is an error; anything else is a hub dataset name for `datasets.load_dataset`.
3. Every mistake in the data is one `UserError` line that names the place: `file:N`, where
   N is the line of a JSONL file and the 1-based row number otherwise.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from selfimprove.errors import UserError, first_line

_SUFFIXES = (".jsonl", ".json", ".parquet")  # what a path (not a hub name) ends with

# A required field is a name, or a tuple of names of which one must be present.
Field = str | tuple[str, ...]


def read_rows(
    source: str,
    split: str,
    required: Sequence[Field],
    convert: Callable[[dict], dict],
    hub_config: str | None = None,
) -> list[dict]:
    """Rows of `split` from `source`, each checked for `required` fields and passed through `convert`.

    `convert` turns a raw row into a task row and raises ValueError on a row it cannot use;
    the message is reported with the row's place. `hub_config` is the dataset configuration
    used only for hub names (GSM8K's is "main").
    """
    path = Path(source).expanduser()
    if path.exists():
        located = _read_local(path, split)
    elif source.startswith(("/", ".", "~")) or source.endswith(_SUFFIXES):
        raise UserError(f"dataset path not found: {source}")
    else:
        located = _read_hub(source, hub_config, split)
    if not located:
        raise UserError(f"{source}: split '{split}' has no rows")
    return [_convert(row, where, required, convert) for where, row in located]


def _convert(row: dict, where: str, required: Sequence[Field], convert: Callable[[dict], dict]) -> dict:
    for field in required:
        names = (field,) if isinstance(field, str) else field
        if all(row.get(name) in (None, "") for name in names):
            raise UserError(f"{where}: row has no {' or '.join(repr(name) for name in names)}")
    try:
        return convert(row)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


def _read_local(path: Path, split: str) -> list[tuple[str, dict]]:
    files = _split_files(path, split) if path.is_dir() else [path]
    return [located for file in files for located in _read_file(file)]


def _split_files(folder: Path, split: str) -> list[Path]:
    patterns = (f"{split}.jsonl", f"{split}.json", f"{split}.parquet", f"{split}-*.parquet")
    for pattern in patterns:
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise UserError(f"{folder}: no {', '.join(patterns)} in this folder")


def _read_file(file: Path) -> list[tuple[str, dict]]:
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    if file.suffix not in readers:
        raise UserError(f"{file}: unsupported file type (use {', '.join(readers)})")
    return readers[file.suffix](file)


def _read_jsonl(file: Path) -> list[tuple[str, dict]]:
    located = []
    # Split on "\n" only: str.splitlines would also break at U+2028 inside JSON strings.
    for n, line in enumerate(_read_text(file).split("\n"), 1):
        if line.strip():
            located.append((f"{file}:{n}", _as_object(_parse_json(line, file, n), f"{file}:{n}")))
    return located


def _read_json(file: Path) -> list[tuple[str, dict]]:
    rows = _parse_json(_read_text(file), file, 1)
    if not isinstance(rows, list):
        raise UserError(f"{file}: expected a JSON list of rows, got {type(rows).__name__}")
    return [(f"{file}:{n}", _as_object(row, f"{file}:{n}")) for n, row in enumerate(rows, 1)]


def _read_parquet(file: Path) -> list[tuple[str, dict]]:
    try:
        rows = pq.read_table(file).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{file}: not a readable Parquet file ({first_line(e, None)})") from None
    return [(f"{file}:{n}", row) for n, row in enumerate(rows, 1)]


def _read_text(file: Path) -> str:
    try:
        data = file.read_bytes()
    except OSError as e:  # no permission, an I/O error
        raise UserError(f"{file}: cannot read ({e.strerror or e})") from None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise UserError(f"{file}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{file}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _parse_json(text: str, file: Path, first_line: int):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{file}:{first_line + e.lineno - 1}: not valid JSON ({e.msg})") from None
    except RecursionError:  # json's parser recurses once per nested [ or {
        raise UserError(f"{file}:{first_line}: not valid JSON (nested too deeply)") from None


def _as_object(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _read_hub(name: str, config: str | None, split: str) -> list[tuple[str, dict]]:
    import datasets  # a second to import, and only hub names need it

    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, config or split: the same fix for the user
        raise UserError(
            f"could not load '{name}' (split '{split}') from the Hugging Face hub, and it is not a local path "
            f"({type(e).__name__}: {first_line(e, None)}); pass a local JSONL/Parquet file or folder as task.data"
        ) from None
    return [(f"{name}:{n}", dict(row)) for n, row in enumerate(rows, 1)]

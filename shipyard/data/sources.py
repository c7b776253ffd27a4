"""Read chat records from JSONL files, `datasets`-readable files, or a synthetic task.

A malformed record stops the run with `file:line` (1-based, for every format)
and the reason, unless the recipe says `data.on_error: skip`; then it is counted
and reported. A record without an assistant turn has nothing to learn from: it
is always skipped and counted. Nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from shipyard.config import DataSource
from shipyard.data import synthetic
from shipyard.data.messages import Record, RecordError, normalise_record
from shipyard.errors import ShipyardError

SKIP_HINT = "set data.on_error=skip to count and skip such records"


class SkipCounter(Counter):
    """Skipped records by reason; reported at the end of a run and in summary.json."""

    def report(self) -> dict:
        return {"total": sum(self.values()), **dict(sorted(self.items()))}


def handle_bad_record(error: RecordError, origin: str, on_error: str, skipped: SkipCounter) -> None:
    """Count a record shipyard cannot use, or stop with its origin; records without assistant turns are always counted."""
    if on_error == "skip" or error.reason == "no_assistant_turn":
        skipped[error.reason] += 1
        return
    raise ShipyardError(f"{origin}: {error} ({SKIP_HINT})")


def _record(obj: object, origin: str, on_error: str, skipped: SkipCounter, image_root: Path | None = None
            ) -> Record | None:
    try:
        return normalise_record(obj, origin, image_root)
    except RecordError as e:
        handle_bad_record(e, origin, on_error, skipped)
        return None


def _parse_line(raw: bytes, lineno: int) -> object:
    """One JSONL line as an object, or RecordError saying what is wrong with it."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(
            f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file as UTF-8"
        ) from None
    if lineno == 1:
        line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise RecordError(f"not valid JSON ({e.msg} at column {e.colno}); each line must hold one JSON record") from None


def jsonl_objects(path: Path):
    """(origin "file:line", parsed object or the RecordError saying why not) per non-blank line of `path`."""
    with path.open("rb") as f:  # bytes: a bad byte is one bad line, not a crash of the whole file
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield f"{path}:{lineno}", _parse_line(raw, lineno)
            except RecordError as e:
                yield f"{path}:{lineno}", e


def _read_jsonl(path: Path, on_error: str, skipped: SkipCounter, image_root: Path) -> list[Record]:
    records = []
    for origin, obj in jsonl_objects(path):
        if isinstance(obj, RecordError):
            handle_bad_record(obj, origin, on_error, skipped)
        elif (record := _record(obj, origin, on_error, skipped, image_root)) is not None:
            records.append(record)
    return records


def _decode_json_columns(row: dict) -> dict:
    """CSV stores nested data as JSON text: decode the columns that hold records' structure."""
    out = dict(row)
    for key in ("messages", "tools", "chat_template_kwargs"):
        value = out.get(key)
        if isinstance(value, str):
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError as e:
                raise RecordError(f'the "{key}" column is text but not valid JSON ({e.msg} at column {e.colno})') from None
        elif value is None and key != "messages":
            out.pop(key, None)  # columnar formats fill absent optional fields with null
    return out


def _read_with_datasets(path: Path, on_error: str, skipped: SkipCounter, image_root: Path) -> list[Record]:
    import datasets  # imported lazily: it is slow to import and JSONL needs none of it

    builder = {".json": "json", ".parquet": "parquet", ".csv": "csv"}[path.suffix]
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - pyarrow and datasets raise many kinds; all mean "cannot read this file"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShipyardError(f"{path}: cannot be read as {builder.upper()} ({first})") from None
    records = []
    for row_number, row in enumerate(table, start=1):
        origin = f"{path}:row {row_number}"
        try:
            obj = _decode_json_columns(row)
        except RecordError as e:
            handle_bad_record(e, origin, on_error, skipped)
            continue
        if (record := _record(obj, origin, on_error, skipped, image_root)) is not None:
            records.append(record)
    return records


def read_source(source: DataSource, on_error: str, skipped: SkipCounter, image_root: str | None = None
                ) -> list[Record]:
    """Records of one source; relative image paths resolve against `image_root`, else the file's folder."""
    if source.synthetic is not None:
        generate = synthetic.GENERATORS[source.synthetic]
        rows = generate(source.num_records, source.seed)
        return [normalise_record(r, f"synthetic:{source.synthetic}#{i}") for i, r in enumerate(rows)]
    path = Path(source.path).expanduser()
    if path.is_dir():
        raise ShipyardError(f"data file '{source.path}' is a directory; name a .jsonl, .json, .parquet or .csv file in it")
    if not path.is_file():
        raise ShipyardError(f"data file '{source.path}' does not exist (relative paths are read from {Path.cwd()})")
    root = Path(image_root).expanduser() if image_root else path.parent
    if path.suffix in (".json", ".parquet", ".csv"):
        return _read_with_datasets(path, on_error, skipped, root)
    return _read_jsonl(path, on_error, skipped, root)


def read_sources(sources: list[DataSource], on_error: str, skipped: SkipCounter, image_root: str | None = None
                 ) -> list[Record]:
    return [record for source in sources for record in read_source(source, on_error, skipped, image_root)]

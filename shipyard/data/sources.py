"""Read chat records from JSONL files, `datasets`-readable files, or a synthetic task.

A record is `{"messages": [{"role": ..., "content": ...}, ...]}` (OpenAI style).
A malformed record stops the run with `file:line` and the reason, unless the
recipe says `data.on_error: skip`; then it is counted and reported. A record
without an assistant turn has nothing to learn from: it is always skipped and
counted. Nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from shipyard.config import DataSource
from shipyard.data import synthetic
from shipyard.errors import ShipyardError

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Record:
    messages: list[dict]
    origin: str  # "file:line", shown in every error about this record


class SkipCounter(Counter):
    """Skipped records by reason; reported at the end of a run and in summary.json."""

    def report(self) -> dict:
        return {"total": sum(self.values()), **dict(sorted(self.items()))}


def _problem(obj: object) -> str | None:
    """Why `obj` is not a chat record, or None when it is one."""
    if not isinstance(obj, dict) or "messages" not in obj:
        return 'expected an object with a "messages" list, e.g. {"messages": [{"role": "user", "content": "hi"}, ...]}'
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty list'
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] is not an object"
        if m.get("role") not in ROLES:
            return f"messages[{i}].role is {m.get('role')!r}; expected one of {', '.join(ROLES)}"
        if not isinstance(m.get("content"), str):
            return f"messages[{i}].content must be a string (got {type(m.get('content')).__name__})"
    return None


def _check(obj: object, origin: str, on_error: str, skipped: SkipCounter) -> Record | None:
    problem = _problem(obj)
    if problem is not None:
        if on_error == "skip":
            skipped["malformed"] += 1
            return None
        raise ShipyardError(f"{origin}: {problem} (set data.on_error=skip to count and skip such records)")
    messages = [{"role": m["role"], "content": m["content"]} for m in obj["messages"]]
    if not any(m["role"] == "assistant" for m in messages):
        skipped["no_assistant_turn"] += 1
        return None
    return Record(messages, origin)


def _read_jsonl(path: Path, on_error: str, skipped: SkipCounter) -> list[Record]:
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            origin = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if on_error == "skip":
                    skipped["malformed"] += 1
                    continue
                raise ShipyardError(
                    f"{origin}: not valid JSON ({e.msg} at column {e.colno}); "
                    "each line must hold one JSON record (set data.on_error=skip to count and skip such lines)"
                ) from None
            if (record := _check(obj, origin, on_error, skipped)) is not None:
                records.append(record)
    return records


def _read_with_datasets(path: Path, on_error: str, skipped: SkipCounter) -> list[Record]:
    import datasets  # imported lazily: it is slow to import and JSONL needs none of it

    builder = {".json": "json", ".parquet": "parquet", ".csv": "csv"}[path.suffix]
    table = datasets.load_dataset(builder, data_files=str(path), split="train")
    records = []
    for i, row in enumerate(table):
        if isinstance(row.get("messages"), str):  # CSV stores nested data as JSON text
            try:
                row = {**row, "messages": json.loads(row["messages"])}
            except json.JSONDecodeError:
                pass
        if (record := _check(row, f"{path}:row {i}", on_error, skipped)) is not None:
            records.append(record)
    return records


def read_source(source: DataSource, on_error: str, skipped: SkipCounter) -> list[Record]:
    if source.synthetic is not None:
        generate = synthetic.GENERATORS[source.synthetic]
        rows = generate(source.num_records, source.seed)
        return [Record(r["messages"], f"synthetic:{source.synthetic}#{i}") for i, r in enumerate(rows)]
    path = Path(source.path).expanduser()
    if not path.is_file():
        raise ShipyardError(f"data file '{source.path}' does not exist (relative paths are read from {Path.cwd()})")
    if path.suffix in (".json", ".parquet", ".csv"):
        return _read_with_datasets(path, on_error, skipped)
    return _read_jsonl(path, on_error, skipped)


def read_sources(sources: list[DataSource], on_error: str, skipped: SkipCounter) -> list[Record]:
    return [record for source in sources for record in read_source(source, on_error, skipped)]

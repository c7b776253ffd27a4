"""Rows of a data source, read on demand: JSONL files, `datasets`-readable files, hub datasets, synthetic tasks.

A source is opened once (`open_source`) into a `Rows`: its length, a content
fingerprint (the token cache's key) and `records(indices)`, which reads just
those rows, converts their column layout (data/formats.py) and normalises them
(data/messages.py). Nothing holds a whole dataset in memory: JSONL is indexed by
line offsets and each row read on demand; `datasets` tables are memory-mapped
Arrow. That is what lets tokenizing processes each read their own share.

A malformed record stops the run with its origin (`file:line`, `file:row N`,
`org/name[split] row N`, 1-based) and the reason, unless the recipe says
`data.on_error: skip`; then it is counted and reported. A record without an
assistant turn has nothing to learn from: it is always skipped and counted.
Nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np

from shipyard.config import DataSource
from shipyard.data import synthetic
from shipyard.data.formats import Layout
from shipyard.data.messages import Record, RecordError, normalise_record
from shipyard.errors import ShipyardError

SKIP_HINT = "set data.on_error=skip to count and skip such records"
TABLE_BUILDERS = {".json": "json", ".parquet": "parquet", ".csv": "csv"}


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


def file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ------------------------------------------------------------------ one source's rows


class Rows:
    """The rows of one source; subclasses say how a row is found and where it came from."""

    def __init__(self, source: DataSource, image_root: Path | None):
        self.source, self.image_root = source, image_root
        self.layout = Layout(source.format, source.columns, source.describe())

    def __len__(self) -> int:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Changes whenever the rows do (the token cache is keyed by it)."""
        raise NotImplementedError

    def raw(self, indices: list[int]) -> list[tuple[str, object]]:
        """(origin, parsed row or the RecordError saying why it cannot be parsed) for each index."""
        raise NotImplementedError

    def records(self, indices: list[int], on_error: str, skipped: SkipCounter) -> list[Record | None]:
        """The normalised record of each index; None where it is skipped (counted in `skipped`)."""
        out: list[Record | None] = []
        for origin, row in self.raw(indices):
            try:
                if isinstance(row, RecordError):
                    raise row
                out.append(normalise_record(self.layout.convert(row), origin, self.image_root))
            except RecordError as e:
                handle_bad_record(e, origin, on_error, skipped)
                out.append(None)
        return out


class JsonlRows(Rows):
    """A JSONL file, indexed by the offsets of its non-blank lines (numpy over blocks of the file: no Python per line)."""

    def __init__(self, source: DataSource, path: Path, image_root: Path):
        super().__init__(source, image_root)
        self.path = path
        self.starts, self.ends, line_numbers = index_lines(path)
        keep = self.ends > self.starts  # blank lines were given an empty span
        self.starts, self.ends = self.starts[keep], self.ends[keep]
        self.linenos = line_numbers[keep]
        self._digest: str | None = None
        if source.format != "auto" or source.columns:  # check the named layout against the first parseable row
            first = next((row for _, row in self.raw(range(min(len(self), 50))) if isinstance(row, dict)), None)
            if first is not None:
                self.layout = self.layout.resolve(list(first))

    def __len__(self) -> int:
        return len(self.starts)

    def fingerprint(self) -> str:
        if self._digest is None:
            self._digest = file_digest(self.path)
        return self._digest

    def raw(self, indices) -> list[tuple[str, object]]:
        out = []
        with self.path.open("rb") as f:
            for i in indices:
                lineno = int(self.linenos[i])
                f.seek(int(self.starts[i]))
                line = f.read(int(self.ends[i] - self.starts[i]))
                origin = f"{self.path}:{lineno}"
                try:
                    out.append((origin, parse_line(line, lineno)))
                except RecordError as e:
                    out.append((origin, e))
        return out


class TableRows(Rows):
    """A `datasets` table: a .json/.parquet/.csv file, or a hub dataset's split from the Hugging Face cache."""

    def __init__(self, source: DataSource, table, origin: str, image_root: Path | None, digest: str):
        super().__init__(source, image_root)
        self.table, self.origin, self.digest = table, origin, digest
        self.layout = self.layout.resolve(list(table.column_names))

    def __len__(self) -> int:
        return len(self.table)

    def fingerprint(self) -> str:
        return self.digest

    def raw(self, indices) -> list[tuple[str, object]]:
        indices = list(indices)
        if not indices:
            return []
        columns = self.table[indices]  # one Arrow read for the whole chunk
        out = []
        for k, i in enumerate(indices):
            row = {name: values[k] for name, values in columns.items()}
            origin = f"{self.origin} {i + 1}"
            try:
                out.append((origin, decode_json_columns(row)))
            except RecordError as e:
                out.append((origin, e))
        return out


class SyntheticRows(Rows):
    """A built-in generated task: generated once per process (they are small), rows in memory."""

    def __init__(self, source: DataSource):
        super().__init__(source, None)
        self.rows = synthetic.GENERATORS[source.synthetic](source.num_records, source.seed)

    def __len__(self) -> int:
        return len(self.rows)

    def fingerprint(self) -> str:
        # The generators are code: their modules' source is part of what the rows are.
        code = b"".join(p.read_bytes() for p in sorted(Path(synthetic.__file__).parent.glob("synthetic*.py")))
        return hashlib.sha256(code + json.dumps(self.source.model_dump(), sort_keys=True).encode()).hexdigest()

    def raw(self, indices) -> list[tuple[str, object]]:
        return [(f"synthetic:{self.source.synthetic}#{i}", self.rows[i]) for i in indices]


# ------------------------------------------------------------------ parsing helpers


def parse_line(raw: bytes, lineno: int) -> object:
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


def index_lines(path: Path, block: int = 1 << 26) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end, line number) of every line of `path`, read in 64 MiB blocks; blank lines get start == end."""
    ends = []
    buffer = bytearray(block)  # read into one buffer: a memory map would count the whole file in this rank's RSS
    with path.open("rb", buffering=0) as f:
        size = f.seek(0, 2)
        f.seek(0)
        at = 0
        while n := f.readinto(buffer):
            ends.append(np.flatnonzero(np.frombuffer(buffer, np.uint8, n) == 10) + at)
            at += n
    ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    if size and (not len(ends) or ends[-1] != size - 1):
        ends = np.append(ends, size)  # a last line without its newline
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)[: len(ends)]
    ends = ends.astype(np.int64)
    short = np.flatnonzero(ends - starts <= 8)  # blank lines are few and short: look at those one by one
    if len(short):
        with path.open("rb") as f:
            for i in short:
                f.seek(int(starts[i]))
                if not f.read(int(ends[i] - starts[i])).strip():
                    ends[i] = starts[i]
    return starts, ends, np.arange(1, len(ends) + 1)


def jsonl_objects(path: Path):
    """(origin "file:line", parsed object or the RecordError saying why not) per non-blank line of `path`."""
    rows = JsonlRows(DataSource(path=str(path)), path, path.parent)
    for start in range(0, len(rows), 1000):
        yield from rows.raw(range(start, min(start + 1000, len(rows))))


def drop_nulls(row: dict) -> dict:
    """Columnar formats fill a row's absent optional fields with null; JSON records leave them out."""
    return {k: v for k, v in row.items() if v is not None or k == "messages"}


def decode_json_columns(row: dict) -> dict:
    """Tables (CSV always, JSON/Parquet sometimes) store nested data as JSON text: decode the columns that hold
    records' structure."""
    out = drop_nulls(row)
    for key in ("messages", "tools", "chat_template_kwargs", "conversations"):
        value = out.get(key)
        if isinstance(value, str):
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError as e:
                raise RecordError(f'the "{key}" column is text but not valid JSON ({e.msg} at column {e.colno})') from None
    return out


# ------------------------------------------------------------------ opening a source


def _load_table(dataset: str, failure: str, **kwargs):
    import datasets  # imported lazily: it is slow to import and JSONL needs none of it

    try:
        return datasets.load_dataset(dataset, **kwargs)
    except Exception as e:  # noqa: BLE001 - pyarrow, datasets and the hub raise many kinds; all mean "cannot read"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShipyardError(f"{failure} ({first})") from None


def open_hub_dataset(source: DataSource) -> TableRows:
    import os

    offline = " (HF_HUB_OFFLINE is set: only datasets already in the local cache, $HF_HOME/datasets, load)" \
        if os.environ.get("HF_HUB_OFFLINE") else ""
    table = _load_table(source.dataset, f"dataset {source.describe()}: cannot be loaded{offline}",
                        name=source.subset, split=source.split, revision=source.revision)
    subset = f"({source.subset})" if source.subset else ""
    # datasets' fingerprint names the exact Arrow files read (it changes with the revision and the split).
    digest = hashlib.sha256(f"{table._fingerprint}|{source.describe()}|{source.revision}".encode()).hexdigest()
    return TableRows(source, table, f"{source.dataset}[{source.split}]{subset} row", None, digest)


def open_source(source: DataSource, image_root: str | None = None) -> Rows:
    """The rows of one source; relative image paths resolve against `image_root`, else the file's folder."""
    if source.synthetic is not None:
        return SyntheticRows(source)
    if source.dataset is not None:
        return open_hub_dataset(source)
    path = Path(source.path).expanduser()
    if path.is_dir():
        raise ShipyardError(f"data file '{source.path}' is a directory; name a .jsonl, .json, .parquet or .csv file in it")
    if not path.is_file():
        hint = (f"; if it is a hub dataset id, write dataset: {source.path}" if "/" in source.path
                and not Path(source.path).suffix else "")
        raise ShipyardError(f"data file '{source.path}' does not exist (relative paths are read from {Path.cwd()}){hint}")
    root = Path(image_root).expanduser() if image_root else path.parent
    if path.suffix in TABLE_BUILDERS:
        builder = TABLE_BUILDERS[path.suffix]
        table = _load_table(builder, f"{path}: cannot be read as {builder.upper()}", data_files=str(path), split="train")
        return TableRows(source, table, f"{path}:row", root, file_digest(path))
    return JsonlRows(source, path, root)


def read_sources(sources: list[DataSource], on_error: str, skipped: SkipCounter, image_root: str | None = None
                 ) -> list[Record]:
    """Every record of `sources`, in order (small data: tests, tools; training reads through data/dataset.py)."""
    out = []
    for source in sources:
        rows = open_source(source, image_root)
        out.extend(r for r in rows.records(range(len(rows)), on_error, skipped) if r is not None)
    return out

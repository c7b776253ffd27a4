"""Tokenized samples on disk: flat token and label arrays with offsets, memory-mapped by every rank.

A cache directory holds one `SampleStore` per split (`train/`, `validation/`)
and `meta.json` (counts, skips, the records probes and evals need). It is
written under a temporary name and renamed into place with `meta.json` last
inside it, so a directory named by its key is always complete: a preparation
killed half-way leaves only a `.partial-*` folder that no run reads (and the
next build of that key removes). The key is a hash of everything that changes
the samples (data/dataset.py `cache_key`); change any of it and a new cache is
built next to the old one.

One process per node builds (local rank 0); the other ranks wait for the
directory to appear, then memory-map it. Memory does not grow with the data:
a rank holds the offsets (8 bytes per sample) and the pages the loader touches.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from shipyard.data.chat import Sample
from shipyard.errors import ShipyardError
from shipyard.fsutil import crash_point, write_text_atomic

log = logging.getLogger(__name__)

FORMAT = 1
COLUMNS = {"input_ids": np.int32, "labels": np.int32, "origin": np.uint8, "extra": np.uint8}


def cache_root(configured: str | None) -> Path:
    if configured:
        return Path(configured).expanduser()
    if env := os.environ.get("SHIPYARD_TOKEN_CACHE"):
        return Path(env).expanduser()
    return Path.home() / ".cache" / "shipyard" / "tokens"


# ------------------------------------------------------------------ one split's samples


class StoreWriter:
    """Appends samples to a store directory: each ragged column is a flat .bin file plus an offsets array."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.files = {name: (folder / f"{name}.bin").open("wb") for name in COLUMNS}
        self.offsets = {"input_ids": [0], "origin": [0], "extra": [0]}
        self.targets: list[np.ndarray] = []
        self.record: list[np.ndarray] = []

    def add(self, chunk: SampleChunk) -> None:
        """Append a chunk's samples (`tokenize` in data/dataset.py makes them)."""
        self.files["input_ids"].write(chunk.input_ids.tobytes())
        self.files["labels"].write(chunk.labels.tobytes())
        self.offsets["input_ids"].extend((self.offsets["input_ids"][-1] + np.cumsum(chunk.lengths)).tolist())
        for name, texts in (("origin", chunk.origins), ("extra", chunk.extras)):
            blobs = [t.encode() for t in texts]
            self.files[name].write(b"".join(blobs))
            self.offsets[name].extend((self.offsets[name][-1] + np.cumsum([len(b) for b in blobs], dtype=np.int64))
                                      .tolist() if blobs else [])
        self.targets.append(chunk.targets)
        self.record.append(chunk.record)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        for name, offsets in self.offsets.items():
            np.save(self.folder / f"{name}.offsets.npy", np.asarray(offsets, np.int64))
        np.save(self.folder / "targets.npy", np.concatenate(self.targets) if self.targets else np.zeros(0, np.int32))
        np.save(self.folder / "record.npy", np.concatenate(self.record) if self.record else np.zeros(0, np.int64))


class SampleChunk:
    """Samples of consecutive records, as flat arrays (what a tokenizing process hands back)."""

    def __init__(self, samples: list[Sample], record: list[int]):
        self.lengths = np.fromiter((len(s.input_ids) for s in samples), np.int64, len(samples))
        flat = lambda key: np.concatenate([np.asarray(getattr(s, key), np.int32) for s in samples]) if samples \
            else np.zeros(0, np.int32)  # noqa: E731
        self.input_ids, self.labels = flat("input_ids"), flat("labels")
        self.targets = np.fromiter((s.num_targets for s in samples), np.int32, len(samples))
        self.origins = [s.source for s in samples]
        self.extras = [json.dumps([list(s.turns), list(s.media)]) if s.turns or s.media else "" for s in samples]
        self.record = np.asarray(record, np.int64)  # each sample's record: its position in the split's rows


class SampleStore(Sequence):
    """A split's samples, memory-mapped: `store[i]` is a Sample with Python lists, as tokenizing made it."""

    def __init__(self, folder: Path):
        self.folder = folder
        off = {name: np.load(folder / f"{name}.offsets.npy") for name in ("input_ids", "origin", "extra")}
        self.offsets = off["input_ids"]
        self.text_offsets = {"origin": off["origin"], "extra": off["extra"]}
        self.columns = {name: self._map(folder / f"{name}.bin", dtype) for name, dtype in COLUMNS.items()}
        self.targets = np.load(folder / "targets.npy", mmap_mode="r")
        self.record = np.load(folder / "record.npy", mmap_mode="r")

    @staticmethod
    def _map(path: Path, dtype) -> np.ndarray:
        return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _text(self, name: str, i: int) -> str:
        start, end = self.text_offsets[name][i], self.text_offsets[name][i + 1]
        return self.columns[name][start:end].tobytes().decode()

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        extra = self._text("extra", i)
        turns, images = json.loads(extra) if extra else ([], [])
        return Sample(self.columns["input_ids"][start:end].tolist(), self.columns["labels"][start:end].tolist(),
                      self._text("origin", i), tuple(turns), tuple(images))

    def __eq__(self, other) -> bool:  # equal to a list of the same samples, as tokenizing in memory gives
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def num_targets(self) -> int:
        return int(np.asarray(self.targets, np.int64).sum())

    def token_ids(self) -> set[int]:
        """Every token id the samples use (read in blocks: the column can be larger than memory)."""
        ids = self.columns["input_ids"]
        used: set[int] = set()
        for at in range(0, len(ids), 1 << 24):
            used.update(np.unique(ids[at : at + (1 << 24)]).tolist())
        return used

    def answer_token_counts(self) -> dict[int, int]:
        """How often each token id is supervised (an answer token): an EAGLE-3 draft vocabulary's ranking."""
        ids, labels = self.columns["input_ids"], self.columns["labels"]
        counts: dict[int, int] = {}
        for at in range(0, len(ids), 1 << 24):
            block = ids[at : at + (1 << 24)][labels[at : at + (1 << 24)] >= 0]
            tokens, n = np.unique(block, return_counts=True)
            for t, c in zip(tokens.tolist(), n.tolist()):
                counts[t] = counts.get(t, 0) + c
        return counts

    def num_media(self) -> int:
        return sum(len(self[i].media) for i in range(len(self))) if self.text_offsets["extra"][-1] else 0


# ------------------------------------------------------------------ build once, publish atomically, share


def _alive(partial: Path) -> bool:
    """Whether the process building `partial` (named .KEY.partial-HOST-PID) is still running on this host."""
    host, _, pid = partial.name.rpartition(".partial-")[2].rpartition("-")
    if host != socket.gethostname():
        return True  # another node's build: not ours to judge
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def is_complete(folder: Path) -> bool:
    return (folder / "meta.json").is_file()


def build(final: Path, write: Callable[[Path], dict]) -> None:
    """Run `write(folder)` into a private folder and publish it as `final`; `write` returns meta.json's content."""
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{final.name}.partial-*"):
        if not _alive(stale):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed preparation: never read, removed now
    partial = root / f".{final.name}.partial-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        meta = write(partial)
        crash_point("token_cache_before_meta")
        write_text_atomic(partial / "meta.json", json.dumps({"format": FORMAT, **meta}))
        crash_point("token_cache_before_publish")
        try:
            partial.rename(final)
        except OSError:
            if not is_complete(final):  # another node published first; theirs is the same data
                raise
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def failure_note(final: Path) -> Path:
    return final.with_name(f".{final.name}.failed")


def open_or_build(final: Path, write: Callable[[Path], dict], builder: bool, say=print) -> tuple[dict, str]:
    """meta.json of the cache at `final` and how it came to be ("reused", "built", "built by local rank 0").

    The builder writes it when missing; other ranks wait for it. A builder that stops on bad data leaves a
    note with the error, which the waiting ranks raise too (the same message on every rank)."""
    if is_complete(final):
        return json.loads((final / "meta.json").read_text()), "reused"
    if builder:
        note = failure_note(final)
        note.unlink(missing_ok=True)
        try:
            build(final, write)
        except ShipyardError as e:
            final.parent.mkdir(parents=True, exist_ok=True)
            note.write_text(str(e))
            raise
        return json.loads((final / "meta.json").read_text()), "built"
    started, last_word = time.time(), time.time()
    note = failure_note(final)
    while not is_complete(final):
        if note.exists() and note.stat().st_mtime >= started - 1:
            raise ShipyardError(note.read_text())
        if time.time() - last_word > 60:
            say(f"data: waiting for local rank 0 to tokenize into {final} ({time.time() - started:.0f} s)")
            last_word = time.time()
        time.sleep(0.2)
    return json.loads((final / "meta.json").read_text()), "built by local rank 0"


def scratch_folder() -> Path:
    """A folder for samples that are not cached (data.cache=false, previews): removed when the process ends."""
    import atexit

    folder = Path(tempfile.mkdtemp(prefix="shipyard-samples-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder

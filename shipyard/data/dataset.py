"""From recipe data sources to tokenized training and validation samples, tokenized once and cached.

    sources (data/sources.py) -> validation carve and mixture (data/mixture.py) -> rows to tokenize
    -> tokenize in parallel processes, in order -> token cache (data/token_cache.py) -> memory-mapped samples

Everything is tokenized before the first step: errors surface before training,
counts are exact, and the training loop only indexes samples. The cache is keyed
by everything that changes the samples (`cache_key`), so a second run, a resume
or a preview of the same data reads it instead of tokenizing again; the samples
are the same as tokenizing in memory, in the same order, on any number of ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from shipyard.config import DataConfig
from shipyard.data import mixture, token_cache
from shipyard.data.chat import IGNORE_INDEX, Sample, tokenize_record
from shipyard.data.images import ImageEncoder
from shipyard.data.messages import Record, RecordError, shape_of, without_images
from shipyard.data.sources import Rows, SkipCounter, handle_bad_record, open_source
from shipyard.errors import ShipyardError

log = logging.getLogger(__name__)

CHUNK_RECORDS = 1000  # records per tokenizing task: small enough for an even spread, large enough to amortise
PARALLEL_FROM = 10_000  # records from which tokenizing uses every core by default
PROBE_RECORDS = 100  # the first kept training records remembered for probes (see export/probe.py)
MAX_SHAPES = 8


@dataclass
class Datasets:
    train: Sequence[Sample]
    validation: Sequence[Sample]
    validation_records: list[Record]  # raw dialogs, for generation evals
    train_records: list[Record] = field(default_factory=list)  # first kept training dialogs and one of each shape
    skipped: SkipCounter = field(default_factory=SkipCounter)
    truncated: int = 0
    turns: Counter = field(default_factory=Counter)  # what happened to each assistant turn (see data/chat.py)
    validation_origin: str = "none"  # where the validation set came from, said at start-up
    sources: list[dict] = field(default_factory=list)  # per training source: records, samples, supervised tokens
    cache: str = ""  # where the samples are and whether they were reused, said at start-up

    def turns_report(self) -> dict:
        return dict(sorted(self.turns.items()))


def fit_length(sample: Sample, max_length: int, policy: str, encoder: ImageEncoder | None) -> Sample | str:
    """The sample within max_length, or the reason it is skipped."""
    if len(sample.input_ids) <= max_length:
        return sample
    if policy == "drop":
        return "overlength"
    if encoder is not None and encoder.placeholder_id in sample.input_ids[max_length:]:
        return "overlength_cuts_image"  # an image's tokens must all be there, or its features have nowhere to go
    cut = Sample(sample.input_ids[:max_length], sample.labels[:max_length], sample.source, sample.turns, sample.media)
    return cut if cut.num_targets else "overlength_no_target_left"


def record_key(record: Record) -> str:
    return json.dumps([record.messages, record.tools, record.template_kwargs], sort_keys=True)


# ------------------------------------------------------------------ which rows


def plan_rows(cfg: DataConfig, train: list[Rows], validation: list[Rows], seed: int
              ) -> tuple[mixture.Selection, mixture.Selection, str]:
    """Training rows (after the validation carve and the mixture), validation rows, and where validation came from."""
    every = [np.arange(len(r), dtype=np.int64) for r in train]
    if validation:
        val = mixture.Selection(np.concatenate([np.full(len(r), i, np.int32) for i, r in enumerate(validation)]),
                                np.concatenate([np.arange(len(r), dtype=np.int64) for r in validation]))
        origin = f"{len(val)} records from {', '.join(s.describe() for s in cfg.validation)}"
        return mixture.select(cfg.train, every, seed), val, origin
    total = sum(len(r) for r in train)
    if cfg.validation_fraction <= 0 or not total:
        none = mixture.Selection(np.zeros(0, np.int32), np.zeros(0, np.int64))
        return mixture.select(cfg.train, every, seed), none, \
            "none (set data.validation or data.validation_fraction to measure validation loss)"
    order = list(range(total))
    random.Random(seed).shuffle(order)  # over all training rows in source order, as a concatenated list
    n_val = max(1, int(total * cfg.validation_fraction))
    carved = np.zeros(total, bool)
    carved[order[:n_val]] = True
    starts = np.cumsum([0] + [len(r) for r in train])
    val_source = np.concatenate([np.full(len(r), i, np.int32) for i, r in enumerate(train)])[carved]
    val_row = np.concatenate(every)[carved]
    kept = [rows[~carved[starts[i] : starts[i + 1]]] for i, rows in enumerate(every)]
    origin = f"{n_val} records carved from the training data (data.validation_fraction={cfg.validation_fraction})"
    return mixture.select(cfg.train, kept, seed), mixture.Selection(val_source, val_row), origin


# ------------------------------------------------------------------ tokenizing, in chunks of records


@dataclass
class TokenizeJob:
    """Everything a tokenizing process needs (it is pickled once per process)."""

    rows: list[Rows]
    selection: mixture.Selection
    tokenizer: PreTrainedTokenizerBase
    cfg: DataConfig
    stop_ids: list[int] | None
    encoder: ImageEncoder | None
    held_out: set[str]  # record keys of the validation set: identical training records are skipped
    keep_records: bool = False  # hand back the kept records (validation: generation evals need them)


@dataclass
class ChunkResult:
    samples: token_cache.SampleChunk
    skipped: SkipCounter
    turns: Counter
    truncated: int
    kept: list[int]  # positions of the first kept records (up to PROBE_RECORDS)
    shapes: dict  # shape -> position of its first kept record
    records: list[Record]  # kept records (only with keep_records)
    rows: int  # rows read
    keys: list[str] = field(default_factory=list)  # record_key of every readable record (only with keep_records)


def tokenize_chunk(job: TokenizeJob, start: int, stop: int) -> ChunkResult:
    """Samples of selection positions [start, stop), in order; the chunk's skip and turn counts."""
    cfg, skipped, turns = job.cfg, SkipCounter(), Counter()
    samples, positions, kept, shapes, records, keys, truncated = [], [], [], {}, [], [], 0
    source, row = job.selection.source[start:stop], job.selection.row[start:stop]
    at = 0
    while at < len(row):  # runs of one source: each is one read of its rows
        end = at + int(np.argmax(source[at:] != source[at])) if (source[at:] != source[at]).any() else len(row)
        read = job.rows[source[at]].records(row[at:end].tolist(), cfg.on_error, skipped)
        for offset, record in enumerate(read):
            position = start + at + offset
            if record is None:
                continue
            if job.keep_records:
                keys.append(record_key(record))
            if job.held_out and record_key(record) in job.held_out:
                skipped["duplicate_of_validation"] += 1
                continue
            if cfg.drop_images:  # after the held-out check: the same records as with images, minus the pixels
                record = without_images(record)
            try:
                out = tokenize_record(job.tokenizer, record, cfg.multi_turn, job.stop_ids, job.encoder)
            except RecordError as e:
                handle_bad_record(e, record.origin, cfg.on_error, skipped)
                continue
            turns.update(out.turns)
            if not out.samples:
                reasons = [r for r, _ in out.turns.most_common() if r != "supervised"]
                skipped[reasons[0] if reasons else "no_supervised_tokens"] += 1
                continue
            fitted = []
            for sample in out.samples:
                fit = fit_length(sample, cfg.max_length, cfg.overlength, job.encoder)
                if isinstance(fit, str):
                    skipped[fit] += 1
                    continue
                truncated += fit is not sample
                fitted.append(fit)
            if not fitted:
                continue
            samples.extend(fitted)
            positions.extend([position] * len(fitted))
            if len(kept) < PROBE_RECORDS:
                kept.append(position)
            shapes.setdefault(shape_of(record), position)
            if job.keep_records:
                records.append(record)
        at = end
    return ChunkResult(token_cache.SampleChunk(samples, positions), skipped, turns, truncated, kept, shapes,
                       records, stop - start, keys)


_JOB: TokenizeJob | None = None


def _start_worker(job: TokenizeJob) -> None:
    global _JOB
    _JOB = job


def _work(span: tuple[int, int]) -> ChunkResult:
    return tokenize_chunk(_JOB, *span)


def _num_proc(cfg: DataConfig, job: TokenizeJob) -> int:
    if cfg.num_proc is not None:
        return cfg.num_proc
    # Media encoders hold processors that are costly to ship to processes; synthetic tasks are small.
    plain = job.encoder is None and all(s.synthetic is None for s in cfg.train)
    return os.cpu_count() or 1 if plain and len(job.selection) >= PARALLEL_FROM else 1


def tokenize_into(job: TokenizeJob, folder: Path, num_proc: int = 1, label: str = "tokenize"):
    """Tokenize every selected row into a store at `folder`; yields nothing, returns the merged ChunkResult parts."""
    from tqdm import tqdm

    writer = token_cache.StoreWriter(folder)
    total = len(job.selection)
    spans = [(s, min(s + CHUNK_RECORDS, total)) for s in range(0, total, CHUNK_RECORDS)]
    merged = ChunkResult(None, SkipCounter(), Counter(), 0, [], {}, [], 0)
    bar = tqdm(total=total, desc=label, unit="rec", disable=total < PARALLEL_FROM, mininterval=2, file=sys.stderr,
               dynamic_ncols=True)

    def consume(part: ChunkResult) -> None:
        writer.add(part.samples)
        merged.skipped.update(part.skipped)
        merged.turns.update(part.turns)
        merged.truncated += part.truncated
        merged.kept.extend(part.kept[: PROBE_RECORDS - len(merged.kept)])
        for shape, position in part.shapes.items():
            merged.shapes.setdefault(shape, position)
        merged.records.extend(part.records)
        merged.keys.extend(part.keys)
        bar.update(part.rows)

    try:
        if num_proc > 1 and len(spans) > 1:
            # spawn, not fork: the parent may hold threads (torch, gloo) that a forked child would inherit broken.
            # An executor, not a Pool: a process that dies (out of memory) fails the build instead of hanging it.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(num_proc, context, _start_worker, (job,)) as pool:
                for part in pool.map(_work, spans):  # in order: samples come out as one process would make them
                    consume(part)
        else:
            for span in spans:
                consume(tokenize_chunk(job, *span))
    finally:
        bar.close()
    writer.close()
    return merged


# ------------------------------------------------------------------ the cache key


def _code_fingerprint() -> str:
    """The data package's source: a change in how samples are made must not reuse old samples."""
    here = Path(__file__).parent
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(here.glob("*.py")))).hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    parts = [type(tokenizer).__name__, vocab, repr(tokenizer.chat_template), repr(tokenizer.special_tokens_map),
             repr(sorted(tokenizer.get_added_vocab().items()))]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def encoder_fingerprint(encoder) -> str:
    if encoder is None:
        return "none"
    # ctc: whether batches carry transcripts for a CTC side loss; samples are the same either way
    settings = {k: repr(v) for k, v in vars(encoder).items() if k not in ("processor", "tokenizer", "ctc")}
    try:
        processor = encoder.processor.to_json_string()
    except Exception:  # noqa: BLE001 - a processor without a JSON form: its class and settings still count
        processor = type(encoder.processor).__name__
    return hashlib.sha256(json.dumps([type(encoder).__name__, settings, processor], sort_keys=True).encode()).hexdigest()


def cache_key(cfg: DataConfig, train: list[Rows], validation: list[Rows], seed: int, tokenizer,
              stop_ids: list[int] | None, encoder) -> tuple[str, dict]:
    """The cache's name and what it was made from (kept in meta.json, so a cache can be told apart by eye)."""
    made_from = {
        "format": token_cache.FORMAT,
        "code": _code_fingerprint(),
        "train": [{**r.source.model_dump(), "content": r.fingerprint()} for r in train],
        "validation": [{**r.source.model_dump(), "content": r.fingerprint()} for r in validation],
        "settings": cfg.model_dump(exclude={"train", "validation", "cache", "cache_dir", "num_proc", "packing"}),
        "seed": seed,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "stop_ids": stop_ids,
        "media": encoder_fingerprint(encoder),
    }
    digest = hashlib.sha256(json.dumps(made_from, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return digest, made_from


# ------------------------------------------------------------------ build and load


def _write(folder: Path, cfg: DataConfig, train_job: TokenizeJob, val: ChunkResult, val_origin: str,
           made_from: dict, require_train: bool) -> dict:
    """Tokenize training into `folder` (validation is there already); meta.json's content."""
    started = time.perf_counter()
    num_proc = _num_proc(cfg, train_job)
    train = tokenize_into(train_job, folder / "train", num_proc)
    skipped = SkipCounter(train.skipped + val.skipped)
    store = token_cache.SampleStore(folder / "train")
    if not len(store) and require_train:
        sources = ", ".join(s.describe() for s in cfg.train)
        raise ShipyardError(
            f"no training samples left in {sources}: skipped {skipped.report()}, assistant turns {dict(train.turns)}. "
            'Each record needs {"messages": [...]} with at least one assistant turn the chat template can render.'
        )
    # Probes need the first kept training dialogs and the first of each shape (export/probe.py make_probe).
    firsts = sorted(set(train.kept) | set(sorted(train.shapes.values())[:MAX_SHAPES]))
    probe_records = []
    for position in firsts:
        rows = train_job.rows[train_job.selection.source[position]]
        record = rows.records([int(train_job.selection.row[position])], "skip", SkipCounter())[0]
        probe_records.append(dataclasses.asdict(without_images(record) if cfg.drop_images else record))
    sel = train_job.selection
    sample_source = sel.source[np.asarray(store.record, np.int64)] if len(store) else np.zeros(0, np.int32)
    n = len(cfg.train)
    per_source = [
        {"source": s.describe(), "records": int(c), "samples": int(k), "supervised_tokens": int(t)}
        for s, c, k, t in zip(cfg.train, np.bincount(sel.source, minlength=n), np.bincount(sample_source, minlength=n),
                              np.bincount(sample_source, weights=np.asarray(store.targets, np.float64), minlength=n))
    ]
    return {
        "made_from": made_from, "skipped": dict(skipped), "turns": dict(train.turns),
        "truncated": train.truncated + val.truncated, "validation_origin": val_origin,
        "validation_records": [dataclasses.asdict(r) for r in val.records], "probe_records": probe_records,
        "sources": per_source, "seconds": round(time.perf_counter() - started, 1), "processes": num_proc,
    }


def _load(folder: Path, meta: dict, how: str, limit: int | None) -> Datasets:
    train = token_cache.SampleStore(folder / "train")
    validation = token_cache.SampleStore(folder / "validation")
    validation_records = [Record(**r) for r in meta["validation_records"]]
    if limit is not None:
        train = [train[int(i)] for i in np.flatnonzero(np.asarray(train.record) < limit)]
        validation, validation_records = [], []
    return Datasets(
        train, validation, validation_records, [Record(**r) for r in meta["probe_records"]],
        SkipCounter(meta["skipped"]), meta["truncated"], Counter(meta["turns"]), meta["validation_origin"],
        meta["sources"], f"{folder} ({how})",
    )


def build_datasets(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, limit: int | None = None,
                   stop_ids: list[int] | None = None, encoder: ImageEncoder | None = None) -> Datasets:
    """Read, split, mix and tokenize; or read the cache of an earlier run on the same data and settings.

    `limit` gives the samples of the first training records only (`shipyard data preview`: from the cache when
    there is one, else those records alone, uncached); `stop_ids` are the ids serving stops on (`eos_token_ids`);
    `encoder`: a multimodal model's processor."""
    train_rows = [open_source(s, cfg.image_root) for s in cfg.train]
    val_rows = [open_source(s, cfg.image_root) for s in cfg.validation]
    train_sel, val_sel, val_origin = plan_rows(cfg, train_rows, val_rows, seed)
    key, made_from = cache_key(cfg, train_rows, val_rows, seed, tokenizer, stop_ids, encoder)
    final = token_cache.cache_root(cfg.cache_dir) / key
    if cfg.cache and token_cache.is_complete(final):
        return _load(final, json.loads((final / "meta.json").read_text()), "reused", limit)

    def job(rows: list[Rows], selection: mixture.Selection, held_out: set[str], keep: bool) -> TokenizeJob:
        return TokenizeJob(rows, selection, tokenizer, cfg, stop_ids, encoder, held_out, keep)

    def write(folder: Path) -> dict:
        val = tokenize_into(job(val_rows or train_rows, val_sel, set(), True), folder / "validation")
        held_out = set(val.keys)  # held out means held out: training records identical to one are skipped
        selection = train_sel if limit is None else mixture.Selection(train_sel.source[:limit], train_sel.row[:limit])
        return _write(folder, cfg, job(train_rows, selection, held_out, False), val, val_origin, made_from,
                      require_train=limit is None)

    if limit is not None or not cfg.cache:
        folder = token_cache.scratch_folder() / "samples"
        token_cache.build(folder, write)
        return _load(folder, json.loads((folder / "meta.json").read_text()), "not cached", limit)
    builder = os.environ.get("LOCAL_RANK", "0") == "0"
    meta, how = token_cache.open_or_build(final, write, builder)
    return _load(final, meta, how, None)


def count_targets(samples: Sequence[Sample]) -> int:
    if isinstance(samples, token_cache.SampleStore):
        return samples.num_targets()
    return sum(sum(label != IGNORE_INDEX for label in s.labels) for s in samples)


def describe_sources(data: Datasets) -> str:
    """The start-up line on where the samples came from: per source (records, samples, supervised tokens), cache."""
    parts = [f"{s['source']}: {s['records']:,} records -> {s['samples']:,} samples, {s['supervised_tokens']:,} "
             "supervised tokens" for s in data.sources]
    return f"data sources: {'; '.join(parts)}; samples in {data.cache}"

"""From recipe data sources to tokenized training and validation samples.

Everything is tokenized up front: errors surface before the first step,
counts are exact, and the training loop only indexes lists.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from shipyard.config import DataConfig
from shipyard.data.chat import IGNORE_INDEX, Sample, tokenize_dialog
from shipyard.data.sources import Record, SkipCounter, read_sources
from shipyard.errors import ShipyardError

log = logging.getLogger(__name__)


@dataclass
class Datasets:
    train: list[Sample]
    validation: list[Sample]
    validation_records: list[Record]  # raw dialogs, for generation evals
    train_head: list[Record] = field(default_factory=list)  # the first training dialogs, for probes
    skipped: SkipCounter = field(default_factory=SkipCounter)
    truncated: int = 0


def _fit_length(sample: Sample, max_length: int, policy: str) -> Sample | None:
    if len(sample.input_ids) <= max_length:
        return sample
    if policy == "drop":
        return None
    cut = Sample(sample.input_ids[:max_length], sample.labels[:max_length])
    return cut if cut.num_targets else None


def tokenize_records(
    records: list[Record], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, skipped: SkipCounter
) -> tuple[list[Sample], list[Record], int]:
    samples, kept, truncated = [], [], 0
    for record in records:
        sample = tokenize_dialog(tokenizer, record)
        if not sample.num_targets:
            skipped["no_supervised_tokens"] += 1
            continue
        fitted = _fit_length(sample, cfg.max_length, cfg.overlength)
        if fitted is None:
            skipped["overlength" if cfg.overlength == "drop" else "overlength_no_target_left"] += 1
            continue
        truncated += fitted is not sample
        samples.append(fitted)
        kept.append(record)
    return samples, kept, truncated


def build_datasets(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> Datasets:
    skipped = SkipCounter()
    train_records = read_sources(cfg.train, cfg.on_error, skipped)
    val_records = read_sources(cfg.validation, cfg.on_error, skipped)
    if not val_records and cfg.validation_fraction > 0:
        order = list(range(len(train_records)))
        random.Random(seed).shuffle(order)
        n_val = max(1, int(len(order) * cfg.validation_fraction))
        val_ids = set(order[:n_val])
        val_records = [r for i, r in enumerate(train_records) if i in val_ids]
        train_records = [r for i, r in enumerate(train_records) if i not in val_ids]

    # Held-out means held out: a training record identical to a validation record is skipped (and counted).
    held_out = {json.dumps(r.messages, sort_keys=True) for r in val_records}
    if held_out:
        before = len(train_records)
        train_records = [r for r in train_records if json.dumps(r.messages, sort_keys=True) not in held_out]
        if before - len(train_records):
            skipped["duplicate_of_validation"] += before - len(train_records)

    train, train_kept, truncated = tokenize_records(train_records, tokenizer, cfg, skipped)
    validation, val_kept, val_truncated = tokenize_records(val_records, tokenizer, cfg, skipped)
    if not train:
        sources = ", ".join(s.describe() for s in cfg.train)
        raise ShipyardError(
            f"no training samples left in {sources}: skipped {skipped.report()}. "
            'Each record needs {"messages": [...]} with at least one assistant turn.'
        )
    return Datasets(train, validation, val_kept, train_kept[:64], skipped, truncated + val_truncated)


def count_targets(samples: list[Sample]) -> int:
    return sum(sum(label != IGNORE_INDEX for label in s.labels) for s in samples)

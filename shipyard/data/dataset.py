"""From recipe data sources to tokenized training and validation samples.

Everything is tokenized up front: errors surface before the first step,
counts are exact, and the training loop only indexes lists.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from shipyard.config import DataConfig
from shipyard.data.chat import IGNORE_INDEX, Sample, tokenize_record
from shipyard.data.images import ImageEncoder
from shipyard.data.messages import Record, RecordError, without_images
from shipyard.data.sources import SkipCounter, handle_bad_record, read_sources
from shipyard.errors import ShipyardError

log = logging.getLogger(__name__)


@dataclass
class Datasets:
    train: list[Sample]
    validation: list[Sample]
    validation_records: list[Record]  # raw dialogs, for generation evals
    train_records: list[Record] = field(default_factory=list)  # the training dialogs kept, in order (for probes)
    skipped: SkipCounter = field(default_factory=SkipCounter)
    truncated: int = 0
    turns: Counter = field(default_factory=Counter)  # what happened to each assistant turn (see data/chat.py)
    validation_origin: str = "none"  # where the validation set came from, said at start-up

    def turns_report(self) -> dict:
        return dict(sorted(self.turns.items()))


def _fit_length(sample: Sample, max_length: int, policy: str, encoder: ImageEncoder | None) -> Sample | str | None:
    """The sample within max_length, or the reason it is skipped."""
    if len(sample.input_ids) <= max_length:
        return sample
    if policy == "drop":
        return "overlength"
    if encoder is not None and encoder.placeholder_id in sample.input_ids[max_length:]:
        return "overlength_cuts_image"  # an image's tokens must all be there, or its features have nowhere to go
    cut = Sample(sample.input_ids[:max_length], sample.labels[:max_length], sample.source, sample.turns, sample.images)
    return cut if cut.num_targets else "overlength_no_target_left"


def tokenize_records(
    records: list[Record], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, skipped: SkipCounter,
    turns: Counter | None = None, stop_ids: list[int] | None = None, encoder: ImageEncoder | None = None,
) -> tuple[list[Sample], list[Record], int]:
    """Samples of `records` in order, the records that gave at least one, and how many samples were truncated."""
    samples, kept, truncated = [], [], 0
    turns = Counter() if turns is None else turns
    for record in records:
        try:
            out = tokenize_record(tokenizer, record, cfg.multi_turn, stop_ids, encoder)
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
            fit = _fit_length(sample, cfg.max_length, cfg.overlength, encoder)
            if isinstance(fit, str):
                skipped[fit] += 1
                continue
            truncated += fit is not sample
            fitted.append(fit)
        if fitted:
            samples.extend(fitted)
            kept.append(record)
    return samples, kept, truncated


def _split_validation(cfg: DataConfig, train_records: list[Record], val_records: list[Record], seed: int):
    if val_records:
        return train_records, val_records, f"{len(val_records)} records from {', '.join(s.describe() for s in cfg.validation)}"
    if cfg.validation_fraction <= 0 or not train_records:
        return train_records, [], "none (set data.validation or data.validation_fraction to measure validation loss)"
    order = list(range(len(train_records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(len(order) * cfg.validation_fraction))
    val_ids = set(order[:n_val])
    val = [r for i, r in enumerate(train_records) if i in val_ids]
    train = [r for i, r in enumerate(train_records) if i not in val_ids]
    return train, val, f"{n_val} records carved from the training data (data.validation_fraction={cfg.validation_fraction})"


def _key(record: Record) -> str:
    return json.dumps([record.messages, record.tools, record.template_kwargs], sort_keys=True)


def build_datasets(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, limit: int | None = None,
                   stop_ids: list[int] | None = None, encoder: ImageEncoder | None = None) -> Datasets:
    """Read, split and tokenize. `limit` tokenizes only the first training records (`shipyard data preview`);
    `stop_ids` are the ids serving stops on (`eos_token_ids`); `encoder`: a vision-language model's processor."""
    skipped = SkipCounter()
    train_records, val_records, val_origin = _split_validation(
        cfg, read_sources(cfg.train, cfg.on_error, skipped, cfg.image_root),
        read_sources(cfg.validation, cfg.on_error, skipped, cfg.image_root), seed
    )
    # Held-out means held out: a training record identical to a validation record is skipped (and counted).
    held_out = {_key(r) for r in val_records}
    if held_out:
        before = len(train_records)
        train_records = [r for r in train_records if _key(r) not in held_out]
        if before - len(train_records):
            skipped["duplicate_of_validation"] += before - len(train_records)
    if limit is not None:
        train_records, val_records = train_records[:limit], []
    if cfg.drop_images:  # after the held-out check: the same records as with images, minus the pixels
        train_records, val_records = [without_images(r) for r in train_records], [without_images(r) for r in val_records]

    turns: Counter = Counter()
    train, train_kept, truncated = tokenize_records(train_records, tokenizer, cfg, skipped, turns, stop_ids, encoder)
    validation, val_kept, val_truncated = tokenize_records(val_records, tokenizer, cfg, skipped, stop_ids=stop_ids,
                                                           encoder=encoder)
    if not train and limit is None:
        sources = ", ".join(s.describe() for s in cfg.train)
        raise ShipyardError(
            f"no training samples left in {sources}: skipped {skipped.report()}, assistant turns {dict(turns)}. "
            'Each record needs {"messages": [...]} with at least one assistant turn the chat template can render.'
        )
    return Datasets(train, validation, val_kept, train_kept, skipped, truncated + val_truncated, turns, val_origin)


def count_targets(samples: list[Sample]) -> int:
    return sum(sum(label != IGNORE_INDEX for label in s.labels) for s in samples)

"""Which rows of each training source make the training set: all of them, or a mixture's share.

Per source, at most one of:

- `epochs: E`      round(E x rows) records: 0.3 takes a seeded 30%, 2 takes every row twice;
- `num_samples: N` exactly N records (a seeded subset, or whole passes plus a seeded remainder);
- `weight: W`      the weighted sources share the sum of their rows in proportion to their weights.

A subset keeps file order (the loader shuffles), so a source without a mixture
setting gives exactly its rows in order, and a mixture is the same for a seed on
any number of ranks: it is decided before any rank-specific step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shipyard.config import DataSource


@dataclass
class Selection:
    """Rows to read, in training order: parallel arrays of source index and row index."""

    source: np.ndarray  # int32
    row: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.row)


def _take(rows: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` of `rows`: whole passes, then a seeded subset of the rest, each in the order given."""
    passes, rest = divmod(count, len(rows)) if len(rows) else (0, 0)
    subset = np.sort(rng.choice(len(rows), size=rest, replace=False)) if rest else np.zeros(0, np.int64)
    return np.concatenate([np.tile(rows, passes), rows[subset]])


def target_counts(sources: list[DataSource], available: list[int]) -> list[int]:
    """Records each source contributes, from its mixture setting and its available rows."""
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    pool = sum(available[i] for i in weighted)
    total_weight = sum(sources[i].weight for i in weighted)
    counts = []
    for s, n in zip(sources, available):
        if s.num_samples is not None:
            counts.append(s.num_samples)
        elif s.epochs is not None:
            counts.append(round(s.epochs * n))
        elif s.weight is not None:
            counts.append(round(pool * s.weight / total_weight))
        else:
            counts.append(n)
    return counts


def select(sources: list[DataSource], rows: list[np.ndarray], seed: int) -> Selection:
    """The training rows of each source (`rows[i]`: row indices still available in source i, e.g. after a
    validation carve), concatenated in source order."""
    counts = target_counts(sources, [len(r) for r in rows])
    parts_source, parts_row = [], []
    for i, (s, available, count) in enumerate(zip(sources, rows, counts)):
        if count and not len(available):
            continue  # an empty source contributes nothing, whatever its share
        chosen = available if count == len(available) else _take(available, count, np.random.default_rng([seed, i]))
        parts_source.append(np.full(len(chosen), i, np.int32))
        parts_row.append(chosen.astype(np.int64))
    if not parts_row:
        return Selection(np.zeros(0, np.int32), np.zeros(0, np.int64))
    return Selection(np.concatenate(parts_source), np.concatenate(parts_row))


"""Deterministic, resumable batches whose content does not depend on the world size.

Each optimizer step consumes the next `global_batch` indices of a stream made
of per-epoch permutations (seeded). Rank r takes the r-th contiguous slice and
splits it into micro-batches. The same global batch is therefore seen by a
1-rank and a 2-rank run, and the loader's whole state is one integer, the
number of samples consumed, which resumes on any world size.

The data is tokenized in memory, so a plain index stream replaces a
DataLoader with workers: nothing here needs a worker process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shipyard.data.chat import IGNORE_INDEX, Sample
from shipyard.data.images import ImageEncoder


@dataclass
class BatchPlan:
    global_batch: int  # samples per optimizer step, all ranks together
    micro_batch_size: int
    grad_accum_steps: int
    dp_rank: int = 0
    dp_size: int = 1

    def __post_init__(self) -> None:
        assert self.global_batch == self.micro_batch_size * self.grad_accum_steps * self.dp_size


class IndexStream:
    """An endless stream of sample indices: epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self._epoch, self._order = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def take(self, start: int, count: int) -> list[int]:
        out = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, self.num_samples)
            if epoch != self._epoch:
                self._epoch, self._order = epoch, self._permutation(epoch)
            out.append(int(self._order[offset]))
        return out


class StepBatches:
    """Yields, per optimizer step, this rank's micro-batches; state is `samples_consumed`.

    With `pack_length`, each micro-batch's samples are packed into rows of at most that many tokens
    (the same samples as unpacked: packing changes the layout, not what a step learns from).
    """

    def __init__(self, samples: list[Sample], plan: BatchPlan, seed: int, pad_id: int, pack_length: int | None = None,
                 encoder: ImageEncoder | None = None, image_chunk_rows: int | None = None):
        self.samples, self.plan, self.pad_id, self.pack_length = samples, plan, pad_id, pack_length
        self.encoder, self.image_chunk_rows = encoder, image_chunk_rows
        self.stream = IndexStream(len(samples), seed)
        self.samples_consumed = 0

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        p = self.plan
        indices = self.stream.take(self.samples_consumed, p.global_batch)
        self.samples_consumed += p.global_batch
        per_rank = p.micro_batch_size * p.grad_accum_steps
        mine = indices[p.dp_rank * per_rank : (p.dp_rank + 1) * per_rank]
        groups = [[self.samples[i] for i in mine[k : k + p.micro_batch_size]] for k in range(0, per_rank, p.micro_batch_size)]
        if self.pack_length:
            return [pack(group, self.pad_id, self.pack_length) for group in groups]
        return [collate(group, self.pad_id, self.encoder, self.image_chunk_rows) for group in groups]

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed}

    def load_state_dict(self, state: dict) -> None:
        self.samples_consumed = int(state["samples_consumed"])

    @property
    def epoch(self) -> float:
        return self.samples_consumed / len(self.samples)


def collate(samples: list[Sample], pad_id: int, encoder: ImageEncoder | None = None,
            image_chunk_rows: int | None = None) -> dict:
    """Right-pad to the longest sample; padding is masked out of attention and loss.

    With `encoder` (vision-language models), the pixel inputs of the batch's images in id order, and the
    token-type ids marking image positions. With `image_chunk_rows` (pipeline parallelism), the pixel inputs
    of each group of that many rows instead, as the list `image_chunks`: one per pipeline micro-batch."""
    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if encoder is not None and image_chunk_rows:
        groups = [samples[k : k + image_chunk_rows] for k in range(0, len(samples), image_chunk_rows)]
        batch["image_chunks"] = [encoder.media_inputs([ref for s in group for ref in s.media]) for group in groups]
        batch.update(encoder.type_ids(input_ids))
    elif encoder is not None:
        batch.update(encoder.media_inputs([ref for s in samples for ref in s.media]))
        if "pixel_values" in batch:
            batch.update(encoder.type_ids(input_ids))
        if "input_features" in batch:  # a speech-LM: its clips' transcripts, when it trains with a CTC side loss
            batch.update(encoder.ctc_targets(samples))
    return batch


def pack(samples: list[Sample], pad_id: int, row_length: int) -> dict[str, torch.Tensor]:
    """Pack samples into rows of at most `row_length` tokens (first fit, longest first).

    Positions restart at 0 for every document; with no attention mask, transformers turns those
    resets into a block-diagonal causal mask (varlen kernels with flash attention), so documents do
    not see each other. A document's first label is ignored: the last token of the previous document
    must not learn to predict it. The row tail is padding: a document of its own, supervising nothing.
    """
    rows: list[list[Sample]] = []
    free: list[int] = []
    for s in sorted(samples, key=lambda s: len(s.input_ids), reverse=True):
        slot = next((i for i, room in enumerate(free) if room >= len(s.input_ids)), None)
        if slot is None:
            rows.append([])
            free.append(row_length)
            slot = len(rows) - 1
        rows[slot].append(s)
        free[slot] -= len(s.input_ids)
    width = max(row_length - room for room in free)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # for counting tokens; not given to the model
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            n = len(s.input_ids)
            input_ids[r, at : at + n] = torch.tensor(s.input_ids)
            labels[r, at + 1 : at + n] = torch.tensor(s.labels[1:])
            position_ids[r, at : at + n] = torch.arange(n)
            attention_mask[r, at : at + n] = 1
            at += n
        position_ids[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": attention_mask}


def eval_batches(samples: list[Sample], batch_size: int, pad_id: int, dp_rank: int = 0, dp_size: int = 1,
                 encoder: ImageEncoder | None = None, image_chunk_rows: int | None = None):
    """Validation micro-batches for one rank: a strided share of the samples, in order.

    Every rank yields the same number of batches (sharded models run collectives in each forward); a rank
    whose share ran out gets a batch of one sample with no supervised token, which adds nothing to the loss.
    """
    mine = samples[dp_rank::dp_size]
    per_rank = -(-len(samples) // dp_size)
    for k in range(0, per_rank, batch_size):
        chunk = mine[k : k + batch_size]
        if not chunk:
            chunk = [Sample(samples[0].input_ids, [IGNORE_INDEX] * len(samples[0].input_ids), media=samples[0].media)]
        yield collate(chunk, pad_id, encoder, image_chunk_rows)


def supervised_tokens(batches, ahead: int = 0) -> int:
    """Supervised next-token targets; `ahead` k: targets of MTP depth k (token t + k + 1 from position t)."""
    return sum(int((b["labels"][:, 1 + ahead:] != IGNORE_INDEX).sum()) for b in batches)

"""The acceptance replay: how many drafted tokens serving's speculative decoding would accept, counted offline.

One copy for every drafter and every caller: an MTP head's evaluation during training (train/loss.py), the
DFlash drafter's (train/dflash.py), and `verify`'s re-count of vLLM's answers for both (verify/speculative.py,
verify/drafter.py). A drafter's tokens are given as a table `drafted[j - 1][m - 1]`: the token depth j drafts
for position m + j after the target step that produced token m; `replay_drafts` walks serving's decoding loop
over it. The callers differ only in where the table and the correct tokens come from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shipyard.data.parts import IGNORE_INDEX


def greedy_tokens(model, hidden: torch.Tensor) -> torch.Tensor:
    """Argmax token of the LM head at every row of `hidden` [B, T, H] (logit transforms do not move an argmax)."""
    head = model.get_output_embeddings()
    return torch.stack([F.linear(row, head.weight, head.bias).argmax(-1) for row in hidden])


def answer_spans(labels: list[int]) -> list[tuple[int, int]]:
    """(first, last) positions of each run of supervised labels: the answers."""
    spans, t = [], 0
    while t < len(labels):
        if labels[t] == IGNORE_INDEX:
            t += 1
            continue
        end = t
        while end + 1 < len(labels) and labels[end + 1] != IGNORE_INDEX:
            end += 1
        spans.append((t, end))
        t = end + 1
    return spans


def replay_drafts(drafted: list[list[int]], correct: list[int], start: int, end: int, accepted: list[int],
                  reach: int | None = None) -> int:
    """Replay serving's decoding loop over the answer at positions start..end; returns how many drafts were made.

    After the step that produced token m (the first comes from the prompt), depth j drafts the token at m + j
    from position m - 1 (`drafted[j - 1][m - 1]`). Drafts are accepted while they equal `correct` (the token at
    each position), and only inside the answer (`accepted[j - 1]` counts depth j's); the next step starts after
    the accepted drafts and the target's own token. `reach` > end also counts drafts accepted past the answer's
    end (against `correct`'s continuation there), as vLLM's raw counters do.
    """
    reach = end if reach is None else reach
    drafts, m = 0, start
    while m < end:
        drafts += 1
        ok = 0
        for j in range(1, len(drafted) + 1):
            if m + j > reach or m - 1 >= len(drafted[j - 1]) or drafted[j - 1][m - 1] != correct[m + j]:
                break
            ok += 1
        for j in range(ok):
            accepted[j] += 1
        m += ok + 1
    return drafts


def block_table(blocks: dict[int, list[int]], block_size: int, length: int) -> list[list[int]]:
    """A DFlash drafter's table for `replay_drafts`: slot j of the block anchored at position m drafts the token
    at m + j (`blocks[m][j]`); -1 (never accepted) where no block is anchored at m. Positions 1..length."""
    return [[blocks.get(m, [-1] * block_size)[j] for m in range(1, length + 1)] for j in range(1, block_size)]


def perfect_table(correct: list[int], depths: int, length: int) -> list[list[int]]:
    """A perfect drafter's table (the ceiling): the correct token at every m + j, -1 past the end."""
    return [[correct[m + j] if m + j < len(correct) else -1 for m in range(1, length + 1)]
            for j in range(1, depths + 1)]


def mtp_drafts(model, outputs: list[torch.Tensor]) -> list[list[list[int]]]:
    """An MTP head's drafts: `drafted[j - 1][b][t]`, depth j's greedy token for position t + j + 1 of row b, from
    its final-normed states per depth (models/mtp.py `mtp_outputs`)."""
    return [greedy_tokens(model, out).tolist() for out in outputs]


def mtp_acceptance(model, hidden: torch.Tensor, outputs: list[torch.Tensor], labels: torch.Tensor
                   ) -> tuple[list[int], int]:
    """(accepted drafts per depth, drafts) over each answer (a run of supervised `labels`), with the base's
    greedy tokens (from its final hidden states `hidden`) as correct: where the base reproduces the answers,
    this is what vLLM counts (verify/speculative.py replays those)."""
    base = greedy_tokens(model, hidden[:, :-1]).tolist()  # base[b][t]: the base's greedy token for position t + 1
    drafted = mtp_drafts(model, outputs)
    accepted, drafts = [0] * len(outputs), 0
    for b, row in enumerate(labels.tolist()):
        correct = [-1] + base[b]
        for start, end in answer_spans(row):
            drafts += replay_drafts([d[b] for d in drafted], correct, max(start, 1), end, accepted)
    return accepted, drafts


def acceptance_per_position(accepted: list[int], drafts: int) -> list[float]:
    """The share of drafts whose tokens 1..j were all accepted, per depth j."""
    return [a / max(drafts, 1) for a in accepted]


def mean_acceptance_length(accepted: list[int], drafts: int) -> float:
    """tau: tokens per target step (the target's own token and the accepted drafts)."""
    return 1 + sum(accepted) / max(drafts, 1)

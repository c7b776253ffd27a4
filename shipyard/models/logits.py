"""The LM head's logits as a loss sees them: per-architecture transforms, and cross-entropy a chunk at a time.

Used wherever a loss is taken at the head: the training losses (train/loss.py, the DFlash drafter's) and the
last pipeline stage (parallel/pipeline.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def logit_transform(config) -> tuple[float | None, float | None]:
    """(scale, softcap) that some architectures apply to logits (Cohere, Gemma 2/3)."""
    scale = getattr(config, "logit_scale", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    return scale, softcap


def _chunk_loss(hidden, weight, bias, targets, scale, softcap) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Sum of CE over rows of `hidden` [N, H] against `targets` [N]; logits exist one chunk at a time."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, h, weight, bias, t, scale, softcap, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, weight, bias, t, scale, softcap)
    return total

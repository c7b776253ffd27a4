"""Token-level cross-entropy without materialising the logits of the whole batch.

The Hugging Face forward runs unchanged (so FSDP2's root hooks, compile and
activation checkpointing behave as usual), except that a forward pre-hook on
the LM head captures the final hidden states and hands the head an empty
slice. The loss then projects only supervised positions, a chunk at a time,
recomputing each chunk's logits in backward instead of storing them: peak
logits memory is `chunk_size × vocab` instead of `batch × seq × vocab` in fp32.

The function returns the *sum* of token losses and the token count; the
training loop divides by the number of supervised tokens in the whole global
batch, which makes gradient accumulation and data parallelism exact.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from shipyard.data.chat import IGNORE_INDEX


@contextmanager
def capture_lm_head_input(model: torch.nn.Module):
    """Inside the block, `captured["hidden"]` receives the LM head's input; the head sees none of it."""
    head = model.get_output_embeddings()
    captured: dict[str, torch.Tensor] = {}

    def pre_hook(_module, args):
        captured["hidden"] = args[0]
        return (args[0][..., :0, :],)  # logits for zero positions: the loss projects what it needs

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield captured
    finally:
        handle.remove()


def _logit_transform(config) -> tuple[float | None, float | None]:
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


@torch.no_grad()
def isolates_packed_documents(model: torch.nn.Module, vocab_size: int) -> bool:
    """Does `model` keep packed documents apart when given position resets (and no attention mask)?

    Two random documents, run apart and packed into one row: the second one's logits must not change.
    Models whose attention ignores the reset (no packed-sequence support) fail this and are not packed.
    """
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    a = torch.randint(0, vocab_size, (1, 7), generator=g).to(device)
    b = torch.randint(0, vocab_size, (1, 5), generator=g).to(device)
    alone = model(input_ids=b, use_cache=False).logits[0].float()
    positions = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0).to(device)
    packed = model(input_ids=torch.cat([a, b], dim=1), position_ids=positions, use_cache=False).logits[0, 7:].float()
    model.train(was_training)
    return bool(torch.allclose(packed, alone, rtol=1e-3, atol=1e-3 * float(alone.abs().max())))


# Batch keys that are not model inputs, or are given only in some cases (packing).
_NOT_INPUTS = ("labels", "attention_mask", "position_ids")


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int,
                   blank_image: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, int]:
    """(sum of next-token losses over supervised positions, number of those positions).

    Image inputs in the batch (pixel_values, image_grid_thw, mm_token_type_ids...) go to the model as they are;
    a vision-language model given a batch without images runs its vision tower on `blank_image` instead
    (see models/vision.py: every rank runs the same modules)."""
    from shipyard.models.vision import vision_on_blank_image

    inputs = {k: v for k, v in batch.items() if k not in _NOT_INPUTS}
    with capture_lm_head_input(model) as captured, \
            vision_on_blank_image(model, blank_image, active="pixel_values" not in batch):
        if "position_ids" in batch:  # packed rows: documents are separated by position resets, not by a mask
            model(**inputs, position_ids=batch["position_ids"], use_cache=False)
        else:
            model(**inputs, attention_mask=batch["attention_mask"], use_cache=False)
    hidden = captured["hidden"][:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[keep], targets[keep]
    head = model.get_output_embeddings()
    scale, softcap = _logit_transform(model.config.get_text_config())
    loss = chunked_cross_entropy(hidden, head.weight, targets, chunk_size, head.bias, scale, softcap)
    return loss, int(keep.sum())

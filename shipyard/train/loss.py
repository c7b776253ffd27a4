"""Token-level cross-entropy without materialising the logits of the whole batch.

The Hugging Face forward runs unchanged (so FSDP2's root hooks, compile and
activation checkpointing behave as usual), except that a forward pre-hook on
the LM head captures the final hidden states and hands the head an empty
slice. The loss then projects only supervised positions, a chunk at a time,
recomputing each chunk's logits in backward instead of storing them (models/logits.py): peak
logits memory is `chunk_size × vocab` instead of `batch × seq × vocab` in fp32.

The function returns the *sum* of token losses and the token count; the
training loop divides by the number of supervised tokens in the whole global
batch, which makes gradient accumulation and data parallelism exact.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from shipyard.data.parts import IGNORE_INDEX
from shipyard.models.logits import chunked_cross_entropy, logit_transform
from shipyard.models.mtp import mtp_outputs
from shipyard.models.structure import final_norm_of
from shipyard.models.vision import vision_on_blank_image
from shipyard.speculative.acceptance import mtp_acceptance


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


# Batch keys that carry images or clips: a batch without them runs the media tower on the blank input instead.
MEDIA_KEYS = frozenset({"pixel_values", "input_features"})
# Batch keys that are not model inputs, or are given only in some cases (packing).
_NOT_INPUTS = ("labels", "attention_mask", "position_ids")


def forward_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor], blank_image, pre_norm: bool = False
                   ) -> dict[str, torch.Tensor]:
    """Run the model; returns the LM head's input ("hidden") and, with `pre_norm`, the final norm's ("pre_norm")."""
    inputs = {k: v for k, v in batch.items() if k not in _NOT_INPUTS}
    with capture_lm_head_input(model) as captured, capture_final_norm_input(model, pre_norm) as pre, \
            vision_on_blank_image(model, blank_image, active=not MEDIA_KEYS.intersection(batch)):
        if "position_ids" in batch:  # packed rows: documents are separated by position resets, not by a mask
            out = model(**inputs, position_ids=batch["position_ids"], use_cache=False)
        else:
            out = model(**inputs, attention_mask=batch["attention_mask"], use_cache=False)
    aux = {"ctc_loss": out.ctc_loss} if getattr(out, "ctc_loss", None) is not None else {}
    return {**captured, **pre, **aux}


def with_side_losses(model: torch.nn.Module, loss: torch.Tensor, captured: dict) -> torch.Tensor:
    """The summed next-token loss plus a speech-LM's CTC side loss (summed over clips, weighted by the config's
    `ctc_loss_weight`), so both are normalised by the same count of supervised tokens."""
    if "ctc_loss" not in captured:
        return loss
    return loss + model.config.ctc_loss_weight * captured["ctc_loss"]


@contextmanager
def capture_final_norm_input(model: torch.nn.Module, active: bool):
    """Inside the block (when `active`), `captured["pre_norm"]` receives the final norm's input."""
    captured: dict[str, torch.Tensor] = {}
    if not active:
        yield captured
        return
    handle = final_norm_of(model).register_forward_pre_hook(lambda _m, args: captured.__setitem__("pre_norm", args[0]))
    try:
        yield captured
    finally:
        handle.remove()


def _supervised_loss(model, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, int]:
    """Sum of CE of `hidden` [B, T, H] against `targets` [B, T] over supervised positions, and their count."""
    keep = targets != IGNORE_INDEX
    head = model.get_output_embeddings()
    scale, softcap = logit_transform(model.config.get_text_config())
    loss = chunked_cross_entropy(hidden[keep], head.weight, targets[keep], chunk_size, head.bias, scale, softcap)
    return loss, int(keep.sum())


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int,
                   blank_image: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, int]:
    """(sum of next-token losses over supervised positions, number of those positions).

    Image inputs in the batch (pixel_values, image_grid_thw, mm_token_type_ids...) go to the model as they are;
    a vision-language model given a batch without images runs its vision tower on `blank_image` instead
    (see models/vision.py: every rank runs the same modules)."""
    captured = forward_hidden(model, batch, blank_image)
    loss, count = _supervised_loss(model, captured["hidden"][:, :-1], batch["labels"][:, 1:], chunk_size)
    return with_side_losses(model, loss, captured), count


@dataclass
class MTPLosses:
    main: torch.Tensor  # summed next-token loss of the base
    depths: list[torch.Tensor]  # per MTP depth k: summed loss of predicting token t + k + 1
    accepted: list[int] | None = None  # evaluation: per depth, drafts whose tokens 1..k all equal the base's greedy
    drafts: int = 0  # evaluation: decoding steps that drafted (replayed over the answers)


def mtp_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int, acceptance: bool = False) -> MTPLosses:
    """The base's loss and each MTP depth's, from one forward of the base (models/mtp.py describes the head).

    With `acceptance`, also counts the offline acceptance serving would see (speculative/acceptance.py): drafts are
    accepted while they equal the base's greedy tokens, counted only inside the answers.
    """
    captured = forward_hidden(model, batch, None, pre_norm=True)
    labels = batch["labels"]
    main, _ = _supervised_loss(model, captured["hidden"][:, :-1], labels[:, 1:], chunk_size)
    main = with_side_losses(model, main, captured)
    outputs = mtp_outputs(model, captured.get("pre_norm"), captured["hidden"], batch["input_ids"],
                          batch["attention_mask"])
    depths = []
    for k, out in enumerate(outputs, start=1):
        summed, _ = _supervised_loss(model, out[:, :-1], labels[:, k + 1:], chunk_size)
        depths.append(summed)
    result = MTPLosses(main, depths)
    if acceptance:
        with torch.no_grad():
            result.accepted, result.drafts = mtp_acceptance(model, captured["hidden"], outputs, labels)
    return result

"""Multi-token-prediction (MTP) heads, DeepSeek-V3 style, attached to any causal LM shipyard trains.

Depth k (1..D) at position t combines what depth k-1 knew at t (depth 0: the base model) with the embedding of
the token k steps ahead, and predicts the token after it:

    h_k[t]      = block_k(eh_proj_k([enorm_k(embed(x[t + k])), hnorm_k(h_{k-1}[t])]))
    logits_k[t] = lm_head(final_norm_k(h_k[t]))          predicts x[t + k + 1]

`block_k` is one decoder block of the base's own kind (it starts as a copy of the base's last attention block);
the embedding and the LM head are the base's. Each depth keeps its own final norm (initialised from the base's):
every serving layout stores one per MTP layer, so nothing is lost on a round trip through an export.

The head lives on the Hugging Face model as the submodule `mtp` (`mtp.layers.{i}.*` in state dicts, so
checkpoints, resume, FSDP2 and optimizer state carry it like any other weight); the model's own forward never
calls it: the loss (train/loss.py) runs it on the hidden states the forward produced.

Serving engines differ in details the head must be trained with (vLLM's code is the reference, see
docs/notes/mtp-on-vllm.md): which hidden state of the base feeds depth 1 (before or after the final norm), which
output of depth k feeds depth k+1, the concatenation order, and whether the embedding at position 0 is zeroed.
`MTPStyle` holds these per model family (models/mtp_layout.py, with where each family's served checkpoint
keeps the head's tensors); training and export both read it.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from shipyard.errors import ShipyardError
from shipyard.models.vision import is_vision_language
from shipyard.models.mtp_layout import STYLES, existing_mtp_layers, read_existing_head, style_for
from shipyard.models.structure import decoder_layers, final_norm_of

log = logging.getLogger(__name__)


def why_not_served(config) -> str | None:
    """Why vLLM cannot serve this family's MTP head as shipyard exports it, or None when it can."""
    model_type = config.get_text_config().model_type
    if model_type in STYLES:
        return None
    if model_type in ("qwen3_next", "qwen3_5", "qwen3_5_moe"):
        return (f"vLLM serves MTP for '{model_type}' from its own layout (mtp.fc, mtp.pre_fc_norm_*), which shipyard "
                "does not write yet; the export carries the head under shipyard's mtp.layers.* names")
    served = ", ".join(sorted({"mimo (Qwen2 bases)", "glm4_moe", "deepseek_v3", "nemotron_h", "qwen3_next",
                               "qwen3_5"}))
    return (f"vLLM has no MTP draft model for '{model_type}' bases (it serves MTP for {served}); the export "
            f"carries the head under mtp.layers.* for other engines and for further training")


# ------------------------------------------------------------------ the modules


class MTPLayer(nn.Module):
    def __init__(self, enorm: nn.Module, hnorm: nn.Module, hidden_size: int, block: nn.Module, final_norm: nn.Module):
        super().__init__()
        self.enorm, self.hnorm = enorm, hnorm
        self.eh_proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)  # columns: [embedding | hidden]
        self.block = block
        self.final_norm = final_norm

    def forward(self, embedded: torch.Tensor, previous: torch.Tensor, block_kwargs: dict
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(block output, its final-normed form). A module call, so FSDP2 gathers this layer's weights."""
        fused = self.eh_proj(torch.cat([self.enorm(embedded), self.hnorm(previous)], dim=-1))
        out = self.block(fused, **block_kwargs)
        h = out[0] if isinstance(out, tuple) else out
        return h, self.final_norm(h)


class MTPHead(nn.Module):
    def __init__(self, layers: list[MTPLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


def _is_attention_block(layer: nn.Module, index: int, config) -> bool:
    kind = getattr(layer, "block_type", None) or (getattr(config, "layer_types", None) or [None] * (index + 1))[index]
    return kind is None or "attention" in kind and "linear" not in kind


def attention_block_index(model: nn.Module) -> int:
    """The last decoder block with (full) attention: what an MTP block is a copy of."""
    layers = decoder_layers(model)
    config = model.config.get_text_config()
    for i in reversed(range(len(layers))):
        if _is_attention_block(layers[i], i, config):
            return i
    raise ShipyardError(f"{type(model).__name__} has no attention block to build an MTP layer from")


def _identity_norm(norm: nn.Module) -> nn.Module:
    """A norm of the same kind as `norm`, with its initial (identity-scale) weights."""
    fresh = copy.deepcopy(norm)
    init = type(norm)(norm.weight.shape[0]) if _constructs(type(norm)) else None
    with torch.no_grad():
        if init is not None:
            fresh.weight.copy_(init.weight)
        else:
            fresh.weight.fill_(1.0)
    return fresh


def _constructs(cls) -> bool:
    try:
        cls(4)
        return True
    except TypeError:
        return False


def build_head(model: nn.Module, num_layers: int, seed: int = 0) -> MTPHead:
    """`num_layers` fresh MTP layers for `model`: blocks copied from its last attention block, new projections."""
    config = model.config.get_text_config()
    source_index = attention_block_index(model)
    source = decoder_layers(model)[source_index]
    base_norm = final_norm_of(model)
    generator = torch.Generator().manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    layers = []
    for i in range(num_layers):
        block = copy.deepcopy(source)
        for module in block.modules():  # its own slot in a KV cache, should one be used
            if hasattr(module, "layer_idx"):
                module.layer_idx = config.num_hidden_layers + i
        layer = MTPLayer(_identity_norm(base_norm), _identity_norm(base_norm), config.hidden_size, block,
                         copy.deepcopy(base_norm))
        with torch.no_grad():
            layer.eh_proj.weight.copy_(torch.randn(layer.eh_proj.weight.shape, generator=generator) * std)
        layers.append(layer)
    head = MTPHead(layers)
    head.to(dtype=next(model.parameters()).dtype)
    for p in head.parameters():
        p.requires_grad_(True)
    return head


def head_of(model: nn.Module) -> MTPHead | None:
    head = getattr(model, "mtp", None)
    return head if isinstance(head, MTPHead) else None


# ------------------------------------------------------------------ forward


def _causal_mask(model: nn.Module, x: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config=model.config.get_text_config(), inputs_embeds=x, attention_mask=attention_mask,
                              past_key_values=None, position_ids=position_ids)


def _block_kwargs(model: nn.Module, x: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """What a decoder block of `model` needs besides its input: the causal mask, positions and RoPE."""
    kwargs = {"attention_mask": _causal_mask(model, x, attention_mask, position_ids), "position_ids": position_ids}
    rotary = getattr(model.get_decoder(), "rotary_emb", None)
    if rotary is not None:
        kwargs["position_embeddings"] = rotary(x, position_ids)
    return kwargs


def mtp_outputs(model: nn.Module, hidden_pre: torch.Tensor | None, hidden_post: torch.Tensor,
                input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Per depth k, the final-normed MTP states [B, S - k, H]: row t predicts token t + k + 1.

    `hidden_pre`/`hidden_post` are the base's last hidden states before/after its final norm ([B, S, H]),
    right-padded rows with `attention_mask`. Positions are the base's (0..S-1), as vLLM runs the MTP layers.
    """
    head = head_of(model)
    style = style_for(model.config)
    embed = model.get_input_embeddings()
    previous = hidden_pre if style.hidden_in == "pre_norm" else hidden_post
    seq = input_ids.shape[1]
    outputs = []
    for k, layer in enumerate(head.layers, start=1):
        n = seq - k
        if n <= 0:
            break
        positions = torch.arange(n, device=input_ids.device).unsqueeze(0).expand(input_ids.shape[0], n)
        e = embed(input_ids[:, k:])
        if style.zero_first_embedding:
            e = e.masked_fill((positions == 0).unsqueeze(-1), 0.0)
        h, normed = layer(e, previous[:, :n], _block_kwargs(model, e, attention_mask[:, :n], positions))
        outputs.append(normed)
        previous = normed if style.chain == "post_norm" else h
    return outputs


# ------------------------------------------------------------------ attaching, and the guard


def attach(model: nn.Module, num_layers: int | None, base_dir: Path | None, seed: int) -> tuple[int, str]:
    """Give `model` its MTP head; returns (layers, "attached" | "loaded").

    A base that already has MTP weights (a shipyard export, MiMo, GLM-4.5, DeepSeek-V3, Nemotron-style) is loaded
    with them: never re-initialised. `num_layers` that disagrees with the checkpoint is refused.
    """
    if head_of(model) is not None:
        raise ShipyardError("the model already has an MTP head attached")  # never wrapped twice
    if is_vision_language(model.config):
        raise ShipyardError("model.mtp is for causal LMs; vision-language models are not supported yet")
    found = existing_mtp_layers(base_dir, model.config) if base_dir is not None else 0
    if found and num_layers is not None and num_layers != found:
        raise ShipyardError(
            f"model.mtp.num_layers is {num_layers}, but the base {base_dir} already has {found} MTP layer(s): "
            f"set model.mtp.num_layers: {found} (or leave it out) to train the base's own head")
    layers = found or num_layers or 1
    model.mtp = build_head(model, layers, seed)
    model.config.num_nextn_predict_layers = layers
    if found:
        state = read_existing_head(base_dir, model.config, model.mtp)
        missing = sorted(set(model.mtp.state_dict()) - set(state))
        if missing:
            raise ShipyardError(f"{base_dir}: its MTP weights are incomplete: no tensor for mtp.{missing[0]} "
                                f"({len(missing)} missing); cannot train a head that would be half random")
        model.mtp.load_state_dict(state)
        return layers, "loaded"
    return layers, "attached"


def freeze_base(model: nn.Module) -> list[str]:
    """Only the MTP head trains; returns the names of the frozen tensors."""
    frozen = []
    for name, p in model.named_parameters():
        if not name.startswith("mtp."):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen

"""DFlash drafters: block-diffusion speculative decoding conditioned on a frozen target's hidden states.

One drafter forward proposes a whole block: the block is the last accepted token followed by block_size - 1
mask tokens, attention inside the block is bidirectional, and every drafter layer also attends to the target's
context: K/V projected from `hidden_norm(fc(concat of K target layers' outputs))`, with no input norm, K-norm and
RoPE at the context's positions. The target's embedding embeds the block and its LM head reads the drafter's
final norm; neither is part of the drafter. Parameter names are those of vLLM's DFlash loader
(`layers.{i}.self_attn.{q,k,v,o}_proj`, `q_norm`, `k_norm`, `mlp.*`, the layer norms, `fc`, `hidden_norm`,
`norm`), so a checkpoint directory is an export. vLLM's qwen3_dflash.py is the reference for what serving
computes; docs/speculative.md has the measurements.

Training (`block_hidden`): anchors are answer positions a; block a sees the target context at positions < a and
its own B tokens at positions a..a+B-1, never another block; slot k predicts token a + k (no shift; slot 0 is
the anchor itself and has no loss), weighted exp(-(k-1)/gamma).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding, rotate_half

from shipyard.data.chat import IGNORE_INDEX
from shipyard.errors import ShipyardError

ARCHITECTURE = "DFlashDraftModel"


# ------------------------------------------------------------------ config


def default_target_layer_ids(num_layers: int, k: int = 5) -> list[int]:
    """Evenly spread layer outputs from 1 to L - 3 (36 layers: [1, 9, 17, 25, 33]); small targets use all
    layers from 0 they have (2 layers: [0, 1])."""
    if num_layers <= k:
        return list(range(num_layers))
    first, last = 1, num_layers - 3
    return sorted({round(first + i * (last - first) / (k - 1)) for i in range(k)})


def drafter_config(target: PretrainedConfig, num_layers: int, block_size: int, layer_ids: list[int],
                   mask_token_id: int) -> Qwen3Config:
    """The drafter's config.json: Qwen3 fields sized like the target, plus what vLLM's DFlash loader reads."""
    text = target.get_text_config()
    rope_theta = (getattr(text, "rope_parameters", None) or {}).get("rope_theta") or getattr(text, "rope_theta", 1e6)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    config = Qwen3Config(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads, head_dim=head_dim, rms_norm_eps=text.rms_norm_eps,
        max_position_embeddings=text.max_position_embeddings, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": rope_theta},
        tie_word_embeddings=False, attention_bias=False,
    )
    config.architectures = [ARCHITECTURE]
    config.block_size = block_size
    config.num_target_layers = text.num_hidden_layers
    config.dflash_config = {"mask_token_id": mask_token_id, "target_layer_ids": list(layer_ids)}
    return config


def check_layer_ids(layer_ids: list[int], target_layers: int) -> None:
    bad = [i for i in layer_ids if not 0 <= i < target_layers]
    if bad or not layer_ids:
        raise ShipyardError(f"draft.target_layer_ids {layer_ids}: the target has layers 0..{target_layers - 1} "
                            f"(ids are 0-based layer outputs); {bad or 'none given'} are outside it")


def check_pairs(drafter: PretrainedConfig, target: PretrainedConfig, where: str) -> None:
    """A drafter reads the target's hidden states and uses its embedding and LM head: the sizes must agree."""
    text = target.get_text_config()
    for key in ("hidden_size", "vocab_size"):
        if getattr(drafter, key) != getattr(text, key):
            raise ShipyardError(f"{where}: the drafter's {key} is {getattr(drafter, key)}, the target's "
                                f"{getattr(text, key)}: this drafter was trained for another target")
    if drafter.num_target_layers != text.num_hidden_layers:
        raise ShipyardError(f"{where}: the drafter reads {drafter.num_target_layers} target layers, the target "
                            f"has {text.num_hidden_layers}: this drafter was trained for another target")


def mask_token_id(tokenizer, embedding_rows: int, name: str | None, used_ids: set[int]) -> int:
    """The id standing for undrafted slots: `name`, or the first special token the data never uses."""
    if name is not None:
        ids = tokenizer.convert_tokens_to_ids([name])
        token_id = ids[0] if ids else None
        if token_id is None or token_id == tokenizer.unk_token_id and name != tokenizer.unk_token:
            raise ShipyardError(f"draft.mask_token '{name}' is not a token of the target's vocabulary; use an "
                                "existing special token (e.g. one of: "
                                f"{', '.join(tokenizer.all_special_tokens[:6])})")
    else:
        candidates = [i for i in sorted(set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values()))
                      if i not in used_ids]
        if not candidates:
            raise ShipyardError("no special token of the target is free to be the mask token; set draft.mask_token")
        token_id = candidates[0]
    if not 0 <= token_id < embedding_rows:
        raise ShipyardError(f"draft.mask_token id {token_id} is outside the target's embedding ({embedding_rows} "
                            "rows): the drafter embeds it with the target's embedding")
    return token_id


# ------------------------------------------------------------------ modules


class DFlashAttention(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.heads * d, h, bias=False)
        self.q_norm = Qwen3RMSNorm(d, eps=config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(d, eps=config.rms_norm_eps)

    def _heads(self, x: torch.Tensor, proj: nn.Linear, n: int) -> torch.Tensor:
        return proj(x).view(*x.shape[:-1], n, self.head_dim).transpose(-3, -2)  # [..., n, T, d]

    def context_kv(self, context: torch.Tensor, rope: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """K (normed, rotated) and V of the projected target context [R, S, H] -> [R, kv, S, d] each."""
        k = _rotate(self.k_norm(self._heads(context, self.k_proj, self.kv_heads)), rope)
        return k, self._heads(context, self.v_proj, self.kv_heads)

    def forward(self, x: torch.Tensor, rope: tuple, context_k: torch.Tensor, context_v: torch.Tensor,
                visible: torch.Tensor) -> torch.Tensor:
        """Blocks x [N, B, H] attend to [their context ; their block]; `visible` [N, 1, B, C + B] says what."""
        q = _rotate(self.q_norm(self._heads(x, self.q_proj, self.heads)), rope)
        k = torch.cat([context_k, _rotate(self.k_norm(self._heads(x, self.k_proj, self.kv_heads)), rope)], dim=-2)
        v = torch.cat([context_v, self._heads(x, self.v_proj, self.kv_heads)], dim=-2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out.transpose(-3, -2).reshape(*x.shape[:-1], self.heads * self.head_dim))


def per_block(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Each block's row of `t` [R, ...] -> [N, ...], as a one-hot matmul: its backward sums the blocks of a row
    in a fixed order (indexing's backward accumulates in a varying order: not bitwise reproducible)."""
    pick = F.one_hot(rows, t.shape[0]).to(t.dtype)
    return (pick @ t.reshape(t.shape[0], -1)).view(len(rows), *t.shape[1:])


def _rotate(x: torch.Tensor, rope: tuple) -> torch.Tensor:
    cos, sin = rope  # [N, T, d], broadcast over heads
    return x * cos.unsqueeze(-3) + rotate_half(x) * sin.unsqueeze(-3)


class DFlashLayer(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = DFlashAttention(config)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = Qwen3MLP(config)

    def forward(self, x, rope, context, context_rope, rows, visible):
        k, v = self.self_attn.context_kv(context, context_rope)  # no input norm on the context (as vLLM)
        x = x + self.self_attn(self.input_layernorm(x), rope, per_block(k, rows), per_block(v, rows), visible)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDrafter(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        k = len(config.dflash_config["target_layer_ids"])
        self.fc = nn.Linear(k * config.hidden_size, config.hidden_size, bias=False)
        self.hidden_norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config)

    def init_weights(self, seed: int, std: float = 0.02) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=g) * std)

    def forward(self, features: torch.Tensor, block_embeds: torch.Tensor, anchors: torch.Tensor,
                rows: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed block states [N, B, H].

        features [R, S, K*H]: the target layers' outputs per row; block_embeds [N, B, H]: the embedded blocks;
        anchors [N]: each block's first position; rows [N]: the row each block belongs to; positions [R, S]: the
        RoPE position of each token (default 0..S-1; an M-RoPE target's temporal row, which is what vLLM gives
        its DFlash drafter, see `drafter_positions` in train/dflash.py). Block slot k sits at anchor's + k.
        """
        seq, block = features.shape[1], block_embeds.shape[1]
        context = self.hidden_norm(self.fc(features))
        if positions is None:
            positions = torch.arange(seq, device=features.device).unsqueeze(0).expand(features.shape[0], seq)
        context_pos = positions
        block_pos = positions[rows, anchors].unsqueeze(1) + torch.arange(block, device=features.device)
        context_rope = self.rotary_emb(context, context_pos)
        rope = self.rotary_emb(block_embeds, block_pos)
        visible = block_visibility(anchors, seq, block).unsqueeze(1)
        x = block_embeds
        for layer in self.layers:
            x = layer(x, rope, context, context_rope, rows, visible)
        return self.norm(x)


def block_visibility(anchors: torch.Tensor, seq: int, block: int) -> torch.Tensor:
    """[N, B, S + B] bool: block n's tokens see context positions < anchor n and all of block n."""
    context = torch.arange(seq, device=anchors.device).unsqueeze(0) < anchors.unsqueeze(1)  # [N, S]
    return torch.cat([context, torch.ones(len(anchors), block, dtype=torch.bool, device=anchors.device)], dim=1) \
        .unsqueeze(1).expand(len(anchors), block, seq + block)


# ------------------------------------------------------------------ training targets


def slot_weights(block: int, gamma: float) -> torch.Tensor:
    """Weight of each slot's loss: 0 for the anchor slot, exp(-(k-1)/gamma) for slot k >= 1."""
    w = torch.exp(-(torch.arange(block, dtype=torch.float32) - 1) / gamma)
    w[0] = 0.0
    return w


def choose_anchors(labels: torch.Tensor, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions) of the blocks to train: answer positions whose next token is supervised too.

    At most `limit` per row, a seeded random subset when there are more (the same on resume: the seed comes
    from the run's seed and the batch's tokens)."""
    supervised = labels != IGNORE_INDEX
    ok = supervised.clone()
    ok[:, :-1] &= supervised[:, 1:]
    ok[:, -1] = False
    rows, positions = [], []
    for r in range(labels.shape[0]):
        where = ok[r].nonzero().squeeze(1)
        if len(where) > limit:
            g = torch.Generator().manual_seed(seed * 1_000_003 + r)
            where = where[torch.randperm(len(where), generator=g)[:limit]].sort().values
        rows.append(torch.full_like(where, r))
        positions.append(where)
    return torch.cat(rows), torch.cat(positions)


def block_targets(input_ids: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, anchors: torch.Tensor,
                  block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets [N, B], valid [N, B]): slot k's target is token anchor + k (unshifted), valid where supervised."""
    seq = input_ids.shape[1]
    pos = anchors.unsqueeze(1) + torch.arange(block, device=anchors.device)
    inside = pos < seq
    pos = pos.clamp(max=seq - 1)
    targets = input_ids[rows.unsqueeze(1), pos]
    valid = inside & (labels[rows.unsqueeze(1), pos] != IGNORE_INDEX)
    valid[:, 0] = False
    return targets, valid


def block_inputs(input_ids: torch.Tensor, rows: torch.Tensor, anchors: torch.Tensor, block: int,
                 mask_id: int) -> torch.Tensor:
    """[N, B] ids: each anchor's own token, then mask tokens."""
    ids = torch.full((len(anchors), block), mask_id, dtype=input_ids.dtype, device=input_ids.device)
    ids[:, 0] = input_ids[rows, anchors]
    return ids


def weight_sum(labels: torch.Tensor, input_ids: torch.Tensor, limit: int, seed: int, block: int, gamma: float) -> float:
    rows, anchors = choose_anchors(labels, limit, seed)
    _, valid = block_targets(input_ids, labels, rows, anchors, block)
    return float((valid * slot_weights(block, gamma).to(valid.device)).sum())

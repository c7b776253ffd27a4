"""EAGLE-3 drafters: one decoder layer fed with the target's fused low/mid/high hidden states, as vLLM serves them.

vLLM's Eagle3Qwen3ForCausalLM / Eagle3LlamaForCausalLM (model_executor/models/{qwen3,llama}_eagle3.py) compute,
per position i with the token x_{i+1} that follows it:

    h = fc(concat of the target's aux hidden states at i)      (step 0; later steps: the previous step's `pre`)
    x = concat(input_layernorm(embed(x_{i+1})), hidden_norm(h))  ->  attention (q/k/v take 2H) + h
    pre = x + mlp(post_attention_layernorm(x));   logits = lm_head(norm(pre))

Aux id 0 is the embedding output and id i the output of decoder layer i - 1 ... up to id L, the last layer's
output, all before the final norm (models/structure.hidden_states_entering). Draft step k > 0 at an anchor
position p runs at position p + k on the token the previous step drafted and that step's own `pre`, and attends
to the step-0 entries at positions <= p and to its own chain's earlier steps: `forward` unrolls exactly that
(training-time test), for every position at once.

Parameter names are vLLM's checkpoint names (`fc`, `midlayer.*`, `norm`; `lm_head` and `d2t` only with a reduced
draft vocabulary), so the drafter's state dict is the export. The target's embedding and LM head are used, not
copied: vLLM shares them when the checkpoint has none.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding, rotate_half

from shipyard.data.parts import IGNORE_INDEX
from shipyard.errors import ShipyardError

# target model_type -> (the architecture vLLM serves the drafter as, MLP, RMSNorm, rotary embedding, q/k norms)
FAMILIES = {
    "qwen3": ("Eagle3Qwen3ForCausalLM", Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding, True),
    "llama": ("LlamaForCausalLMEagle3", LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding, False),
}
ARCHITECTURES = {family[0] for family in FAMILIES.values()}


# ------------------------------------------------------------------ config


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """vLLM's default (2, L // 2, L - 3) where its ids are valid and distinct (L >= 7); on smaller targets the embedding output, the
    middle and the last layer's output (2 layers: [0, 1, 2]). Always written into the drafter's config: vLLM's
    default crashes on small targets."""
    if num_layers >= 7:
        return [2, num_layers // 2, num_layers - 3]
    return sorted({round(i * num_layers / 2) for i in range(3)})


def check_aux_layer_ids(ids: list[int], num_layers: int) -> None:
    bad = [i for i in ids if not 0 <= i <= num_layers]
    if bad or not ids or sorted(set(ids)) != list(ids):
        raise ShipyardError(f"draft.aux_layer_ids {ids}: give distinct ids in increasing order within 0..{num_layers} "
                            f"(0 = the embedding output, i = the output of decoder layer i - 1, {num_layers} = the "
                            f"last layer's, all before the final norm); {bad or ids} do not fit")


def family_of(target: PretrainedConfig, where: str) -> str:
    model_type = target.get_text_config().model_type
    if model_type not in FAMILIES:
        raise ShipyardError(f"{where}: EAGLE-3 drafters are exported for Qwen3 and Llama targets (vLLM's "
                            f"{', '.join(sorted(ARCHITECTURES))}); this target is {model_type!r}, not supported yet")
    return model_type


def drafter_config(target: PretrainedConfig, aux_ids: list[int], draft_vocab_size: int | None) -> PretrainedConfig:
    """The drafter's config.json: the target's text config with one layer, plus what vLLM's EAGLE-3 loader reads."""
    family = family_of(target, "task: eagle3")
    config = copy.deepcopy(target.get_text_config())
    config.num_hidden_layers = 1
    config.architectures = [FAMILIES[family][0]]
    config.tie_word_embeddings = False
    config.layer_types = None if not hasattr(config, "layer_types") else ["full_attention"]
    config.draft_vocab_size = draft_vocab_size or config.vocab_size
    config.target_hidden_size = config.hidden_size
    config.eagle_aux_hidden_state_layer_ids = list(aux_ids)
    config.eagle_config = {"eagle_aux_hidden_state_layer_ids": list(aux_ids), "use_aux_hidden_state": True}
    config.num_target_layers = target.get_text_config().num_hidden_layers
    return config


def check_pairs(drafter: PretrainedConfig, target: PretrainedConfig, where: str) -> None:
    """The drafter reads the target's hidden states and uses its embedding and LM head: the sizes must agree."""
    text = target.get_text_config()
    for key in ("hidden_size", "vocab_size"):
        if getattr(drafter, key) != getattr(text, key):
            raise ShipyardError(f"{where}: the drafter's {key} is {getattr(drafter, key)}, the target's "
                                f"{getattr(text, key)}: this drafter was trained for another target")
    if drafter.num_target_layers != text.num_hidden_layers:
        raise ShipyardError(f"{where}: the drafter reads {drafter.num_target_layers} target layers, the target "
                            f"has {text.num_hidden_layers}: this drafter was trained for another target")


def draft_vocabulary(token_counts: dict[int, int], size: int, vocab_size: int) -> torch.Tensor:
    """The `size` most frequent supervised tokens of the data (ties: lower id first), in increasing id order: draft
    id i stands for target id ids[i] (exported as the offset d2t[i] = ids[i] - i)."""
    if not 0 < size < vocab_size:
        raise ShipyardError(f"draft.draft_vocab_size {size}: give a size below the target's vocabulary "
                            f"({vocab_size}), or leave it unset for the full vocabulary")
    ranked = sorted(token_counts, key=lambda t: (-token_counts[t], t))[:size]
    rest = [t for t in range(vocab_size) if t not in set(ranked)][: size - len(ranked)]  # fewer distinct tokens
    return torch.tensor(sorted(ranked + rest), dtype=torch.long)


def expected_weights(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor vLLM's EAGLE-3 drafter class declares for this config, with its shape, in checkpoint names
    (qwen3_eagle3.py / llama_eagle3.py: `fc`, `midlayer.*` mapped to `layers.0.*`, `norm`, and `lm_head`, `d2t` for
    a reduced vocabulary). vLLM's loader reports none missing: a drafter without `fc.weight` loads and accepts
    nothing, so export checks these itself."""
    family = next((f for f, spec in FAMILIES.items() if spec[0] in (config.architectures or [])), None)
    if family is None:
        raise ShipyardError(f"not an EAGLE-3 drafter: architectures {config.architectures} (expected one of "
                            f"{sorted(ARCHITECTURES)})")
    h, inter = config.hidden_size, config.intermediate_size
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    n_aux = len(config.eagle_aux_hidden_state_layer_ids)
    out = {"fc.weight": (h, config.target_hidden_size * n_aux), "norm.weight": (h,),
           "midlayer.input_layernorm.weight": (h,), "midlayer.hidden_norm.weight": (h,),
           "midlayer.post_attention_layernorm.weight": (h,),
           "midlayer.self_attn.q_proj.weight": (q, 2 * h), "midlayer.self_attn.k_proj.weight": (kv, 2 * h),
           "midlayer.self_attn.v_proj.weight": (kv, 2 * h), "midlayer.self_attn.o_proj.weight": (h, q),
           "midlayer.mlp.gate_proj.weight": (inter, h), "midlayer.mlp.up_proj.weight": (inter, h),
           "midlayer.mlp.down_proj.weight": (h, inter)}
    if getattr(config, "attention_bias", False):
        out.update({"midlayer.self_attn.q_proj.bias": (q,), "midlayer.self_attn.k_proj.bias": (kv,),
                    "midlayer.self_attn.v_proj.bias": (kv,)})
    if FAMILIES[family][4]:
        out.update({"midlayer.self_attn.q_norm.weight": (d,), "midlayer.self_attn.k_norm.weight": (d,)})
    if config.draft_vocab_size < config.vocab_size:
        out.update({"lm_head.weight": (config.draft_vocab_size, h), "d2t": (config.draft_vocab_size,)})
    return out


def check_weights(config: PretrainedConfig, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Refuse a drafter whose tensors are not exactly what vLLM's class declares (names and shapes)."""
    expected = expected_weights(config)
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    wrong = [f"{n} {tuple(shapes[n])} (vLLM declares {expected[n]})" for n in sorted(expected)
             if n in shapes and tuple(shapes[n]) != expected[n]]
    if missing or extra or wrong:
        raise ShipyardError(f"{where}: not a servable EAGLE-3 drafter for vLLM's {config.architectures[0]}: "
                            f"missing {missing[:4]}, unexpected {extra[:4]}, misshaped {wrong[:3]}; nothing was "
                            "written (vLLM would load it without error and accept nothing)")


# ------------------------------------------------------------------ modules


def _rotate(x: torch.Tensor, rope: tuple) -> torch.Tensor:
    cos, sin = rope  # [R, S, d], broadcast over heads
    return x * cos.unsqueeze(-3) + rotate_half(x) * sin.unsqueeze(-3)


class Eagle3Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, norm_cls, qk_norm: bool):
        super().__init__()
        h = config.hidden_size
        d = getattr(config, "head_dim", None) or h // config.num_attention_heads
        bias = bool(getattr(config, "attention_bias", False))
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.q_proj = nn.Linear(2 * h, self.heads * d, bias=bias)
        self.k_proj = nn.Linear(2 * h, self.kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(2 * h, self.kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.heads * d, h, bias=False)
        if qk_norm:
            self.q_norm = norm_cls(d, eps=config.rms_norm_eps)
            self.k_norm = norm_cls(d, eps=config.rms_norm_eps)

    def _heads(self, x: torch.Tensor, proj: nn.Linear, n: int, norm: str) -> torch.Tensor:
        y = proj(x).view(*x.shape[:-1], n, self.head_dim)
        if hasattr(self, norm):
            y = getattr(self, norm)(y)
        return y.transpose(-3, -2)  # [R, n, S, d]

    def qkv(self, x: torch.Tensor, rope: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = _rotate(self._heads(x, self.q_proj, self.heads, "q_norm"), rope)
        k = _rotate(self._heads(x, self.k_proj, self.kv_heads, "k_norm"), rope)
        return q, k, self._heads(x, self.v_proj, self.kv_heads, "")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out.transpose(-3, -2).reshape(*q.shape[:-3], q.shape[-2], self.heads * self.head_dim))


class Eagle3Layer(nn.Module):
    """vLLM's `midlayer`: input_layernorm on the embedding, hidden_norm on the hidden state, attention over both."""

    def __init__(self, config: PretrainedConfig, mlp_cls, norm_cls, qk_norm: bool):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = norm_cls(h, eps=eps)
        self.hidden_norm = norm_cls(h, eps=eps)
        self.self_attn = Eagle3Attention(config, norm_cls, qk_norm)
        self.post_attention_layernorm = norm_cls(h, eps=eps)
        self.mlp = mlp_cls(config)


class Eagle3Drafter(nn.Module):
    single_block = True  # one FSDP2 unit (parallel/fsdp.py): no decoder layer list

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        family = next((f for f, spec in FAMILIES.items() if spec[0] in config.architectures), None)
        if family is None:
            raise ShipyardError(f"not an EAGLE-3 drafter config: architectures {config.architectures}")
        _, mlp_cls, norm_cls, rope_cls, qk_norm = FAMILIES[family]
        h = config.hidden_size
        self.fc = nn.Linear(len(config.eagle_aux_hidden_state_layer_ids) * config.target_hidden_size, h, bias=False)
        self.midlayer = Eagle3Layer(config, mlp_cls, norm_cls, qk_norm)
        self.norm = norm_cls(h, eps=config.rms_norm_eps)
        self.rotary_emb = rope_cls(config)
        if config.draft_vocab_size < config.vocab_size:
            # Its own head over the draft vocabulary (the target's rows, frozen): vLLM shares the target's head only
            # when the vocabularies are equal. d2t: draft id i -> target id i + d2t[i].
            self.lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
            self.lm_head.weight.requires_grad_(False)
            self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))

    @property
    def reduced(self) -> bool:
        return hasattr(self, "lm_head")

    def init_weights(self, seed: int, target_head: torch.Tensor | None = None, draft_ids: torch.Tensor | None = None,
                     std: float = 0.02) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, module in self.named_modules():
                if isinstance(module, nn.Linear) and name != "lm_head":
                    module.weight.copy_(torch.randn(module.weight.shape, generator=g) * std)
                    if module.bias is not None:
                        module.bias.zero_()
            if self.reduced:
                self.lm_head.weight.copy_(target_head[draft_ids])
                self.d2t.copy_(draft_ids - torch.arange(len(draft_ids)))

    def head(self, target) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of the head the drafter's logits come from: its own over the draft vocabulary, else the
        target's."""
        if self.reduced:
            return self.lm_head.weight, None
        head = target.get_output_embeddings()
        return head.weight, head.bias

    def draft_to_target(self, ids: torch.Tensor) -> torch.Tensor:
        return ids + self.d2t[ids] if self.reduced else ids

    def target_to_draft(self, ids: torch.Tensor) -> torch.Tensor:
        """Draft ids of target ids; -1 (never predictable) where the draft vocabulary lacks the token."""
        if not self.reduced:
            return ids
        table = torch.full((self.config.vocab_size,), -1, dtype=torch.long, device=ids.device)
        draft = torch.arange(self.config.draft_vocab_size, device=ids.device)
        table[draft + self.d2t] = draft
        return table[ids.clamp(min=0)].masked_fill(ids < 0, -1)

    def forward(self, features: torch.Tensor, embeds: list[torch.Tensor], positions: torch.Tensor | None = None
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each step's pre-norm outputs [R, S, H] and their final-normed states (what the head reads), for
        `len(embeds)` training-time-test steps.

        features [R, S, n_aux * H]: the target's aux hidden states at each position i; embeds[k] [R, S, H]: the
        embedded token step k consumes at i (x_{i+1+k}); positions [R, S]: RoPE positions (default 0..S-1).
        Step k at i runs at position i + k on step k-1's pre-norm output at i, attending to step 0 at positions <= i
        and to steps 1..k at i (what vLLM's KV cache holds when it drafts step k from anchor i).
        """
        rows, seq = features.shape[:2]
        if positions is None:
            positions = torch.arange(seq, device=features.device).unsqueeze(0).expand(rows, seq)
        layer, attn = self.midlayer, self.midlayer.self_attn
        causal = torch.ones(seq, seq, dtype=torch.bool, device=features.device).tril()
        own = torch.eye(seq, dtype=torch.bool, device=features.device)
        hidden = self.fc(features)
        keys, values, outputs = [], [], []
        for k, embed in enumerate(embeds):
            x = torch.cat([layer.input_layernorm(embed), layer.hidden_norm(hidden)], dim=-1)
            q, key, value = attn.qkv(x, self.rotary_emb(x, positions + k))
            keys.append(key)
            values.append(value)
            visible = torch.cat([causal] + [own] * k, dim=1)  # [S, (k + 1) S]
            residual = hidden + attn.attend(q, torch.cat(keys, dim=-2), torch.cat(values, dim=-2), visible)
            hidden = residual + layer.mlp(layer.post_attention_layernorm(residual))
            outputs.append(hidden)
        return outputs, [self.norm(h) for h in outputs]


# ------------------------------------------------------------------ training targets


def step_inputs(input_ids: torch.Tensor, steps: int, pad_id: int = 0) -> list[torch.Tensor]:
    """[R, S] ids per step: step k at position i consumes token i + 1 + k (pad past the end)."""
    seq = input_ids.shape[1]
    out = []
    for k in range(steps):
        shifted = torch.full_like(input_ids, pad_id)
        if 1 + k < seq:
            shifted[:, : seq - 1 - k] = input_ids[:, 1 + k:]
        out.append(shifted)
    return out


def step_targets(input_ids: torch.Tensor, labels: torch.Tensor, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(targets, valid) [R, S] per step: step k at position i predicts token i + 2 + k, trained where supervised."""
    seq = input_ids.shape[1]
    out = []
    for k in range(steps):
        targets = torch.zeros_like(input_ids)
        valid = torch.zeros_like(input_ids, dtype=torch.bool)
        if 2 + k < seq:
            targets[:, : seq - 2 - k] = input_ids[:, 2 + k:]
            valid[:, : seq - 2 - k] = labels[:, 2 + k:] != IGNORE_INDEX
        out.append((targets, valid))
    return out


def count_targets(labels: torch.Tensor, steps: int) -> int:
    """Supervised (position, step) pairs: the loss normaliser."""
    supervised = labels != IGNORE_INDEX
    return sum(int(supervised[:, 2 + k:].sum()) for k in range(steps))

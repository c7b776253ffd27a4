"""Named tiny models built from a config, for the quickstart and the tests.

Every preset uses attention head_dim 64 (vLLM's CPU backend rejects 16) and
the vocabulary of the tokenizer shipped in `shipyard/assets/tokenizer`, so a
preset trained on the quickstart task exports and serves in vLLM.
"""

from __future__ import annotations

from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    Glm4MoeConfig,
    LlamaConfig,
    MistralConfig,
    NemotronHConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

VOCAB_SIZE = 512  # the shipped tokenizer's size (a multiple of 64)
_SPECIAL_IDS = dict(bos_token_id=None, eos_token_id=2, pad_token_id=0)  # <|im_end|>, <|endoftext|>

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    head_dim=64,
    max_position_embeddings=512,
    rope_theta=10_000.0,
    initializer_range=0.02,
    **_SPECIAL_IDS,
)


def _qwen3(layers: int, hidden: int, heads: int, kv_heads: int, tied: bool = True) -> PretrainedConfig:
    return Qwen3Config(
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
        **_COMMON,
    )


def _llama(layers: int, hidden: int, heads: int, kv_heads: int) -> PretrainedConfig:
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=False,
        **_COMMON,
    )


# The family presets below are 2 layers, hidden 128, 2 heads of 64: tiny, but each keeps what makes its family
# different (what a serving engine could get wrong), so train -> export -> vLLM is checked for every one of them.
# SLIDING_WINDOW is below the quickstart's max_length (64) and below a verify prompt plus its 32 generated tokens,
# so the window changes the numbers in training and at serving time.
SLIDING_WINDOW = 32
_TINY = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=384)


def _mistral() -> PretrainedConfig:
    # Mistral: Llama-shaped, grouped-query attention, sliding-window attention on every layer.
    return MistralConfig(**_TINY, num_key_value_heads=1, sliding_window=SLIDING_WINDOW, tie_word_embeddings=False,
                         **_COMMON)


def _qwen2() -> PretrainedConfig:
    # Qwen2: biases on q/k/v (and only there), tied embeddings like the small Qwen2/2.5 checkpoints.
    return Qwen2Config(**_TINY, num_key_value_heads=1, tie_word_embeddings=True, **_COMMON)


def _qwen3_moe() -> PretrainedConfig:
    # Qwen3-MoE: every layer a sparse MoE block (4 experts, top-2, renormalised top-k weights, no shared expert),
    # as in the published Qwen3-MoE checkpoints (no `mlp_only_layers`). transformers 5 holds the experts as fused
    # 3-D parameters (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), not nn.Linear modules.
    return Qwen3MoeConfig(
        **_TINY, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False, **_COMMON,
    )


def _phi3() -> PretrainedConfig:
    # Phi-3: fused qkv_proj and gate_up_proj (the Hugging Face module names are the fused ones).
    return Phi3Config(**_TINY, num_key_value_heads=2, original_max_position_embeddings=512,
                      tie_word_embeddings=False, **_COMMON)


def _gemma2() -> PretrainedConfig:
    # Gemma 2: soft-capped attention logits and final logits, sliding-window and global layers alternating,
    # query scaling by query_pre_attn_scalar, GeGLU, (1 + w) RMSNorms around attention and MLP, tied embeddings
    # scaled by sqrt(hidden). The published models cap attention at 50, but a tiny model's attention scores stay
    # far below 50: sdpa (which ignores the cap) then agrees with eager to 1e-4, inside verify's tolerance, and a
    # dropped cap would go unnoticed. At 5, dropping it moves the trained preset's logprobs by up to ~7e-2
    # (measured over verify's prompts). The final cap (30) already matters at 30.
    return Gemma2Config(
        **_TINY, num_key_value_heads=1, query_pre_attn_scalar=64, sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=5.0,
        final_logit_softcapping=30.0, tie_word_embeddings=True, **_COMMON,
    )


def _gemma3() -> PretrainedConfig:
    # Gemma 3 (text): a local sliding-window layer then a global one (the 5:1 pattern shrunk to 1:1), separate
    # RoPE bases for local (10k) and global (1M) layers, q/k RMSNorm, no soft-capping.
    common = {k: v for k, v in _COMMON.items() if k != "rope_theta"}
    return Gemma3TextConfig(
        **_TINY, num_key_value_heads=1, query_pre_attn_scalar=64, sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        },
        tie_word_embeddings=True, **common,
    )


def _nemotron_h() -> PretrainedConfig:
    # Nemotron-H (NemotronV3): a hybrid of Mamba-2 (linear_attention), attention without positional encoding and
    # relu^2 MLP blocks, each its own layer. Dense (no MoE): vLLM's MoE kernels for this family are CUDA-only.
    common = {k: v for k, v in _COMMON.items() if k not in ("rope_theta",)}
    return NemotronHConfig(
        hidden_size=128, layers_block_type=["linear_attention", "full_attention", "mlp", "full_attention", "mlp"],
        num_attention_heads=2, num_key_value_heads=1, intermediate_size=384, mamba_num_heads=4, mamba_head_dim=32,
        ssm_state_size=16, n_groups=1, chunk_size=16, tie_word_embeddings=False, **common,
    )


def _glm4_moe() -> PretrainedConfig:
    # GLM-4.5 (glm4_moe): a dense first layer, then sparse MoE layers with a shared expert and sigmoid routing;
    # partial rotary. vLLM serves its MTP layer (models/mtp.py) from model.layers.{L}.
    common = {k: v for k, v in _COMMON.items() if k != "rope_theta"}
    return Glm4MoeConfig(
        **_TINY, num_key_value_heads=1, moe_intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, tie_word_embeddings=False, **common,
    )


PRESETS = {
    # The quickstart model: ~0.5M parameters, learns reverse_words in about a minute on 2 CPU cores.
    "qwen3-tiny": lambda: _qwen3(layers=2, hidden=128, heads=2, kv_heads=1),
    # Four layers and untied embeddings: splits into pipeline stages of several layers, LM head on its own weight.
    "qwen3-tiny-4l": lambda: _qwen3(layers=4, hidden=128, heads=2, kv_heads=1, tied=False),
    "qwen3-tiny-untied": lambda: _qwen3(layers=2, hidden=128, heads=2, kv_heads=1, tied=False),
    "llama-tiny": lambda: _llama(layers=4, hidden=128, heads=2, kv_heads=2),
    # One per family users fine-tune (Llama 3 and Qwen3 are above); tests/test_families.py trains, exports and
    # serves each in vLLM.
    "mistral-tiny": _mistral,
    "qwen2-tiny": _qwen2,
    "qwen3-moe-tiny": _qwen3_moe,
    "phi3-tiny": _phi3,
    "gemma2-tiny": _gemma2,
    "gemma3-tiny": _gemma3,
    # The hybrid backbone of NVIDIA's speech-LMs; MTP heads attach to it (models/mtp.py).
    "nemotron-h-tiny": _nemotron_h,
    "glm4-moe-tiny": _glm4_moe,
}


def preset_config(name: str) -> PretrainedConfig:
    return PRESETS[name]()

"""Named tiny models built from a config, for the quickstart and the tests.

Every preset uses attention head_dim 64 (vLLM's CPU backend rejects 16) and
the vocabulary of the tokenizer shipped in `shipyard/assets/tokenizer`, so a
preset trained on the quickstart task exports and serves in vLLM.
"""

from __future__ import annotations

from transformers import LlamaConfig, PretrainedConfig, Qwen3Config

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


PRESETS = {
    # The quickstart model: ~0.5M parameters, learns reverse_words in about a minute on 2 CPU cores.
    "qwen3-tiny": lambda: _qwen3(layers=2, hidden=128, heads=2, kv_heads=1),
    # Four layers and untied embeddings: splits into pipeline stages (tied weights cannot cross stages).
    "qwen3-tiny-4l": lambda: _qwen3(layers=4, hidden=128, heads=2, kv_heads=1, tied=False),
    "qwen3-tiny-untied": lambda: _qwen3(layers=2, hidden=128, heads=2, kv_heads=1, tied=False),
    "llama-tiny": lambda: _llama(layers=4, hidden=128, heads=2, kv_heads=2),
}


def preset_config(name: str) -> PretrainedConfig:
    return PRESETS[name]()

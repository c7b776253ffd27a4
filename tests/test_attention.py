"""The attention backend implements every attention feature the config declares, or the user is told."""

import logging

from transformers import Gemma2Config, Qwen3Config

from shipyard.models.attention import choose_attention, declared_features


def gemma2(**kw):
    return Gemma2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=64, intermediate_size=256, vocab_size=512, **kw)


def test_soft_capping_picks_eager_and_plain_models_keep_sdpa():
    assert declared_features(gemma2()) == {"attn_logit_softcapping": 50.0}
    assert choose_attention(gemma2(), "auto") == "eager"
    assert choose_attention(gemma2(attn_logit_softcapping=None), "auto") == "sdpa"
    assert choose_attention(Qwen3Config(), "auto") == "sdpa"


def test_forcing_a_backend_that_drops_a_feature_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="shipyard"):
        assert choose_attention(gemma2(), "sdpa") == "sdpa"
    assert "model.attn_implementation=sdpa ignores attn_logit_softcapping=50.0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shipyard"):
        assert choose_attention(gemma2(), "eager") == "eager"
    assert caplog.text == ""

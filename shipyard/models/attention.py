"""Pick an attention implementation that computes what the model's config declares.

transformers lets the backend silently skip attention features: sdpa ignores
Gemma 2's `attn_logit_softcapping`, and attention sinks are not expressible in
sdpa either. The exported config still declares the feature, so vLLM serves a
different function than the one trained. shipyard therefore chooses, per model,
a backend that implements every feature the config uses (`model.attn_implementation:
auto`, the default), and warns when a user's explicit choice drops one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from transformers import PretrainedConfig

log = logging.getLogger(__name__)

# The fastest backends first; eager implements every feature (it is the reference implementation).
PREFERENCE = ("sdpa", "eager")


@dataclass(frozen=True)
class Feature:
    name: str
    supported_by: tuple[str, ...]

    def value(self, config: PretrainedConfig):
        return getattr(config, self.name, None)


FEATURES = (
    Feature("attn_logit_softcapping", ("eager", "flex_attention", "flash_attention_2", "flash_attention_3")),
    Feature("sinks", ("eager", "flash_attention_3", "kernels-community/vllm-flash-attn3")),
)


def declared_features(config: PretrainedConfig) -> dict[str, object]:
    """The attention features `config` turns on, by name."""
    text = config.get_text_config()
    found = {f.name: f.value(text) for f in FEATURES if f.name != "sinks" and f.value(text) is not None}
    if getattr(text, "model_type", "") == "gpt_oss":  # learned attention sinks in every layer
        found["sinks"] = True
    return found


def missing_features(config: PretrainedConfig, implementation: str) -> list[str]:
    by_name = {f.name: f for f in FEATURES}
    return [name for name in declared_features(config) if implementation not in by_name[name].supported_by]


def choose_attention(config: PretrainedConfig, requested: str) -> str:
    """The attention implementation to load `config` with: `requested`, or for `auto` the first of PREFERENCE
    that implements every declared feature. An explicit choice that drops a feature is kept, with a warning."""
    if requested != "auto":
        dropped = missing_features(config, requested)
        if dropped:
            values = ", ".join(f"{name}={declared_features(config)[name]}" for name in dropped)
            log.warning(
                "model.attn_implementation=%s ignores %s declared by the model's config: training computes a "
                "different function than the exported config declares and vLLM serves. Use "
                "model.attn_implementation=auto (picks one that implements it) unless you mean this.",
                requested, values,
            )
        return requested
    chosen = next(impl for impl in PREFERENCE if not missing_features(config, impl))
    if chosen != PREFERENCE[0]:
        log.info("attention: %s, since the config declares %s, which %s would ignore", chosen,
                 ", ".join(missing_features(config, PREFERENCE[0])), PREFERENCE[0])
    return chosen

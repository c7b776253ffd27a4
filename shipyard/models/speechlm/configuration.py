"""The speech-LM's config: an audio encoder's config, a causal LM's config, and the projector between them."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from shipyard.data.parts import AUDIO_TOKEN

MODEL_TYPE = "shipyard_speechlm"
# vLLM picks the serving class by this name; a hybrid (Mamba + attention) backbone needs vLLM's hybrid cache
# manager, so it is a different architecture name (as in NeMo's speech-LM plugin).
ARCHITECTURE = "ShipyardSpeechLMForConditionalGeneration"
HYBRID_ARCHITECTURE = "ShipyardSpeechLMHybridForConditionalGeneration"
HYBRID_BACKBONES = ("nemotron_h",)


@strict
class SpeechLMConfig(PreTrainedConfig):
    """audio encoder (`audio_config`, FastConformer: `parakeet_encoder`) → frame stacking + MLP projector →
    the language model (`text_config`, any causal LM), whose `<|audio|>` positions take the projected frames."""

    model_type = MODEL_TYPE
    sub_configs = {"audio_config": AutoConfig, "text_config": AutoConfig}

    audio_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    audio_token: str = AUDIO_TOKEN
    audio_token_id: int | None = None
    projector_stack: int = 2  # encoder frames concatenated per audio token
    projector_hidden_act: str = "gelu"
    # Training aid for encoders trained from scratch: a CTC loss on the encoder's frames against the transcript
    # makes the encoder learn to listen long before the LM's gradient alone would (0 turns it off).
    ctc_loss_weight: float = 0.0
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if isinstance(self.audio_config, dict):
            self.audio_config = CONFIG_MAPPING[self.audio_config.get("model_type", "parakeet_encoder")](
                **{k: v for k, v in self.audio_config.items() if k != "model_type"})
        elif self.audio_config is None:
            self.audio_config = CONFIG_MAPPING["parakeet_encoder"]()
        if isinstance(self.text_config, dict):
            self.text_config = CONFIG_MAPPING[self.text_config.get("model_type", "qwen3")](
                **{k: v for k, v in self.text_config.items() if k != "model_type"})
        elif self.text_config is None:
            self.text_config = CONFIG_MAPPING["qwen3"]()
        if self.audio_config.model_type != "parakeet_encoder":
            raise ValueError(f"audio_config.model_type {self.audio_config.model_type!r}: shipyard's speech-LM takes "
                             "the FastConformer encoder ('parakeet_encoder')")
        if self.projector_stack < 1:
            raise ValueError(f"projector_stack must be >= 1, got {self.projector_stack}")
        super().__post_init__(**kwargs)

    @property
    def is_hybrid(self) -> bool:
        return self.text_config.model_type in HYBRID_BACKBONES

    @property
    def architecture(self) -> str:
        return HYBRID_ARCHITECTURE if self.is_hybrid else ARCHITECTURE

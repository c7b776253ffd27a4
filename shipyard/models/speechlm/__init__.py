"""shipyard's speech-LM (audio encoder + projector + causal LM), registered with transformers' Auto classes when
this package is first imported (`import shipyard.models.speechlm`; every shipyard module that loads a model
imports it), so an exported directory loads with `AutoModelForCausalLM` / `AutoProcessor` and no
`trust_remote_code`. Registering here rather than in `shipyard/__init__` keeps `import shipyard` free of
transformers."""

from shipyard.models.speechlm.configuration import (
    ARCHITECTURE, AUDIO_TOKEN, HYBRID_ARCHITECTURE, MODEL_TYPE, SpeechLMConfig,
)


def is_speech_lm(config) -> bool:
    return getattr(config, "model_type", None) == MODEL_TYPE


def register() -> None:
    """Make transformers' Auto classes know the speech-LM (idempotent)."""
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForCausalLM, AutoProcessor
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from shipyard.models.speechlm.modeling import ShipyardSpeechLMForConditionalGeneration
    from shipyard.models.speechlm.processing import ShipyardSpeechFeatureExtractor, ShipyardSpeechLMProcessor

    if MODEL_TYPE in CONFIG_MAPPING:
        return
    AutoConfig.register(MODEL_TYPE, SpeechLMConfig)
    AutoModel.register(SpeechLMConfig, ShipyardSpeechLMForConditionalGeneration)
    AutoModelForCausalLM.register(SpeechLMConfig, ShipyardSpeechLMForConditionalGeneration)
    AutoFeatureExtractor.register(SpeechLMConfig, ShipyardSpeechFeatureExtractor)
    AutoProcessor.register(SpeechLMConfig, ShipyardSpeechLMProcessor)


register()

__all__ = ["ARCHITECTURE", "AUDIO_TOKEN", "HYBRID_ARCHITECTURE", "MODEL_TYPE", "SpeechLMConfig", "is_speech_lm",
           "register"]

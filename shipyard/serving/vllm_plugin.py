"""vLLM plugin: serve shipyard's speech-LM (`models/speechlm`) with vLLM.

Installed as the `vllm.general_plugins` entry point `shipyard_speechlm` (pyproject.toml), so every vLLM process
(the front end, the engine core, each worker) imports this module and calls `register()`. It registers both
architecture names with vLLM's model registry by string: vLLM imports the serving classes (serving/speechlm.py)
only when it serves a speech-LM, so engines that serve other models stay as cheap to start as without the plugin.
Importing this module imports `shipyard.models.speechlm`, which tells transformers the `shipyard_speechlm` config
and processor (vLLM reads a directory's config through transformers before it picks a class).

Use it like any vLLM model: `LLM(model=export_dir)`, then `LLM.chat` with `audio_url` parts, or `LLM.generate`
with `{"prompt": ..., "multi_modal_data": {"audio": (samples, 16000)}}`.
"""

from __future__ import annotations

from vllm import ModelRegistry
from vllm.model_executor.models.config import MODELS_CONFIG_MAP, NemotronHForCausalLMConfig, VerifyAndUpdateConfig

from shipyard.models.speechlm.configuration import ARCHITECTURE, HYBRID_ARCHITECTURE

MODULE = "shipyard.serving.speechlm"
MODEL_CLASS = "ShipyardSpeechLMForVLLM"
HYBRID_MODEL_CLASS = "ShipyardSpeechLMHybridForVLLM"


class ShipyardSpeechLMHybridConfig(VerifyAndUpdateConfig):
    """vLLM's per-architecture config hook for the hybrid name, as for its own NemotronH models: the SSM state
    cache defaults to float32 (or the backbone config's `mamba_ssm_cache_dtype`), not the model's dtype."""

    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        NemotronHForCausalLMConfig.update_mamba_ssm_cache_dtype(
            cache_config=vllm_config.cache_config, hf_config=vllm_config.model_config.hf_config.text_config)


def register() -> None:
    """vLLM's plugin hook: may run several times per process and in every vLLM process (idempotent)."""
    supported = set(ModelRegistry.get_supported_archs())
    for arch, cls in ((ARCHITECTURE, MODEL_CLASS), (HYBRID_ARCHITECTURE, HYBRID_MODEL_CLASS)):
        if arch not in supported:
            ModelRegistry.register_model(arch, f"{MODULE}:{cls}")
    MODELS_CONFIG_MAP.setdefault(HYBRID_ARCHITECTURE, ShipyardSpeechLMHybridConfig)

"""What shipyard needs to know about a Hugging Face speech-LM (Qwen2-Audio, Voxtral, Granite Speech), in one place.

The model stays transformers' own module (`AutoModelForMultimodalLM`); this module finds its parts by the names
transformers gives them: the audio tower (`get_encoder(modality="audio")`), the projector that maps its features
into the language model, and the language model. shipyard's own speech-LM (models/speechlm) is not one of these:
it has its own config type and classes.

`audio_idle_output`: a micro-batch without clips runs the audio tower and projector on a blank clip and adds 0 x
their output to the input embeddings, as a vision-language model does with a blank image (models/vision.py), so
every FSDP2 rank computes gradients for the same parameters whatever its data.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES

AUDIO_PROJECTOR_NAMES = ("multi_modal_projector", "projector")


def is_audio_language(config: PretrainedConfig) -> bool:
    """A transformers speech-LM: an audio config and a model type AutoModelForMultimodalLM maps."""
    return config is not None and getattr(config, "audio_config", None) is not None and getattr(config, "vision_config", None) is None \
        and config.model_type in MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES


def audio_tower(model: nn.Module) -> nn.Module:
    return model.get_encoder(modality="audio")


def projector(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", model)
    return next(getattr(inner, n) for n in AUDIO_PROJECTOR_NAMES if hasattr(inner, n))


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Parameter names of each named group: audio_encoder (the tower), projector, language_model, embeddings."""
    ids = {part: {id(p) for p in module.parameters()}
           for part, module in (("audio_encoder", audio_tower(model)), ("projector", projector(model)))}
    named = list(model.named_parameters())
    groups = {part: [n for n, p in named if id(p) in members] for part, members in ids.items()}
    taken = set(groups["audio_encoder"]) | set(groups["projector"])
    groups["language_model"] = [n for n, _ in named if n not in taken]
    groups["embeddings"] = [n for n, p in named if p is model.get_input_embeddings().weight]
    return groups


def audio_idle_output(model: nn.Module, blank: dict[str, torch.Tensor]) -> torch.Tensor:
    """0 x (the audio tower and projector's output on a blank clip's features): runs them, changes nothing."""
    device = model.get_input_embeddings().weight.device
    features = blank["input_features"].to(device)
    hidden = audio_tower(model)(features.to(next(audio_tower(model).parameters()).dtype)).last_hidden_state
    return projector(model)(hidden).float().sum() * 0.0

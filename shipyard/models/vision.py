"""What shipyard needs to know about a vision-language model, in one place.

The model stays the Hugging Face module (`AutoModelForImageTextToText`); this
module finds its parts by the names transformers gives them:

- the vision tower (`get_encoder(modality="image")`) and its blocks (FSDP2
  units, pipeline stage 0), and the projector that maps its features into the
  language model's embedding space;
- named parameter groups for `model.freeze`;
- `vision_on_blank_image`: for batches without images. FSDP2 gathers the
  vision blocks' weights inside their forward, so every rank must run them in
  every micro-batch, and at the same point (collectives pair up in order): a
  rank whose batch is text-only runs them on a blank image just before the
  language model, where an image batch runs them, and adds 0 x their output
  to the input embeddings. Every run (one rank or many) does the same, so the
  vision weights get a (zero) gradient in every step and the optimizer treats
  them the same whatever the world size.
"""

from __future__ import annotations

import fnmatch
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from shipyard.errors import ShipyardError
from shipyard.models import audio_lm

PROJECTOR_NAMES = ("merger", "deepstack_merger_list", "connector", "multi_modal_projector", "mm_projector",
                   "projector")
FREEZE_GROUPS = ("vision_tower", "audio_encoder", "projector", "language_model", "embeddings")


def is_vision_language(config: PretrainedConfig) -> bool:
    return getattr(config, "vision_config", None) is not None and \
        config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def vision_tower(model: nn.Module) -> nn.Module | None:
    if not is_vision_language(model.config):
        return None
    tower = model.get_encoder(modality="image")
    return None if tower is model or tower is getattr(model, "model", None) else tower


def _prefix_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def projector_prefixes(model: nn.Module) -> list[str]:
    """Dotted names of the modules that map vision features into the language model (inside the tower or not)."""
    found = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in PROJECTOR_NAMES]
    return [name for name in found if not any(name.startswith(outer + ".") for outer in found)]


def vision_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The vision tower's block list (its transformer layers), or None."""
    tower = vision_tower(model)
    for name, module in tower.named_modules() if tower is not None else ():
        if isinstance(module, nn.ModuleList) and len(module) and name.rsplit(".", 1)[-1] not in PROJECTOR_NAMES:
            return module
    return None


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Parameter names of each named group of a vision-language model."""
    names = [n for n, _ in model.named_parameters()]
    tower = vision_tower(model)
    projector = projector_prefixes(model)
    tower_prefix = _prefix_of(model, tower) if tower is not None else None

    def under(name: str, prefix: str) -> bool:
        return name.startswith(prefix + ".")

    groups = {
        "projector": [n for n in names if any(under(n, p) for p in projector)],
        "vision_tower": [n for n in names if tower_prefix and under(n, tower_prefix)
                         and not any(under(n, p) for p in projector)],
        "embeddings": [n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight],
    }
    groups["language_model"] = [n for n in names if n not in groups["projector"] and n not in groups["vision_tower"]]
    return groups


def freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Turn off gradients for the named groups / parameter-name globs; returns the frozen names."""
    if is_vision_language(model.config):
        groups = parameter_groups(model)
    elif audio_lm.is_audio_language(model.config):  # Qwen2-Audio and its kind: tower, projector, language model
        groups = audio_lm.parameter_groups(model)
    elif hasattr(model, "audio_encoder"):  # a speech-LM (models/speechlm): its parts are its top-level modules
        names = [n for n, _ in model.named_parameters()]
        groups = {part: [n for n in names if n.startswith(part + ".")]
                  for part in ("audio_encoder", "projector", "language_model")}
        groups["embeddings"] = [n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight]
    else:
        groups = {"language_model": [n for n, _ in model.named_parameters()],
                  "embeddings": [n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight]}
    params = dict(model.named_parameters())
    frozen: list[str] = []
    for pattern in patterns:
        if pattern in FREEZE_GROUPS:
            found = groups.get(pattern, [])
            if not found:
                raise ShipyardError(f"model.freeze: {type(model).__name__} has no {pattern} "
                                    f"(groups here: {', '.join(k for k, v in groups.items() if v)})")
        else:
            found = [n for n in params if fnmatch.fnmatchcase(n, pattern) or n.startswith(pattern.rstrip(".") + ".")]
            if not found:
                raise ShipyardError(f"model.freeze: '{pattern}' matches no parameter of {type(model).__name__}; "
                                    f"give a group ({', '.join(FREEZE_GROUPS)}) or a name glob like "
                                    f"'{next(iter(params))}'")
        frozen.extend(found)
    for name in frozen:
        params[name].requires_grad_(False)
    return sorted(set(frozen))


# ------------------------------------------------------------------ text-only batches


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def vision_idle_loss(model: nn.Module, blank: dict[str, torch.Tensor]) -> torch.Tensor:
    """0 x (the vision tower and projector's output on a blank image): runs them, changes nothing. A speech-LM's
    blank is a clip's features (models/audio_lm.py)."""
    if "input_features" in blank:
        return audio_lm.audio_idle_output(model, blank)
    device = model.get_decoder().embed_tokens.weight.device
    out = model.get_image_features(**{k: v.to(device) for k, v in blank.items()})
    return sum((t.float().sum() for t in _tensors(out) if t.is_floating_point()), torch.zeros((), device=device)) * 0.0


@contextmanager
def vision_on_blank_image(model: nn.Module, blank: dict[str, torch.Tensor] | None, active: bool):
    """While active, the language model's forward first runs the vision tower on `blank` (see the module doc)."""
    if not active or blank is None:
        yield
        return

    def before_language_model(_module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        return args, {**kwargs, "inputs_embeds": embeds + vision_idle_loss(model, blank).to(embeds.dtype)}

    handle = model.get_decoder().register_forward_pre_hook(before_language_model, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()

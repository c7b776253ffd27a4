"""Finding the parts of a Hugging Face model by the names transformers gives them, and naming its parameters.

Model-structure helpers every layer above uses (MTP heads, FSDP2 units, pipeline stages, LoRA targets,
checkpoints and exports), kept with the models so none of those has to import another for them.
"""

from __future__ import annotations

import copy
import re
from contextlib import contextmanager

from torch import nn

from shipyard.errors import ShipyardError


def decoder_layers(model: nn.Module) -> nn.ModuleList | nn.ModuleDict:
    """The decoder blocks of a Hugging Face causal LM (model.model.layers and the like).

    A ModuleDict keyed by original layer index on a pipeline stage (see parallel/pipeline.py).
    """
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model
    for attr in ("layers", "h", "blocks", "decoder_layers"):
        layers = getattr(inner, attr, None)
        if isinstance(layers, (nn.ModuleList, nn.ModuleDict)):
            return layers
    raise ShipyardError(f"{type(model).__name__}: cannot find its decoder layer list (looked for layers, h, blocks)")


def final_norm_of(model: nn.Module) -> nn.Module:
    inner = model.get_decoder()
    for attr in ("norm", "norm_f", "final_layernorm", "ln_f"):
        if isinstance(getattr(inner, attr, None), nn.Module):
            return getattr(inner, attr)
    raise ShipyardError(f"{type(model).__name__}: cannot find the final norm (looked for norm, norm_f, ln_f)")


@contextmanager
def hidden_states_entering(model: nn.Module, ids: list[int]):
    """Inside the block, `captured[i]` receives the hidden state entering the model's decoder layer i, or its
    final norm for i = the number of layers: the embedding output for 0, then each layer's output before the
    final norm (vLLM's EAGLE-3 aux hidden state ids; a DFlash target layer id j is entering id j + 1).

    Read where the next layer (or the final norm) receives it, as vLLM's aux hidden states are: a model that adds
    to the hidden state between layers (Qwen3-VL's deepstack visual features after its first layers) has added it.
    """
    layers = decoder_layers(model)
    captured: dict = {}
    handles = []
    for i in ids:
        receiver = layers[i] if i < len(layers) else final_norm_of(model)

        def hook(_module, args, kwargs, i=i):
            captured[i] = args[0] if args else kwargs["hidden_states"]
        handles.append(receiver.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object sharing submodules and parameters, with its own registries and hook tables."""
    clone = copy.copy(module)
    for key, value in module.__dict__.items():
        if isinstance(value, dict):
            clone.__dict__[key] = type(value)(value)
    return clone


_WRAPPER_PREFIXES = re.compile(r"(_orig_mod\.|_checkpoint_wrapped_module\.|_fsdp_wrapped_module\.)")


def clean_name(name: str) -> str:
    """Drop the wrapper prefixes torch.compile and activation checkpointing add to module paths."""
    return _WRAPPER_PREFIXES.sub("", name)


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: canonical} for parameters that share storage, e.g. {"lm_head.weight": "model.embed_tokens.weight"}.

    Read from the live module (the same Parameter object under two names), not
    from `tie_word_embeddings`: a config can claim tying that the weights do not
    have, and the other way round.
    """
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(clean_name(name))
    declared = set(getattr(model, "all_tied_weights_keys", None) or {})
    aliases = {}
    for names in by_id.values():
        if len(names) < 2:
            continue
        # Keep the name transformers expects on load: the source of the declared tie (the embedding).
        keep = next((n for n in names if n not in declared), sorted(names)[0])
        aliases.update({n: keep for n in names if n != keep})
    return aliases

"""Pipeline stages of a vision-language model: the vision tower and projector on stage 0.

Stage 0 runs the Hugging Face model's own multimodal forward (embeddings,
vision tower, projector, image features merged at the placeholder tokens,
deepstack features, its first decoder layers); later stages run the
language model's forward from hidden states on their layers. Each stage is a
shallow copy of the model holding only its parts: its decoder layers sit in a
`KeyedLayers` list whose keys are the original layer indices, so parameter
names (checkpoints, safetensors) are exactly the unpipelined ones, and the
model's own `for layer in self.layers` loops run just this stage's layers.
The final norm is an identity on all stages but the last.

What crosses stages is hidden states only. Positions are inputs of every stage:
M-RoPE models (Qwen-VL) get their 3-D position ids computed once per micro-batch
from the token ids and image grids (no weights needed) and passed to each
stage; other models number positions themselves. Pixel inputs cannot be split
by rows like the other inputs (an image's patches are not a row), so the
runner builds them per pipeline micro-batch and stage 0 picks its own by the
`chunk_index` input.
"""

from __future__ import annotations

import torch
from torch import nn

from shipyard.errors import ShipyardError
from shipyard.models.structure import shallow_copy
from shipyard.models.vision import projector_prefixes, vision_on_blank_image, vision_tower


class KeyedLayers(nn.ModuleList):
    """A ModuleList whose modules keep the keys they had in the whole model ("3", "4", ...).

    Indexing is by position among this stage's layers; a slice (`self.layers[: config.num_hidden_layers]` in
    Llama-style forwards) is a plain ModuleList of them."""

    def __init__(self, layers: dict[str, nn.Module]):
        super().__init__()
        for key, layer in layers.items():
            self.add_module(key, layer)

    def __getitem__(self, index):
        layers = list(self._modules.values())
        return nn.ModuleList(layers[index]) if isinstance(index, slice) else layers[index]


def _path_to(model: nn.Module, target: nn.Module) -> list[str]:
    return next(name for name, m in model.named_modules() if m is target).split(".")


def _copy_path(root: nn.Module, path: list[str]) -> nn.Module:
    """Shallow-copy every module along `path` below `root` (a copy itself); returns the copy of the last one."""
    node = root
    for name in path:
        child = shallow_copy(getattr(node, name))
        setattr(node, name, child)
        node = child
    return node


def _drop(root: nn.Module, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node = _copy_path(root, parents)
    node._modules[leaf] = None


def validate_vlm(model: nn.Module, first_stage_layers: int) -> None:
    deepstack = len(getattr(model.config.vision_config, "deepstack_visual_indexes", None) or [])
    if deepstack > first_stage_layers:
        raise ShipyardError(
            f"{type(model).__name__} adds vision features after its first {deepstack} decoder layers (deepstack), "
            f"but pipeline stage 0 holds {first_stage_layers}; give stage 0 at least {deepstack} layers "
            f"(parallel.pp_split=[{deepstack}, ...])"
        )


def build_vlm_stage(model: nn.Module, layer_ids: list[int], first: bool, last: bool, blank_image: dict | None
                    ) -> nn.Module:
    stage = shallow_copy(model)
    decoder_path = _path_to(model, model.get_decoder())
    decoder = _copy_path(stage, decoder_path)
    decoder.layers = KeyedLayers({str(i): model.get_decoder().layers[i] for i in layer_ids})
    if not last:
        decoder.norm = nn.Identity()
        stage.lm_head = None
    if not first:
        decoder.embed_tokens = None
        tower = ".".join(_path_to(model, vision_tower(model)))
        for prefix in [tower, *(p for p in projector_prefixes(model) if not p.startswith(tower + "."))]:
            _drop(stage, prefix)
    # Plain attributes, not submodules: the decoder is already in the stage's tree under its own name.
    for key, value in {"_pp_first": first, "_pp_decoder": decoder, "_pp_blank": blank_image,
                       "_pp_images": []}.items():  # _pp_images: pixel inputs per pipeline micro-batch (stage 0)
        object.__setattr__(stage, key, value)
    stage.forward = _stage_forward.__get__(stage)
    return stage


def _stage_forward(self, x, attention_mask=None, position_ids=None, chunk_index=None, **type_ids):
    """Token ids (stage 0) or hidden states in; hidden states out (after the final norm on the last stage).

    `position_ids` arrive rows first ([rows, 3, length]) so that the schedule splits them by rows like the rest."""
    if position_ids is not None and position_ids.ndim == 3:
        position_ids = position_ids.transpose(0, 1)
    if not self._pp_first:
        return self._pp_decoder(inputs_embeds=x, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False).last_hidden_state
    pixels = self._pp_images[int(chunk_index[0])] if chunk_index is not None and self._pp_images else {}
    extra = {**pixels, **type_ids} if pixels else {}
    with vision_on_blank_image(self, self._pp_blank, active=not pixels):  # see models/vision.py
        return self.model(input_ids=x, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                          **extra).last_hidden_state


def multimodal_positions(model: nn.Module, batch: dict, chunks: list[dict], rows_per_chunk: int,
                         type_key: str | None) -> torch.Tensor | None:
    """3-D M-RoPE position ids of a batch (per pipeline micro-batch, with its own images), or None when the
    model numbers positions itself."""
    base = getattr(model, "model", None)
    if not hasattr(base, "get_rope_index"):
        return None
    parts = []
    for k, pixels in enumerate(chunks):
        rows = slice(k * rows_per_chunk, (k + 1) * rows_per_chunk)
        ids = batch["input_ids"][rows]
        types = batch[type_key][rows] if type_key in batch else torch.zeros_like(ids)
        position_ids, _ = base.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=pixels.get("image_grid_thw"),
                                              attention_mask=batch["attention_mask"][rows])
        parts.append(position_ids)
    return torch.cat(parts, dim=1)

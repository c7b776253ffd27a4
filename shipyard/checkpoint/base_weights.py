"""Filling a model built without its weights from its base's safetensors files, each rank reading what it keeps.

models/load.py builds a folder (or cached hub) base on the meta device; freezing and LoRA adapters (created on
the CPU with their values) are applied to it, and parallel/ shards or splits it while it is still empty. `fill`
then gives every parameter storage on the training device and copies in its rows from the files: a rank's FSDP2
shard (its rows of dim 0), a pipeline stage's own layers whole. Nothing reaches a rank's memory that it does not
keep: 8 ranks of a 70B model hold 1/8 of it each, not all of it each, and each file is opened per tensor, so its
memory map never holds more than the rows being read.

Each value is the file's tensor cast to the parameter's dtype, as `from_pretrained(dtype=...)` casts it: a filled
model is bitwise the model one process loads whole (tests/test_base_weights.py).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from shipyard.config import ModelConfig
from shipyard.errors import ShipyardError
from shipyard.models.load import ModelSource, load_model
from shipyard.models.structure import clean_name
from shipyard.models.weights import DirectoryWeights


def is_empty(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def unfillable(model: torch.nn.Module, weights: DirectoryWeights) -> str | None:
    """Why `weights` cannot fill `model`'s empty parameters (one they lack or hold in another shape), or None.

    Checkpoints that transformers converts on load (per-expert MoE tensors fused into one, older key layouts)
    do not name the model's parameters one to one: those bases are loaded whole."""
    for name, param in model.named_parameters():
        key = clean_name(name)
        if not param.is_meta:
            continue
        if key not in weights.shapes:
            return f"its files have no tensor {key} (transformers converts this checkpoint's layout on load)"
        if tuple(weights.shapes[key][0]) != tuple(param.shape):
            return f"{key} is {tuple(weights.shapes[key][0])} in its files but {tuple(param.shape)} in the model"
    return None


def base_weights_for(model, cfg: ModelConfig, source: ModelSource, seed: int
                     ) -> tuple[torch.nn.Module, DirectoryWeights | None, str]:
    """(the model, the files that fill it or None when it is loaded already, the start-up line about loading)."""
    if not is_empty(model):
        return model, None, "loaded whole in every process"
    try:
        weights = DirectoryWeights(Path(source.local_dir))
        why = unfillable(model, weights)
    except ShipyardError as e:  # e.g. shard files without their index
        weights, why = None, str(e)
    if why is not None:
        return load_model(cfg, source, seed), None, f"loaded whole in every process: {why}"
    return model, weights, "built empty, each rank reading only the tensors it keeps from the base's files"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def rows_kept(param: torch.Tensor) -> tuple[int | None, int | None]:
    """The rows [start, stop) of dim 0 this rank holds of `param` (None, None: all of it).

    FSDP2 shards dim 0 like torch.chunk: ceil(n / ranks) rows each, the last ranks possibly fewer or none."""
    if not isinstance(param, DTensor):
        return None, None
    start, length = 0, param.shape[0]
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_replicate():
            continue
        if not (placement.is_shard() and placement.dim == 0):
            raise ShipyardError(f"cannot fill a parameter sharded as {param.placements} from files; "
                                "shipyard shards dim 0 only (FSDP2)")
        ranks, rank = param.device_mesh.size(mesh_dim), param.device_mesh.get_local_rank(mesh_dim)
        chunk = -(-length // ranks)
        start, length = start + min(rank * chunk, length), max(0, min(chunk, length - rank * chunk))
    return start, start + length


def fill(module: torch.nn.Module, device: torch.device, weights: DirectoryWeights) -> None:
    """Storage on `device` for every tensor of `module` (sharded or not), the empty ones read from `weights`."""
    tensors = lambda: itertools.chain(module.named_parameters(), module.named_buffers())  # noqa: E731
    holding = {name: _local(t).detach() for name, t in tensors() if not t.is_meta}  # adapters, buffers: kept
    first_name: dict[int, str] = {}
    aliases = {}  # tied parameters (one Parameter under two names): `to_empty` gives each name its own
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            aliases[name] = first_name[id(param)]
        first_name.setdefault(id(param), name)
    module.to_empty(device=device)
    for alias, name in aliases.items():
        owner, _, attr = alias.rpartition(".")
        setattr(module.get_submodule(owner), attr, module.get_parameter(name))
    with torch.no_grad():
        for name, tensor in tensors():
            target = _local(tensor)
            if name in holding:
                target.copy_(holding[name])
                continue
            copy_rows(target, weights, clean_name(name), *rows_kept(tensor))


# Rows are read in blocks of about this many bytes: a 70B model's embedding is 2 GB in bf16, and reading it whole
# would add that (and its file pages) to the peak of every rank that keeps any of it.
BLOCK_BYTES = 64 << 20


def copy_rows(target: torch.Tensor, weights: DirectoryWeights, key: str, start: int | None, stop: int | None) -> None:
    """`target` = rows [start, stop) of the file tensor `key` (all of it for None), read block by block."""
    shape, dtype = weights.shapes[key]
    start, stop = (0, shape[0]) if start is None and len(shape) else (start, stop)
    if tuple(target.shape) != ((stop - start, *shape[1:]) if len(shape) else ()):
        raise ShipyardError(f"{key}: this rank holds {tuple(target.shape)} of it, but rows {start}:{stop} of "
                            f"{weights.directory}'s {tuple(shape)} tensor were asked for")
    if not len(shape):
        target.copy_(weights.load_rows(key))
        return
    row_bytes = max(1, shape[1:].numel() * dtype.itemsize)
    step = max(1, BLOCK_BYTES // row_bytes)
    for first in range(start, stop, step):
        last = min(first + step, stop)
        target[first - start:last - start].copy_(weights.load_rows(key, first, last))

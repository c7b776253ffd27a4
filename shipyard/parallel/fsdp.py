"""Parallelism, activation checkpointing and compile, applied to a plain Hugging Face model in one place.

Order matters and follows torchtitan: checkpoint-wrap each decoder block,
compile each block, `fully_shard` each block, then `fully_shard` the root
(embeddings, final norm and LM head stay together in the root group, which
keeps tied embeddings tied). Parameter names stay Hugging Face names: state
dicts and optimizer state are keyed by them, and the few wrapper prefixes
(`_checkpoint_wrapped_module.`) are stripped wherever names are written.
"""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from shipyard.config import ParallelConfig
from shipyard.errors import ShipyardError
from shipyard.parallel.dist import DistInfo


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder block list of a Hugging Face causal LM (model.model.layers and the like)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model
    for attr in ("layers", "h", "blocks", "decoder_layers"):
        layers = getattr(inner, attr, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ShipyardError(f"{type(model).__name__}: cannot find its decoder layer list (looked for layers, h, blocks)")


def use_fsdp(cfg: ParallelConfig, dist_info: DistInfo) -> bool:
    return cfg.fsdp == "on" or (cfg.fsdp == "auto" and dist_info.world_size > 1)


def data_parallel_mesh(cfg: ParallelConfig, dist_info: DistInfo) -> DeviceMesh:
    shard = cfg.dp_shard if cfg.dp_shard > 0 else dist_info.world_size // cfg.dp_replicate
    if cfg.dp_replicate * shard != dist_info.world_size:
        raise ShipyardError(
            f"parallel.dp_replicate ({cfg.dp_replicate}) x parallel.dp_shard ({shard}) must equal the number of "
            f"ranks ({dist_info.world_size})"
        )
    device_type = dist_info.device.type
    if cfg.dp_replicate == 1:
        return init_device_mesh(device_type, (shard,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(device_type, (cfg.dp_replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard"))


def apply_parallelism(model: torch.nn.Module, cfg: ParallelConfig, dist_info: DistInfo, bf16: bool) -> torch.nn.Module:
    """Activation checkpointing, compile and FSDP2 on `model` (in place); returns it on its device."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        if cfg.activation_checkpointing == "full":
            layer = checkpoint_wrapper(layer, preserve_rng_state=False)
        if cfg.compile:
            layer.compile()  # nn.Module.compile: compiled in place, no `_orig_mod.` in parameter names
        layers[i] = layer
    if not use_fsdp(cfg, dist_info):
        return model.to(dist_info.device)

    mesh = data_parallel_mesh(cfg, dist_info)
    # bf16 compute with fp32 gradient reduction on GPU; exact fp32 on CPU.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    model.to(dist_info.device)
    for i, layer in enumerate(layers):
        # The last block is gathered again right away for backward: keeping it saves one all-gather.
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward and i < len(layers) - 1)
    # The root (embeddings, final norm, LM head) stays gathered after forward: the loss projects hidden
    # states with the LM head weight after the forward returns (train/loss.py), and backward needs it next.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return model

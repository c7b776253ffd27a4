"""Parallelism, activation checkpointing and compile, applied to a plain Hugging Face model in one place.

Order matters and follows torchtitan: checkpoint-wrap each decoder block,
compile each block, `fully_shard` each block, then `fully_shard` the root
(embeddings, final norm and LM head stay together in the root group, which
keeps tied embeddings tied). A vision-language model's vision blocks are
units of their own too, before the decoder's (its patch embedding and
projector stay in the root group). Parameter names stay Hugging Face names: state
dicts and optimizer state are keyed by them, and the few wrapper prefixes
(`_checkpoint_wrapped_module.`) are stripped wherever names are written.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from shipyard.config import ParallelConfig
from shipyard.models.structure import decoder_layers
from shipyard.models.vision import vision_blocks
from shipyard.parallel.dist import DistInfo
from shipyard.parallel.topology import Topology


# Selective activation checkpointing keeps what is expensive to recompute (matmuls, attention) and
# recomputes the rest; memory falls by the pointwise activations at a few percent of extra compute.
_KEEP = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEEP else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed(layer: torch.nn.Module, mode: str) -> torch.nn.Module:
    if mode == "none":
        return layer
    if mode == "selective":
        context = partial(create_selective_checkpoint_contexts, _keep_matmuls)
        return checkpoint_wrapper(layer, context_fn=context, preserve_rng_state=False)
    return checkpoint_wrapper(layer, preserve_rng_state=False)


def compiles(cfg: ParallelConfig, device: torch.device) -> bool:
    return cfg.compile is True or (cfg.compile == "auto" and device.type == "cuda")


def use_fsdp(cfg: ParallelConfig, dist_info: DistInfo) -> bool:
    """FSDP2 when asked, or by default whenever several ranks share the data."""
    return cfg.fsdp is True or (cfg.fsdp == "auto" and dist_info.world_size // cfg.pp > 1)


def apply_parallelism(model: torch.nn.Module, cfg: ParallelConfig, topo: Topology, device: torch.device,
                      bf16: bool) -> torch.nn.Module:
    """Activation checkpointing, compile and FSDP2 on `model` (in place); returns it on its device, or still on
    the meta device when it was built empty (checkpoint/base_weights.py fills it, sharded)."""
    # A model of one block (an EAGLE-3 drafter) is one FSDP2 unit: the root.
    layers = torch.nn.ModuleList() if getattr(model, "single_block", False) else decoder_layers(model)
    blocks = list(layers.named_children())
    for key, layer in blocks:
        layer = checkpointed(layer, cfg.activation_checkpointing)
        if compiles(cfg, device):
            layer.compile()  # nn.Module.compile: compiled in place, no `_orig_mod.` in parameter names
        setattr(layers, key, layer)
    vision = vision_blocks(model) if hasattr(model, "config") else None
    if not any(p.is_meta for p in model.parameters()):
        model.to(device)  # an empty model (built on meta) gets its storage, on the device, when it is filled
    if topo.fsdp_mesh is None:
        return model

    mesh = topo.fsdp_mesh
    # bf16 compute with fp32 gradient reduction on GPU; exact fp32 on CPU.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in vision if vision is not None else ():
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    for i, (_, layer) in enumerate(layers.named_children()):
        # The last block is gathered again right away for backward: keeping it saves one all-gather.
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward and i < len(blocks) - 1)
    # MTP layers (models/mtp.py) after the base's blocks, each a unit of its own: the loss runs them after the
    # base's forward, and each gathers its weights for its own forward and backward.
    for layer in getattr(getattr(model, "mtp", None), "layers", ()):
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    # The root (embeddings, final norm, LM head) stays gathered after forward: the loss projects hidden
    # states with the LM head weight after the forward returns (train/loss.py), and backward needs it next.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return model

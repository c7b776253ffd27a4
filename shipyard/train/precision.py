"""What the forwards of a run compute in: bf16 autocast over fp32 weights, or exact fp32."""

from __future__ import annotations

import contextlib

import torch

from shipyard.config import Recipe


def bf16_enabled(recipe: Recipe, device: torch.device) -> bool:
    """bf16 compute on GPU (weights and optimizer stay fp32); exact fp32 on CPU unless asked."""
    mode = recipe.train.mixed_precision
    return mode == "bf16" or (mode == "auto" and device.type == "cuda")


def autocast_for(recipe: Recipe, device: torch.device):
    """A context factory: bf16 autocast when `bf16_enabled`, else nothing."""
    if not bf16_enabled(recipe, device):
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)

"""LoRA on fused MoE expert weights: one rank-r pair per expert, saved as PEFT `target_parameters` adapters.

transformers 5 holds a MoE layer's experts as 3-D parameters (`mlp.experts.gate_up_proj`, shape
(experts, 2 x intermediate, hidden); `mlp.experts.down_proj`), not as Linear modules, so the Linear adapters of
lora.py cannot reach them. Here the experts module keeps its parameters under their Hugging Face names and gains

    lora_A  ParameterDict {weight name: (experts, r, in)}
    lora_B  ParameterDict {weight name: (experts, out, r)}

and a forward pre-hook that shadows each adapted weight with `W + scale * B @ A` for that forward (an instance
attribute, which Python finds before nn.Module's parameter lookup; the forward hook removes it again). The
experts' own forward (eager, grouped_mm, ...) then runs unchanged on the adapted weights, exactly as PEFT's
ParamWrapper does it with a parametrization, while checkpoints, FSDP2 and the optimizer keep seeing
`mlp.experts.gate_up_proj`. Cost: one adapted copy of each expert tensor per layer while its forward and backward
need it (activation checkpointing keeps that to one layer at a time), as with PEFT.

"in" and "out" are the matmul's: (experts, out, in) is the usual layout; experts modules flagged `is_transposed`
store (experts, in, out), and their delta is transposed to match.

PEFT's file layout (its ParamWrapper; vLLM reads the same): per experts module, the adapted weights nest
in the order the module registers them, the first innermost, so with both adapted `experts.base_layer.lora_A`
belongs to gate_up_proj and `experts.lora_A` to down_proj. lora_A is (experts x r, in), expert-major; lora_B is
(out, r x experts), expert index fastest.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shipyard.models.structure import clean_name


def expert_weights(model: nn.Module) -> list[str]:
    """Clean names of fused expert weights, in registration order: 3-D parameters of the model's own modules
    (torch's layers, such as Conv1d kernels, and adapters are not experts)."""
    out = []
    for module_name, module in model.named_modules():
        if type(module).__module__.startswith("torch."):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.ndim == 3:
                out.append(clean_name(f"{module_name}.{name}"))
    return out


def is_transposed(module: nn.Module) -> bool:
    """transformers' experts modules say whether they store (experts, in, out) instead of (experts, out, in)."""
    return bool(getattr(module, "is_transposed", False))


def adapted_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                   transposed: bool) -> torch.Tensor:
    """W + scale * B @ A per expert, in W's dtype (PEFT folds it the same way, with one baddbmm)."""
    with torch.autocast(device_type=weight.device.type, enabled=False):
        if transposed:
            return torch.baddbmm(weight, lora_a.mT, lora_b.mT, alpha=scale)
        return torch.baddbmm(weight, lora_b, lora_a, alpha=scale)


def _shadow_adapted(module: nn.Module, args) -> None:
    for name in module.lora_A:
        # module._parameters, not getattr: a forward that raised may have left its shadow behind.
        module.__dict__[name] = adapted_weight(module._parameters[name], module.lora_A[name], module.lora_B[name],
                                               module.lora_scaling, is_transposed(module))


def _drop_shadow(module: nn.Module, args, output) -> None:
    for name in module.lora_A:
        module.__dict__.pop(name, None)


def add_expert_adapters(model: nn.Module, names: list[str], r: int, scale: float, generator: torch.Generator) -> None:
    """Adapters on the named expert weights: A drawn like PEFT's (uniform, bound 1/sqrt(in)), B zero."""
    modules = {clean_name(n): m for n, m in model.named_modules()}
    for name in names:
        module_name, param_name = name.rsplit(".", 1)
        experts = modules[module_name]
        weight = experts._parameters[param_name]
        n_experts, rows, cols = weight.shape
        fan_in, fan_out = (rows, cols) if is_transposed(experts) else (cols, rows)
        if not hasattr(experts, "lora_A"):
            experts.lora_A, experts.lora_B = nn.ParameterDict(), nn.ParameterDict()
            experts.lora_scaling = scale
            experts.register_forward_pre_hook(_shadow_adapted)
            experts.register_forward_hook(_drop_shadow)
        # A base built empty (meta): the adapters start on the CPU with their values, kept when the base is filled.
        kw = dict(device="cpu" if weight.is_meta else weight.device, dtype=weight.dtype)
        bound = 1 / math.sqrt(fan_in)
        with torch.no_grad():
            a = torch.empty(n_experts, r, fan_in, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        experts.lora_A[param_name] = nn.Parameter(a.to(**kw))
        experts.lora_B[param_name] = nn.Parameter(torch.zeros(n_experts, fan_out, r, **kw))


def peft_module_paths(adapted: list[str]) -> dict[str, str]:
    """{adapted expert weight: the module path PEFT saves its pair under}; `adapted` in registration order."""
    by_module: dict[str, list[str]] = {}
    for name in adapted:
        by_module.setdefault(name.rsplit(".", 1)[0], []).append(name)
    return {name: module + ".base_layer" * (len(names) - 1 - i)
            for module, names in by_module.items() for i, name in enumerate(names)}


def to_peft_layout(which: str, tensor: torch.Tensor) -> torch.Tensor:
    """A (experts, r, in) -> (experts x r, in); B (experts, out, r) -> (out, r x experts)."""
    if which == "A":
        return tensor.reshape(-1, tensor.shape[-1]).contiguous()
    return tensor.permute(1, 2, 0).reshape(tensor.shape[1], -1).contiguous()


def from_peft_layout(which: str, tensor: torch.Tensor, r: int) -> torch.Tensor:
    if which == "A":
        return tensor.reshape(-1, r, tensor.shape[-1]).contiguous()
    return tensor.reshape(tensor.shape[0], r, -1).permute(2, 0, 1).contiguous()


# Hub checkpoints keep fused expert weights one matrix per expert; transformers fuses them at load (its conversion
# mapping): [gate_proj; up_proj] rows -> gate_up_proj for Qwen2/3-MoE, DeepSeek, GLM and the like, [w1; w3] for
# Mixtral; down_proj / w2 stacked as they are.
_CHECKPOINT_PARTS = {"gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")), "down_proj": (("down_proj",), ("w2",))}


def checkpoint_slices(fused: str, shapes: dict) -> dict[str, tuple[int, int, int]] | None:
    """{per-expert checkpoint tensor: (expert, first row, end row) within the fused weight} when a checkpoint
    whose tensors are `shapes` ({name: (shape, dtype)}) stores the fused expert weight `fused` one matrix per
    expert; None when it does not."""
    module, leaf = fused.rsplit(".", 1)
    for parts in _CHECKPOINT_PARTS.get(leaf, ()):
        out: dict[str, tuple[int, int, int]] = {}
        expert = 0
        while all(f"{module}.{expert}.{p}.weight" in shapes for p in parts):
            start = 0
            for p in parts:
                name = f"{module}.{expert}.{p}.weight"
                rows = shapes[name][0][0]
                out[name] = (expert, start, start + rows)
                start += rows
            expert += 1
        if out:
            return out
    return None

"""LoRA adapters on a Hugging Face model, saved in the Hugging Face PEFT format.

Why not the `peft` library's injection: it replaces each targeted Linear with a
wrapper, renaming every base weight (`q_proj.base_layer.weight`) and keeping a
second full copy of each `modules_to_save` module. Here a targeted Linear stays
where it is; it gains two children, `lora_A` and `lora_B`, and a forward hook
adds `scale * lora_B(lora_A(dropout(x)))` to its output. So

- base parameter names stay Hugging Face names (checkpoints, FSDP2 groups and
  the optimizer see the model they would see without LoRA);
- adapter names are PEFT's saved names minus the `base_model.model.` prefix
  (`model.layers.0.self_attn.q_proj.lora_A.weight`), so saving is a rename;
- the module tree is unchanged for FSDP2 (adapters shard with their block) and
  for per-block compile (hooks are traced with the block).

`peft` itself is the reference in the tests: `PeftModel.from_pretrained`
loads what this module saves and must give the same logits.
"""

from __future__ import annotations

import fnmatch
import math
import re

import torch
from torch import nn

from shipyard.config import LoraConfig
from shipyard.errors import ShipyardError, did_you_mean
from shipyard.export.hf import clean_name
from shipyard.models.vision import is_vision_language, parameter_groups

PEFT_PREFIX = "base_model.model."
_FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _lora_hook(module: nn.Linear, args, output):
    return output + module.lora_B(module.lora_A(module.lora_dropout(args[0]))) * module.lora_scaling


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear but the LM head, by clean dotted name."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        clean_name(name): m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m is not head and not name.endswith(("lora_A", "lora_B"))
    }


def _matches(pattern: str, name: str) -> bool:
    return pattern == name or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def resolve_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Dotted names of the linear layers to adapt; an entry matching nothing is an error naming candidates."""
    linears = linear_modules(model)
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linears})
    patterns = ["*"] if cfg.target_modules == "all-linear" else cfg.target_modules
    for pattern in [*patterns, *cfg.exclude_modules]:
        if not any(_matches(pattern, n) for n in linears):
            raise ShipyardError(
                f"lora: '{pattern}' matches no linear layer of {type(model).__name__}{did_you_mean(pattern, leaf_names)}; "
                f"candidates: {', '.join(leaf_names)} (names, dotted paths like model.layers.0.mlp.up_proj, or globs)"
            )
    chosen = [n for n in linears if any(_matches(p, n) for p in patterns)]
    if cfg.target_modules == "all-linear" and is_vision_language(model.config):
        # A vision-language model's LoRA adapts its language model; name vision layers to adapt them too.
        language = {n.rsplit(".", 1)[0] for n in parameter_groups(model)["language_model"]}
        chosen = [n for n in chosen if n in language]
    return [n for n in chosen if not any(_matches(p, n) for p in cfg.exclude_modules)]


def resolve_trainable(model: nn.Module, cfg: LoraConfig) -> list[str]:
    modules = {clean_name(n): m for n, m in model.named_modules()}
    out = []
    for pattern in cfg.trainable_modules:
        found = [n for n in modules if n and _matches(pattern, n) and not n.endswith(("lora_A", "lora_B"))]
        if not found:
            raise ShipyardError(f"lora.trainable_modules: '{pattern}' matches no module of {type(model).__name__}")
        out.extend(found)
    return out


def apply_lora(model: nn.Module, cfg: LoraConfig, seed: int) -> list[str]:
    """Freeze the base, add adapters to the targeted linears; returns their names. Call before parallelism."""
    targets = resolve_targets(model, cfg)
    trainable = resolve_trainable(model, cfg)
    for param in model.parameters():
        param.requires_grad_(False)
    scale = cfg.alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    by_clean = {clean_name(n): m for n, m in modules.items()}
    for name in targets:
        linear = by_clean[name]
        device, dtype = linear.weight.device, linear.weight.dtype
        if device.type == "meta":  # a base built empty: adapters start with their values (kept when it is filled)
            device = torch.device("cpu")
        linear.lora_A = nn.Linear(linear.in_features, cfg.r, bias=False, device=device, dtype=dtype)
        linear.lora_B = nn.Linear(cfg.r, linear.out_features, bias=False, device=device, dtype=dtype)
        with torch.no_grad():  # PEFT's default init: A like nn.Linear (kaiming-uniform), B zero -> no change at step 0
            bound = 1 / math.sqrt(linear.in_features)
            linear.lora_A.weight.copy_(torch.empty_like(linear.lora_A.weight).uniform_(-bound, bound, generator=generator))
            linear.lora_B.weight.zero_()
        linear.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        linear.lora_scaling = scale
        linear.register_forward_hook(_lora_hook)
    for name in trainable:
        for param in by_clean[name].parameters():
            param.requires_grad_(True)
    return targets


def is_adapter_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_state_names(model: nn.Module) -> list[str]:
    """Clean names of every parameter a LoRA run trains (adapters and trainable modules)."""
    return [clean_name(n) for n, p in model.named_parameters() if p.requires_grad]


def to_peft_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {PEFT_PREFIX + clean_name(k): v for k, v in state.items()}


def from_peft_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}


def adapter_target_modules(module_names: list[str], model_module_names: set[str] | None = None) -> list[str]:
    """`target_modules` for adapter_config.json: HF projection names, as PEFT and vLLM know them.

    Wrapper prefixes (`_orig_mod.`, `_checkpoint_wrapped_module.`) are dropped; fused projections
    (`qkv_proj`, `gate_up_proj`) are expanded to the separate HF names unless the Hugging Face model
    itself has a module of the fused name (Phi-3 does), in which case that name is what loaders expect.
    """
    leaves = {clean_name(n).rsplit(".", 1)[-1] for n in module_names}
    out: set[str] = set()
    for leaf in leaves:
        if leaf in _FUSED and (model_module_names is None or leaf not in model_module_names):
            out.update(_FUSED[leaf])
        else:
            out.add(leaf)
    return sorted(out)


def peft_target_modules(targets: list[str], model_names: set[str], other_linears: list[str]) -> list[str] | str:
    """Projection names (`q_proj`), or, when a name is also used by linears left alone (a vision tower's
    q_proj beside the language model's), a regex of the exact module paths, which PEFT matches in full."""
    leaves = adapter_target_modules(targets, model_names)
    if not {n.rsplit(".", 1)[-1] for n in other_linears} & set(leaves):
        return leaves
    return "^(" + "|".join(re.escape(clean_name(t)) for t in sorted(targets)) + ")$"


def peft_config_dict(cfg: LoraConfig, targets: list[str], trainable: list[str], base_name: str, model_names: set[str],
                     other_linears: list[str] = ()) -> dict:
    """The minimal adapter_config.json Hugging Face PEFT and vLLM need."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": peft_target_modules(targets, model_names, list(other_linears)),
        "modules_to_save": sorted({n.rsplit(".", 1)[-1] for n in trainable}) or None,
        "use_rslora": cfg.use_rslora,
        "bias": "none",
        "base_model_name_or_path": base_name,
        "inference_mode": True,
    }


def merged_weight(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B @ A, computed in fp32 and returned in the base weight's dtype."""
    return (base.float() + scale * (lora_b.float() @ lora_a.float())).to(base.dtype)


_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def split_adapter_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """({module: (A, B)}, {other trained weights}) from an adapter state dict with clean (non-PEFT) keys."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, value in state.items():
        m = _LORA_KEY.match(key)
        if m:
            pairs.setdefault(m["module"], {})[m["which"]] = value
        else:
            rest[key] = value
    return {k: (v["A"], v["B"]) for k, v in pairs.items()}, rest

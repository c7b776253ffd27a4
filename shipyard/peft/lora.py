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

Fused MoE expert weights (3-D parameters, not Linears) get adapters too when
`lora.target_experts` asks (experts.py); they are saved as PEFT saves its
`target_parameters` adapters.

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
from shipyard.models.structure import clean_name
from shipyard.models import audio_lm
from shipyard.models.vision import parameter_groups, vision_tower
from shipyard.peft.experts import (
    add_expert_adapters,
    expert_weights,
    from_peft_layout,
    peft_module_paths,
    to_peft_layout,
)

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
    experts = _expert_names_and_modules(model) if cfg.target_experts else []
    for pattern in [*patterns, *cfg.exclude_modules]:
        excluding_experts = pattern in cfg.exclude_modules and any(_matches(pattern, n) for n in experts)
        if not any(_matches(pattern, n) for n in linears) and not excluding_experts:
            raise ShipyardError(
                f"lora: '{pattern}' matches no linear layer of {type(model).__name__}{did_you_mean(pattern, leaf_names)}; "
                f"candidates: {', '.join(leaf_names)} (names, dotted paths like model.layers.0.mlp.up_proj, or globs)"
            )
    chosen = [n for n in linears if any(_matches(p, n) for p in patterns)]
    speech = audio_lm.is_audio_language(getattr(model, "config", None))
    if cfg.target_modules == "all-linear" and (vision_tower(model) is not None or speech):
        # A vision- or speech-language model's LoRA adapts its language model; name tower layers to adapt them too.
        groups = audio_lm.parameter_groups(model) if speech else parameter_groups(model)
        language = {n.rsplit(".", 1)[0] for n in groups["language_model"]}
        chosen = [n for n in chosen if n in language]
    return [n for n in chosen if not any(_matches(p, n) for p in cfg.exclude_modules)]


def _expert_names_and_modules(model: nn.Module) -> list[str]:
    names = expert_weights(model)
    return names + sorted({n.rsplit(".", 1)[0] for n in names})


def resolve_expert_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Fused expert weights to adapt (lora.target_experts), in registration order, minus lora.exclude_modules
    (which may name the weight or its experts module)."""
    if not cfg.target_experts:
        return []
    names = expert_weights(model)
    if not names:
        raise ShipyardError(
            f"lora.target_experts: {type(model).__name__} has no fused expert weights (3-D parameters); "
            "experts held as linear layers are adapted through lora.target_modules. Set lora.target_experts=false"
        )
    return [n for n in names if not any(_matches(p, n) or _matches(p, n.rsplit(".", 1)[0])
                                        for p in cfg.exclude_modules)]


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
    experts = resolve_expert_targets(model, cfg)
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
    add_expert_adapters(model, experts, cfg.r, scale, generator)
    for name in trainable:
        for param in by_clean[name].parameters():
            param.requires_grad_(True)
    return targets


def is_adapter_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_state_names(model: nn.Module) -> list[str]:
    """Clean names of every parameter a LoRA run trains (adapters and trainable modules)."""
    return [clean_name(n) for n, p in model.named_parameters() if p.requires_grad]


# An adapter tensor by clean name: <module>.lora_A.weight (a Linear's) or <experts>.lora_A.<weight> (experts.py);
# either way the adapted base tensor is <prefix>.<leaf>.
_ADAPTER_KEY = re.compile(r"^(?P<prefix>.+)\.lora_(?P<which>[AB])\.(?P<leaf>[^.]+)$")


def to_peft_state(state: dict[str, torch.Tensor], adapted_experts: list[str] = ()) -> dict[str, torch.Tensor]:
    """Trained tensors by clean name -> adapter_model.safetensors' keys and layout (PEFT's, by construction for
    Linears; expert pairs reshaped and renamed as PEFT's ParamWrapper saves them)."""
    paths = peft_module_paths(list(adapted_experts))
    out = {}
    for key, value in state.items():
        key = clean_name(key)
        m = _ADAPTER_KEY.match(key)
        adapted = f"{m['prefix']}.{m['leaf']}" if m else None
        if adapted in paths:
            key, value = f"{paths[adapted]}.lora_{m['which']}.weight", to_peft_layout(m["which"], value)
        out[PEFT_PREFIX + key] = value
    return out


def from_peft_state(state: dict[str, torch.Tensor], adapted_experts: list[str] = (), r: int = 0) -> dict[str, torch.Tensor]:
    """The inverse of to_peft_state (`r`: the adapter's rank, which the expert layout folds in)."""
    modules = {path: name for name, path in peft_module_paths(list(adapted_experts)).items()}
    out = {}
    for key, value in state.items():
        key = key.removeprefix(PEFT_PREFIX)
        m = _ADAPTER_KEY.match(key)
        if m and m["leaf"] == "weight" and m["prefix"] in modules:
            adapted = modules[m["prefix"]]
            module, leaf = adapted.rsplit(".", 1)
            key, value = f"{module}.lora_{m['which']}.{leaf}", from_peft_layout(m["which"], value, r)
        out[key] = value
    return out


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


def renamed_by_peft(model: nn.Module, target_modules: list[str]) -> set[str]:
    """The names of `target_modules` that PEFT does not keep as module targets when it loads an adapter for `model`.

    For MoE families whose experts were Linears in transformers 4 (Mixtral; Qwen2/3-MoE, DeepSeek-V3, GLM-4.5 and
    the others transformers converts like Qwen2-MoE), PEFT turns the old expert projection names (gate_proj, up_proj,
    down_proj; w1-w3) into fused expert `target_parameters` and removes them from target_modules, so a dense MLP or
    a shared expert of that name silently loses its adapter (or, named alone, fails to load). PEFT itself is asked,
    one name at a time, so the answer follows the installed version.
    """
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # a PEFT without transformers-5 conversions loads target_modules as written
        return set()
    renamed = set()
    for name in target_modules:
        probe = PeftLoraConfig(target_modules=[name])
        try:
            convert_peft_config_for_transformers(probe, model, None)
        except ValueError:  # "cannot convert gate_proj without also targeting up_proj"
            renamed.add(name)
            continue
        if name not in set(probe.target_modules or ()):
            renamed.add(name)
    return renamed


def peft_rewrites(model: nn.Module, peft_config: dict) -> str | None:
    """What PEFT's load-time conversion would still change in adapter_config.json's targets, or None."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:
        return None
    keys = ("target_modules", "target_parameters")
    written = {k: peft_config.get(k) for k in keys}
    probe = PeftLoraConfig(r=peft_config["r"], lora_alpha=peft_config["lora_alpha"], **written)
    before = {k: getattr(probe, k) for k in keys}
    try:
        convert_peft_config_for_transformers(probe, model, None)
    except ValueError as e:
        return str(e)
    after = {k: getattr(probe, k) for k in keys}
    norm = lambda v: v if isinstance(v, str) else sorted(v) if v else None  # noqa: E731
    changed = {k: (norm(before[k]), norm(after[k])) for k in keys if norm(before[k]) != norm(after[k])}
    for key in ("rank_pattern", "alpha_pattern"):
        if getattr(probe, key):
            changed[key] = (None, getattr(probe, key))
    return "; ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()) or None


def peft_parameter_names(adapted: list[str], model_parameters: list[str]) -> list[str]:
    """`target_parameters` entries: per adapted tensor, the shortest dotted suffix (`experts.gate_up_proj`) whose
    matches among the model's parameters are all adapted (PEFT matches an entry as a suffix), else its full name."""
    chosen = set(adapted)
    out = set()
    for name in adapted:
        parts = name.split(".")
        for k in range(2, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if all(n in chosen for n in model_parameters if n == suffix or n.endswith("." + suffix)):
                out.add(suffix)
                break
    return sorted(out)


def peft_config_dict(cfg: LoraConfig, targets: list[str], trainable: list[str], base_name: str, model_names: set[str],
                     other_linears: list[str] = (), target_parameters: list[str] = ()) -> dict:
    """The minimal adapter_config.json Hugging Face PEFT and vLLM need.

    `target_parameters`: tensors PEFT adapts through its ParamWrapper (fused experts; Linears whose names PEFT
    would rename, see renamed_by_peft). ParamWrapper refuses any lora_dropout, so such an adapter records 0: dropout
    only acts in training, and shipyard_lora.json keeps the value trained with.
    """
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": 0.0 if target_parameters else cfg.dropout,
        "target_modules": peft_target_modules(targets, model_names, list(other_linears)) if targets else [],
        "modules_to_save": sorted({n.rsplit(".", 1)[-1] for n in trainable}) or None,
        "use_rslora": cfg.use_rslora,
        "bias": "none",
        "base_model_name_or_path": base_name,
        "inference_mode": True,
    }
    if target_parameters:
        config["target_parameters"] = list(target_parameters)
    return config


def merged_weight(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                  transposed: bool = False) -> torch.Tensor:
    """W + scale * B @ A (per expert for 3-D expert weights), computed in fp32, returned in the base weight's dtype.
    `transposed`: expert weights stored (experts, in, out)."""
    delta = lora_b.float() @ lora_a.float()
    return (base.float() + scale * (delta.mT if transposed else delta)).to(base.dtype)


def split_adapter_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """({adapted base tensor: (A, B)}, {other trained weights}) from an adapter state dict with clean keys;
    `model.layers.0.self_attn.q_proj.weight` or `model.layers.0.mlp.experts.gate_up_proj` name a pair."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, value in state.items():
        m = _ADAPTER_KEY.match(key)
        if m:
            pairs.setdefault(f"{m['prefix']}.{m['leaf']}", {})[m["which"]] = value
        else:
            rest[key] = value
    return {k: (v["A"], v["B"]) for k, v in pairs.items()}, rest

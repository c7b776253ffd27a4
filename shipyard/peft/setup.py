"""Preparing a LoRA run: a loadable base, adapters on the model, and what adapter checkpoints record."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from shipyard.config import Recipe
from shipyard.models.save import ModelMeta, write_hf_metadata, write_weights
from shipyard.models.structure import clean_name, tied_aliases
from shipyard.fsutil import publish
from shipyard.parallel.dist import DistInfo, barrier
from shipyard.peft.experts import is_transposed
from shipyard.peft.lora import (
    adapter_target_modules,
    apply_lora,
    is_adapter_param,
    linear_modules,
    peft_config_dict,
    peft_parameter_names,
    peft_rewrites,
    renamed_by_peft,
    resolve_expert_targets,
    resolve_trainable,
)

log = logging.getLogger(__name__)


def setup_lora(model, recipe: Recipe, meta: ModelMeta, source, dist_info: DistInfo) -> dict:
    """Add adapters to `model`; returns what adapter checkpoints record (adapter_config.json and more).

    The adapter's `base_model_name_or_path` must load in PEFT and vLLM: a hub id or a directory. A preset has
    neither, so its initial weights are written once to OUTPUT_DIR/base_model and the adapter points there.
    """
    if source.kind == "preset":
        base_dir = (recipe.out_dir / "base_model").resolve()
        if dist_info.is_main and not base_dir.exists():
            write_base_model(base_dir, model, meta)
        barrier()
        base_name = str(base_dir)
    else:
        # A hub id stays the hub id (what a user of the adapter downloads); a folder is named by its path.
        base_name = source.name if source.kind == "hub" else str(source.local_dir)
    meta.base_name = base_name
    model_names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    linears = list(linear_modules(model))
    targets = apply_lora(model, recipe.lora, recipe.seed)
    experts = resolve_expert_targets(model, recipe.lora)
    others = [n for n in linears if n not in set(targets)]
    trainable = resolve_trainable(model, recipe.lora)
    unadapted = unadaptable_weights(model, trainable, experts)
    if unadapted:
        log.warning(
            "lora: adapting %d linear layers (%s)%s; %d weight tensors are not linear layers and cannot get adapters, "
            "so they stay frozen: %s. To train them, set lora.target_experts=true (fused MoE experts), name their "
            "modules in lora.trainable_modules (trained in full) or fine-tune without LoRA.",
            len(targets), ", ".join(sorted({t.rsplit(".", 1)[-1] for t in targets})),
            f" and {len(experts)} expert weights" if experts else "", len(unadapted), _summarise(unadapted))
    # PEFT renames some projection names of MoE families at load (renamed_by_peft): Linears adapted under such a
    # name are written as target_parameters, which PEFT adapts in place with the same keys and numbers.
    renamed = renamed_by_peft(model, adapter_target_modules(targets, model_names))
    by_parameter = [t for t in targets if set(adapter_target_modules([t], model_names)) & renamed]
    base_params = [clean_name(n) for n, _ in model.named_parameters() if not is_adapter_param(n)]
    parameters = peft_parameter_names([*experts, *(f"{t}.weight" for t in by_parameter)], base_params)
    if by_parameter:
        log.info("lora: %d adapted linear layers (%s) are listed in adapter_config.json's target_parameters: PEFT's "
                 "transformers-5 conversion for %s would drop them from target_modules at load%s",
                 len(by_parameter), _summarise(by_parameter), type(model).__name__,
                 f" (lora_dropout recorded as 0 there, as PEFT requires; {recipe.lora.dropout} was trained with)"
                 if recipe.lora.dropout else "")
    peft_config = peft_config_dict(recipe.lora, [t for t in targets if t not in by_parameter], trainable, base_name,
                                   model_names, others, parameters)
    if rewrites := peft_rewrites(model, peft_config):
        log.warning("lora: PEFT will change this adapter's targets when it loads it (%s): PeftModel may not "
                    "reproduce the trained model; `shipyard verify` compares them", rewrites)
    modules = {clean_name(n): m for n, m in model.named_modules()}
    return {
        "peft_config": peft_config,
        "lora_meta": {**recipe.lora.model_dump(mode="json"), "adapted_modules": targets, "trainable_modules": trainable,
                      "adapted_parameters": experts,
                      "transposed_parameters": [e for e in experts if is_transposed(modules[e.rsplit(".", 1)[0]])],
                      "not_adapted": unadapted},
    }


def unadaptable_weights(model, trainable: list[str], adapted: list[str] = ()) -> list[str]:
    """Matrices LoRA cannot reach: fused MoE expert weights (3-D parameters, one slice per expert) left out of
    lora.target_experts, and the like."""
    return [clean_name(n) for n, p in model.named_parameters()
            if p.ndim >= 3 and not is_adapter_param(n) and clean_name(n) not in set(adapted)
            and not any(clean_name(n).startswith(t + ".") for t in trainable)]


def _summarise(names: list[str]) -> str:
    """`model.layers.*.mlp.experts.gate_up_proj` for names that differ only in their layer index."""
    return ", ".join(sorted({re.sub(r"\.\d+\.", ".*.", n) for n in names}))


def write_base_model(out_dir: Path, model, meta: ModelMeta) -> None:
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    aliases = tied_aliases(model)
    dtype = write_weights(partial, {k: v for k, v in model.state_dict().items() if k not in aliases}, meta.layout)
    write_hf_metadata(partial, meta, dtype)
    publish(partial, out_dir)

"""Hugging Face PEFT adapter directories: write, read, and merge into base weights.

    adapter_model.safetensors   base_model.model.<module>.lora_A.weight / lora_B.weight (+ trained modules;
                                fused expert pairs in PEFT's target_parameters layout, see experts.py)
    adapter_config.json         the minimal HF-PEFT fields (peft_type, task_type, r, lora_alpha, target_modules, ...)
    shipyard_lora.json          the rest of the recipe's LoRA settings and the exact adapted module and expert
                                weight names (in registration order: PEFT's expert keys depend on it)
    tokenizer files             normalised like every shipyard export
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from shipyard.checkpoint.weights import DirectoryWeights
from shipyard.errors import ShipyardError
from shipyard.export.hf import write_tokenizer, write_weight_file
from shipyard.models.probe_file import write_probe
from shipyard.peft.experts import checkpoint_slices
from shipyard.peft.lora import from_peft_state, merged_weight, split_adapter_state, to_peft_state

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LORA_META = "shipyard_lora.json"


def is_adapter_dir(directory: Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def write_adapter_dir(out_dir: Path, state: dict[str, torch.Tensor], peft_config: dict, lora_meta: dict, tokenizer,
                      probe: dict | None) -> None:
    """`state` has clean model names (model.layers.0.self_attn.q_proj.lora_A.weight), full tensors."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_weight_file(out_dir / ADAPTER_WEIGHTS, to_peft_state(state, lora_meta.get("adapted_parameters", [])))
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    (out_dir / LORA_META).write_text(json.dumps(lora_meta, indent=2) + "\n")
    write_tokenizer(out_dir, tokenizer)
    if probe is not None:
        write_probe(out_dir, probe)


def read_lora_meta(directory: Path) -> dict:
    """shipyard_lora.json, or {} for an adapter shipyard did not write."""
    path = Path(directory) / LORA_META
    return json.loads(path.read_text()) if path.is_file() else {}


def read_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, adapter weights with clean model names, expert pairs as (experts, r, in) / (experts,
    out, r))."""
    directory = Path(directory)
    if not (directory / ADAPTER_WEIGHTS).is_file():
        raise ShipyardError(f"{directory}: {ADAPTER_CONFIG} without {ADAPTER_WEIGHTS}")
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    experts = read_lora_meta(directory).get("adapted_parameters", [])
    if config.get("target_parameters") and not experts and any(
            t.rsplit(".", 1)[-1] != "weight" for t in config["target_parameters"]):
        raise ShipyardError(f"{directory}: an adapter of fused expert weights (target_parameters) without "
                            f"{LORA_META}: shipyard reads the expert adapters it wrote itself")
    return config, from_peft_state(load_file(directory / ADAPTER_WEIGHTS), experts, config["r"])


def lora_scale(config: dict) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / (r**0.5 if config.get("use_rslora") else r)


def resolve_base_dir(name: str) -> Path:
    """A local directory with the base model's files: the path itself, or the hub cache's snapshot."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.py", "*.jinja", "*.model", "*.txt"]))
    except Exception as e:
        raise ShipyardError(
            f"the adapter's base model '{name}' (base_model_name_or_path) is neither a directory nor downloadable: {e}"
        ) from None


class MergedWeights:
    """A base directory's weights with an adapter merged in: W + scale * B @ A, per requested tensor.

    A fused expert weight the base stores one matrix per expert (hub checkpoints: `mlp.experts.0.gate_proj.weight`)
    is merged into those matrices, so the export keeps the base's layout.
    """

    def __init__(self, base: DirectoryWeights, adapter_config: dict, adapter_state: dict[str, torch.Tensor],
                 transposed: list[str] = ()):
        self.base = base
        self.scale = lora_scale(adapter_config)
        self.pairs, self.full = split_adapter_state(adapter_state)
        self.transposed = set(transposed)  # expert weights stored (experts, in, out)
        self.shapes = dict(base.shapes)
        self.per_expert: dict[str, tuple[str, int, int, int]] = {}  # checkpoint tensor -> (fused, expert, rows)
        missing = []
        for name, (a, _) in self.pairs.items():
            if name in self.shapes:
                continue
            slices = checkpoint_slices(name, self.shapes) if a.ndim == 3 and name not in self.transposed else None
            if not slices or max(e for e, _, _ in slices.values()) + 1 != a.shape[0]:
                missing.append(name)
                continue
            self.per_expert.update({n: (name, *where) for n, where in slices.items()})
        if missing:
            raise ShipyardError(f"the adapter targets weights the base model lacks: {missing[:3]}")

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        tensors = self.base.load(names)
        for name in names:
            if name in self.pairs:
                a, b = self.pairs[name]
                tensors[name] = merged_weight(tensors[name], a, b, self.scale, name in self.transposed)
            elif name in self.per_expert:
                fused, expert, start, end = self.per_expert[name]
                a, b = self.pairs[fused]
                tensors[name] = merged_weight(tensors[name], a[expert], b[expert, start:end], self.scale)
            elif name in self.full:  # a module trained in full (modules_to_save)
                tensors[name] = self.full[name].to(tensors[name].dtype)
        return tensors

"""Hugging Face PEFT adapter directories: write, read, and merge into base weights.

    adapter_model.safetensors   base_model.model.<module>.lora_A.weight / lora_B.weight (+ trained modules)
    adapter_config.json         the minimal HF-PEFT fields (peft_type, task_type, r, lora_alpha, target_modules, ...)
    shipyard_lora.json          the rest of the recipe's LoRA settings and the exact adapted module names
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
from shipyard.peft.lora import from_peft_keys, merged_weight, split_adapter_state, to_peft_keys
from shipyard.verify.probe import write_probe

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LORA_META = "shipyard_lora.json"


def is_adapter_dir(directory: Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def write_adapter_dir(out_dir: Path, state: dict[str, torch.Tensor], peft_config: dict, lora_meta: dict, tokenizer,
                      probe: dict | None) -> None:
    """`state` has clean model names (model.layers.0.self_attn.q_proj.lora_A.weight), full tensors."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_weight_file(out_dir / ADAPTER_WEIGHTS, to_peft_keys(state))
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    (out_dir / LORA_META).write_text(json.dumps(lora_meta, indent=2) + "\n")
    write_tokenizer(out_dir, tokenizer)
    if probe is not None:
        write_probe(out_dir, probe)


def read_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, adapter weights with clean model names)."""
    directory = Path(directory)
    if not (directory / ADAPTER_WEIGHTS).is_file():
        raise ShipyardError(f"{directory}: {ADAPTER_CONFIG} without {ADAPTER_WEIGHTS}")
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    return config, from_peft_keys(load_file(directory / ADAPTER_WEIGHTS))


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
    """A base directory's weights with an adapter merged in: W + scale * B @ A, per requested tensor."""

    def __init__(self, base: DirectoryWeights, adapter_config: dict, adapter_state: dict[str, torch.Tensor]):
        self.base = base
        self.scale = lora_scale(adapter_config)
        self.pairs, self.full = split_adapter_state(adapter_state)
        self.shapes = dict(base.shapes)
        missing = [m for m in self.pairs if f"{m}.weight" not in self.shapes]
        if missing:
            raise ShipyardError(f"the adapter targets modules the base model lacks: {missing[:3]}")

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        tensors = self.base.load(names)
        for name in names:
            module = name.removesuffix(".weight")
            if module in self.pairs:
                a, b = self.pairs[module]
                tensors[name] = merged_weight(tensors[name], a, b, self.scale)
            elif name in self.full:  # a module trained in full (modules_to_save)
                tensors[name] = self.full[name].to(tensors[name].dtype)
        return tensors

"""Write Hugging Face directories that load unchanged in transformers and vLLM (models/load.py reads them).

One writer for every place shipyard produces model files (checkpoint saves,
`shipyard export`, consolidation), so every output gets the same fixes for the
usual serving failures:

- config.json in full (not a diff against defaults), with `architectures`,
  `dtype`/`torch_dtype` matching the weights and no stale `quantization_config`;
- generation_config.json with every end-of-turn id as EOS, and the pad id;
- the chat template inlined into tokenizer_config.json, `extra_special_tokens`
  as a dict, and a `tokenizer_class` every loader can import;
- tied weights saved once (found by storage aliasing, not by the config flag);
- safetensors split like the base model's own index, with its per-tensor dtypes.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from shipyard.data.chat import eos_token_ids
from shipyard.errors import ShipyardError
from shipyard.hf_files import INDEX_FILE, MTP_SIDE_FILE, SINGLE_FILE, write_probe
from shipyard.models.eagle3 import ARCHITECTURES as EAGLE3_ARCHITECTURES
from shipyard.models.mtp_layout import STYLES
from shipyard.models.speechlm import ARCHITECTURE, HYBRID_ARCHITECTURE

MAX_SHARD_BYTES = 5 * 1024**3
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


# ------------------------------------------------------------------ weight layout


@dataclass
class WeightLayout:
    """Which file each tensor goes to and in which dtype; copied from a base model's files."""

    files: dict[str, str] = field(default_factory=dict)  # tensor name -> file name
    dtypes: dict[str, str] = field(default_factory=dict)  # tensor name -> torch dtype name

    @classmethod
    def from_dir(cls, directory: Path | None) -> WeightLayout:
        if directory is None:
            return cls()
        index = directory / INDEX_FILE
        if index.is_file():
            files = json.loads(index.read_text())["weight_map"]
        elif (directory / SINGLE_FILE).is_file():
            with safe_open(directory / SINGLE_FILE, "pt") as f:
                files = {name: SINGLE_FILE for name in f.keys()}
        else:
            return cls()
        dtypes = {}
        for filename in sorted(set(files.values())):
            with safe_open(directory / filename, "pt") as f:
                for name in f.keys():
                    dtypes[name] = _DTYPE_NAMES.get(_DTYPES.get(f.get_slice(name).get_dtype()), "")
        return cls(files, {k: v for k, v in dtypes.items() if v})

    def to_json(self) -> dict:
        return {"files": self.files, "dtypes": self.dtypes}

    @classmethod
    def from_json(cls, data: dict | None) -> WeightLayout:
        return cls(**data) if data else cls()


def plan_files(shapes: dict[str, tuple[torch.Size, torch.dtype]], layout: WeightLayout) -> dict[str, list[str]]:
    """File name -> tensor names. Follows `layout` where it knows a name; else splits by size."""
    if layout.files and set(shapes) <= set(layout.files):
        plan: dict[str, list[str]] = {}
        for name in shapes:
            plan.setdefault(layout.files[name], []).append(name)
        return dict(sorted(plan.items()))
    sizes = {n: shape.numel() * dtype.itemsize for n, (shape, dtype) in shapes.items()}
    groups, current, used = [], [], 0
    for name in shapes:
        if current and used + sizes[name] > MAX_SHARD_BYTES:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += sizes[name]
    groups.append(current)
    if len(groups) == 1:
        return {SINGLE_FILE: groups[0]}
    n = len(groups)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


def target_dtype(name: str, tensor_dtype: torch.dtype, layout: WeightLayout, dtype: torch.dtype | None) -> torch.dtype:
    if not tensor_dtype.is_floating_point:  # integer tables (an EAGLE-3 drafter's d2t) keep their type
        return tensor_dtype
    if dtype is not None:
        return dtype
    if name in layout.dtypes:
        return getattr(torch, layout.dtypes[name])
    return tensor_dtype


def write_weight_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def write_index(out_dir: Path, plan: dict[str, list[str]], shapes: dict[str, tuple[torch.Size, torch.dtype]]) -> None:
    stale = out_dir / INDEX_FILE
    if len(plan) == 1:
        stale.unlink(missing_ok=True)
        return
    plan = {f: names for f, names in plan.items() if f != MTP_SIDE_FILE}
    total = sum(shapes[n][0].numel() * shapes[n][1].itemsize for names in plan.values() for n in names)
    weight_map = {name: filename for filename, names in plan.items() for name in names}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def write_weights(
    out_dir: Path, state_dict: dict[str, torch.Tensor], layout: WeightLayout, dtype: torch.dtype | None = None
) -> torch.dtype:
    """Write `state_dict` as safetensors (+ index); returns the dtype most tensors were saved in."""
    casted = {n: t.to(target_dtype(n, t.dtype, layout, dtype)) for n, t in state_dict.items()}
    shapes = {n: (t.shape, t.dtype) for n, t in casted.items()}
    plan = plan_files(shapes, layout)
    for filename, names in plan.items():
        write_weight_file(out_dir / filename, {n: casted[n] for n in names})
    write_index(out_dir, plan, shapes)
    return dominant_dtype(shapes)


def dominant_dtype(shapes: dict[str, tuple[torch.Size, torch.dtype]]) -> torch.dtype:
    """The weights' dtype (config.json's): integer tables (an EAGLE-3 drafter's d2t) do not count."""
    counts: dict[torch.dtype, int] = {}
    for shape, dtype in shapes.values():
        if dtype.is_floating_point:
            counts[dtype] = counts.get(dtype, 0) + shape.numel()
    return max(counts, key=counts.get) if counts else torch.float32


# ----------------------------------------------------------------- metadata files


def has_quantized_parameters(model: torch.nn.Module | None) -> bool:
    if model is None:
        return False
    return any(not p.dtype.is_floating_point for p in model.parameters())


def write_config(out_dir: Path, config: PretrainedConfig, weights_dtype: torch.dtype, architecture: str | None, quantized: bool = False) -> None:
    data = config.to_dict()  # every attribute, not a diff against the defaults
    if not quantized:
        data.pop("quantization_config", None)
    if architecture:
        data["architectures"] = [architecture]
    dtype_name = _DTYPE_NAMES[weights_dtype]
    data["dtype"] = dtype_name
    data["torch_dtype"] = dtype_name  # loaders older than transformers 5 read this key
    for key in ("_name_or_path", "transformers_version_saved"):
        data.pop(key, None)
    data["transformers_version"] = transformers.__version__
    data.update(legacy_rope_fields(data))
    (out_dir / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def legacy_rope_fields(data: dict) -> dict:
    """Top-level `rope_theta` and `rope_scaling`, as transformers 4 and the tools pinned to it (older vLLM, SGLang,
    conversion scripts) read them, equal to the `rope_parameters` transformers 5 writes; without them such a
    reader silently falls back to its default RoPE. Per-layer-type parameters (Gemma 3) have no such spelling."""
    rope = data.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return {}
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    legacy = scaling.get("rope_type", "default") != "default"
    return {"rope_theta": rope["rope_theta"], "rope_scaling": scaling if legacy else data.get("rope_scaling")}


def write_generation_config(out_dir: Path, eos_ids: list[int], pad_id: int | None) -> None:
    # EOS and pad only: sampling settings (temperature, top_p...) belong to the server and the request.
    data = {"eos_token_id": eos_ids if len(eos_ids) > 1 else eos_ids[0]}
    if pad_id is not None:
        data["pad_token_id"] = pad_id
    data["transformers_version"] = transformers.__version__
    (out_dir / "generation_config.json").write_text(json.dumps(data, indent=2) + "\n")


def _token_attribute_name(token: str, taken: set[str]) -> str:
    base = re.sub(r"[^0-9a-zA-Z]+", "_", token).strip("_").lower() or "special"
    name = base if base.endswith("_token") else f"{base}_token"
    i = 1
    while name in taken:
        i += 1
        name = f"{base}_{i}_token"
    taken.add(name)
    return name


def normalise_tokenizer_files(out_dir: Path) -> None:
    """Rewrite tokenizer_config.json into the form every loader (transformers 4 and 5, vLLM) accepts."""
    path = out_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    jinja = out_dir / "chat_template.jinja"
    extra_templates = out_dir / "additional_chat_templates"
    if jinja.is_file():
        cfg["chat_template"] = jinja.read_text()
        jinja.unlink()
    if extra_templates.is_dir():
        named = [{"name": p.stem, "template": p.read_text()} for p in sorted(extra_templates.glob("*.jinja"))]
        default = cfg.get("chat_template")
        cfg["chat_template"] = ([{"name": "default", "template": default}] if default else []) + named
        shutil.rmtree(extra_templates)
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list):
        tokens = [t["content"] if isinstance(t, dict) else t for t in extra]
        taken: set[str] = set()
        cfg["extra_special_tokens"] = {_token_attribute_name(t, taken): t for t in tokens}
        cfg["additional_special_tokens"] = tokens
    cls = cfg.get("tokenizer_class")
    if cls and (cls == "TokenizersBackend" or not hasattr(transformers, cls)) and (out_dir / "tokenizer.json").is_file():
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    # Loader state that transformers 5 writes back on save; not tokenizer settings.
    for key in ("backend", "is_local", "local_files_only", "model_specific_special_tokens"):
        cfg.pop(key, None)
    named = cfg.get("extra_special_tokens")
    if isinstance(named, dict):  # named tokens live in the dict; top-level copies are redundant
        for name in named:
            cfg.pop(name, None)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def write_tokenizer(out_dir: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    tokenizer.save_pretrained(out_dir)
    normalise_tokenizer_files(out_dir)


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")


def write_processor(out_dir: Path, processor, tokenizer: PreTrainedTokenizerBase) -> None:
    """The processor's config (image settings such as the pixel limits training used) next to the tokenizer.

    Its chat template is written into processor_config.json as well: the tokenizer's copy is inlined into
    tokenizer_config.json (see normalise_tokenizer_files), and a processor without its own template cannot
    `apply_chat_template`.
    """
    with tempfile.TemporaryDirectory(prefix="shipyard-processor-") as tmp:
        processor.chat_template = tokenizer.chat_template
        processor.save_pretrained(tmp)
        for name in PROCESSOR_FILES:
            if (Path(tmp) / name).is_file():
                shutil.copyfile(Path(tmp) / name, out_dir / name)
    path = out_dir / "processor_config.json"
    data = json.loads(path.read_text()) if path.is_file() else {"processor_class": type(processor).__name__}
    data["chat_template"] = tokenizer.chat_template
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def copy_custom_code(base_dir: Path | None, out_dir: Path) -> list[str]:
    """Copy the `*.py` files of a trust_remote_code model, keeping their folder structure."""
    if base_dir is None:
        return []
    copied = []
    for src in sorted(base_dir.rglob("*.py")):
        rel = src.relative_to(base_dir)
        if any(part.startswith(".") for part in rel.parts):
            continue
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out_dir / rel)
        copied.append(str(rel))
    return copied


def check_exportable(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase | None, where: str) -> None:
    """Fail before anything is written when a servable directory cannot be made."""
    if tokenizer is None:
        raise ShipyardError(f"{where}: no tokenizer found; a serving directory needs one")
    if not tokenizer.chat_template:
        raise ShipyardError(f"{where}: the tokenizer has no chat template; vLLM's chat endpoint and `verify` need one")
    if not eos_token_ids(tokenizer, None):
        raise ShipyardError(f"{where}: no EOS token: neither the tokenizer nor the chat template defines one")
    architectures = getattr(config, "architectures", None) or []
    # vLLM-only architectures: MiMoForCausalLM (a Qwen2 model with MTP), DFlashDraftModel and EAGLE-3 drafters, and the
    # speech-LM, registered with transformers by `shipyard.models.speechlm` (served by shipyard's vLLM plugin)
    served_mtp = {s.architecture for s in STYLES.values()} | {"DFlashDraftModel", ARCHITECTURE, HYBRID_ARCHITECTURE} \
        | EAGLE3_ARCHITECTURES
    known = any(hasattr(transformers, a) or a in served_mtp for a in architectures) or bool(getattr(config, "auto_map", None))
    if not known:
        raise ShipyardError(
            f"{where}: unknown architecture {architectures or '(none)'} in config.json; "
            "transformers has no such class and the directory ships no modelling code (auto_map)"
        )


@dataclass
class ModelMeta:
    """Everything besides the weights that a Hugging Face directory of this model needs."""

    config: PretrainedConfig
    architecture: str
    tokenizer: PreTrainedTokenizerBase
    base_name: str  # hub id / directory / preset the run started from
    base_dir: Path | None = None  # local files of the base (custom code, weight layout)
    base_eos: list[int] | int | None = None
    layout: WeightLayout = field(default_factory=WeightLayout)
    quantized: bool = False
    probe: dict | None = None  # shipyard_verify.json: prompts and the training-time rendering
    processor: object | None = None  # vision-language models: the processor (image settings, chat template)


def write_hf_metadata(out_dir: Path, meta: ModelMeta, weights_dtype: torch.dtype) -> None:
    """config.json, generation_config.json, tokenizer and custom code: the directory minus weights."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if getattr(meta.config, "auto_map", None):  # a trust_remote_code model: its code travels with it
        copy_custom_code(meta.base_dir, out_dir)
    write_config(out_dir, meta.config, weights_dtype, meta.architecture, meta.quantized)
    write_generation_config(out_dir, eos_token_ids(meta.tokenizer, meta.base_eos), meta.tokenizer.pad_token_id)
    write_tokenizer(out_dir, meta.tokenizer)
    if meta.processor is not None:
        write_processor(out_dir, meta.processor, meta.tokenizer)
    if meta.probe is not None:
        write_probe(out_dir, meta.probe)


# ------------------------------------------------------------------ checkpoint layouts vLLM reads

# Families whose transformers 5 module names are not the checkpoint layout vLLM loads (vLLM has no name mapper for
# them), as (prefix in the module, prefix in the served files). Qwen2-Audio: transformers 5.19 holds the language
# model as `model.language_model.*`, and its own save_pretrained writes `language_model.model.model.*` (its
# conversion mapping applied backwards twice); vLLM reads the published layout, `language_model.model.*`
# ("no module or parameter named 'model' in Qwen2Model" otherwise). transformers loads both layouts.
SERVED_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "qwen2_audio": (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                    ("model.audio_tower.", "audio_tower."), ("model.multi_modal_projector.", "multi_modal_projector.")),
}


def served_name(name: str, config: PretrainedConfig) -> str:
    """`name` in the checkpoint layout vLLM reads for the config's family (unchanged for most families)."""
    for module_prefix, served_prefix in SERVED_PREFIXES.get(getattr(config, "model_type", ""), ()):
        if name.startswith(module_prefix):
            return served_prefix + name[len(module_prefix):]
    return name


class ServedNamesWeights:
    """A weights view (shapes + load) with every tensor under the name vLLM reads for the family (`served_name`)."""

    def __init__(self, weights, config: PretrainedConfig):
        self.weights = weights
        self.source = {served_name(n, config): n for n in weights.shapes}
        self.shapes = {served: weights.shapes[name] for served, name in self.source.items()}

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        tensors = self.weights.load([self.source[n] for n in names])
        return {n: tensors[self.source[n]] for n in names}

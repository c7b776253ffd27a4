"""Hugging Face directories with the defects real checkpoints have, built from tiny presets.

Weights are drawn with std 0.1 instead of the usual 0.02: at 0.02 a random
tiny model's logits are so flat that greedy choices hinge on 1e-6 differences,
and engine comparisons on such a model test luck, not correctness.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shipyard.models.load import SHIPPED_TOKENIZER
from shipyard.models.presets import preset_config


def random_model(preset: str = "qwen3-tiny", seed: int = 0, **config_changes):
    """A preset (with `config_changes` applied, e.g. mlp_only_layers=[0]) with random weights."""
    torch.manual_seed(seed)
    config = preset_config(preset)
    for key, value in config_changes.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2:
                param.normal_(0, 0.1)
    return model.eval()


def save_model_dir(out: Path, preset: str = "qwen3-tiny", seed: int = 0, dtype=None, max_shard_size: str | None = None,
                   **config_changes) -> Path:
    """`save_pretrained` of a random preset plus the shipped tokenizer, as transformers 5 writes them."""
    model = random_model(preset, seed, **config_changes)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER).save_pretrained(out)
    return out


def preset_folder(out: Path, preset: str = "qwen3-tiny", seed: int = 0) -> Path:
    """The weights a run with `model.path: <preset>` and `seed` starts from, saved as a Hugging Face folder: a run
    from this folder (built empty, filled from the files) must equal the run from the preset."""
    from shipyard.config import ModelConfig
    from shipyard.models.load import load_model, resolve_source

    load_model(ModelConfig(path=preset), resolve_source(preset), seed).save_pretrained(out)
    AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER).save_pretrained(out)
    return out


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2))


def with_unknown_tokenizer_class(out: Path) -> Path:
    save_model_dir(out)
    edit_json(out / "tokenizer_config.json", tokenizer_class="AcmeInternalTokenizer")
    return out


def with_stale_quantization_config(out: Path) -> Path:
    save_model_dir(out)
    edit_json(out / "config.json", quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic"})
    return out


def with_custom_code_in_subfolder(out: Path) -> Path:
    """A trust_remote_code model whose code lives in custom_code/ and imports a sibling module."""
    save_model_dir(out)
    code = out / "custom_code"
    code.mkdir()
    (code / "configuration_tiny.py").write_text(
        "from transformers import Qwen3Config\n\n\nclass TinyConfig(Qwen3Config):\n    model_type = 'qwen3'\n"
    )
    (code / "helpers.py").write_text("MARKER = 'shipyard custom code'\n")
    (code / "modeling_tiny.py").write_text(
        "from transformers import Qwen3ForCausalLM\n\nfrom .configuration_tiny import TinyConfig\n"
        "from .helpers import MARKER  # noqa: F401\n\n\nclass TinyForCausalLM(Qwen3ForCausalLM):\n"
        "    config_class = TinyConfig\n"
    )
    edit_json(out / "config.json", auto_map={
        "AutoConfig": "custom_code/configuration_tiny.TinyConfig",
        "AutoModelForCausalLM": "custom_code/modeling_tiny.TinyForCausalLM",
    })
    return out


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


CHAT_TEMPLATES = Path(__file__).resolve().parent / "fixtures" / "chat_templates"


def template_manifest() -> dict:
    """Published chat templates stored as test data (tests/fixtures/chat_templates/SOURCES.md names each source)."""
    return json.loads((CHAT_TEMPLATES / "manifest.json").read_text())


def family_tokenizer(family: str, template: str = "chat_template.jinja"):
    """The shipped tokenizer with a published template and that family's control tokens added as special tokens."""
    from tokenizers import AddedToken

    spec = template_manifest()[family]
    tok = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    controls = [t for t in [*spec["special_tokens"], spec["bos_token"], spec["eos_token"], spec["end_of_turn"]] if t]
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(controls)], special_tokens=True)
    if spec["bos_token"]:
        tok.bos_token = spec["bos_token"]
    tok.eos_token = spec["eos_token"]
    tok.chat_template = (CHAT_TEMPLATES / family / template).read_text()
    return tok


# ------------------------------------------------------------------ an offline Hugging Face cache

SNAPSHOT = "0" * 40  # the commit every stand-in snapshot is filed under


def into_hub_cache(hf_home: Path, repo_id: str, folder: Path) -> Path:
    """`folder` as the snapshot of model `repo_id` in the Hugging Face cache at `hf_home`, the layout a download
    leaves (hub/models--org--name/snapshots/<commit> and refs/main); returns the snapshot folder."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / SNAPSHOT
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return snapshot


def hub_dataset_into_cache(hf_home: Path, repo_id: str, splits: dict[str, list[dict]]) -> None:
    """Put dataset `repo_id` into `hf_home`'s datasets cache in the layout `load_dataset` leaves after a download,
    so that `load_dataset(repo_id, split=...)` with HF_HUB_OFFLINE=1 and HF_HOME=hf_home reads it. The builder is
    given the cache folder, so this works whatever HF_HOME the `datasets` of this process read at import."""
    import datasets
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.parquet.parquet import Parquet

    namespace, name = repo_id.split("/")
    files = {}
    for split, rows in splits.items():
        files[split] = str(hf_home / f"src-{namespace}-{name}-{split}.parquet")
        datasets.Dataset.from_list(rows).to_parquet(files[split])
    builder = Parquet(dataset_name=f"{namespace}___{name}", data_files=files, hash="0" * 16, config_id="default",
                      cache_dir=str(hf_home / "datasets"))
    builder.download_and_prepare()
    # An offline `load_dataset` looks for NAMESPACE___snake_name/ (the namespace as written) holding
    # snake_name-SPLIT.arrow files; the builder snake-cased the namespace too and prefixed the files with both.
    built = Path(builder.cache_dir)
    for path in built.glob(f"{builder.dataset_name}-*.arrow"):
        path.rename(path.with_name(path.name.replace(builder.dataset_name, camelcase_to_snakecase(name), 1)))
    root = hf_home / "datasets" / builder.dataset_name
    wanted = hf_home / "datasets" / f"{namespace}___{camelcase_to_snakecase(name)}"
    if root != wanted:
        root.rename(wanted)

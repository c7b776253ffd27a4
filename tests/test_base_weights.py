"""A base built empty and filled from its files is bitwise the base loaded whole (checkpoint/base_weights.py).

Two and four ranks (FSDP2 shards, pipeline stages, both) are driven end to end through the CLI by
tests/test_distributed.py (`dist_runs`: FSDP2 from a folder = one process from the preset) and
tests/test_pipeline.py (PP x FSDP2 on 4 ranks from a folder); bench/load_memory.py measures memory at Qwen3-0.6B's
shape (`make quality`).
"""

from __future__ import annotations

import torch

from shipyard.checkpoint import base_weights
from shipyard.checkpoint.base_weights import base_weights_for, fill, is_empty
from shipyard.config import load_recipe
from shipyard.models.load import load, load_model
from shipyard.peft.lora import apply_lora
from tests.fixtures import save_model_dir


def loaded(folder, *extra):
    """(filled model, line) and the model `from_pretrained` loads whole, from the same recipe."""
    recipe = load_recipe("quickstart", [f"model.path={folder}", *extra])
    model, _, source = load(recipe.model, recipe.seed, empty=True)
    assert is_empty(model)
    model, weights, line = base_weights_for(model, recipe.model, source, recipe.seed)
    if weights is not None:
        fill(model, torch.device("cpu"), weights)
    return model, line, load_model(recipe.model, source, recipe.seed), recipe


def assert_bitwise(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name
    for name, buffer in b.named_buffers():  # rotary frequencies are computed, not read: computed the same
        assert torch.equal(a.get_buffer(name), buffer), name


def test_a_sharded_bf16_folder_fills_bitwise_as_loaded_whole_tied_embeddings_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(base_weights, "BLOCK_BYTES", 3000)  # every matrix read in several blocks of rows
    folder = save_model_dir(tmp_path / "base", dtype=torch.bfloat16, max_shard_size="120KB")
    model, line, whole, _ = loaded(folder)
    assert "reading only the tensors it keeps" in line
    assert not is_empty(model)
    assert_bitwise(model, whole)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one Parameter: tied in training too
    assert model.generation_config.eos_token_id == whole.generation_config.eos_token_id
    ids = torch.arange(3, 23).reshape(2, 10)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, whole(ids).logits)


def test_adapters_made_on_an_empty_base_keep_their_values(tmp_path):
    """LoRA adapters are created (seeded) before the base is filled: filling must not wipe them."""
    folder = save_model_dir(tmp_path / "base", preset="qwen3-tiny-untied")
    recipe = load_recipe("quickstart", [f"model.path={folder}", "lora.r=4"])
    model, _, source = load(recipe.model, recipe.seed, empty=True)
    model, weights, _ = base_weights_for(model, recipe.model, source, recipe.seed)
    targets = apply_lora(model, recipe.lora, recipe.seed)
    fill(model, torch.device("cpu"), weights)
    whole = load_model(recipe.model, source, recipe.seed)
    assert apply_lora(whole, recipe.lora, recipe.seed) == targets and targets
    assert_bitwise(model, whole)
    assert any(n.endswith("lora_A.weight") and p.abs().sum() > 0 for n, p in model.named_parameters())


def test_a_checkpoint_transformers_converts_on_load_is_loaded_whole_and_says_why(tmp_path):
    """transformers 5 saves Qwen3-MoE experts one tensor per expert and fuses them on load: no one-to-one names."""
    folder = save_model_dir(tmp_path / "moe", preset="qwen3-moe-tiny")
    model, line, whole, _ = loaded(folder)
    assert line.startswith("loaded whole in every process: its files have no tensor model.layers.0.mlp.experts")
    assert_bitwise(model, whole)

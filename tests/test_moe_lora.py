"""LoRA on MoE models: fused expert weights adapted (lora.target_experts) and dense-MLP adapters of mixed dense/MoE
models kept, both loading in Hugging Face PEFT with the trained model's logits, and merging exactly.

The base is the Qwen3-MoE preset with its first layer dense (`mlp_only_layers: [0]`, as Qwen3-MoE configs allow):
layer 0 has Linear gate_proj/up_proj/down_proj, layer 1 fused experts (`mlp.experts.gate_up_proj`, `down_proj`).
The served side (the merged export passes verify; the adapter gets the vLLM CPU build's own status) is in
test_families, whose Qwen3-MoE LoRA run adapts the experts.
"""

import json

import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from shipyard.config import LoraConfig, load_recipe
from shipyard.errors import ShipyardError
from shipyard.export.export import export_checkpoint
from shipyard.peft.adapter_dir import read_adapter
from shipyard.peft.lora import apply_lora, peft_rewrites, renamed_by_peft
from shipyard.train.loop import train
from tests.fixtures import random_model, save_model_dir
from tests.test_lora import IDS, lora_overrides

MIXED = {"mlp_only_layers": [0]}
DENSE_MLP = [f"model.layers.0.mlp.{m}" for m in ("down_proj", "gate_proj", "up_proj")]


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """Six LoRA steps on the mixed base with the experts adapted: (base dir, run dir, TrainResult)."""
    root = tmp_path_factory.mktemp("moe_lora")
    base = save_model_dir(root / "base", "qwen3-moe-tiny", **MIXED)
    out = root / "run"
    result = train(load_recipe("quickstart", lora_overrides(out, base, 6, "lora.target_experts=true",
                                                            "eval.generate=false")))
    return base, out, result


def test_expert_and_dense_mlp_adapters_load_in_peft_with_equal_logits(moe_run):
    base, out, result = moe_run
    final = out / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    # The dense MLP's Linears are target_parameters too: under target_modules PEFT would drop them (see below).
    assert config["target_parameters"] == ["down_proj.weight", "experts.down_proj", "experts.gate_up_proj",
                                           "gate_proj.weight", "up_proj.weight"]
    saved = load_file(final / "adapter_model.safetensors")
    experts = "base_model.model.model.layers.1.mlp.experts"
    # PEFT's ParamWrapper layout: gate_up_proj (registered first) innermost, experts x r folded into the rank.
    assert saved[f"{experts}.base_layer.lora_A.weight"].shape == (4 * 8, 128)   # gate_up_proj: (E*r, hidden)
    assert saved[f"{experts}.base_layer.lora_B.weight"].shape == (2 * 64, 4 * 8)  # (2*moe_intermediate, r*E)
    assert saved[f"{experts}.lora_A.weight"].shape == (4 * 8, 64)              # down_proj
    assert saved[f"{experts}.lora_B.weight"].shape == (128, 4 * 8)

    assert peft_rewrites(AutoModelForCausalLM.from_pretrained(base), config) is None  # PEFT loads it as written
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final).eval()
    loaded = get_peft_model_state_dict(peft)
    assert set(loaded) == set(saved)  # nothing dropped or renamed at load, the dense MLP's pairs included
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    for name in ("model.layers.0.mlp.gate_proj", "model.layers.1.mlp.experts"):
        assert saved[f"base_model.{'model.' + name}.lora_B.weight"].abs().max() > 0  # trained, not the zero init
    with torch.no_grad():
        ours = result.model.eval()(IDS).logits
        theirs = peft(IDS).logits
        before = AutoModelForCausalLM.from_pretrained(base)(IDS).logits
    assert (ours - theirs).abs().max() <= 1e-5
    assert (ours - before).abs().max() > 1e-2  # the adapters changed the model


def test_adapter_reads_back_and_merges_exactly(moe_run, tmp_path):
    base, out, result = moe_run
    _, state = read_adapter(out / "final")
    trained = {n: p for n, p in result.model.named_parameters() if p.requires_grad}
    assert set(state) == set(trained) and all(torch.equal(state[n], trained[n]) for n in trained)
    assert state["model.layers.1.mlp.experts.lora_A.gate_up_proj"].shape == (4, 8, 128)  # (experts, r, in)

    merged = export_checkpoint(out / "final", tmp_path / "merged", merge_lora=True).out_dir
    with torch.no_grad():
        ours = result.model.eval()(IDS).logits
        theirs = AutoModelForCausalLM.from_pretrained(merged)(IDS).logits
    assert (ours - theirs).abs().max() <= 1e-5


def test_peft_renames_dense_mlp_projections_of_moe_families():
    """Why the dense MLP goes to target_parameters: PEFT's transformers-5 conversion maps gate_proj/up_proj/down_proj
    of Qwen2/3-MoE-style models to the fused experts and removes them from target_modules. Dense models keep them."""
    names = ["q_proj", "gate_proj", "up_proj", "down_proj"]
    assert renamed_by_peft(random_model("qwen3-moe-tiny", **MIXED), names) == {"gate_proj", "up_proj", "down_proj"}
    assert renamed_by_peft(random_model("qwen3-tiny"), names) == set()
    old_layout = {"r": 8, "lora_alpha": 16, "target_modules": names}
    assert "target_modules ['down_proj', 'gate_proj', 'q_proj', 'up_proj'] -> ['q_proj']" in peft_rewrites(
        random_model("qwen3-moe-tiny", **MIXED), old_layout)


def test_expert_targets_respect_exclusions_and_bad_settings_are_named():
    model = random_model("qwen3-moe-tiny")
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj"], target_experts=True,
                                 exclude_modules=["model.layers.0.mlp.experts", "down_proj"]), seed=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad and ".experts." in n} == {
        "model.layers.1.mlp.experts.lora_A.gate_up_proj", "model.layers.1.mlp.experts.lora_B.gate_up_proj"}
    with pytest.raises(ShipyardError, match="lora.target_experts: Qwen3ForCausalLM has no fused expert weights"):
        apply_lora(random_model("qwen3-tiny"), LoraConfig(target_experts=True), seed=0)
    with pytest.raises(ShipyardError, match=r"lora.target_experts needs lora.dropout=0"):
        load_recipe("quickstart", ["lora={target_experts: true, dropout: 0.1}"])


def test_transposed_experts_match_peft():
    """gpt-oss stores its experts (experts, in, out) (`is_transposed`): the pair still loads in PEFT with equal
    logits and merges into the weight it adapts."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, set_peft_model_state_dict
    from transformers import GptOssConfig

    from shipyard.peft.lora import merged_weight, split_adapter_state, to_peft_state

    config = GptOssConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=32, num_local_experts=4, num_experts_per_tok=2,
                          vocab_size=512, layer_types=["full_attention"] * 2)
    torch.manual_seed(0)
    weights = {k: torch.randn_like(v) * 0.1 for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}

    def model():
        m = AutoModelForCausalLM.from_config(config).eval()
        m.load_state_dict(weights)
        return m

    ours = model()
    apply_lora(ours, LoraConfig(r=4, alpha=8, target_modules=["q_proj"], target_experts=True), seed=0)
    experts = [n.replace(".lora_A", "") for n, _ in ours.named_parameters() if ".experts.lora_A." in n]
    assert experts[:2] == ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if ".lora_B" in name:
                param.normal_(0, 0.1)
    state = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    peft = get_peft_model(model(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                   target_parameters=["experts.down_proj", "experts.gate_up_proj"]))
    result = set_peft_model_state_dict(peft, to_peft_state(state, experts))
    assert not result.unexpected_keys and not [k for k in result.missing_keys if ".lora_" in k]
    merged = dict(weights)
    for name, (a, b) in split_adapter_state(state)[0].items():
        merged[name] = merged_weight(weights[name], a, b, 2.0, transposed=name in experts)
    merged_model = model()
    merged_model.load_state_dict(merged)
    with torch.no_grad():
        expected = ours(IDS).logits
        assert (peft.eval()(IDS).logits - expected).abs().max() <= 1e-5
        assert (merged_model(IDS).logits - expected).abs().max() <= 1e-5
        assert (model()(IDS).logits - expected).abs().max() > 1e-3

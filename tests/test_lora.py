"""LoRA: adapters that load in Hugging Face PEFT and vLLM, merge exactly, and shard with FSDP2."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from shipyard.config import LoraConfig, load_recipe
from shipyard.errors import ShipyardError
from shipyard.export.export import export_checkpoint
from shipyard.peft.lora import adapter_target_modules, apply_lora, resolve_targets
from shipyard.train.loop import train
from tests.conftest import run_cli, tiny_overrides
from tests.fixtures import random_model

IDS = torch.tensor([[1, 280, 201, 281, 28, 374, 373, 377, 2, 201, 1, 282, 201]])


def lora_overrides(out, base, steps=30, *extra):
    return tiny_overrides(out, steps=steps, records=1000) + [
        f"model.path={base}", "lora={r: 8, alpha: 16}", "optim.lr=3e-3",
        "data.train={synthetic: sort_words, num_records: 1000, seed: 0}",
        "data.validation={synthetic: sort_words, num_records: 8, seed: 1}", *extra,
    ]


@pytest.fixture(scope="module")
def base(text_base):
    """A briefly trained full model: peaked enough logits that greedy comparisons are meaningful (tests/served.py:
    the 60-step quickstart test_verify reads too). `lora_run`, the adapter trained on it, is session-scoped there."""
    return text_base


def test_adapter_directory_format(lora_run, base):
    out, _ = lora_run
    final = out / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16.0, "base_model_name_or_path": str(base)}
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    keys = list(safe_open(final / "adapter_model.safetensors", "pt").keys())
    assert len(keys) == 2 * 7 * 2 and all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    meta = json.loads((final / "shipyard_lora.json").read_text())
    assert meta["dropout"] == 0.0 and len(meta["adapted_modules"]) == 14
    assert (final / "tokenizer.json").is_file() and (final / "shipyard_verify.json").is_file()
    assert not (final / "model.safetensors").exists()  # an adapter, not a copy of the base


def test_peft_loads_adapter_with_equal_logits(lora_run, base):
    _, result = lora_run
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), lora_run[0] / "final").eval()
    with torch.no_grad():
        ours = result.model.eval()(IDS).logits
        theirs = peft_model(IDS).logits
        base_logits = AutoModelForCausalLM.from_pretrained(base)(IDS).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    assert (ours - base_logits).abs().max() > 1e-2  # the adapter learned something


def test_merged_export_equals_base_plus_adapter(lora_run, base, tmp_path):
    out, _ = lora_run
    proc = run_cli("export", str(out / "final"), str(tmp_path / "merged"), "--merge-lora")
    assert proc.returncode == 0, proc.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / "final").eval()
    with torch.no_grad():
        assert torch.allclose(merged(IDS).logits, peft_model(IDS).logits, atol=1e-4, rtol=1e-4)
    keys = list(safe_open(tmp_path / "merged" / "model.safetensors", "pt").keys())
    assert not [k for k in keys if "lora" in k] and "lm_head.weight" not in keys  # base was tied: still tied
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    # without --merge-lora, an adapter stays an adapter
    adapter_out = export_checkpoint(out / "checkpoints" / "step_30", tmp_path / "adapter").out_dir
    assert (adapter_out / "adapter_config.json").is_file() and not (adapter_out / "config.json").exists()


def test_resume_from_adapter_checkpoint_is_exact(lora_run, base, tmp_path):
    import shutil

    out, _ = lora_run
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    shutil.rmtree(cut / "checkpoints" / "step_30")
    shutil.rmtree(cut / "final")
    (cut / "checkpoints" / "LATEST").write_text("step_15\n")
    result = train(load_recipe("quickstart", lora_overrides(cut, base, 30, "checkpoint.every_steps=15")))
    assert result.summary["resumed_from_step"] == 15
    steps = lambda d: [json.loads(line)["train/loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert steps(cut) == steps(out)


def test_only_adapters_train(base):
    model = AutoModelForCausalLM.from_pretrained(base)
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], trainable_modules=["embed_tokens"]), seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.embed_tokens.weight"} | {
        f"model.layers.{i}.self_attn.{m}.lora_{ab}.weight" for i in range(2) for m in ("q_proj", "v_proj") for ab in "AB"}


def test_target_resolution_names_candidates():
    model = random_model()
    assert resolve_targets(model, LoraConfig(target_modules=["model.layers.*.mlp.*"], exclude_modules=["down_proj"])) == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    with pytest.raises(ShipyardError) as e:
        resolve_targets(model, LoraConfig(target_modules=["q_proj", "qproj"]))
    assert "'qproj' matches no linear layer of Qwen3ForCausalLM (did you mean 'q_proj'?)" in str(e.value)
    assert "candidates: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in str(e.value)
    assert "lm_head" not in resolve_targets(model, LoraConfig())  # all-linear leaves the LM head alone


def test_adapter_target_names_strip_wrappers_and_expand_fused():
    names = [
        "model.layers.0.self_attn._orig_mod.q_proj",
        "model.layers.0._checkpoint_wrapped_module.self_attn.o_proj",
        "model.layers.1.self_attn.qkv_proj",
        "model.layers.1.mlp.gate_up_proj",
    ]
    assert adapter_target_modules(names) == ["gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    # A model whose own Hugging Face modules are fused (Phi-3) keeps the fused names loaders expect for it.
    assert adapter_target_modules(["model.layers.0.self_attn.qkv_proj"], {"qkv_proj", "o_proj"}) == ["qkv_proj"]


def test_lora_under_compile_and_activation_checkpointing_saves_clean_names(base, tmp_path):
    out = tmp_path / "wrapped"
    train(load_recipe("quickstart", lora_overrides(out, base, 2, "parallel.compile=true",
                                                   "parallel.activation_checkpointing=full", "eval.generate=false")))
    keys = list(safe_open(out / "final" / "adapter_model.safetensors", "pt").keys())
    assert keys and not [k for k in keys if "_orig_mod" in k or "_checkpoint_wrapped" in k]
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_lora_equals_one_rank(base, tmp_path):
    def run(out, ranks):
        extra = [f"train.micro_batch_size={8 // ranks}", "eval.generate=false"]
        if ranks == 1:  # the reference in this process: a new interpreter would add only its start-up
            train(load_recipe("quickstart", lora_overrides(out, base, 10, *extra)))
        else:
            proc = run_cli("train", "quickstart", *lora_overrides(out, base, 10, *extra), "--nproc-per-node", "2")
            assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    one, two = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    assert len(one) == len(two) == 10
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5 * abs(a)


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.served("lora")
def test_adapter_and_merged_export_serve_in_vllm(served):
    """The adapter and its --merge-lora export (tests/served.py), verified by the suite's one vLLM worker."""
    adapter_report, merged_report = served["lora/adapter"], served["lora/merged"]
    assert adapter_report["kind"] == "adapter"
    for report in (adapter_report, merged_report):
        assert report["ok"], report
        assert [r["matched_tokens"] for r in report["vllm"]["per_prompt"]] == [32] * len(report["prompts"])


def test_moe_expert_weights_that_lora_cannot_reach_are_named():
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from shipyard.peft.setup import _summarise, unadaptable_weights

    config = Qwen3MoeConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                            head_dim=64, intermediate_size=256, moe_intermediate_size=64, num_experts=4,
                            num_experts_per_tok=2, vocab_size=512)
    model = AutoModelForCausalLM.from_config(config)
    names = unadaptable_weights(model, trainable=[])
    assert _summarise(names) == "model.layers.*.mlp.experts.down_proj, model.layers.*.mlp.experts.gate_up_proj"
    assert unadaptable_weights(model, trainable=["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]) == []


def test_lora_on_a_preset_writes_its_base_and_the_adapter_loads(tmp_path):
    """A preset has no directory for base_model_name_or_path: the run writes one, and PEFT loads the pair."""
    out = tmp_path / "preset_lora"
    result = train(load_recipe("quickstart", lora_overrides(out, "qwen3-tiny", 2, "eval.generate=false")))
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base_model").resolve())
    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    peft = PeftModel.from_pretrained(base, out / "final").eval()
    with torch.no_grad():
        expected = result.model.eval()(IDS).logits
        assert torch.allclose(peft(IDS).logits, expected, atol=1e-5)

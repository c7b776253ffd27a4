"""The model families users fine-tune: each trains (full and LoRA), exports, reloads and serves in vLLM.

One session fixture (tests/served.py: `family_runs`) trains every family twice (a full fine-tune from the
family's tiny preset, then a LoRA run on that fine-tuned model); every exported directory is verified by the ONE
vLLM worker process that `served` starts for all the suite's "serves in vLLM" directories (vLLM's import and
engine start-up dominate). The test functions only read their results.

Thirty steps at lr 3e-3 matter: a random tiny model has near-tied logits, and greedy comparisons between two
engines on it test luck rather than numerics. LoRA runs on the fine-tuned model for the same reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from shipyard.models.attention import choose_attention
from shipyard.models.presets import VOCAB_SIZE
from shipyard.train.loop import TrainResult
from shipyard.verify.run import format_report
from tests.conftest import losses

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.served("families")]

FAMILIES = {
    "llama": "llama-tiny",
    "mistral": "mistral-tiny",
    "qwen2": "qwen2-tiny",
    "qwen3": "qwen3-tiny",
    "qwen3-moe": "qwen3-moe-tiny",
    "phi3": "phi3-tiny",
    "gemma2": "gemma2-tiny",
    "gemma3": "gemma3-tiny",
}
MODES = ("full", "lora")
# Qwen3-MoE's LoRA adapts its fused experts too (PEFT target_parameters), so the adapter, its PEFT load and the
# merged export that serves cover them.
MOE_LORA = {"qwen3-moe": ["lora.target_experts=true"]}
STEPS, RECORDS = 30, 512

# Gemma 2 soft-caps its attention logits and sdpa, transformers' default backend, silently ignores the cap.
# shipyard's `model.attn_implementation=auto` trains with eager there; a plain transformers reload must choose
# the same way (shipyard.models.attention), or it computes another function than the config declares.

# A text longer than the presets' sliding window (32), so windowed layers compute something else than full ones.
TEXT = ("reverse: red fox sun blue green tree cat dog bird fish moon star lake road hill rain snow wind "
        "gold iron salt wolf bear frog lamp door king ship")


def _vllm_cpu_build() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


@dataclass
class Matrix:
    runs: dict[tuple[str, str], TrainResult]
    dirs: dict[tuple[str, str], Path]
    reports: dict[tuple[str, str], dict]
    train_seconds: float


def _load(directory: Path, family: str):
    config = AutoConfig.from_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation=choose_attention(config, "auto")).eval()


@pytest.fixture(scope="module")
def matrix(family_runs, served) -> Matrix:
    """The trained matrix (tests/served.py: session-scoped) and its verify reports (one vLLM worker for every
    directory the suite only needs served, these 17 included)."""
    runs, trained_dirs, train_seconds = family_runs
    dirs = dict(trained_dirs)
    reports = {key: served["families/" + "/".join(key)] for key in dirs}
    print(f"\nfamilies: trained {len(runs)} runs in {train_seconds:.0f}s, verified {len(dirs)} directories")
    for key, report in reports.items():
        v = report["vllm"]
        loss = runs[key].summary["final_train_loss"] if key in runs else None
        print(f"  {'/'.join(key):<22} loss {f'{loss:.3f}' if loss is not None else '-':>6}  ok {report['ok']!s:<5} "
              f"greedy {v.get('greedy_match')!s:<5} max|dlogprob| {v.get('max_abs_logprob_diff', float('nan')):.1e}  "
              f"vLLM load {v.get('load_seconds', float('nan')):.1f}s  {v.get('error', '')[:120]}")
    return Matrix(runs, dirs, reports, train_seconds)


def _ids(run: TrainResult) -> torch.Tensor:
    ids = run.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:48]
    assert len(ids) == 48
    return torch.tensor([ids])


@pytest.mark.parametrize("family", FAMILIES)
def test_full_fine_tune_learns(matrix, family):
    run = matrix.runs[family, "full"]
    trajectory = losses(Path(run.summary["final_checkpoint"]).parent)  # metrics.jsonl of the run
    assert len(trajectory) == STEPS
    assert trajectory[0] > 0.9 * math.log(VOCAB_SIZE)  # a random start
    assert run.summary["eval"]["loss"] < 0.7 * math.log(VOCAB_SIZE), run.summary["eval"]


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_improves_on_its_base(matrix, family):
    full, lora = matrix.runs[family, "full"], matrix.runs[family, "lora"]
    assert lora.summary["eval"]["loss"] < full.summary["eval"]["loss"], (full.summary["eval"], lora.summary["eval"])


@pytest.mark.parametrize("family", FAMILIES)
def test_full_export_reloads_with_the_trained_logits(matrix, family):
    run = matrix.runs[family, "full"]
    final = matrix.dirs[family, "full"]
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == [type(run.model).__name__]
    ids = _ids(run)
    with torch.no_grad():
        ours = run.model.eval()(ids).logits
        theirs = _load(final, family)(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_adapter_loads_in_peft_with_the_trained_logits(matrix, family):
    from peft import PeftModel

    run = matrix.runs[family, "lora"]
    final = matrix.dirs[family, "lora"]
    base = Path(json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert base == matrix.dirs[family, "full"].resolve()
    ids = _ids(run)
    with torch.no_grad():
        ours = run.model.eval()(ids).logits
        theirs = PeftModel.from_pretrained(_load(base, family), final).eval()(ids).logits
        base_logits = _load(base, family)(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()
    assert (ours - base_logits).abs().max() > 1e-2  # the adapter changed the model


def _serves(report: dict) -> None:
    v = report["vllm"]
    assert v["available"] and v.get("loaded"), v.get("error")
    assert v["greedy_match"], v["per_prompt"]
    assert v["logprobs"]["ok"], v["logprobs"]
    assert report["template_parity"], report["template"]
    assert report["ok"], report


SERVED = [(f, m) for f in FAMILIES for m in MODES if (f, m) != ("qwen3-moe", "lora")]


@pytest.mark.parametrize("family, mode", SERVED, ids=[f"{f}-{m}" for f, m in SERVED])
def test_serves_in_vllm(matrix, family, mode):
    """transformers (PEFT for adapters) and vLLM agree on greedy tokens and their logprobs (verify_many)."""
    _serves(matrix.reports[family, mode])


def test_qwen3_moe_lora_gets_its_own_status_on_vllm_cpu(matrix):
    """vLLM's CPU build has no MoE-LoRA kernels (Triton only): verify says so and names the way out, instead of
    failing inside a kernel. On a GPU build the adapter is served and compared like any other."""
    report = matrix.reports["qwen3-moe", "lora"]
    if not _vllm_cpu_build():
        _serves(report)
        return
    assert not report["ok"] and "Triton MoE-LoRA kernel" in report["vllm"]["cannot_serve"]
    assert "build cannot serve this adapter" in format_report(report) and "--merge-lora" in format_report(report)


def test_qwen3_moe_lora_adapts_experts(matrix):
    """`all-linear` with lora.target_experts on Qwen3-MoE: q/k/v/o as Linears, the fused experts (3-D parameters in
    transformers 5) through PEFT's target_parameters; the router (not an nn.Linear) stays frozen. Stated here so
    that a change to it is a decision, not an accident."""
    final = matrix.dirs["qwen3-moe", "lora"]
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    meta = json.loads((final / "shipyard_lora.json").read_text())
    assert meta["adapted_modules"] and all(".self_attn." in name for name in meta["adapted_modules"])
    assert meta["adapted_parameters"] == [f"model.layers.{i}.mlp.experts.{w}" for i in range(2)
                                          for w in ("gate_up_proj", "down_proj")]
    assert meta["not_adapted"] == []
    # The unmerged adapter is still checked in transformers: PEFT reproduces the training-time greedy answers.
    assert matrix.reports["qwen3-moe", "lora"]["training_reference"]["ok"]


def test_qwen3_moe_lora_merged_export_serves(matrix):
    _serves(matrix.reports["qwen3-moe", "lora-merged"])

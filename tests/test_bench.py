"""`shipyard bench`: the FLOP count behind MFU, and the side-by-side run driven through the CLI."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from shipyard.bench.workload import SHAPES, Workload, flops_per_token
from tests.conftest import run_cli


def parameters_of(shape: str) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(SHAPES[shape]())
    return sum(p.numel() for p in model.parameters())


def test_flop_count_reproduces_the_h100_anchor():
    # Reference facts: HF Trainer on one H100, Qwen3-0.6B shape, seq 4096: 35,215 tokens/s = 17.7% MFU.
    n = parameters_of("qwen3-0.6b")
    assert 0.59e9 < n < 0.61e9  # tied embeddings counted once
    fpt = flops_per_token(Workload(model="qwen3-0.6b", seq_len=4096), n)
    assert 35_215 * fpt / 989.4e12 == pytest.approx(0.177, abs=0.0005)


def test_lora_flop_count_matches_the_published_llama3_8b_figure():
    # NeMo Automodel, Llama-3-8B LoRA, seq 4096, one H100: 12,473 tokens/s at 402 TFLOP/s, counted as 4N per token.
    n = parameters_of("llama3-8b")
    assert 12_473 * 4 * n / 1e12 == pytest.approx(402, rel=0.01)
    with_attention = flops_per_token(Workload(model="llama3-8b", seq_len=4096, lora={"r": 16}), n)
    assert with_attention == 4 * n + 6 * 32 * 32 * 128 * 4096


@pytest.mark.slow
def test_bench_tiny_runs_both_sides_on_the_same_data():
    proc = run_cli("bench", "--preset", "tiny", "--steps", "4", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    hf, ours, packed = report["hf_trainer"], report["shipyard"], report["shipyard_packed"]
    for side in (hf, ours, packed):
        assert side["measured_steps"] == 4 and side["tokens_per_second"] > 0 and side["peak_memory_gib"] > 0
    # Same samples on every side (real tokens, warm-up included), and the same model.
    assert hf["total_tokens"] == ours["total_tokens"] == packed["total_tokens"]
    assert hf["parameters"] == ours["parameters"]
    assert report["ratio"] == pytest.approx(ours["tokens_per_second"] / hf["tokens_per_second"])
    assert report["packing_gain"] == pytest.approx(packed["tokens_per_second"] / ours["tokens_per_second"])


def test_bench_switches_are_validated():
    from shipyard.bench.run import parse_switches
    from shipyard.errors import ShipyardError

    assert parse_switches(["compile=false", "activation_checkpointing=selective"]) == {
        "compile": False, "activation_checkpointing": "selective"}
    with pytest.raises(ShipyardError, match="unknown switch 'comple'; known: compile"):
        parse_switches(["comple=true"])
    with pytest.raises(ShipyardError, match="activation_checkpointing takes one of none, selective, full"):
        parse_switches(["activation_checkpointing=some"])

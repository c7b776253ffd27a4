"""MTP heads through the CLI as users run them: the quickstart, its proof in vLLM, and a nemotron_h base."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_main

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


# The runs are session fixtures in tests/e2e/conftest.py (`mtp_quickstart`, `mtp_glm`); both exports are proven in
# the one `shipyard verify` of the e2e exports there (`cli_verified`).


@pytest.fixture(scope="module")
def quickstart(mtp_quickstart):
    return mtp_quickstart


@pytest.fixture(scope="module")
def glm(mtp_glm):
    return mtp_glm


@pytest.fixture(scope="module")
def verified(cli_verified):
    """{run name: report}."""
    return {"quickstart": cli_verified["mtp/quickstart"], "glm": cli_verified["mtp/glm"]}


def test_quickstart_trains_base_and_head(quickstart):
    out, stdout = quickstart
    summary = json.loads((out / "summary.json").read_text())
    ev = summary["eval"]
    assert ev["num_prompts"] == 40 and 0.0 <= ev["exact_match"] <= 1.0, ev
    assert ev["mtp_acceptance_1"] > ev["mtp_before_training"]["mtp_acceptance_1"], ev  # the head learned something
    assert ev["mtp_mean_acceptance_length"] == pytest.approx(1 + ev["mtp_acceptance_1"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    # loss = main + loss_scale x mean over depths, each part logged
    assert last["train/loss"] == pytest.approx(last["train/loss_main"] + 0.3 * last["train/loss_mtp_1"], rel=1e-6)
    assert "mtp: 1 layer(s) attached" in stdout and "MiMoForCausalLM" in stdout
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["architectures"] == ["MiMoForCausalLM"] and config["num_nextn_predict_layers"] == 1
    tensors = load_file(out / "final" / "model.safetensors")
    step = load_file(out / "checkpoints" / f"step_{summary['steps']}" / "model.safetensors")
    assert sum(n.startswith("model.mtp_layers.0.") for n in tensors) == sum(n.startswith("mtp.layers.0.") for n in step)
    eh = step["mtp.layers.0.eh_proj.weight"]
    h = eh.shape[1] // 2
    assert torch.equal(tensors["model.mtp_layers.0.input_proj.weight"], torch.cat([eh[:, h:], eh[:, :h]], 1))


@pytest.mark.cli_verified("mtp")
def test_verify_proves_lossless_speculative_decoding_in_vllm(verified):
    report = verified["quickstart"]
    spec = report["speculative"]
    assert report["ok"] and report["vllm"]["greedy_match"] and report["template_parity"]
    assert spec["method"] == "mtp" and spec["num_speculative_tokens"] == 1 and spec["prompts"] == 40
    assert spec["lossless"] and spec["lossless_prompts"] == spec["prompts"]
    assert spec["acceptance_per_position"][0] > 0
    assert spec["mean_acceptance_length"] == pytest.approx(1 + sum(spec["acceptance_per_position"]))
    # The replay counts drafts inside answers; vLLM's raw counters are reported beside it.
    assert 0 < spec["drafts"] <= spec["vllm_raw_drafts"] and spec["vllm_raw_acceptance_per_position"]
    assert spec["ngram_lossless"] and spec["tokens_per_second"]["mtp"] > 0


def test_nemotron_h_base_gets_a_head_exports_in_its_layout_and_loads_back(tmp_path):
    out = tmp_path / "nemotron"
    common = ["train.max_steps=4", "train.micro_batch_size=8", "checkpoint.every_steps=null", "eval.generate=false",
              "data.train={synthetic: reverse_words, num_records: 64, seed: 0}",
              "data.validation={synthetic: reverse_words, num_records: 16, seed: 1}"]
    proc = run_main("train", "quickstart_mtp", "model.path=nemotron-h-tiny", f"output_dir={out}", *common)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "exported as NemotronHForCausalLM (nemotron_h layout)" in proc.stdout
    final = out / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["mtp_layers_block_type"] == ["full_attention"]
    tensors = load_file(final / "model.safetensors")
    head = {n: t for n, t in tensors.items() if n.startswith("mtp.layers.0.")}
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "final_layernorm.weight", "norm.weight",
                 "mixer.q_proj.weight", "mixer.o_proj.weight"):
        assert f"mtp.layers.0.{name}" in head, sorted(head)
    step = load_file(out / "checkpoints" / "step_4" / "model.safetensors")
    assert len(head) == sum(n.startswith("mtp.") for n in step)
    assert torch.equal(head["mtp.layers.0.mixer.q_proj.weight"], step["mtp.layers.0.block.mixer.q_proj.weight"])

    # The export as a base: its head is loaded (not re-initialised); at lr 1e-12 nothing moves measurably, so the
    # next export's head equals this one (a fresh head would differ by ~1e-2).
    again = tmp_path / "again"
    proc = run_main("train", "quickstart_mtp", f"model.path={final}", f"output_dir={again}", "optim.lr=1e-12", *common)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mtp: 1 layer(s) loaded from the base" in proc.stdout
    reloaded = load_file(again / "final" / "model.safetensors")
    assert all(torch.allclose(reloaded[n], t, rtol=0, atol=1e-9) for n, t in head.items())

    wrong = run_main("train", "quickstart_mtp", f"model.path={final}", "model.mtp.num_layers=2",
                     f"output_dir={tmp_path / 'wrong'}", *common)
    assert wrong.returncode == 2 and "already has 1 MTP layer(s)" in wrong.stderr, wrong.stderr[-2000:]


@pytest.mark.cli_verified("mtp")
def test_glm4_moe_head_exports_per_expert_serves_in_vllm_and_loads_back(glm, verified):
    """GLM-4.5 layout: model.layers.{L}.*, the MTP block's experts one by one (vLLM's MTP loader reads them so)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from shipyard.models import mtp

    out = glm
    tensors = load_file(out / "final" / "model.safetensors")
    assert "model.layers.2.eh_proj.weight" in tensors and "model.layers.2.mlp.experts.3.down_proj.weight" in tensors
    assert torch.equal(tensors["model.layers.2.shared_head.head.weight"], tensors["lm_head.weight"])
    step = load_file(out / "checkpoints" / "step_60" / "model.safetensors")
    fused = step["mtp.layers.0.block.mlp.experts.gate_up_proj"]
    half = fused.shape[1] // 2
    assert torch.equal(tensors["model.layers.2.mlp.experts.1.up_proj.weight"], fused[1, half:])

    report = verified["glm"]
    assert report["ok"] and report["speculative"]["lossless"] and report["speculative"]["prompts"] == 40

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert mtp.attach(model, None, Path(out / "final"), seed=0) == (1, "loaded")
    assert all(torch.equal(v, step["mtp." + k]) for k, v in model.mtp.state_dict().items())

"""The vision-language quickstart and a second VLM family, driven through the CLI as a user runs them."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_main

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


# The quickstart's path at a length that proves it (about 10 s of training): the full 3,000 steps and their
# exact-match thresholds (images >= 90%, the text-only baseline <= 40%) are `make quality` (bench/quality.py).
SHORT = ["train.max_steps=60", "data.train={synthetic: shapes, num_records: 2000, seed: 0}",
         "data.validation={synthetic: shapes, num_records: 24, seed: 1}", "checkpoint.every_steps=30"]


# The runs are session fixtures in tests/e2e/conftest.py (`vlm_quickstart`, `vlm_idefics3`, `vlm_drafter`); the three
# exports are proven in the one `shipyard verify` of the e2e exports there (`cli_verified`).


@pytest.fixture(scope="module")
def quickstart(vlm_quickstart):
    return vlm_quickstart


def test_quickstart_trains_evaluates_and_exports_with_its_processor(quickstart):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out, stdout = quickstart
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["num_prompts"] == 24 and 0.0 <= summary["eval"]["exact_match"] <= 1.0
    assert summary["final_checkpoint"] == str(out / "final") and summary["steps"] == 60
    assert summary["train_seconds"] > 0 and (out / "checkpoints" / "step_30" / "model.safetensors").is_file()
    assert "images: Qwen3VLProcessor" in stdout and "<|image_pad|>" not in stdout
    loss = [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert loss[-1] < 0.5 * loss[0]  # learning, not yet learned: that is `make quality`'s question
    model = AutoModelForImageTextToText.from_pretrained(out / "final")
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert AutoProcessor.from_pretrained(out / "final").chat_template


def test_text_only_baseline_trains_without_image_parts(tmp_path):
    """`data.drop_images`: the same records with the image parts removed (`make quality` holds its exact match
    to <= 40%: the answers need the images)."""
    out = tmp_path / "text_only"
    proc = run_main("train", "quickstart_vlm", f"output_dir={out}", *SHORT, "data.drop_images=true",
                    "train.max_steps=4", "checkpoint.every_steps=null", "eval.generate=false")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "images: Qwen3VLProcessor, 0 in training samples" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["eval"]["loss"] > 0


@pytest.fixture(scope="module")
def idefics3(vlm_idefics3):
    return vlm_idefics3


@pytest.fixture(scope="module")
def drafter(vlm_drafter):
    return vlm_drafter


@pytest.fixture(scope="module")
def verified(cli_verified):
    """{run name: report}."""
    return {name: cli_verified[f"vlm/{name}"] for name in ("quickstart", "idefics3", "drafter")}


@pytest.mark.cli_verified("vlm")
def test_verify_serves_the_images_in_vllm(verified):
    report = verified["quickstart"]
    assert report["ok"] and report["vllm"]["available"] and report["vllm"]["greedy_match"] and report["template_parity"]
    assert report["vllm"]["prompt_ids_match"]  # image placeholders expanded alike in transformers and vLLM
    assert report["vllm"]["training_prompt_ids_match"]  # ... and they are the ids training made of the prompts
    assert report["vllm"]["logprobs"]["max_abs_diff"] <= 1e-3
    assert all(p.endswith("[+image]") for p in report["prompts"])


@pytest.mark.cli_verified("vlm")
def test_second_family_idefics3_trains_exports_loads_and_serves(idefics3, verified):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = idefics3
    final = out / "final"
    model = AutoModelForImageTextToText.from_pretrained(final)
    processor = AutoProcessor.from_pretrained(final)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration" and processor.chat_template
    losses = [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.5 * losses[0]
    assert torch.isfinite(next(model.parameters())).all()
    report = verified["idefics3"]
    assert report["ok"], json.dumps(report)[-3000:]
    assert report["vllm"]["greedy_match"] and report["vllm"]["prompt_ids_match"] and report["template_parity"]
    assert report["vllm"]["training_prompt_ids_match"]  # vLLM's ids, image tokens expanded, are training's


@pytest.mark.cli_verified("vlm")
def test_dflash_drafter_for_the_vlm_target_is_served_losslessly(quickstart, drafter, verified):
    """The drafter reads the target's hidden states at the positions vLLM gives it (M-RoPE's temporal row, not
    the token index). It trained under bf16 autocast (`train.mixed_precision: bf16` on CPU) and exports its fp32
    master weights."""
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from shipyard.data.images import ImageEncoder
    from shipyard.train.dflash import drafter_positions
    from shipyard.models.greedy import prompt_inputs
    from shipyard.hf_files import read_probe

    out, _ = quickstart
    summary = json.loads((drafter / "summary.json").read_text())
    assert summary["mixed_precision"] == "bf16"
    ev = summary["eval"]
    assert 1.0 < ev["mean_acceptance_length"] <= ev["ceiling_mean_acceptance_length"]
    with safe_open(drafter / "final" / "model.safetensors", "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"F32"}

    s = verified["drafter"]["speculative"]
    assert s["method"] == "dflash" and s["prompts"] == 24 and s["lossless"] and s["prompt_ids_equal"]
    assert 1.0 < s["mean_acceptance_length"] <= s["ceiling_mean_acceptance_length"]
    # vLLM's counters are not held to the replay here: its DFlash proposer files the context K/V of an M-RoPE
    # target under cache slots derived from the (repeating) temporal positions, so image tokens overwrite each
    # other in the drafter's cache (docs/speculative.md). Text targets match exactly (test_cli_dflash.py).
    assert sum(s["vllm_raw_accepted_per_position"]) > 0

    # ... and those positions are not the token index once an image precedes the text.
    final = out / "final"
    model = AutoModelForImageTextToText.from_pretrained(final)
    processor = AutoProcessor.from_pretrained(final)
    dialog = read_probe(drafter / "final")["held_out"][0]
    batch = prompt_inputs(processor.tokenizer, dialog, ImageEncoder(processor))
    positions = drafter_positions(model, batch)
    assert positions is not None and not torch.equal(positions[0], torch.arange(batch["input_ids"].shape[1]))

"""The vision-language quickstart and a second VLM family, driven through the CLI as a user runs them."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm") / "quickstart_vlm"
    proc = run_cli("train", "quickstart_vlm", f"output_dir={out}", timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_quickstart_learns_what_only_the_images_tell(quickstart):
    out, stdout = quickstart
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["num_prompts"] >= 200
    assert summary["eval"]["exact_match"] >= 0.9, summary["eval"]
    assert summary["final_checkpoint"] == str(out / "final") and summary["wall_seconds"] > 0
    # Speed lives in benchmarks (docs/benchmarks.md), not in timed tests: a loaded CI machine ran these 3,000
    # steps at 5,000 tokens/s (11 minutes), a quiet one in about 4.
    assert summary["train_seconds"] > 0
    assert "images: Qwen3VLProcessor" in stdout and "<|image_pad|>" not in stdout


def test_text_only_baseline_scores_at_most_40_percent(tmp_path):
    """The recipe with the image parts removed: the answers need the images. 600 steps keep CI lean (the
    text-only loss has flattened by then); the full 3000 steps score 10.5%."""
    out = tmp_path / "text_only"
    proc = run_cli("train", "quickstart_vlm", f"output_dir={out}", "data.drop_images=true", "train.max_steps=600",
                   "checkpoint.every_steps=null", timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["num_prompts"] >= 200
    assert summary["eval"]["exact_match"] <= 0.40, summary["eval"]


def test_verify_serves_the_images_in_vllm(quickstart):
    out, _ = quickstart
    proc = run_cli("verify", str(out / "final"), "--json", timeout=900)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["ok"] and report["vllm"]["available"] and report["vllm"]["greedy_match"] and report["template_parity"]
    assert report["vllm"]["prompt_ids_match"]  # image placeholders expanded alike in transformers and vLLM
    assert report["vllm"]["training_prompt_ids_match"]  # ... and they are the ids training made of the prompts
    assert report["vllm"]["logprobs"]["max_abs_diff"] <= 1e-3
    assert all(p.endswith("[+image]") for p in report["prompts"])


def test_second_family_idefics3_trains_exports_loads_and_serves(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = tmp_path / "idefics3"
    proc = run_cli("train", "quickstart_vlm", f"output_dir={out}", "model.path=idefics3-tiny", "train.max_steps=60",
                   "data.train={synthetic: shapes, num_records: 2000, seed: 0}", "eval.max_prompts=16",
                   "checkpoint.every_steps=null", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = out / "final"
    model = AutoModelForImageTextToText.from_pretrained(final)
    processor = AutoProcessor.from_pretrained(final)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration" and processor.chat_template
    losses = [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.5 * losses[0]
    assert torch.isfinite(next(model.parameters())).all()
    proc = run_cli("verify", str(final), "--json", timeout=900)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"], json.dumps(report)[-3000:]
    assert report["vllm"]["greedy_match"] and report["vllm"]["prompt_ids_match"] and report["template_parity"]
    assert report["vllm"]["training_prompt_ids_match"]  # vLLM's ids, image tokens expanded, are training's


def test_dflash_drafter_for_the_vlm_target_is_served_losslessly(quickstart, tmp_path):
    """A drafter for the Qwen3-VL-shaped target: images go through the target, the drafter reads its hidden
    states at the positions vLLM gives it (M-RoPE's temporal row, not the token index)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from shipyard.data.images import ImageEncoder
    from shipyard.train.dflash import drafter_positions
    from shipyard.verify.hf_greedy import prompt_inputs
    from shipyard.verify.probe import read_probe

    out, _ = quickstart
    drafter = tmp_path / "drafter"
    proc = run_cli("train", "quickstart_dflash", f"output_dir={drafter}", f"draft.target={out / 'final'}",
                   "data.train={synthetic: shapes, num_records: 512, seed: 0}",
                   "data.validation={synthetic: shapes, num_records: 24, seed: 1}", "train.max_steps=40",
                   "train.micro_batch_size=16", "train.eval_every=null", "checkpoint.every_steps=null", timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ev = json.loads((drafter / "summary.json").read_text())["eval"]
    assert 1.0 < ev["mean_acceptance_length"] <= ev["ceiling_mean_acceptance_length"]

    proc = run_cli("verify", str(drafter / "final"), "--json", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads(proc.stdout)["speculative"]
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

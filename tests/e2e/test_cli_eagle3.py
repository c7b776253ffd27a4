"""The EAGLE-3 quickstart from the CLI: a short drafter run on the DFlash quickstart's target; vLLM proves it."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_quickstart_trains_an_eagle3_drafter_in_vllms_layout(eagle3_quickstart):
    out, stdout = eagle3_quickstart
    assert "shipyard eagle3:" in stdout and "aux layers [0, 1, 2] (pre-norm)" in stdout
    ev = json.loads((out / "summary.json").read_text())["eval"]
    assert 1.0 < ev["mean_acceptance_length"] <= ev["ceiling_mean_acceptance_length"] + 1e-9, ev
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["architectures"] == ["Eagle3Qwen3ForCausalLM"] and config["num_hidden_layers"] == 1
    assert config["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2] and config["draft_vocab_size"] == config["vocab_size"]


@pytest.mark.cli_verified("eagle3")
def test_verify_serves_the_eagle3_drafter_in_vllm_losslessly(eagle3_quickstart, cli_verified):
    out, _ = eagle3_quickstart
    report = cli_verified["eagle3/drafter"]  # the one `shipyard verify` of the e2e exports (tests/e2e/conftest.py)
    s = report["speculative"]
    assert report["ok"] and report["kind"] == "eagle3_drafter" and s["method"] == "eagle3"
    assert s["num_speculative_tokens"] == 6 and len(s["acceptance_per_position"]) == 6
    assert s["prompts"] == 60 and s["lossless"] and s["lossless_prompts"] == s["prompts"]
    assert 1.0 < s["mean_acceptance_length"] <= s["ceiling_mean_acceptance_length"] + 1e-9
    assert s["mean_acceptance_length"] == pytest.approx(1 + sum(s["acceptance_per_position"]))
    # Acceptance falls (or stays) with depth: a draft at depth j needs depths 1..j-1 accepted.
    assert all(a >= b for a, b in zip(s["acceptance_per_position"], s["acceptance_per_position"][1:]))
    # vLLM's own EAGLE-3 model drafts what shipyard's drafter drafts, step by step on its own outputs: its raw
    # counters (late drafts included) match the replay counted the same way, position by position (5% slack for
    # near-ties after the stop token, as for DFlash).
    for vllm_count, replayed in zip(s["vllm_raw_accepted_per_position"], s["replayed_raw_accepted_per_position"]):
        assert abs(vllm_count - replayed) <= 0.05 * s["drafts"], (s["vllm_raw_accepted_per_position"],
                                                                  s["replayed_raw_accepted_per_position"])
    offline = json.loads((out / "summary.json").read_text())["eval"]["mean_acceptance_length"]
    assert abs(offline - s["mean_acceptance_length"]) <= 0.05 * s["mean_acceptance_length"]
    assert set(s["tokens_per_second"]) == {"plain", "eagle3", "ngram"}

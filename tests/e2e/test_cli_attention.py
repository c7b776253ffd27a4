"""Gemma 2's soft-capping: trained with an attention that implements it, and verify notices when it is removed."""

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.mark.cli_verified("attention")
def test_gemma2_soft_capping_is_trained_and_a_removed_cap_fails_verify(gemma2_runs, cli_verified):
    """The runs and the edited export: tests/e2e/conftest.py (`gemma2_runs`); the edited directory is verified in
    the one `shipyard verify` of the e2e exports (`cli_verified`, which also checks the command's exit status)."""
    sdpa, auto, edited = gemma2_runs
    assert "model.attn_implementation=sdpa ignores attn_logit_softcapping=5.0" in sdpa.stderr
    assert "attention: eager, since the config declares attn_logit_softcapping" in auto.stderr
    report = cli_verified["attention/edited"]
    ref = report["training_reference"]
    assert not ref["ok"] and not report["ok"]
    assert ref["first_mismatch"] is not None or (ref["max_abs_diff"] > ref["tolerance"] and ref["prompt"] is not None)

"""Gemma 2's soft-capping: trained with an attention that implements it, and verify notices when it is removed."""

import json
import shutil

import pytest

from tests.conftest import run_cli, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_gemma2_soft_capping_is_trained_and_a_removed_cap_fails_verify(tmp_path):
    proc = run_cli("train", "quickstart", *tiny_overrides(tmp_path / "sdpa", steps=1), "model.path=gemma2-tiny",
                   "model.attn_implementation=sdpa", "eval.generate=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model.attn_implementation=sdpa ignores attn_logit_softcapping=5.0" in proc.stderr

    out = tmp_path / "gemma2"
    proc = run_cli("train", "quickstart", *tiny_overrides(out, steps=30, records=512), "model.path=gemma2-tiny",
                   "eval.generate=false", "optim.lr=3e-3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "attention: eager, since the config declares attn_logit_softcapping" in proc.stderr
    edited = shutil.copytree(out / "final", tmp_path / "edited")
    config = json.loads((edited / "config.json").read_text())
    assert config["attn_logit_softcapping"] == 5.0
    config["attn_logit_softcapping"] = None  # what a careless conversion script might do
    (edited / "config.json").write_text(json.dumps(config))

    proc = run_cli("verify", str(edited), "--json")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    ref = report["training_reference"]
    assert not ref["ok"] and not report["ok"]
    assert ref["first_mismatch"] is not None or (ref["max_abs_diff"] > ref["tolerance"] and ref["prompt"] is not None)

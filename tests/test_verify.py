"""`shipyard verify`: agreement is proven, and each kind of disagreement is named."""

import json

import pytest

from shipyard import cli
from shipyard.train.loop import train
from shipyard.verify import run as verify_run
from shipyard.models.greedy import load_for_verify
from shipyard.hf_files import read_probe
from shipyard.verify.run import eos_ids_of, template_parity
from tests.conftest import tiny_overrides
from tests.fixtures import edit_json


@pytest.fixture(scope="module")
def trained(text_base):
    """A tiny model trained long enough that its greedy choices are not near-ties; returns final/ (tests/served.py:
    the 60-step quickstart test_lora adapts too)."""
    return text_base


def test_probe_records_training_rendering(trained):
    probe = read_probe(trained)
    assert len(probe["prompts"]) == 8 and probe["prompts"][0][0]["content"].startswith("reverse: ")
    assert probe["multi_turn"] == "as_served" and len(probe["dialogs"]) == 1  # the synthetic task has one shape
    dialog = probe["dialogs"][0]
    assert dialog["shape"] == ["single_turn"] and len(dialog["samples"]) == 1
    rendered = dialog["samples"][0]
    assert len(rendered["input_ids"]) == len(rendered["labels"])
    _, tok = load_for_verify(trained)
    assert template_parity(tok, probe, eos_ids_of(trained, tok)) == {
        "ok": True, "recorded_at_training": True, "dialogs": 1, "tokens": len(rendered["input_ids"]), "problems": []}


def test_changed_template_is_named(trained, tmp_path):
    _, tok = load_for_verify(trained)
    tok.chat_template = tok.chat_template.replace("'\\n' + message['content']", "': ' + message['content']")
    result = template_parity(tok, read_probe(trained), eos_ids_of(trained, tok))
    assert not result["ok"]
    assert f"dialog {read_probe(trained)['dialogs'][0]['source']} (single_turn), sample 1: chat template drift at " \
        "token 2: training rendered" in result["problems"][0]
    assert "user\\n" in result["problems"][0] and "user: " in result["problems"][0]


def test_missing_eos_is_named(trained):
    _, tok = load_for_verify(trained)
    result = template_parity(tok, read_probe(trained), eos_ids=[0])
    assert result["problems"] == [
        "assistant turns end with ['<|im_end|>'], which generation_config.json does not list as EOS ([0]): "
        "the served model would not stop"
    ]


def test_without_vllm_says_so_and_fails_unless_allowed(trained, monkeypatch, capsys):
    monkeypatch.setattr(verify_run, "vllm_available", lambda: False)
    assert cli.main(["verify", str(trained), "--json", "--max-new-tokens", "4"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["vllm"] == {"available": False} and report["ok"] is False and report["template_parity"] is True
    assert cli.main(["verify", str(trained), "--max-new-tokens", "4", "--allow-missing-vllm"]) == 0
    assert "vLLM: not installed" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.served("verify")
def test_trained_checkpoint_passes_and_a_broken_export_fails_with_the_difference_named(served):
    """`trained` and a copy whose template renders the user turn differently (tests/served.py), verified by the
    suite's one vLLM worker. (`shipyard verify A B --json`'s exit 1 and JSON lines: tests/e2e/test_cli_chat.py.)"""
    report, broken_report = served["verify/trained"], served["verify/broken"]

    assert report["ok"] and report["template_parity"]
    assert report["vllm"]["available"] and report["vllm"]["greedy_match"] and report["vllm"]["prompt_ids_match"]
    assert [r["matched_tokens"] for r in report["vllm"]["per_prompt"]] == [32] * 8
    assert report["vllm"]["max_abs_logprob_diff"] < 1e-3

    assert not broken_report["ok"]
    table = verify_run.format_report(broken_report)
    assert "template parity: FAILED" in table
    assert "chat template drift at token 2" in table and "NOT OK" in table


def test_verify_table_of_several_directories_says_which_fail(trained, tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(verify_run, "vllm_available", lambda: False)
    broken = shutil.copytree(trained, tmp_path / "broken")
    edit_json(broken / "config.json", rms_norm_eps=0.5)  # no longer the trained function
    assert cli.main(["verify", str(trained), str(broken), "--allow-missing-vllm", "--max-new-tokens", "4"]) == 1
    out = capsys.readouterr().out
    assert out.count("shipyard verify ") == 2 and f"1 of 2 directories pass; failed: {broken}" in out


@pytest.mark.slow
def test_training_from_a_sharded_bf16_base_exports_like_the_base(tmp_path):
    from safetensors import safe_open

    from tests.fixtures import save_model_dir
    import torch

    base = save_model_dir(tmp_path / "base", dtype=torch.bfloat16, max_shard_size="120KB")
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    out = tmp_path / "run"
    from shipyard.config import load_recipe

    train(load_recipe("quickstart", tiny_overrides(out, steps=3) + [f"model.path={base}", "eval.generate=false"]))
    final = out / "final"
    assert json.loads((final / "model.safetensors.index.json").read_text())["weight_map"] == index
    for name, filename in index.items():
        with safe_open(final / filename, "pt") as f:
            assert f.get_slice(name).get_dtype() == "BF16"
    # the step directory keeps the fp32 training weights, for exact resume
    with safe_open(out / "checkpoints" / "step_3" / "model.safetensors", "pt") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"F32"}


def test_an_edited_config_differs_from_the_trained_model(trained, tmp_path, monkeypatch, capsys):
    """transformers and vLLM would agree on the edited config; the recorded training answers do not."""
    probe = read_probe(trained)
    assert probe["reference"]["dtype"] == "float32" and len(probe["reference"]["token_ids"]) == len(probe["prompts"])
    monkeypatch.setattr(verify_run, "vllm_available", lambda: False)
    assert cli.main(["verify", str(trained), "--allow-missing-vllm", "--max-new-tokens", "8"]) == 0
    assert "vs the trained model (float32, recorded at training time)" in capsys.readouterr().out

    import shutil

    edited = shutil.copytree(trained, tmp_path / "edited")
    config = json.loads((edited / "config.json").read_text())
    edit_json(edited / "config.json", rms_norm_eps=0.5)
    assert cli.main(["verify", str(edited), "--allow-missing-vllm", "--max-new-tokens", "8", "--json"]) == 1
    ref = json.loads(capsys.readouterr().out)["training_reference"]
    assert config["rms_norm_eps"] != 0.5 and not ref["ok"]
    assert ref["first_mismatch"] is not None or ref["max_abs_diff"] > ref["tolerance"], ref

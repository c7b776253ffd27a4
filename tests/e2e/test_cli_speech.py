"""The speech-LM through the CLI as a user runs it: the quickstart (synthetic speech, WER), verify in
transformers and in vLLM with shipyard's plugin, frozen parts, FSDP2, MTP, a hybrid backbone, thinking defaults."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from shipyard.models.speechlm import HYBRID_ARCHITECTURE
from tests.conftest import assert_close_trajectory, losses, run_cli, run_main

pytestmark = [pytest.mark.slow]

# A seconds-long run on a small synthetic set (the clips are cached, shared by the tests below).
SMALL = ["data.train={synthetic: spoken_digits, num_records: 96, seed: 0}",
         "data.validation=[{synthetic: spoken_digits_heldout, num_records: 8, seed: 1}]",
         "train.micro_batch_size=8", "checkpoint.every_steps=null", "eval.max_new_tokens=8", "optim.warmup_steps=1"]


def train(out, *extra, steps: int = 4):
    proc = run_main("train", "quickstart_speech", f"output_dir={out}", f"train.max_steps={steps}", *SMALL, *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def quickstart(speech_quickstart):
    """tests/e2e/conftest.py (`speech_quickstart`): its export is verified in the one `shipyard verify` of the e2e
    exports there."""
    return speech_quickstart


def test_quickstart_reports_word_error_rates_and_exports_a_speech_lm(quickstart):
    out, stdout = quickstart
    summary = json.loads((out / "summary.json").read_text())
    ev = summary["eval"]
    assert ev["num_prompts"] == 12 and 0.0 <= ev["wer"], ev
    assert set(ev["wer_by_source"]) == {"synthetic:spoken_digits_heldout", "synthetic:spoken_digits_unseen_voices"}
    assert summary["final_checkpoint"] == str(out / "final") and summary["steps"] == 30
    assert (out / "checkpoints" / "step_15" / "model.safetensors").is_file()
    assert summary["wall_seconds"] > summary["train_seconds"] > 0
    assert "word error rate" in stdout and "audio: 96 clips" in stdout and "vllm.entrypoints.openai.api_server" in stdout
    assert losses(out)[-1] < 0.7 * losses(out)[0]
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["architectures"] == ["ShipyardSpeechLMForConditionalGeneration"] and "auto_map" not in config
    generation = json.loads((out / "final" / "generation_config.json").read_text())
    tokenizer_config = json.loads((out / "final" / "tokenizer_config.json").read_text())
    assert isinstance(tokenizer_config["extra_special_tokens"], dict)
    assert "<|audio|>" in tokenizer_config["extra_special_tokens"].values()
    assert generation["eos_token_id"] in (2, [2])


@pytest.mark.vllm
@pytest.mark.cli_verified("speech")
def test_verify_transcribes_alike_in_transformers_and_vllm(cli_verified):
    report = cli_verified["speech/final"]
    assert report["ok"] and report["vllm"]["available"] and report["vllm"]["greedy_match"] and report["template_parity"]
    assert report["vllm"]["training_prompt_ids_match"] and report["vllm"]["prompt_ids_match"]
    wer = report["wer"]
    assert wer["num_clips"] == 12 and wer["transformers"] == wer["vllm"], wer
    assert all(p.endswith("[+audio]") for p in report["prompts"])


def test_frozen_encoder_stays_bit_identical(tmp_path):
    from shipyard.config import load_recipe
    from shipyard.models.load import load

    train(tmp_path / "run", "model.freeze=[audio_encoder]", "eval.generate=false")
    start, _, _ = load(load_recipe("quickstart_speech").model, seed=0)
    exported = load_file(tmp_path / "run" / "final" / "model.safetensors")
    encoder = {n: t for n, t in start.state_dict().items() if n.startswith("audio_encoder.")}
    assert encoder and all(torch.equal(exported[n], t) for n, t in encoder.items())
    assert not torch.equal(exported["projector.linear_1.weight"], start.state_dict()["projector.linear_1.weight"])


@pytest.mark.distributed
def test_two_ranks_equal_one_rank(tmp_path):
    common = ["train.micro_batch_size=8", "parallel.fsdp=true", "eval.generate=false", "optim.lr=1e-3"]
    train(tmp_path / "one", *common, "train.grad_accum_steps=2", steps=6)
    proc = run_cli("train", "quickstart_speech", f"output_dir={tmp_path / 'two'}", "train.max_steps=6", *SMALL,
                   *common, "--nproc-per-node", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_close_trajectory(losses(tmp_path / "one"), losses(tmp_path / "two"), 6)
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-5), name


def test_mtp_on_the_speech_lm_trains_with_a_loss_per_depth(tmp_path):
    proc = train(tmp_path / "mtp", "model.mtp={num_layers: 2}", "eval.generate=false", steps=3)
    assert "mtp: 2 layer(s) attached" in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "mtp" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train/loss_mtp_1"] > 0 and r["train/loss_mtp_2"] > 0 for r in rows)
    side = load_file(tmp_path / "mtp" / "final" / "mtp.safetensors")
    assert any(n.startswith("mtp.layers.1.") for n in side)


def test_hybrid_backbone_exports_under_the_hybrid_name_and_loads_back(tmp_path):
    from transformers import AutoModelForCausalLM

    from shipyard.verify.run import prepare

    train(tmp_path / "hybrid", "model.path=speech-nemotron-h-tiny", "eval.generate=false", steps=3)
    final = tmp_path / "hybrid" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == [HYBRID_ARCHITECTURE] and config["text_config"]["model_type"] == "nemotron_h"
    model = AutoModelForCausalLM.from_pretrained(final)
    assert type(model).__name__ == HYBRID_ARCHITECTURE
    report = prepare(final, max_new_tokens=8, trust_remote_code=False).report
    assert report["training_reference"]["ok"], report["training_reference"]  # the trained function, reloaded
    assert report["template"]["ok"], report["template"]


def test_reasoning_template_gets_trainings_thinking_default(tmp_path):
    """Trained with enable_thinking=false, the export's template defaults to it (vLLM renders the same prompt);
    an export whose template still defaults to thinking fails verify."""
    from tests.fixtures import CHAT_TEMPLATES, family_tokenizer
    from shipyard.verify.run import prepare

    tokenizer_dir = tmp_path / "qwen3_tokenizer"
    family_tokenizer("qwen3").save_pretrained(tokenizer_dir)
    train(tmp_path / "think", f"model.tokenizer={tokenizer_dir}", "data.chat_template_kwargs={enable_thinking: false}",
          "eval.generate=false", steps=2)
    final = tmp_path / "think" / "final"
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(final)
    prompt = exported.apply_chat_template([{"role": "user", "content": "<|audio|>\nhi"}], tokenize=False,
                                          add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert prepare(final, max_new_tokens=4, trust_remote_code=False).report["template"]["ok"]

    path = final / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = (CHAT_TEMPLATES / "qwen3" / "chat_template.jinja").read_text()  # thinking by default
    path.write_text(json.dumps(config))
    (final / "processor_config.json").write_text(json.dumps({**json.loads((final / "processor_config.json").read_text()),
                                                             "chat_template": config["chat_template"]}))
    report = prepare(final, max_new_tokens=4, trust_remote_code=False).report["template"]
    assert not report["ok"] and any("drift" in p for p in report["problems"]), report


def test_speech_lm_from_a_pretrained_encoder_and_llm(tmp_path):
    """model.speech composes a speech-LM of an LLM directory and a parakeet checkpoint: both keep their weights
    (frozen here: bit-identical in the export), the projector is new, and the export is one model."""
    from transformers import AutoModel, ParakeetCTCConfig, ParakeetForCTC

    from shipyard.models.speech_presets import _ENCODER
    from tests.fixtures import save_model_dir

    llm = save_model_dir(tmp_path / "llm", "qwen3-tiny")
    torch.manual_seed(1)
    encoder_config = {k: v for k, v in _ENCODER.items() if k != "model_type"}
    ParakeetForCTC(ParakeetCTCConfig(encoder_config=encoder_config, vocab_size=32)).save_pretrained(tmp_path / "enc")
    out = tmp_path / "composed"
    proc = run_main("train", "quickstart_speech", f"output_dir={out}", "train.max_steps=2", *SMALL,
                    f"model.path={llm}", f"model.speech={{encoder: {tmp_path / 'enc'}}}",
                    "model.freeze=[audio_encoder, language_model]", "eval.generate=false")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exported = load_file(out / "final" / "model.safetensors")
    encoder = AutoModel.from_pretrained(tmp_path / "enc").encoder.state_dict()
    assert all(torch.equal(exported[f"audio_encoder.{n}"], t) for n, t in encoder.items())
    base = load_file(llm / "model.safetensors")
    assert all(f"language_model.{n}" in exported for n in base)
    for name, tensor in base.items():  # the embedding grew by the <|audio|> row (rounded up to 64 rows)
        assert torch.equal(exported[f"language_model.{name}"][: tensor.shape[0]], tensor), name
    assert "projector.linear_1.weight" in exported and "ctc_head.weight" not in exported
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["audio_config"]["model_type"] == "parakeet_encoder" and config["projector_stack"] == 2

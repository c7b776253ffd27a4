"""A transformers speech-LM (Qwen2-Audio, the tiny `qwen2-audio-tiny` preset built from its config) trained like a
vision-language model: its processor and chat template render the dialogs, `shipyard data preview` shows what
vLLM expands, the export loads in transformers and serves in vLLM with no plugin (the `qwen2_audio` group of
tests/served.py), and FSDP2 on two ranks equals one process on a mixed text/audio dataset."""

from __future__ import annotations

import json
import re

import pytest
import torch

from shipyard.config import load_recipe
from shipyard.train.loop import train
from tests.conftest import assert_close_trajectory, losses, run_cli, run_main
from tests.served import assert_serves

AUDIO_ID = 512  # <|AUDIO|> in the preset's tokenizer (the shipped 512 tokens, then the family's special tokens)


def test_preview_collapses_audio_tokens_as_vllm_expands_them_and_supervises_only_the_answer():
    from transformers import AutoTokenizer

    from shipyard.data.audio import load_audio, qwen2_audio_tokens
    from shipyard.models.speech_presets import qwen2_audio

    data = ["data.train={synthetic: spoken_digits, num_records: 3, seed: 0}", "data.max_length=256"]
    text = run_main("data", "preview", "quickstart_speech", "model.path=qwen2-audio-tiny", *data, "--limit", "3")
    assert text.returncode == 0, text.stderr
    rows = run_main("data", "preview", "quickstart_speech", "model.path=qwen2-audio-tiny", *data, "--limit", "3",
                    "--json")
    samples = [json.loads(line) for line in rows.stdout.splitlines()]
    _, processor = qwen2_audio()
    tokenizer = processor.tokenizer
    shown = [int(n) for n in re.findall(r"<\|audio_bos\|><\|AUDIO\|>x(\d+)<\|audio_eos\|>", text.stdout)]
    assert len(samples) == len(shown) == 3
    for sample, n_shown in zip(samples, shown):
        clip = load_audio(sample["images"][0], 16000)
        n = sample["input_ids"].count(AUDIO_ID)
        # What vLLM expands (FACTS: the same formula in its Qwen2-Audio processor, L = samples / 160) and what
        # the family's own processor expands on the decoded clip.
        own = processor(text=["<|AUDIO|>"], audio=[clip], return_tensors="pt")["input_ids"][0].tolist()
        assert n == n_shown == qwen2_audio_tokens(-(-len(clip) // 160)) == own.count(AUDIO_ID) > 0
        supervised = [t for t in sample["labels"] if t != -100]
        assert supervised == sample["input_ids"][-len(supervised):]
        answer = tokenizer.decode(supervised)
        assert answer.endswith("<|im_end|>") and "<|im_start|>" not in answer and "AUDIO" not in answer
        assert re.fullmatch(r"[a-z ]+<\|im_end\|>", answer), answer
    assert "Audio 1: <|audio_bos|>" in text.stdout and "You are a helpful assistant." in text.stdout


def test_export_reloads_in_transformers_under_the_names_vllm_reads(qwen2_audio_run):
    """The run of tests/served.py (audio tower frozen): its export holds the published layout, reloads with
    AutoModelForMultimodalLM to the trained logits, keeps the frozen tower bit-identical and the 30 s window."""
    from safetensors.torch import load_file
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    out, result = qwen2_audio_run
    final = out / "final"
    exported = load_file(final / "model.safetensors")
    assert {n.split(".")[0] for n in exported} == {"audio_tower", "multi_modal_projector", "language_model"}
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in exported
    assert "language_model.lm_head.weight" in exported and not any(".model.model." in n for n in exported)
    features = json.loads((final / "processor_config.json").read_text())["feature_extractor"]
    assert features["nb_max_frames"] == 3000 and features["chunk_length"] == 30

    from shipyard.models.load import load
    start, _, _ = load(load_recipe("quickstart_speech", ["model.path=qwen2-audio-tiny"]).model, seed=0)
    tower = {n.removeprefix("model."): t for n, t in start.state_dict().items() if n.startswith("model.audio_tower.")}
    assert tower and all(torch.equal(exported[n], t) for n, t in tower.items())

    processor = AutoProcessor.from_pretrained(final)
    clip = torch.randn(24000).numpy() * 0.1
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "audio", "audio": "x"},
                                            {"type": "text", "text": "Transcribe the audio."}]}],
                                           tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt], audio=[clip], return_tensors="pt")
    with torch.no_grad():
        ours = result.model.eval()(**inputs).logits
        theirs = AutoModelForMultimodalLM.from_pretrained(final).eval()(**inputs).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()


@pytest.mark.vllm
@pytest.mark.served("qwen2_audio")
def test_vllm_serves_the_export_natively_with_equal_tokens_and_wer(served):
    report = served["qwen2_audio/final"]
    assert_serves(report, "qwen2_audio")
    assert report["vllm"]["training_prompt_ids_match"]
    assert report["wer"]["transformers"] == report["wer"]["vllm"] and report["wer"]["num_clips"] == 4, report["wer"]
    assert all(p.endswith("[+audio]") for p in report["prompts"])


def test_lora_adapts_only_the_language_model(tmp_path):
    from shipyard.models.load import load
    from shipyard.peft.lora import resolve_targets
    from shipyard.config import LoraConfig

    model, _, _ = load(load_recipe("quickstart_speech", ["model.path=qwen2-audio-tiny"]).model, seed=0)
    targets = resolve_targets(model, LoraConfig())
    assert len(targets) == 2 * 7 and all(t.startswith("model.language_model.layers.") for t in targets)


@pytest.mark.distributed
def test_fsdp_two_ranks_equal_one_rank_on_mixed_text_and_audio(tmp_path):
    """Half the records are text-only, in 1-sample micro-batches per rank: a rank whose micro-batch has no clip runs
    the audio tower on a blank clip while the other runs it on a real one."""
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Count to {n}."},
                                                     {"role": "assistant", "content": " ".join(["one"] * n)}]}) + "\n"
                            for n in range(1, 9)))
    common = [f"data.train=[{{synthetic: spoken_digits, num_records: 8, seed: 0}}, {text}]",
              "data.validation=[{synthetic: spoken_digits_heldout, num_records: 2, seed: 1}]", "data.max_length=160",
              "model.path=qwen2-audio-tiny", "train.max_steps=4", "optim.lr=1e-3", "optim.warmup_steps=0",
              "eval.generate=false", "checkpoint.every_steps=null", "parallel.fsdp=true"]
    train(load_recipe("quickstart_speech", [f"output_dir={tmp_path / 'one'}", *common, "train.micro_batch_size=2"]))
    proc = run_cli("train", "quickstart_speech", f"output_dir={tmp_path / 'two'}", *common,
                   "train.micro_batch_size=1", "--nproc-per-node", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_close_trajectory(losses(tmp_path / "one"), losses(tmp_path / "two"), 4)

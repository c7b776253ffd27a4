"""The speech-LM's pieces, checked by number: placeholder counts, masks, features, CTC targets, bad audio."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
import torch

import shipyard.models.speechlm  # noqa: F401  (registers the speech-LM with transformers)
from shipyard.data.audio import AudioEncoder, audio_parts_as_text, load_audio
from shipyard.data.chat import IGNORE_INDEX, tokenize_record
from shipyard.data.loader import collate
from shipyard.data.messages import RecordError, normalise_record
from shipyard.models.speech_presets import SPEECH_PRESETS
from shipyard.models.speechlm import AUDIO_TOKEN


@pytest.fixture(scope="module")
def speech():
    from transformers import AutoModelForCausalLM

    config, processor = SPEECH_PRESETS["speech-qwen3-tiny"]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.reset_audio_convolutions()
    return model.eval(), processor


def tone(seconds: float, rate: int = 16_000, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_clip(path, samples, rate=16_000):
    soundfile.write(path, samples, rate, subtype="PCM_16")
    return str(path)


def test_placeholder_count_equals_encoder_output_length(speech):
    """One function decides how many <|audio|> tokens a clip gets; the encoder + projector make exactly that many
    frames, for lengths across the range (one sample past each subsampling boundary included)."""
    model, processor = speech
    lengths = [160, 1_279, 1_280, 1_281, 2_560, 7_999, 16_000, 23_457, 48_000, 160_000, 321_111]
    features = processor.feature_extractor([np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
                                            for n in lengths], sampling_rate=16_000)
    with torch.no_grad():
        frames, _, _ = model.encode_audio(features["input_features"], features["feature_lengths"])
    counts = [processor.audio_token_count(n) for n in lengths]
    assert frames.shape[0] == sum(counts)
    for n, count, frame_count in zip(lengths, counts, features["feature_lengths"].tolist()):
        one = processor.feature_extractor([np.zeros(n, np.float32)], sampling_rate=16_000)
        with torch.no_grad():
            alone, _, _ = model.encode_audio(one["input_features"], one["feature_lengths"])
        assert alone.shape[0] == count, n
        assert frame_count == n // 160 + 1
    assert counts[lengths.index(16_000)] == 7  # 1 s: 101 frames -> 13 after 8x subsampling -> 7 tokens of 2 frames


def test_clip_in_a_batch_equals_clip_alone(speech):
    """Padding never reaches a clip's frames: the logits of a short clip batched with a long one equal its own."""
    model, processor = speech
    text = f"<|im_start|>user\n{AUDIO_TOKEN}\nTranscribe the audio.<|im_end|>\n<|im_start|>assistant\n"
    clips = [tone(0.7), tone(2.3, freq=300.0)]
    batch = processor(text=[text, text], audio=clips, sampling_rate=16_000, padding=True)
    one = processor(text=[text], audio=clips[:1], sampling_rate=16_000)
    with torch.no_grad():
        both = model(**batch).logits
        alone = model(**one).logits
    n = alone.shape[1]
    assert torch.allclose(both[0, :n], alone[0], atol=1e-5)


def test_placeholder_mismatch_is_an_error(speech):
    model, processor = speech
    ids = torch.tensor([[1, processor.audio_token_id, 2]])
    features = processor.feature_extractor([tone(1.0)], sampling_rate=16_000)
    with pytest.raises(ValueError, match="1 <\\|audio\\|> tokens but 7 audio frames"):
        model(input_ids=ids, **features)


def test_audio_parts_render_as_vllm_renders_them():
    """A text template sees one placeholder per clip, then the text, joined by newlines (vLLM's chat renderer)."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "Transcribe."}, {"type": "audio", "audio": "a"},
                                             {"type": "audio", "audio": "b"}]}]
    assert audio_parts_as_text(messages)[0]["content"] == f"{AUDIO_TOKEN}\n{AUDIO_TOKEN}\nTranscribe."
    placed = [{"role": "user", "content": [{"type": "text", "text": f"Say {AUDIO_TOKEN} again"},
                                           {"type": "audio", "audio": "a"}]}]
    assert audio_parts_as_text(placed)[0]["content"] == f"Say {AUDIO_TOKEN} again"


def test_masks_supervise_only_the_answer(speech, tmp_path):
    """Audio positions and the user turn are never supervised; the answer and its end-of-turn token are."""
    _, processor = speech
    clip = write_clip(tmp_path / "a.wav", tone(1.3))
    record = normalise_record({"messages": [
        {"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, {"type": "text", "text": "Transcribe the audio."}]},
        {"role": "assistant", "content": "three one four"}]}, "t:1", tmp_path)
    assert record.messages[0]["content"][0] == {"type": "audio", "audio": clip}
    encoder = AudioEncoder(processor, ctc=True)
    sample = tokenize_record(processor.tokenizer, record, encoder=encoder).samples[0]
    ids, labels = sample.input_ids, sample.labels
    audio = [i for i, t in enumerate(ids) if t == encoder.placeholder_id]
    assert len(audio) == processor.audio_token_count(int(1.3 * 16_000))
    assert all(labels[i] == IGNORE_INDEX for i in audio)
    supervised = [t for t in labels if t != IGNORE_INDEX]
    assert processor.tokenizer.decode(supervised) == "three one four<|im_end|>"
    first = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    assert processor.tokenizer.decode(ids[:first]).endswith("<|im_start|>assistant\n")
    batch = collate([sample, sample], 0, encoder)
    assert batch["input_features"].shape[0] == 2 and batch["feature_lengths"].tolist() == [131, 131]
    transcript = processor.tokenizer("three one four", add_special_tokens=False)["input_ids"]
    assert batch["ctc_targets"][0, : len(transcript)].tolist() == transcript
    assert (batch["ctc_targets"][0, len(transcript):] == IGNORE_INDEX).all()


def test_bad_audio_gets_a_clear_error(tmp_path):
    empty = write_clip(tmp_path / "empty.wav", np.zeros(0, np.float32))
    low = write_clip(tmp_path / "low.wav", tone(1.0, rate=8_000), rate=8_000)
    long = write_clip(tmp_path / "long.wav", tone(3.0))
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    cases = {empty: ("empty_audio", "is empty"), low: ("audio_rate_too_low", "8000 Hz, below the model's 16000 Hz"),
             long: ("audio_too_long", "3.0 s long, above the 2 s accepted"),
             str(tmp_path / "junk.wav"): ("bad_audio", "cannot be read"),
             str(tmp_path / "missing.wav"): ("missing_audio", "does not exist")}
    for path, (reason, message) in cases.items():
        with pytest.raises(RecordError, match=message) as e:
            load_audio(path, 16_000, max_seconds=2)
        assert e.value.reason == reason and path in str(e.value)


def test_audio_is_mixed_down_and_resampled(tmp_path):
    stereo = np.stack([tone(1.0, 44_100), tone(1.0, 44_100)], axis=1)
    path = write_clip(tmp_path / "s.wav", stereo, rate=44_100)
    samples = load_audio(path, 16_000)
    assert samples.dtype == np.float32 and abs(len(samples) - 16_000) <= 1
    assert abs(float(np.abs(samples).max()) - 0.3) < 0.01


def test_audio_in_an_assistant_turn_is_refused(tmp_path):
    with pytest.raises(RecordError, match="audio in an assistant turn"):
        normalise_record({"messages": [{"role": "user", "content": "hi"},
                                       {"role": "assistant", "content": [{"type": "audio", "audio": "x.wav"}]}]},
                         "t:1", tmp_path)


def test_export_round_trip_loads_without_remote_code(speech, tmp_path):
    """save -> AutoModelForCausalLM / AutoProcessor (registered by `import shipyard.models.speechlm`) -> equal logits."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    model, processor = speech
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "shipyard_speechlm" and "auto_map" not in config
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert loaded_processor.audio_token_count(12_345) == processor.audio_token_count(12_345)
    text = f"<|im_start|>user\n{AUDIO_TOKEN}\nhi<|im_end|>\n<|im_start|>assistant\n"
    inputs = loaded_processor(text=[text], audio=[tone(0.9)], sampling_rate=16_000)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_a_text_only_training_batch_touches_every_parameter(speech):
    """FSDP2 reduces the same gradients on every rank: a batch without audio runs the encoder on a silent clip
    with weight 0 (zero gradients, equal logits)."""
    model, processor = speech
    ids = processor.tokenizer(["<|im_start|>user\nhi<|im_end|>\n"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    model.train()
    try:
        out = model(input_ids=ids)
        out.logits.sum().backward()
    finally:
        model.eval()
    assert torch.equal(out.logits.detach(), plain)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(float(p.grad.abs().max()) == 0.0 for n, p in model.named_parameters()
               if n.startswith(("audio_encoder.", "projector.", "ctc_head.")))
    model.zero_grad(set_to_none=True)

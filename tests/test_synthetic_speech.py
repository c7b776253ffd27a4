"""Synthetic speech: the records have the chat shape, the audio is 16 kHz and reproducible, and voices differ."""

import itertools
import json

import numpy as np
import pytest
import soundfile

from shipyard.data import synthetic_speech
from shipyard.data.synthetic_speech import (
    COMMANDS,
    DIGITS,
    HELD_OUT_VOICES,
    PROMPT,
    SAMPLE_RATE,
    TRAIN_VOICES,
    spoken_digits,
    synthesize,
    write_dataset,
)


def transcripts(records: list[dict]) -> list[str]:
    return [r["messages"][1]["content"] for r in records]


def clip_bytes(out_dir, records: list[dict]) -> list[bytes]:
    return [(out_dir / r["messages"][0]["content"][0]["audio"]).read_bytes() for r in records]


def test_records_have_the_chat_shape_and_16khz_clips(tmp_path):
    records = spoken_digits(24, seed=0, out_dir=tmp_path)
    assert len(records) == 24
    for k, record in enumerate(records):
        text = record["messages"][1]["content"]
        assert record == {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "audio", "audio": f"clips/{k:05d}.wav"}, {"type": "text", "text": PROMPT}],
                },
                {"role": "assistant", "content": text},
            ],
            "voice": record["voice"],
        }
        assert record["voice"] in TRAIN_VOICES
        words = text.split()
        assert (set(words) <= set(DIGITS) and 2 <= len(words) <= 5) or (
            set(words) <= set(COMMANDS) and 1 <= len(words) <= 3
        ), text
        info = soundfile.info(tmp_path / f"clips/{k:05d}.wav")
        assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
        assert 0.2 < info.duration < 4.0, (text, info.duration)
    assert any(t.split()[0] in COMMANDS for t in transcripts(records))
    assert any(t.split()[0] in DIGITS for t in transcripts(records))


def test_same_seed_same_records_and_bytes(tmp_path):
    first = spoken_digits(12, seed=3, out_dir=tmp_path / "a")
    synthesize("stop", "en-us+f1", 150, 60)  # eSpeak keeps state between utterances: this must not leak in
    second = spoken_digits(12, seed=3, out_dir=tmp_path / "b")
    shorter = spoken_digits(5, seed=3, out_dir=tmp_path / "c")
    assert first == second and first[:5] == shorter
    assert clip_bytes(tmp_path / "a", first) == clip_bytes(tmp_path / "b", second)
    assert clip_bytes(tmp_path / "a", first[:5]) == clip_bytes(tmp_path / "c", shorter)
    assert transcripts(spoken_digits(12, seed=4, out_dir=tmp_path / "d")) != transcripts(first)


def test_clips_are_distinct_even_for_equal_words(tmp_path):
    records = spoken_digits(40, seed=1, out_dir=tmp_path)
    assert len(set(clip_bytes(tmp_path, records))) == len(records)


def test_exclude_gives_new_sequences(tmp_path):
    train = set(transcripts(spoken_digits(30, seed=5, out_dir=tmp_path / "train")))
    # The same seed would draw exactly these transcripts first: every record has to redraw.
    held_out = transcripts(spoken_digits(30, seed=5, out_dir=tmp_path / "val", exclude=train))
    assert not train & set(held_out)

    every_sequence = {
        " ".join(words)
        for vocabulary, sizes in ((DIGITS, range(2, 6)), (COMMANDS, range(1, 4)))
        for n in sizes
        for words in itertools.product(vocabulary, repeat=n)
    }
    with pytest.raises(ValueError, match="exclude"):
        spoken_digits(1, seed=0, out_dir=tmp_path / "none", exclude=every_sequence)


def test_held_out_voices_are_unseen_and_speak(tmp_path):
    assert 2 <= len(HELD_OUT_VOICES) <= 3
    assert not set(HELD_OUT_VOICES) & set(TRAIN_VOICES)
    # Not just new accent/variant pairs: training never hears the held-out speakers' variants.
    assert not {v.split("+")[1] for v in HELD_OUT_VOICES} & {v.split("+")[1] for v in TRAIN_VOICES}
    records = spoken_digits(6, seed=0, out_dir=tmp_path, voices=HELD_OUT_VOICES)
    assert {r["voice"] for r in records} <= set(HELD_OUT_VOICES)


def pitch_hz(audio: np.ndarray) -> float:
    """Median autocorrelation pitch over the loud 40 ms frames."""
    frame = int(0.04 * SAMPLE_RATE)
    lo, hi = SAMPLE_RATE // 400, SAMPLE_RATE // 60
    estimates = []
    for start in range(0, len(audio) - frame, frame):
        x = audio[start : start + frame].astype(np.float64)
        if np.sqrt(np.mean(x**2)) < 0.05:
            continue
        ac = np.correlate(x, x, "full")[frame - 1 :]
        estimates.append(SAMPLE_RATE / (lo + int(np.argmax(ac[lo:hi]))))
    return float(np.median(estimates))


def test_voices_sound_different():
    male = synthesize("three one four", "en-us+m1", 160, 50)
    female = synthesize("three one four", "en-us+f3", 160, 50)
    assert male.dtype == np.float32 and np.abs(male).max() <= 1.0
    assert 0.5 < len(male) / SAMPLE_RATE < 2.5
    assert male.shape != female.shape or not np.allclose(male, female)
    assert pitch_hz(female) > 1.4 * pitch_hz(male)
    with pytest.raises(ValueError, match="no voice"):
        synthesize("stop", "en-gb", 160, 50)  # British English is "en"; "en-gb" names no voice file


def test_write_dataset_reuses_only_a_finished_folder(tmp_path, monkeypatch):
    out = tmp_path / "speech"
    jsonl = write_dataset(out, 4, seed=0)
    assert jsonl == out / "records.jsonl" and (out / "DONE").is_file()
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(records) == 4 and all((out / r["messages"][0]["content"][0]["audio"]).is_file() for r in records)
    assert not list(out.glob(".*"))  # no partial folder or temporary file left behind

    calls = []
    generate = synthetic_speech._generate
    monkeypatch.setattr(synthetic_speech, "_generate", lambda *a: calls.append(a) or generate(*a))
    assert write_dataset(out, 4, seed=0) == jsonl and not calls  # finished, same parameters: reused
    write_dataset(out, 4, seed=0, exclude={"one two"})
    assert len(calls) == 1  # other parameters: regenerated
    (out / "DONE").unlink()  # as if the run had been interrupted
    write_dataset(out, 3, seed=0)
    assert len(calls) == 2 and len(jsonl.read_text().splitlines()) == 3
    assert sorted(p.name for p in (out / "clips").iterdir()) == ["00000.wav", "00001.wav", "00002.wav"]

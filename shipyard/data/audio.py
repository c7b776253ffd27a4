"""Audio in chat records: where a clip is, reading it, and turning a rendered prompt into speech-LM inputs.

A record names a clip as a part of a user message's content (paths relative to the JSONL's folder):

    {"type": "audio", "audio": "clips/0001.wav"}       or   {"type": "audio_url", "audio_url": {"url": "file:///..."}}

Clips are read with soundfile (WAV, FLAC, OGG...), mixed down to mono and resampled to the model's rate with
soxr. A speech-LM's chat template is its backbone's text template, so a message with audio parts is given to
the template as text the way vLLM's chat endpoint builds it (`audio_parts_as_text`): one `<|audio|>` per clip,
then the message's texts, joined by newlines. The processor then expands each placeholder into as many tokens
as the clip has projected frames (`models/speechlm/features.audio_token_count`), exactly as vLLM's plugin does.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from shipyard.data.messages import RecordError
from shipyard.errors import ShipyardError
from shipyard.data.parts import AUDIO_TOKEN, IGNORE_INDEX

MAX_AUDIO_SECONDS = 60.0


def audio_parts_as_text(messages: list[dict]) -> list[dict]:
    """Messages whose content lists hold audio, as vLLM hands them to a text chat template: the placeholders the
    text does not already hold, then the texts, joined by newlines (vllm/renderers/chat_utils.py)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list) and any(p.get("type") == "audio" for p in content):
            text = "\n".join(p["text"] for p in content if p.get("type") == "text")
            missing = sum(p.get("type") == "audio" for p in content) - text.count(AUDIO_TOKEN)
            m = {**m, "content": "\n".join([AUDIO_TOKEN] * max(0, missing) + ([text] if text else []))}
        out.append(m)
    return out


def load_audio(ref: str, rate: int, max_seconds: float = MAX_AUDIO_SECONDS, header_only: bool = False
               ) -> np.ndarray | int:
    """The clip as float32 mono samples at `rate`; RecordError naming it when it is missing, unreadable, empty,
    longer than `max_seconds`, or recorded below `rate` (upsampling cannot add what the features look at).

    `header_only`: the number of samples at `rate` when the header says so without decoding (a clip already
    at `rate`); else the samples."""
    import soundfile
    import soxr

    source = ref
    if ref.startswith("data:"):  # verify's probe carries its clips inline
        import base64
        import binascii

        try:
            source = io.BytesIO(base64.b64decode(ref.partition(",")[2], validate=True))
        except (binascii.Error, ValueError) as e:
            raise RecordError(f"audio {ref[:40]}...: not valid base64 ({e})", reason="bad_audio") from None
        ref = f"{ref[:30]}... ({len(ref)} characters)"
    elif not Path(ref).is_file():
        raise RecordError(f"audio {ref} does not exist", reason="missing_audio")
    try:
        info = soundfile.info(source)
        if info.frames == 0:
            raise RecordError(f"audio {ref} is empty (0 samples)", reason="empty_audio")
        if info.duration > max_seconds:
            raise RecordError(f"audio {ref} is {info.duration:.1f} s long, above the {max_seconds:g} s accepted "
                              "(data.max_audio_seconds); cut it into shorter clips", reason="audio_too_long")
        if info.samplerate < rate:
            raise RecordError(f"audio {ref} is sampled at {info.samplerate} Hz, below the model's {rate} Hz; "
                              f"record or export it at {rate} Hz or more", reason="audio_rate_too_low")
        if header_only and info.samplerate == rate:
            return info.frames
        if isinstance(source, io.BytesIO):
            source.seek(0)
        samples, source_rate = soundfile.read(source, dtype="float32", always_2d=True)
    except RecordError:
        raise
    except (RuntimeError, ValueError, OSError) as e:  # soundfile.LibsndfileError is a RuntimeError
        raise RecordError(f"audio {ref} cannot be read ({type(e).__name__}: {e})", reason="bad_audio") from None
    mono = samples.mean(axis=1)
    if source_rate != rate:
        mono = soxr.resample(mono, source_rate, rate)
    return np.ascontiguousarray(mono, dtype=np.float32)


class AudioEncoder:
    """A speech-LM's processor, as the data pipeline uses it (the same interface as data/images.ImageEncoder).

    `encode` turns rendered text with its clips into ids with each placeholder expanded; `media_inputs` builds
    a batch's features (clips in id order). With the model's CTC side loss on, `ctc_targets` gives each clip
    of a one-clip sample the sample's supervised tokens (its transcript), special tokens left out.
    """

    kind = "audio"
    type_keys: list[str] = []

    def __init__(self, processor, max_seconds: float = MAX_AUDIO_SECONDS, ctc: bool = False):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.placeholder = processor.audio_token
        self.placeholder_id = processor.audio_token_id
        self.rate = processor.feature_extractor.sampling_rate
        self.max_seconds, self.ctc = max_seconds, ctc
        self._not_transcript = set(self.tokenizer.all_special_ids)

    def load(self, ref: str) -> np.ndarray:
        return load_audio(ref, self.rate, self.max_seconds)

    def configure(self, config, parallel) -> None:
        """The speech-LM's CTC side loss (targets are built with the batches); no pipeline stages for its encoder."""
        self.ctc_weight = getattr(config, "ctc_loss_weight", 0.0)
        self.ctc = self.ctc_weight > 0
        if parallel.pp > 1:
            raise ShipyardError("parallel.pp > 1 is not supported for speech-LMs yet (the audio encoder would need a "
                                "stage of its own); use FSDP2 (parallel.pp=1)")

    def blank_inputs(self) -> None:
        return None  # the audio encoder runs only on clips; FSDP2 wraps it in the root unit (parallel/fsdp.py)

    def describe(self, count: int) -> str:
        return (f"audio: {count} clips in training samples at {self.rate} Hz (resampled with soxr), up to "
                f"{self.max_seconds:g} s each; CTC side loss weight {getattr(self, 'ctc_weight', 0.0)}")

    def encode(self, text: str, clips: list[str]) -> list[int]:
        placeholders = text.count(self.placeholder)
        if placeholders != len(clips):
            raise RecordError(
                f"the chat template rendered {placeholders} audio placeholder(s) ({self.placeholder}) for "
                f"{len(clips)} clip(s); each audio part must be rendered once, and texts must not contain "
                f"{self.placeholder} themselves", reason="audio_placeholder_mismatch")
        lengths = [load_audio(r, self.rate, self.max_seconds, header_only=True) for r in clips]
        expanded = self.processor.expand(text, [n if isinstance(n, int) else len(n) for n in lengths]) if clips else text
        return self.tokenizer(expanded, add_special_tokens=False)["input_ids"] if expanded else []

    def media_inputs(self, clips: list[str]) -> dict[str, torch.Tensor]:
        if not clips:
            return {}
        return dict(self.processor.feature_extractor([self.load(r) for r in clips], sampling_rate=self.rate))

    def type_ids(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def ctc_targets(self, samples) -> dict[str, torch.Tensor]:
        if not self.ctc:
            return {}
        rows = []
        for s in samples:
            transcript = [t for t in s.labels if t != IGNORE_INDEX and t not in self._not_transcript]
            rows.extend([transcript if len(s.media) == 1 else []] * len(s.media))
        if not rows:
            return {}
        out = torch.full((len(rows), max(1, max(len(r) for r in rows))), IGNORE_INDEX, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return {"ctc_targets": out}

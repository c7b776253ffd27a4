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
import re
from pathlib import Path

import numpy as np
import torch

from shipyard.data.messages import RecordError
from shipyard.errors import ShipyardError
from shipyard.data.parts import AUDIO_TOKEN, IGNORE_INDEX

MAX_AUDIO_SECONDS = 60.0
# A template that names audio parts itself (Qwen2-Audio's: `'audio' in content`) is given the parts, as vLLM does.
_AUDIO_PART = re.compile(r"""['"]audio(_url)?['"]""")


def template_renders_audio(template) -> bool:
    """Does the chat template render audio parts itself (a transformers speech-LM's), rather than being a text
    template that vLLM hands placeholders as text (shipyard's speech-LM)?"""
    return isinstance(template, str) and bool(_AUDIO_PART.search(template))


def audio_parts_as_text(messages: list[dict], template=None) -> list[dict]:
    """Messages whose content lists hold audio, as vLLM hands them to a text chat template: the placeholders the
    text does not already hold, then the texts, joined by newlines (vllm/renderers/chat_utils.py). A template
    that renders audio parts itself (`template_renders_audio`) gets the messages as they are."""
    if template_renders_audio(template):
        return messages
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


def whisper_frames(samples: int, hop: int = 160) -> int:
    """Valid mel frames of a clip in a Whisper feature extractor's window (its attention mask: one per hop)."""
    return -(-samples // hop)


def qwen2_audio_tokens(frames: int) -> int:
    """Audio tokens of a clip with `frames` valid mel frames in Qwen2-Audio (its processor and vLLM: conv stride 2,
    then pooling by 2)."""
    return (((frames - 1) // 2 + 1) - 2) // 2 + 1


# Placeholder tokens per clip from its sample count, per processor class (what the processor and vLLM expand to);
# a processor not listed expands its placeholders itself, on the decoded clip (exact, slower).
TOKEN_COUNTS = {
    "Qwen2AudioProcessor": lambda processor, samples: qwen2_audio_tokens(
        min(whisper_frames(samples, processor.feature_extractor.hop_length), processor.feature_extractor.nb_max_frames)),
}


class ProcessorAudioEncoder:
    """A transformers speech-LM's processor (Qwen2-Audio's) as the data pipeline uses it: the interface of
    `AudioEncoder`, the family's own features (its feature extractor, padded to its fixed window as vLLM pads
    them) and placeholder expansion (each `<|AUDIO|>` its chat template writes becomes as many tokens as the
    clip's encoder frames)."""

    kind = "audio"
    type_keys: list[str] = []
    ctc = False

    def __init__(self, processor, max_seconds: float = MAX_AUDIO_SECONDS):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.placeholder = processor.audio_token
        self.placeholder_id = self.tokenizer.convert_tokens_to_ids(self.placeholder)
        extractor = processor.feature_extractor
        self.rate = extractor.sampling_rate
        window = getattr(extractor, "n_samples", None)  # Whisper: a fixed 30 s window; longer clips are cut
        self.window_seconds = window / self.rate if window else None
        self.max_seconds = min(max_seconds, self.window_seconds) if window else max_seconds
        # The family's name, not its function: the token cache's key holds this object's settings by repr.
        self.counted_as = type(processor).__name__ if type(processor).__name__ in TOKEN_COUNTS else None

    def load(self, ref: str) -> np.ndarray:
        return load_audio(ref, self.rate, self.max_seconds)

    def configure(self, config, parallel) -> None:
        if parallel.pp > 1:
            raise ShipyardError("parallel.pp > 1 is not supported for speech-LMs yet (the audio tower would need a "
                                "stage of its own); use FSDP2 (parallel.pp=1)")

    def features(self, clips: list[np.ndarray]) -> dict[str, torch.Tensor]:
        out = self.processor.feature_extractor(clips, sampling_rate=self.rate, return_attention_mask=True,
                                               padding="max_length", return_tensors="pt")
        return {"input_features": out["input_features"], "feature_attention_mask": out["attention_mask"]}

    def blank_inputs(self) -> dict[str, torch.Tensor]:
        """Features of 0.1 s of silence: micro-batches without clips run the audio tower on it (models/audio_lm.py)."""
        return self.features([np.zeros(self.rate // 10, dtype=np.float32)])

    def describe(self, count: int) -> str:
        window = f"; features {type(self.processor.feature_extractor).__name__} in a {self.window_seconds:g} s window" \
            if self.window_seconds else ""
        return (f"audio: {count} clips in training samples at {self.rate} Hz (resampled with soxr), up to "
                f"{self.max_seconds:g} s each{window}; {type(self.processor).__name__} expands {self.placeholder}")

    def encode(self, text: str, clips: list[str]) -> list[int]:
        placeholders = text.count(self.placeholder)
        if placeholders != len(clips):
            raise RecordError(
                f"the chat template rendered {placeholders} audio placeholder(s) ({self.placeholder}) for "
                f"{len(clips)} clip(s); each audio part must be rendered once, and texts must not contain "
                f"{self.placeholder} themselves", reason="audio_placeholder_mismatch")
        if not clips:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if self.counted_as is None:  # the processor expands the placeholders itself
            out = self.processor(text=[text], audio=[self.load(r) for r in clips], add_special_tokens=False)
            return list(out["input_ids"][0])
        pieces = text.split(self.placeholder)
        expanded = pieces[0]
        for ref, rest in zip(clips, pieces[1:]):
            samples = load_audio(ref, self.rate, self.max_seconds, header_only=True)
            n = samples if isinstance(samples, int) else len(samples)
            expanded += self.placeholder * TOKEN_COUNTS[self.counted_as](self.processor, n) + rest
        return self.tokenizer(expanded, add_special_tokens=False)["input_ids"]

    def media_inputs(self, clips: list[str]) -> dict[str, torch.Tensor]:
        return self.features([self.load(r) for r in clips]) if clips else {}

    def type_ids(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def ctc_targets(self, samples) -> dict[str, torch.Tensor]:
        return {}

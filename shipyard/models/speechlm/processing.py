"""The speech-LM's feature extractor and processor: clips → log-mel frames, and `<|audio|>` → as many tokens
as the clip's projected frames (one function, `features.audio_token_count`, for training, transformers and
vLLM). Saved with every export (preprocessor_config.json, processor_config.json)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin, SequenceFeatureExtractor

from shipyard.models.speechlm.configuration import AUDIO_TOKEN
from shipyard.models.speechlm.features import FeatureSpec, audio_token_count, log_mel


class ShipyardSpeechFeatureExtractor(SequenceFeatureExtractor):
    model_input_names = ["input_features", "feature_lengths"]

    def __init__(self, feature_size: int = 80, sampling_rate: int = 16_000, padding_value: float = 0.0,
                 n_fft: int = 400, hop_length: int = 160, **kwargs):
        super().__init__(feature_size=feature_size, sampling_rate=sampling_rate, padding_value=padding_value, **kwargs)
        self.n_fft, self.hop_length = n_fft, hop_length

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec(self.sampling_rate, self.n_fft, self.hop_length, self.feature_size)

    def __call__(self, audio, sampling_rate: int | None = None, return_tensors: str | None = "pt", **_) -> BatchFeature:
        """Features of one clip or a list of clips (mono float arrays at `sampling_rate`), right-padded with zeros."""
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(f"audio at {sampling_rate} Hz: this model's features are computed at "
                             f"{self.sampling_rate} Hz; resample first (shipyard's data path does, with soxr)")
        clips = [audio] if isinstance(audio, np.ndarray) and audio.ndim == 1 or torch.is_tensor(audio) and audio.dim() == 1 \
            else list(audio)
        frames = [log_mel(clip, self.spec) for clip in clips]
        width = max(f.shape[0] for f in frames)
        features = torch.zeros(len(frames), width, self.feature_size)
        for i, f in enumerate(frames):
            features[i, : f.shape[0]] = f
        lengths = torch.tensor([f.shape[0] for f in frames])
        return BatchFeature({"input_features": features, "feature_lengths": lengths}, tensor_type=None)


class ShipyardSpeechLMProcessor(ProcessorMixin):
    """Tokenizer + feature extractor. `processor(text=..., audio=[...])` expands the i-th `<|audio|>` of the text
    into `audio_token_count(len(clip_i))` tokens and returns ids with the clips' features."""

    def __init__(self, feature_extractor=None, tokenizer=None, chat_template=None, audio_token: str = AUDIO_TOKEN,
                 subsampling_factor: int = 8, subsampling_kernel: int = 3, subsampling_stride: int = 2,
                 projector_stack: int = 2):
        self.audio_token = audio_token
        self.subsampling_factor, self.subsampling_kernel = subsampling_factor, subsampling_kernel
        self.subsampling_stride, self.projector_stack = subsampling_stride, projector_stack
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template)

    @property
    def audio_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.audio_token)

    def audio_token_count(self, num_samples: int) -> int:
        return audio_token_count(num_samples, self.feature_extractor.spec, self.subsampling_factor,
                                 self.projector_stack, self.subsampling_kernel, self.subsampling_stride)

    def expand(self, text: str, clip_samples: list[int]) -> str:
        """`text` with its i-th placeholder repeated for clip i's frames (one placeholder per clip, in order)."""
        pieces = text.split(self.audio_token)
        if len(pieces) - 1 != len(clip_samples):
            raise ValueError(f"{len(pieces) - 1} {self.audio_token} placeholder(s) for {len(clip_samples)} clip(s)")
        out = pieces[0]
        for n, piece in zip(clip_samples, pieces[1:]):
            out += self.audio_token * self.audio_token_count(n) + piece
        return out

    def __call__(self, text=None, audio=None, sampling_rate: int | None = None, return_tensors: str | None = "pt",
                 **kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [])
        clips = [] if audio is None else [audio] if getattr(audio, "ndim", 2) == 1 else list(audio)
        data = {}
        if clips:
            data.update(self.feature_extractor(clips, sampling_rate=sampling_rate))
            lengths = [len(c) for c in clips]
            per_text, at = [], 0
            for t in texts:
                n = t.count(self.audio_token)
                per_text.append(self.expand(t, lengths[at : at + n]))
                at += n
            if at != len(clips):
                raise ValueError(f"{at} {self.audio_token} placeholder(s) in the text for {len(clips)} clip(s)")
            texts = per_text
        if texts:
            data.update(self.tokenizer(texts, return_tensors=return_tensors, **kwargs))
        return BatchFeature(data, tensor_type=None)

    @property
    def model_input_names(self):
        return list(self.tokenizer.model_input_names) + list(self.feature_extractor.model_input_names)

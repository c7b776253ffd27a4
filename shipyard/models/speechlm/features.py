"""Audio → log-mel frames → number of `<|audio|>` tokens: the one definition training, the exported
processor and the vLLM plugin all use.

The features are computed with torch alone (an STFT and a mel filter bank), per clip, before any padding:
a clip gets the same frames whether it is trained in a batch, transcribed by transformers or served by
vLLM. `audio_token_count` is the exact length of the projected audio sequence for a clip of
`num_samples` samples; the placeholder is expanded to that many tokens everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch


@dataclass(frozen=True)
class FeatureSpec:
    """How a waveform becomes frames (saved in the export's preprocessor_config.json)."""

    sampling_rate: int = 16_000
    n_fft: int = 400  # 25 ms windows
    hop_length: int = 160  # 10 ms frames
    num_mel_bins: int = 80

    def frames(self, num_samples: int) -> int:
        return num_samples // self.hop_length + 1  # a centred STFT


@lru_cache(maxsize=8)
def _mel_filters(spec: FeatureSpec) -> torch.Tensor:
    from transformers.audio_utils import mel_filter_bank

    bank = mel_filter_bank(num_frequency_bins=spec.n_fft // 2 + 1, num_mel_filters=spec.num_mel_bins, min_frequency=0.0,
                           max_frequency=spec.sampling_rate / 2, sampling_rate=spec.sampling_rate, norm="slaney",
                           mel_scale="slaney")
    return torch.from_numpy(np.asarray(bank, dtype=np.float32))  # [freq, mel]


def log_mel(samples: np.ndarray | torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    """[frames, num_mel_bins] float32 log-mel features of one mono clip at `spec.sampling_rate`.

    Each mel bin is normalised over the clip's own frames (mean 0, variance 1), so loudness does not
    matter and nothing depends on other clips of a batch."""
    wave = torch.as_tensor(samples, dtype=torch.float32).reshape(-1)
    stft = torch.stft(wave, spec.n_fft, spec.hop_length, window=torch.hann_window(spec.n_fft), center=True,
                      pad_mode="constant", return_complex=True)
    power = stft.abs().square()  # [freq, frames]
    mel = torch.log(_mel_filters(spec).T @ power + 1e-6).T  # [frames, mel]
    mean, std = mel.mean(0, keepdim=True), mel.std(0, keepdim=True, unbiased=False)
    return (mel - mean) / (std + 1e-5)


def subsampled_length(frames: int, factor: int, kernel: int = 3, stride: int = 2) -> int:
    """Frames after the encoder's strided convolutions (FastConformer: log2(factor) stride-2 convs, 'same' padding)."""
    padding = (kernel - 1) // 2
    for _ in range(int(math.log2(factor))):
        frames = (frames + 2 * padding - kernel) // stride + 1
    return frames


def audio_token_count(num_samples: int, spec: FeatureSpec, subsampling_factor: int, stack: int,
                      kernel: int = 3, stride: int = 2) -> int:
    """How many `<|audio|>` positions a clip of `num_samples` samples fills: frames → encoder → frame stacking."""
    return -(-subsampled_length(spec.frames(num_samples), subsampling_factor, kernel, stride) // stack)

"""vLLM's classes for shipyard's speech-LM (`models/speechlm`), registered by the plugin (serving/vllm_plugin.py).

vLLM imports this module when it serves a speech-LM directory (the plugin registers the class names by string), so
engines that serve other models never pay for it.

The served model is the transformers model's own parts:

- the audio encoder (transformers' `ParakeetEncoder`) and shipyard's `SpeechLMProjector`, run as plain torch
  modules by the transformers model's own `encode_audio` (borrowed, not copied), so the projected frames are the
  ones training produced;
- vLLM's own implementation of the language model, picked from `text_config` (Qwen3, NemotronH, ...), which gets
  the `language_model.*` weights; `ctc_head.*` (a training aid) and `mtp.*` weights are skipped.

Prompts: each `<|audio|>` is replaced by `processor.audio_token_count(num_samples)` copies of itself, the one
function training and the transformers processor use. Audio reaches the processor at the feature extractor's
rate (16 kHz): vLLM's parser resamples anything else with soxr (its default resampler needs torchaudio).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from transformers import AutoModel, BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import (
    HasInnerState, IsHybrid, MultiModalEmbeddings, SupportsMultiModal, SupportsPP,
)
from vllm.model_executor.models.utils import (
    AutoWeightsLoader, WeightsMapper, init_vllm_registered_model, maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder, BaseMultiModalProcessor, BaseProcessingInfo, PromptReplacement, PromptUpdate,
)
from vllm.sequence import IntermediateTensors
from vllm.utils.gpu_sync_debug import gpu_sync_allowed

from shipyard.data.audio import MAX_AUDIO_SECONDS
from shipyard.models.speechlm.configuration import AUDIO_TOKEN, HYBRID_ARCHITECTURE, SpeechLMConfig
from shipyard.models.speechlm.modeling import ShipyardSpeechLMForConditionalGeneration, SpeechLMProjector
from shipyard.models.speechlm.processing import ShipyardSpeechLMProcessor

# ---------------------------------------------------------------- prompts and audio -> model inputs


class SpeechLMProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> SpeechLMConfig:
        return self.ctx.get_hf_config(SpeechLMConfig)

    def get_hf_processor(self, **kwargs: object) -> ShipyardSpeechLMProcessor:
        return self.ctx.get_hf_processor(ShipyardSpeechLMProcessor, **kwargs)

    def get_data_parser(self) -> MultiModalDataParser:
        return MultiModalDataParser(
            target_sr=self.get_hf_processor().feature_extractor.sampling_rate,
            target_channels=1,
            audio_resample_method="soxr",  # vLLM's default (torchaudio) is not installable beside CPU torch
            expected_hidden_size=self._get_expected_hidden_size(),
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
        )

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"audio": None}

    def max_audio_samples(self, seq_len: int, num_audios: int = 1) -> int:
        """The longest clip (samples) profiled for: shipyard's limit on training clips, or less where that
        many audio tokens would not fit `num_audios` times in `seq_len`."""
        processor = self.get_hf_processor()
        longest = int(MAX_AUDIO_SECONDS * processor.feature_extractor.sampling_rate)
        budget = max(1, seq_len // max(1, num_audios))
        if processor.audio_token_count(longest) <= budget:
            return longest
        low, high = 0, longest  # audio_token_count grows with the clip: the longest clip within budget
        while low < high:
            mid = (low + high + 1) // 2
            if processor.audio_token_count(mid) <= budget:
                low = mid
            else:
                high = mid - 1
        return low

    def get_mm_max_tokens_per_item(self, seq_len: int,
                                   mm_counts: Mapping[str, int] | None = None) -> Mapping[str, int]:
        num_audios = (mm_counts or {}).get("audio", 1)
        if num_audios <= 0:
            return {}
        return {"audio": self.get_hf_processor().audio_token_count(self.max_audio_samples(seq_len, num_audios))}


class SpeechLMDummyInputsBuilder(BaseDummyInputsBuilder[SpeechLMProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().audio_token * mm_counts.get("audio", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        num_audios = mm_counts.get("audio", 0)
        return {"audio": self._get_dummy_audios(length=self.info.max_audio_samples(seq_len, num_audios),
                                                num_audios=num_audios,
                                                overrides=mm_options.get("audio") if mm_options else None)}


class SpeechLMMultiModalProcessor(BaseMultiModalProcessor[SpeechLMProcessingInfo]):
    """The processor's feature extractor computes each clip's log-mel frames; vLLM expands `<|audio|>` in the
    (already tokenized) prompt itself, to `audio_num_tokens` copies: the processor's `audio_token_count`."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        processor = self.info.get_hf_processor(**hf_kwargs)
        clips = list(hf_data.get("audio") or [])
        extractor = processor.feature_extractor  # the processor wants a text with the clips' placeholders
        out = self.info.ctx.call_hf_processor(extractor, {"audio": clips},
                                              {**hf_kwargs, "sampling_rate": extractor.sampling_rate})
        lengths = torch.as_tensor(out["feature_lengths"], dtype=torch.long)
        features = out["input_features"]  # [clips, T_max, mel], zero-padded: keep each clip's own frames
        return BatchFeature({
            "input_features": torch.cat([features[i, :n] for i, n in enumerate(lengths.tolist())]),
            "feature_lengths": lengths,
            "audio_num_tokens": torch.tensor([processor.audio_token_count(len(c)) for c in clips],
                                             dtype=torch.long),
        })

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        lengths = hf_inputs.get("feature_lengths", torch.empty(0, dtype=torch.long))
        return dict(
            input_features=MultiModalFieldConfig.flat_from_sizes("audio", lengths),
            feature_lengths=MultiModalFieldConfig.batched("audio", keep_on_cpu=True),
            audio_num_tokens=MultiModalFieldConfig.batched("audio", keep_on_cpu=True),
        )

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        audio_token_id = self.info.get_hf_processor(**hf_processor_mm_kwargs).audio_token_id
        counts = out_mm_kwargs.get_data().get("audio_num_tokens")

        def replacement(item_idx: int) -> list[int]:
            return [audio_token_id] * int(counts[item_idx])

        return [PromptReplacement(modality="audio", target=[audio_token_id], replacement=replacement)]


# ---------------------------------------------------------------- the model


class SpeechLMAudioTower(nn.Module):
    """The transformers model's audio encoder and projector, run by its own `encode_audio`."""

    encode_audio = ShipyardSpeechLMForConditionalGeneration.encode_audio
    encoder_output_lengths = ShipyardSpeechLMForConditionalGeneration.encoder_output_lengths

    def __init__(self, config: SpeechLMConfig, dtype: torch.dtype):
        super().__init__()
        self.config = config
        # As `from_pretrained(dtype=...)` builds it: parameters in `dtype`, explicitly typed buffers (the
        # relative positions' float32 frequencies) kept.
        self.audio_encoder = AutoModel.from_config(config.audio_config, dtype=dtype)
        self.projector = SpeechLMProjector(config).to(dtype)


@MULTIMODAL_REGISTRY.register_processor(SpeechLMMultiModalProcessor, info=SpeechLMProcessingInfo,
                                        dummy_inputs=SpeechLMDummyInputsBuilder)
class ShipyardSpeechLMForVLLM(nn.Module, SupportsMultiModal, SupportsPP):
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={
        "audio_encoder.": "audio_tower.audio_encoder.",
        "projector.": "audio_tower.projector.",
        "ctc_head.": None,  # the CTC side loss's head: training only
        "mtp.": None,  # multi-token-prediction heads: served, if at all, as a speculative drafter
        "language_model.mtp.": None,
    })

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("audio"):
            return AUDIO_TOKEN
        raise ValueError(f"{cls.__name__} takes audio only, not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: SpeechLMConfig = vllm_config.model_config.hf_config
        self.config = config
        with self._mark_tower_model(vllm_config, "audio"):
            self.audio_tower = SpeechLMAudioTower(config, vllm_config.model_config.dtype)
        with self._mark_language_model(vllm_config), _ties_like_transformers(config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"))
        self.configure_mm_token_handling(config.text_config.vocab_size, [config.audio_token_id])
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        features, lengths = kwargs.get("input_features"), kwargs.get("feature_lengths")
        if features is None:
            return []
        if isinstance(features, (list, tuple)):
            features = torch.cat(list(features))
        if isinstance(lengths, (list, tuple)):
            lengths = torch.stack([torch.as_tensor(n) for n in lengths])
        with gpu_sync_allowed():
            sizes = lengths.reshape(-1).tolist()
            clips = features.split(sizes)
            padded = features.new_zeros(len(clips), max(sizes), features.shape[-1])
            for i, clip in enumerate(clips):
                padded[i, : clip.shape[0]] = clip
            lengths = torch.tensor(sizes, device=features.device)
            projected, _, encoded_lengths = self.audio_tower.encode_audio(padded, lengths)
            counts = (-(-encoded_lengths // self.config.projector_stack)).tolist()
            expected = kwargs.get("audio_num_tokens")
            if expected is not None and [int(n) for n in torch.as_tensor(expected).reshape(-1)] != counts:
                raise RuntimeError(f"the audio encoder made {counts} frames for clips the processor gave "
                                   f"{torch.as_tensor(expected).reshape(-1).tolist()} <|audio|> tokens: "
                                   "features.audio_token_count disagrees with the encoder")
            return list(projected.split(counts))

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


class ShipyardSpeechLMHybridForVLLM(ShipyardSpeechLMForVLLM, HasInnerState, IsHybrid):
    """Over a hybrid (Mamba + attention) backbone: vLLM sizes the Mamba state caches from the backbone's
    config, through the backbone's own class."""

    @staticmethod
    def _backbone(vllm_config: VllmConfig):
        from vllm.model_executor.models.nemotron_h import NemotronHForCausalLM

        text_config = vllm_config.model_config.hf_config.text_config
        if text_config.model_type != "nemotron_h":
            raise ValueError(f"{HYBRID_ARCHITECTURE} is served over a nemotron_h backbone, not "
                             f"{text_config.model_type!r}")
        return NemotronHForCausalLM, vllm_config.with_hf_config(text_config)

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        backbone, text_vllm_config = cls._backbone(vllm_config)
        return backbone.get_mamba_state_shape_from_config(text_vllm_config)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        backbone, text_vllm_config = cls._backbone(vllm_config)
        return backbone.get_mamba_state_dtype_from_config(text_vllm_config)

    @classmethod
    def get_mamba_state_copy_func(cls):
        from vllm.model_executor.models.nemotron_h import NemotronHForCausalLM

        return NemotronHForCausalLM.get_mamba_state_copy_func()


class _ties_like_transformers:
    """vLLM gives a multimodal model's language model the *outer* config's `tie_word_embeddings`
    (vllm/config/vllm.py, `with_hf_config`); transformers ties the speech-LM's LM head by the *text* config's
    (the outer flag is unused there). The outer flag reads as the text config's while the backbone is built."""

    def __init__(self, config):
        self.config = config

    def __enter__(self):
        self.saved = self.config.tie_word_embeddings
        self.config.tie_word_embeddings = bool(self.config.text_config.tie_word_embeddings)

    def __exit__(self, *exc):
        self.config.tie_word_embeddings = self.saved
        return False

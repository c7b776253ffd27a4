"""The speech-LM: audio encoder → projector → the language model's `<|audio|>` positions.

A plain transformers model: the encoder is transformers' FastConformer (`ParakeetEncoder`), the language
model is any `AutoModelForCausalLM` kept whole as `language_model` (its weights keep their own names under
that prefix, its embeddings stay tied if they were). The projector stacks `projector_stack` consecutive
encoder frames and maps them through a 2-layer MLP into the LM's embedding space; the clip's projected
frames replace its `<|audio|>` tokens in order, and there are exactly as many of those as frames
(`features.audio_token_count`, enforced here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

from shipyard.models.speechlm.configuration import SpeechLMConfig
from shipyard.models.speechlm.features import subsampled_length


@dataclass
class SpeechLMOutput(CausalLMOutputWithPast):
    ctc_loss: torch.FloatTensor | None = None  # summed over clips (see SpeechLMConfig.ctc_loss_weight)


class SpeechLMProjector(nn.Module):
    def __init__(self, config: SpeechLMConfig):
        super().__init__()
        self.stack = config.projector_stack
        self.linear_1 = nn.Linear(config.audio_config.hidden_size * self.stack, config.text_config.hidden_size)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """[clips, T, H_audio] (frames past each clip's end zeroed) → [clips, ceil(T / stack), H_text]."""
        clips, length, hidden = frames.shape
        frames = F.pad(frames, (0, 0, 0, (-length) % self.stack))
        stacked = frames.reshape(clips, -1, hidden * self.stack)
        return self.linear_2(self.act(self.linear_1(stacked)))


class SpeechLMPreTrainedModel(PreTrainedModel):
    config_class = SpeechLMConfig
    config: SpeechLMConfig
    base_model_prefix = "speechlm"
    main_input_name = "input_ids"
    input_modalities = ("audio", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["ParakeetEncoderBlock"]


class ShipyardSpeechLMForConditionalGeneration(SpeechLMPreTrainedModel, GenerationMixin):
    def __new__(cls, config, *args, **kwargs):
        # The Auto classes map the config to this class; a hybrid backbone gets the class named for it, the
        # name vLLM serves it under (configuration.HYBRID_ARCHITECTURE), so save_pretrained writes that name.
        if cls is ShipyardSpeechLMForConditionalGeneration and getattr(config, "is_hybrid", False):
            cls = ShipyardSpeechLMHybridForConditionalGeneration
        return super().__new__(cls)

    def __init__(self, config: SpeechLMConfig):
        super().__init__(config)
        self.audio_encoder = AutoModel.from_config(config.audio_config)
        self.projector = SpeechLMProjector(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        if config.ctc_loss_weight > 0:  # the last class is CTC's blank
            self.ctc_head = nn.Linear(config.audio_config.hidden_size, config.text_config.vocab_size + 1)
        self.post_init()

    # The language model's parts, where transformers and shipyard look for them.
    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    def get_decoder(self):
        return self.language_model.get_decoder()

    def set_decoder(self, decoder):
        self.language_model.set_decoder(decoder)

    def train(self, mode: bool = True):
        """The encoder's BatchNorm layers always normalise with their running statistics (frozen, never updated):
        a clip is then computed the same whatever else is in its batch, however much padding the batch has,
        on any number of ranks, and at serving time. Models built from a config start them at (0, 1): an
        affine layer that trains like any other."""
        super().train(mode)
        for module in self.audio_encoder.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def reset_audio_convolutions(self) -> None:
        """PyTorch's default (fan-in) init for the encoder's convolutions: transformers' N(0, 0.02) leaves a
        FastConformer trained from scratch silent for a long time. Only for models built from a config."""
        for module in self.audio_encoder.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d)):
                module.reset_parameters()

    def encoder_output_lengths(self, feature_lengths: torch.Tensor) -> torch.Tensor:
        cfg = self.config.audio_config
        return torch.tensor([subsampled_length(int(n), cfg.subsampling_factor, cfg.subsampling_conv_kernel_size,
                                               cfg.subsampling_conv_stride) for n in feature_lengths.tolist()],
                            device=feature_lengths.device)

    def encode_audio(self, input_features: torch.Tensor, feature_lengths: torch.Tensor):
        """(projected frames of all clips, concatenated in order [tokens, H_text]; encoder frames [clips, T', H];
        encoder output lengths [clips])."""
        frames_in = torch.arange(input_features.shape[1], device=input_features.device)[None] < feature_lengths[:, None]
        encoded = self.audio_encoder(input_features.to(self.projector.linear_1.weight.dtype),
                                     attention_mask=frames_in.long()).last_hidden_state
        lengths = self.encoder_output_lengths(feature_lengths)
        valid = torch.arange(encoded.shape[1], device=encoded.device)[None] < lengths[:, None]
        encoded = encoded * valid[..., None].to(encoded.dtype)  # frames past a clip's end never reach its tokens
        projected = self.projector(encoded)
        counts = -(-lengths // self.config.projector_stack)
        keep = torch.arange(projected.shape[1], device=projected.device)[None] < counts[:, None]
        return projected[keep], encoded, lengths

    def _idle_audio(self, like: torch.Tensor) -> torch.Tensor:
        """0 x the encoder and projector run on one short silent clip: a text-only training batch touches every
        parameter, like an audio batch (FSDP2 reduces the same gradients on every rank; Adam sees every step)."""
        mel = self.config.audio_config.num_mel_bins
        frames = torch.zeros(1, 32, mel, device=like.device, dtype=self.projector.linear_1.weight.dtype)
        audio, encoded, _ = self.encode_audio(frames, torch.tensor([32], device=like.device))
        idle = audio.sum() + encoded.sum()
        if getattr(self, "ctc_head", None) is not None:
            idle = idle + self.ctc_head(encoded).sum()
        return (idle * 0.0).to(like.dtype)

    def _ctc_loss(self, encoded: torch.Tensor, lengths: torch.Tensor, ctc_targets: torch.Tensor) -> torch.Tensor:
        target_lengths = (ctc_targets >= 0).sum(-1)
        use = target_lengths > 0
        if not use.any():
            return encoded.sum() * 0.0
        log_probs = self.ctc_head(encoded[use]).float().log_softmax(-1).transpose(0, 1)  # [T', clips, C]
        targets = ctc_targets[use]
        return F.ctc_loss(log_probs, targets[targets >= 0], lengths[use], target_lengths[use],
                          blank=self.ctc_head.out_features - 1, reduction="sum", zero_infinity=True)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        feature_lengths: torch.LongTensor | None = None,
        ctc_targets: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> SpeechLMOutput:
        ctc_loss = None
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            slots = input_ids == self.config.audio_token_id
            if input_features is not None and bool(slots.any()):  # the prompt (generation steps after it have none)
                audio, encoded, lengths = self.encode_audio(input_features, feature_lengths)
                if audio.shape[0] != int(slots.sum()):
                    raise ValueError(f"{int(slots.sum())} {self.config.audio_token} tokens but {audio.shape[0]} audio "
                                     "frames: expand each placeholder with the processor (features.audio_token_count)")
                inputs_embeds = inputs_embeds.masked_scatter(slots[..., None], audio.to(inputs_embeds.dtype))
                if ctc_targets is not None and self.config.ctc_loss_weight > 0:
                    ctc_loss = self._ctc_loss(encoded, lengths, ctc_targets)
            elif self.training and input_features is None:
                inputs_embeds = inputs_embeds + self._idle_audio(inputs_embeds)
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                                  past_key_values=past_key_values, labels=labels, use_cache=use_cache,
                                  logits_to_keep=logits_to_keep, **kwargs)
        return SpeechLMOutput(loss=out.loss, logits=out.logits, past_key_values=out.past_key_values,
                              hidden_states=out.hidden_states, attentions=out.attentions, ctc_loss=ctc_loss)


class ShipyardSpeechLMHybridForConditionalGeneration(ShipyardSpeechLMForConditionalGeneration):
    """The same model over a hybrid (Mamba + attention) backbone: its own name, which vLLM serves with the
    hybrid cache manager (see configuration.HYBRID_ARCHITECTURE)."""


"""Tiny speech-LM presets built from configs: a model config and its processor, no downloads.

A FastConformer encoder (transformers' `parakeet_encoder`: 8x conv subsampling, 2 conformer blocks, hidden 128)
over 80 log-mel bins, a 2-frame stacking projector, and a tiny language model with the shipped 512-token
tokenizer plus `<|audio|>` (id 512; 576 embedding rows, a multiple of 64). One audio token covers
160 ms of speech. Dropout is off: a run on several ranks computes exactly what one rank computes.
"""

from __future__ import annotations

from transformers import AutoTokenizer, PretrainedConfig

from shipyard.models.presets import preset_config
from shipyard.models.speechlm.configuration import AUDIO_TOKEN, SpeechLMConfig
from shipyard.models.vision_presets import SHIPPED_TOKENIZER

SPEECH_VOCAB = 576
_ENCODER = dict(model_type="parakeet_encoder", hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=256, conv_kernel_size=9, subsampling_factor=8, subsampling_conv_channels=64,
                num_mel_bins=80, dropout=0.0, dropout_positions=0.0, layerdrop=0.0, activation_dropout=0.0,
                attention_dropout=0.0, max_position_embeddings=2048)


def speech_tokenizer(base=SHIPPED_TOKENIZER):
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", AUDIO_TOKEN]})
    return tok


def _speech(backbone: str, ctc_loss_weight: float = 1.0) -> tuple[PretrainedConfig, object]:
    from shipyard.models.speechlm.processing import ShipyardSpeechFeatureExtractor, ShipyardSpeechLMProcessor

    tok = speech_tokenizer()
    text = preset_config(backbone)
    text.vocab_size = SPEECH_VOCAB
    config = SpeechLMConfig(audio_config=dict(_ENCODER), text_config=text.to_dict(),
                            audio_token_id=tok.convert_tokens_to_ids(AUDIO_TOKEN), projector_stack=2,
                            ctc_loss_weight=ctc_loss_weight)
    config.architectures = [config.architecture]
    processor = ShipyardSpeechLMProcessor(
        feature_extractor=ShipyardSpeechFeatureExtractor(feature_size=_ENCODER["num_mel_bins"]), tokenizer=tok,
        chat_template=tok.chat_template, subsampling_factor=_ENCODER["subsampling_factor"],
        projector_stack=config.projector_stack)
    return config, processor


SPEECH_PRESETS = {
    # The speech quickstart model (~1M parameters): encoder trained from scratch with a CTC side loss, Qwen3 LM.
    "speech-qwen3-tiny": lambda: _speech("qwen3-tiny"),
    # The hybrid backbone (Mamba + attention + MLP blocks): exported under the hybrid architecture name.
    "speech-nemotron-h-tiny": lambda: _speech("nemotron-h-tiny"),
}


def qwen2_audio() -> tuple[PretrainedConfig, object]:
    """A tiny Qwen2-Audio (~0.75M parameters): a 2-layer Whisper-style audio tower (d_model 64) over 128 mel bins,
    its linear projector and a 2-layer Qwen2 LM (head_dim 64: vLLM's CPU attention rejects smaller). The feature
    extractor keeps Whisper's 30 s window (3000 frames), which vLLM's Qwen2-Audio insists on; the chat template
    is the family's own (its processor's), so vLLM renders the same prompt."""
    from transformers import Qwen2AudioConfig, Qwen2AudioProcessor, WhisperFeatureExtractor

    tok = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *QWEN2_AUDIO_TOKENS]})
    processor = Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128, sampling_rate=16000),
                                    tokenizer=tok)
    tok.chat_template = processor.chat_template  # the family's template (system prompt, "Audio 1: ..." lines)
    config = Qwen2AudioConfig(
        audio_config=dict(d_model=64, encoder_layers=2, encoder_attention_heads=1, encoder_ffn_dim=128,
                          num_mel_bins=128, max_source_positions=1500, dropout=0.0, attention_dropout=0.0,
                          activation_dropout=0.0, encoder_layerdrop=0.0),
        text_config=dict(model_type="qwen2", vocab_size=SPEECH_VOCAB, hidden_size=128, intermediate_size=384,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=2048, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        audio_token_id=processor.audio_token_id,
    )
    config.architectures = ["Qwen2AudioForConditionalGeneration"]
    return config, processor


QWEN2_AUDIO_TOKENS = ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
# Qwen2-Audio's own layout (transformers' AutoModelForMultimodalLM class), random init: what a user's checkpoint is.
SPEECH_PRESETS["qwen2-audio-tiny"] = qwen2_audio

"""Tiny vision-language presets built from configs: a model config and its processor, no downloads.

Each keeps what makes its family different for training and serving: how an
image becomes placeholder tokens (Qwen3-VL: one per 32x32 pixels after a
resize within min/max pixels; Idefics3/SmolVLM: a fixed 16 per image), how
image features enter the language model (Qwen3-VL: M-RoPE positions and
deepstack features added after decoder layer 0), and the chat template the
processor renders with. Tokens: the shipped 512-token tokenizer plus the
family's image tokens (ids 512 and up); the text vocabulary is 576 rows, a
multiple of 64 that holds them. Every head_dim is 64 (vLLM's CPU attention
rejects smaller).
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PretrainedConfig

SHIPPED_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"
VISION_VOCAB = 576

# Qwen3-VL's chat format (ChatML) with its image placeholder; content is a string or a list of parts.
_QWEN3_VL_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# SmolVLM's chat format: "User:" / "Assistant:" turns ended by <end_of_utterance>; an image is <image>.
_IDEFICS3_TEMPLATE = (
    "{%- for message in messages %}{{- message['role'] | capitalize }}"
    "{%- if message['content'] is string %}{{- ': ' + message['content'] }}"
    "{%- else %}{{- ':' }}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' %}{{- '<image>' }}"
    "{%- elif part['type'] == 'text' %}{{- ' ' + part['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<end_of_utterance>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'Assistant:' }}{%- endif %}"
)


def _tokenizer(tokens: list[str], template: str, eos: str | None = None):
    tok = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *tokens]})
    if eos is not None:
        tok.eos_token = eos
    tok.chat_template = template
    return tok


def _text(**overrides) -> dict:
    return dict(vocab_size=VISION_VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
                initializer_range=0.02, tie_word_embeddings=False, pad_token_id=0, **overrides)


def qwen3_vl() -> tuple[PretrainedConfig, object]:
    from transformers import Qwen3VLConfig, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    vision_tokens = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _tokenizer(vision_tokens, _QWEN3_VL_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in vision_tokens}
    config = Qwen3VLConfig(
        # mrope_section sums to head_dim / 2; interleaved like the published Qwen3-VL models.
        text_config=_text(rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [12, 10, 10],
                                           "mrope_interleaved": True}, eos_token_id=tok.eos_token_id),
        vision_config=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=128,
                           num_position_embeddings=256, deepstack_visual_indexes=[0], initializer_range=0.02),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    # One placeholder token per 32x32 pixels (patch 16, merged 2x2); 64x64 .. 256x256 pixels: 4 .. 64 tokens.
    pixels = {"shortest_edge": 64 * 64, "longest_edge": 256 * 256}
    patching = dict(patch_size=16, temporal_patch_size=2, merge_size=2)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**patching, size=pixels, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        video_processor=Qwen3VLVideoProcessor(**patching),
        tokenizer=tok, chat_template=_QWEN3_VL_TEMPLATE,
    )
    return config, processor


def idefics3() -> tuple[PretrainedConfig, object]:
    from transformers import Idefics3Config, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = _tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"],
                     _IDEFICS3_TEMPLATE, eos="<end_of_utterance>")
    config = Idefics3Config(
        text_config=_text(model_type="llama", eos_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=8, initializer_range=0.02),
        scale_factor=2,  # (64/8)^2 patches / 2^2 = 16 tokens per image
        image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
    )
    config.architectures = ["Idefics3ForConditionalGeneration"]
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 64},
                                                max_image_size={"longest_edge": 64})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=16,
                                  chat_template=_IDEFICS3_TEMPLATE)
    return config, processor


VISION_PRESETS = {
    # The VLM quickstart model: 2 vision blocks (patch 16) and 2 decoder layers, hidden 128 (~1M parameters).
    "qwen3-vl-tiny": qwen3_vl,
    # A second family (SmolVLM's architecture): SigLIP-style vision tower, pixel-shuffle connector, Llama decoder.
    "idefics3-tiny": idefics3,
}

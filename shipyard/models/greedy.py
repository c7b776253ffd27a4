"""Greedy decoding in transformers, token for token comparable with vLLM's `ignore_eos` greedy.

A plain loop rather than `generate`: `generate` stops at EOS, and its
`min_new_tokens` works by masking EOS, which changes the argmax. Here every
step takes the argmax of the full distribution and keeps going, exactly as
vLLM does with `ignore_eos=True`, so the two token streams are comparable for
as many tokens as asked. Vision-language models go through `generate` (their
M-RoPE positions and image features are set up on the first forward), told
that no token ends the answer.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer

from shipyard.data.audio import audio_parts_as_text
from shipyard.data.images import media_of
from shipyard.models.attention import choose_attention
from shipyard.models.load import auto_model_class


def load_for_verify(directory: Path, adapter: Path | None = None, trust_remote_code: bool = False):
    """The model in fp32 (exact upcast of bf16 weights, so both engines compute at the same precision)."""
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    auto = auto_model_class(config)
    model = auto.from_pretrained(directory, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                 attn_implementation=choose_attention(config, "auto"))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    tokenizer = AutoTokenizer.from_pretrained(adapter or directory, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


def render_prompt_ids(tokenizer, dialog: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(audio_parts_as_text(dialog, tokenizer.chat_template), tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_inputs(tokenizer, dialog: list[dict], encoder=None) -> dict[str, torch.Tensor]:
    """Model inputs of a chat prompt: ids (image placeholders expanded by the processor) and pixel inputs."""
    if encoder is None:
        return {"input_ids": torch.tensor([render_prompt_ids(tokenizer, dialog)])}
    text = tokenizer.apply_chat_template(audio_parts_as_text(dialog, tokenizer.chat_template), tokenize=False,
                                         add_generation_prompt=True)
    refs = media_of(dialog)
    ids = torch.tensor([encoder.encode(text, refs)])
    inputs = {"input_ids": ids, **encoder.media_inputs(refs)}
    return {**inputs, **encoder.type_ids(ids)} if refs else inputs


@torch.no_grad()
def greedy(model, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """(token ids, their log-probabilities) for `max_new_tokens` greedy steps, never stopping early."""
    device = next(model.parameters()).device
    if len(inputs) > 1:
        return _greedy_generate(model, {k: v.to(device) for k, v in inputs.items()}, max_new_tokens)
    x = inputs["input_ids"].to(device)
    past = None
    tokens, logprobs = [], []
    for _ in range(max_new_tokens):
        out = model(input_ids=x, past_key_values=past, use_cache=True)
        logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        token = int(torch.argmax(logp))
        tokens.append(token)
        logprobs.append(float(logp[token]))
        past = out.past_key_values
        x = torch.tensor([[token]], device=device)
    return tokens, logprobs


def _greedy_generate(model, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> tuple[list[int], list[float]]:
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # it warns that an EOS of -1 never stops generation: the point
    try:
        out = model.generate(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=[-1], pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    logprobs = [float(torch.log_softmax(step[0].float(), dim=-1)[t]) for step, t in zip(out.logits, tokens)]
    return tokens, logprobs

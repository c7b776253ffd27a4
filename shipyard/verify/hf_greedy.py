"""Greedy decoding in transformers, token for token comparable with vLLM's `ignore_eos` greedy.

A plain loop rather than `generate`: `generate` stops at EOS, and its
`min_new_tokens` works by masking EOS, which changes the argmax. Here every
step takes the argmax of the full distribution and keeps going, exactly as
vLLM does with `ignore_eos=True`, so the two token streams are comparable for
as many tokens as asked.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from shipyard.models.attention import choose_attention


def load_for_verify(directory: Path, adapter: Path | None = None, trust_remote_code: bool = False):
    """The model in fp32 (exact upcast of bf16 weights, so both engines compute at the same precision)."""
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                                 attn_implementation=choose_attention(config, "auto"))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    tokenizer = AutoTokenizer.from_pretrained(adapter or directory, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


def render_prompt_ids(tokenizer, dialog: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(dialog, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def greedy(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """(token ids, their log-probabilities) for `max_new_tokens` greedy steps, never stopping early."""
    device = next(model.parameters()).device
    x = torch.tensor([prompt_ids], device=device)
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

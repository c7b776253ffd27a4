"""Render dialogs with the tokenizer's own chat template and mark what the loss sees.

The loss covers assistant turns only, each including its end-of-turn token so
the trained model learns to stop. Two ways to find them:

- the template has `{% generation %}` markers: transformers reports the
  assistant characters directly (`return_assistant_tokens_mask`);
- otherwise, by rendering prefixes: an assistant turn starts where the
  rendering of the dialog before it (with the generation prompt) ends, and
  ends after its content and the template's end-of-turn token.

Training ids are exactly `apply_chat_template(messages)` tokenized, so the
exported template reproduces them at serving time (`shipyard verify` checks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

from shipyard.data.sources import Record
from shipyard.errors import ShipyardError

IGNORE_INDEX = -100
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_SENTINEL = "SHIPYARD_SENTINEL_7f3a"


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # input id where supervised, IGNORE_INDEX elsewhere; not shifted

    @property
    def num_targets(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def has_generation_markers(tokenizer: PreTrainedTokenizerBase) -> bool:
    template = tokenizer.chat_template
    return isinstance(template, str) and bool(_GENERATION_TAG.search(template))


def render_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str:
    """The special token the template writes right after an assistant message ('' if none)."""
    return _end_of_turn(tokenizer, tokenizer.chat_template)


@lru_cache(maxsize=8)
def _end_of_turn(tokenizer: PreTrainedTokenizerBase, template: str) -> str:
    # `template` is part of the cache key: a tokenizer whose template is replaced gets a fresh answer.
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    text = render_text(tokenizer, probe)
    if _SENTINEL not in text:
        return ""
    after = text[text.index(_SENTINEL) + len(_SENTINEL) :].lstrip(" \t")
    specials = sorted(tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()), key=len, reverse=True)
    return next((tok for tok in specials if tok and after.startswith(tok)), "")


def _assistant_char_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict], text: str, origin: str) -> list[tuple[int, int]]:
    eot = end_of_turn(tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render_text(tokenizer, messages[:i], add_generation_prompt=True)
        if not text.startswith(prefix):
            raise ShipyardError(
                f"{origin}: the chat template renders the dialog before assistant turn {i} differently "
                "on its own than inside the whole dialog, so its tokens cannot be located. "
                "Use a template with {% generation %} markers (set model.tokenizer to one) for this data."
            )
        content = message["content"].strip()
        at = text.find(content, len(prefix))
        if at < 0:
            raise ShipyardError(f"{origin}: the chat template does not reproduce assistant turn {i} verbatim")
        end = at + len(content)
        gap = len(text[end:]) - len(text[end:].lstrip(" \t"))
        if eot and text.startswith(eot, end + gap):
            end += gap + len(eot)
        spans.append((len(prefix), end))
    return spans


def tokenize_dialog(tokenizer: PreTrainedTokenizerBase, record: Record) -> Sample:
    """Token ids of the rendered dialog and labels covering the assistant turns."""
    messages = record.messages
    try:
        if has_generation_markers(tokenizer):
            out = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
            return Sample(ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)])
        text = render_text(tokenizer, messages)
    except ShipyardError:
        raise
    except Exception as e:  # jinja raises its own errors (raise_exception in templates, undefined vars)
        raise ShipyardError(f"{record.origin}: the chat template failed on this record: {e}") from None
    spans = _assistant_char_spans(tokenizer, messages, text, record.origin)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"]):
        inside = any(s <= start < e for s, e in spans)
        labels.append(token if inside else IGNORE_INDEX)
    return Sample(list(enc["input_ids"]), labels)


def prompt_and_reference(record: Record) -> tuple[list[dict], str]:
    """The dialog up to its last assistant turn, and that turn's content (for generation evals)."""
    last = max(i for i, m in enumerate(record.messages) if m["role"] == "assistant")
    return record.messages[:last], record.messages[last]["content"]

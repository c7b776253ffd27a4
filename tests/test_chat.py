"""The loss mask covers exactly the assistant content tokens and each turn's end-of-turn token."""

import copy

import pytest

from shipyard.data.chat import IGNORE_INDEX, end_of_turn, has_generation_markers, tokenize_dialog
from shipyard.data.sources import Record
from shipyard.errors import ShipyardError

DIALOG = [
    {"role": "system", "content": "You reverse words."},
    {"role": "user", "content": "reverse: red fox sun"},
    {"role": "assistant", "content": "sun fox red"},
    {"role": "user", "content": "reverse: one two"},
    {"role": "assistant", "content": "two one"},
    {"role": "user", "content": "and: cat dog owl bee"},
    {"role": "assistant", "content": "bee owl dog cat"},
]
EXPECTED = ["sun fox red<|im_end|>", "two one<|im_end|>", "bee owl dog cat<|im_end|>"]

GENERATION_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Like Qwen3: only assistant turns after the last user message get an (empty) think block, so
# rendering a prefix of the dialog changes how earlier assistant turns look.
THINK_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' and loop.index0 > ns.last_user %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Like Llama 3: a BOS in the text and no newline after the end-of-turn token.
BOS_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n\\n' + m['content'] | trim + '<|im_end|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n\\n' }}{%- endif %}"
)


def supervised_spans(tokenizer, sample) -> list[str]:
    spans, current = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tokenizer.decode(s) for s in spans]


def with_template(tokenizer, template, **special):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    for key, value in special.items():
        setattr(tok, key, value)
    return tok


def test_prefix_rendering_masks_exactly_assistant_turns(tokenizer):
    assert not has_generation_markers(tokenizer)
    sample = tokenize_dialog(tokenizer, Record(DIALOG, "t"))
    assert supervised_spans(tokenizer, sample) == EXPECTED
    # the ids trained on are exactly what the template produces at serving time
    assert sample.input_ids == tokenizer.apply_chat_template(DIALOG, tokenize=True)["input_ids"]


def test_generation_markers_mask_exactly_assistant_turns(tokenizer):
    tok = with_template(tokenizer, GENERATION_TEMPLATE)
    assert has_generation_markers(tok)
    sample = tokenize_dialog(tok, Record(DIALOG, "t"))
    assert supervised_spans(tok, sample) == EXPECTED


def test_both_methods_agree(tokenizer):
    a = tokenize_dialog(tokenizer, Record(DIALOG, "t"))
    b = tokenize_dialog(with_template(tokenizer, GENERATION_TEMPLATE), Record(DIALOG, "t"))
    assert a.input_ids == b.input_ids and a.labels == b.labels


def test_think_block_template(tokenizer):
    tok = with_template(tokenizer, THINK_TEMPLATE)
    sample = tokenize_dialog(tok, Record(DIALOG, "t"))
    # The last turn's injected think block is what the model must produce at serving time, so it is supervised.
    assert supervised_spans(tok, sample) == EXPECTED[:2] + ["<think>\n\n</think>\n\nbee owl dog cat<|im_end|>"]


def test_bos_template_without_newlines(tokenizer):
    tok = with_template(tokenizer, BOS_TEMPLATE, bos_token="<|endoftext|>")
    assert end_of_turn(tok) == "<|im_end|>"
    sample = tokenize_dialog(tok, Record(DIALOG, "t"))
    assert sample.input_ids[0] == tok.convert_tokens_to_ids("<|endoftext|>")
    assert supervised_spans(tok, sample) == EXPECTED


def test_template_that_drops_content_is_a_clear_error(tokenizer):
    tok = with_template(tokenizer, "{%- for m in messages %}{{ m['role'] }}<|im_end|>{%- endfor %}")
    with pytest.raises(ShipyardError, match=r"data.jsonl:7: .*assistant turn 1"):
        tokenize_dialog(tok, Record(DIALOG[1:3], "data.jsonl:7"))


def test_template_exception_names_the_record(tokenizer):
    tok = with_template(tokenizer, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ShipyardError, match=r"data.jsonl:3: the chat template failed.*roles must alternate"):
        tokenize_dialog(tok, Record(DIALOG, "data.jsonl:3"))

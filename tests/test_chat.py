"""Masks cover exactly what serving generates for each assistant turn, end-of-turn token included."""

import copy

import pytest

from shipyard.data.chat import (
    IGNORE_INDEX, apply_template_defaults, end_of_turn, has_generation_markers, render_text, template_defaults,
    tokenize_dialog, tokenize_record,
)
from shipyard.data.messages import Record, RecordError, normalise_record

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

# Like Qwen3: only assistant turns after the last user message get a think block, so a past turn
# renders differently in history than when the model generated it.
THINK_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' and loop.index0 > ns.last_user %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + (m.reasoning_content or '') + '\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
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


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def assert_served_form(tok, record, samples):
    """Every supervised turn: ids = tokenize(serving prompt) + its labels, ending with the end-of-turn token."""
    eot = tok.convert_tokens_to_ids(end_of_turn(tok))
    for sample in samples:
        for i in sample.turns:
            prompt = encode(tok, render_text(tok, record.messages[:i], add_generation_prompt=True, tools=record.tools,
                                             kwargs=record.template_kwargs))
            n = len(prompt)
            assert sample.input_ids[:n] == prompt
            end = next(k for k in range(n, len(sample.labels) + 1) if k == len(sample.labels) or sample.labels[k] == IGNORE_INDEX)
            assert end > n and sample.labels[n:end] == sample.input_ids[n:end] and sample.input_ids[end - 1] == eot


def test_prefix_rendering_masks_exactly_assistant_turns(tokenizer):
    assert not has_generation_markers(tokenizer)
    record = Record(DIALOG, "t")
    sample = tokenize_dialog(tokenizer, record)
    assert supervised_spans(tokenizer, sample) == EXPECTED
    assert sample.turns == (2, 4, 6)
    assert_served_form(tokenizer, record, [sample])
    # the ids trained on are the template's own rendering, up to the last end-of-turn token
    full = tokenizer.apply_chat_template(DIALOG, tokenize=True)["input_ids"]
    assert sample.input_ids == full[: len(sample.input_ids)] and len(full) == len(sample.input_ids) + 1  # "\n"


def test_generation_markers_give_the_same_samples(tokenizer):
    tok = with_template(tokenizer, GENERATION_TEMPLATE)
    assert has_generation_markers(tok)
    a = tokenize_dialog(tokenizer, Record(DIALOG, "t"))
    b = tokenize_dialog(tok, Record(DIALOG, "t"))
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)


def test_markers_that_stop_before_the_end_of_turn_are_extended_through_it(tokenizer):
    tok = with_template(tokenizer, GENERATION_TEMPLATE.replace(
        "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}",
        "{% generation %}{{- message['content'] }}{% endgeneration %}{{- '<|im_end|>' }}"))
    assert supervised_spans(tok, tokenize_dialog(tok, Record(DIALOG, "t"))) == EXPECTED


def test_history_rendered_differently_is_trained_as_served(tokenizer):
    """Qwen3-style: each turn becomes its own sample in the form generation produces; whole_dialog counts the rest."""
    tok = with_template(tokenizer, THINK_TEMPLATE)
    record = Record(DIALOG, "t")
    out = tokenize_record(tok, record, "as_served")
    assert [s.turns for s in out.samples] == [(2,), (4,), (6,)]
    assert [supervised_spans(tok, s) for s in out.samples] == [[f"<think>\n\n</think>\n\n{e}"] for e in EXPECTED]
    assert dict(out.turns) == {"supervised": 3}
    assert_served_form(tok, record, out.samples)

    whole = tokenize_record(tok, record, "whole_dialog")
    assert len(whole.samples) == 1 and whole.samples[0].turns == (6,)
    assert dict(whole.turns) == {"supervised": 1, "differs_in_history": 2}


def test_short_answers_inside_template_text_and_reasoning_containing_the_answer(tokenizer):
    tok = with_template(tokenizer, THINK_TEMPLATE)
    for answer in ["hi", "in", "k", "think", "assistant", "im"]:
        record = normalise_record({"messages": [{"role": "user", "content": "say it"},
                                                {"role": "assistant", "content": answer}]}, "t")
        assert supervised_spans(tok, tokenize_dialog(tok, record)) == [f"<think>\n\n</think>\n\n{answer}<|im_end|>"]
    record = normalise_record({"messages": [
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "3 plus 3 is 6, done"}]}, "t")
    assert supervised_spans(tok, tokenize_dialog(tok, record)) == ["<think>\n3 plus 3 is 6, done\n</think>\n\n6<|im_end|>"]


def test_trailing_newline_answer_still_learns_to_stop(tokenizer):
    record = normalise_record({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello there\n"}]}, "t")
    assert supervised_spans(tokenizer, tokenize_dialog(tokenizer, record)) == ["hello there\n<|im_end|>"]
    tok = with_template(tokenizer, BOS_TEMPLATE, bos_token="<|endoftext|>")  # a template that trims
    assert supervised_spans(tok, tokenize_dialog(tok, record)) == ["hello there<|im_end|>"]


def test_bos_template_without_newlines(tokenizer):
    tok = with_template(tokenizer, BOS_TEMPLATE, bos_token="<|endoftext|>")
    assert end_of_turn(tok) == "<|im_end|>"
    record = Record(DIALOG, "t")
    sample = tokenize_dialog(tok, record)
    assert sample.input_ids[0] == tok.convert_tokens_to_ids("<|endoftext|>")
    assert supervised_spans(tok, sample) == EXPECTED
    assert_served_form(tok, record, [sample])


def test_empty_answers_are_counted_not_trained(tokenizer):
    record = normalise_record({"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "  \n"},
        {"role": "user", "content": "b"}, {"role": "assistant", "content": "yes"}]}, "t")
    out = tokenize_record(tokenizer, record)
    assert dict(out.turns) == {"empty_answer": 1, "supervised": 1}
    assert [supervised_spans(tokenizer, s) for s in out.samples] == [["yes<|im_end|>"]]


def test_template_exception_is_a_record_error(tokenizer):
    tok = with_template(tokenizer, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(RecordError, match="the chat template failed on this record: roles must alternate") as e:
        tokenize_record(tok, Record(DIALOG, "data.jsonl:3"))
    assert e.value.reason == "template_error"


def test_reasoning_or_tool_calls_a_template_ignores_are_refused(tokenizer):
    reasoning = normalise_record({"messages": [{"role": "user", "content": "q"},
                                               {"role": "assistant", "content": "a", "reasoning": "because"}]}, "t")
    with pytest.raises(RecordError, match="never renders it") as e:
        tokenize_record(tokenizer, reasoning)
    assert e.value.reason == "reasoning_not_rendered"
    calls = normalise_record({"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    ]}, "t")
    with pytest.raises(RecordError, match="never renders tool_calls") as e:
        tokenize_record(tokenizer, calls)
    assert e.value.reason == "tool_calls_not_rendered"


def test_records_keep_every_field_the_template_reads():
    record = normalise_record({
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "weather"}, {"type": "text", "text": "in Paris?"}]},
            {"role": "assistant", "content": None, "thinking": "use the tool",
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "name": "w", "content": "sunny", "custom": 7},
            {"role": "assistant", "content": "Sunny."},
        ],
        "tools": [{"type": "function", "function": {"name": "w", "parameters": {}}}],
        "chat_template_kwargs": {"enable_thinking": True},
    }, "f:1")
    user, call, tool, _ = record.messages
    assert user["content"] == "weather\nin Paris?"
    assert call["content"] == "" and call["reasoning_content"] == call["reasoning"] == "use the tool"
    assert call["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert tool == {"role": "tool", "tool_call_id": "c1", "name": "w", "content": "sunny", "custom": 7}
    assert record.tools[0]["function"]["name"] == "w" and record.template_kwargs == {"enable_thinking": True}


@pytest.mark.parametrize("message, match", [
    ({"role": "user", "content": None}, r"messages\[0\].content is null"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
     r"messages\[0\].tool_calls\[0\].function.arguments is a string but not valid JSON"),
    ({"role": "assistant", "content": [{"type": "image", "image": "x.png"}]}, r"content\[0\] is an image in an assistant turn"),
    ({"role": "user", "content": "q", "reasoning_content": "r"}, r"reasoning_content is set on a user turn"),
])
def test_bad_messages_name_the_field(message, match):
    with pytest.raises(RecordError, match=match):
        normalise_record({"messages": [message, {"role": "assistant", "content": "a"}]}, "t")


def test_template_defaults_make_training_the_default_request(tokenizer):
    tok = with_template(tokenizer, THINK_TEMPLATE)
    prompt = [{"role": "user", "content": "hi"}]
    apply_template_defaults(tok, {"enable_thinking": False})
    assert render_text(tok, prompt, add_generation_prompt=True).endswith("<think>\n\n</think>\n\n")
    assert render_text(tok, prompt, add_generation_prompt=True, kwargs={"enable_thinking": True}).endswith("assistant\n")
    # applying again replaces, never stacks; an empty mapping restores the original
    assert template_defaults(tok.chat_template, {"enable_thinking": True}).count("shipyard: chat_template_kwargs") == 1
    assert template_defaults(tok.chat_template, {}) == THINK_TEMPLATE

"""Masks on published chat templates equal an independent ground truth, and each turn trains as it is served.

For every family in tests/fixtures/chat_templates (the published template, verbatim, with its source in
SOURCES.md) there is a hand-written `{% generation %}` variant that renders byte-identical text
(check_fixtures.py proves it) and marks what the model generates for each assistant turn. The ground truth
for turn i is that marked text in the dialog rendered up to turn i, minus what the serving prompt
`render(history, add_generation_prompt=True)` already holds. shipyard, on the published template (no
markers), must supervise exactly that, in a sample whose ids start with the serving prompt's ids.
"""

import json
from datetime import datetime

import pytest

from shipyard.data.chat import IGNORE_INDEX, eos_token_ids, render, tokenize_record
from shipyard.data.messages import RecordError, normalise_record, without_reasoning
from tests.fixtures import CHAT_TEMPLATES, family_tokenizer, template_manifest

MANIFEST = template_manifest()
DIALOGS = json.loads((CHAT_TEMPLATES / "dialogs.json").read_text())
# End tokens a family's generation_config.json lists besides its template's end-of-turn token (Llama 3.1+: the
# built-in tool call ends with <|eom_id|>); serving stops on them, so a turn may end with one.
BASE_EOS = {"llama3": ["<|eom_id|>"], "llama3.2": ["<|eom_id|>"]}
FIXED_NOW = datetime(2025, 1, 15, 12, 0, 0)  # for the templates that print today's date


def pinned_clock(fmt: str) -> str:
    return FIXED_NOW.strftime(fmt)


def record_of(dialog: dict):
    record = normalise_record(dialog, dialog["name"])
    record.template_kwargs = {**record.template_kwargs, "strftime_now": pinned_clock}
    return record


def stop_ids(tok, family):
    return eos_token_ids(tok, tok.convert_tokens_to_ids(BASE_EOS.get(family, [])))


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def ground_truth(truth_tok, record, i: int, stops: list[str]) -> str:
    """What turn i must supervise by the marked template, or the reason it cannot be trained."""
    message = record.messages[i]
    if not message["content"].strip() and not message.get("reasoning_content") and not message.get("tool_calls"):
        return "empty_answer"
    kw = dict(tools=record.tools, kwargs=record.template_kwargs)
    prompt, _ = render(truth_tok, record.messages[:i], add_generation_prompt=True, **kw)
    text, spans = render(truth_tok, record.messages[: i + 1], with_spans=True, **kw)
    if not text.startswith(prompt):
        return "not_servable"
    start, end = spans[-1]
    turn = text[max(start, len(prompt)) : end]
    return turn if any(turn.endswith(s) for s in stops) else "no_end_of_turn"


def served_turn(tok, record, sample, i: int) -> list[int]:
    """Turn i's supervised ids in `sample`, after asserting the sample starts with its serving prompt."""
    prompt, _ = render(tok, record.messages[:i], add_generation_prompt=True, tools=record.tools,
                       kwargs=record.template_kwargs)
    n = len(encode(tok, prompt))
    assert sample.input_ids[:n] == encode(tok, prompt), "the history is not the serving prompt, token for token"
    assert sample.labels[n] != IGNORE_INDEX
    end = next((k for k in range(n, len(sample.labels)) if sample.labels[k] == IGNORE_INDEX), len(sample.labels))
    assert sample.labels[n:end] == sample.input_ids[n:end]
    return sample.labels[n:end]


@pytest.mark.parametrize("family", sorted(MANIFEST))
def test_masks_equal_the_marked_template(family):
    tok, truth_tok = family_tokenizer(family), family_tokenizer(family, "generation.jinja")
    ids = stop_ids(tok, family)
    stops = tok.convert_ids_to_tokens(ids)
    skip = set(MANIFEST[family]["skip_dialogs"])  # dialogs the published template raises on
    trained = 0
    for dialog in DIALOGS:
        record = record_of(dialog)
        try:
            out = tokenize_record(tok, record, stop_ids=ids)
        except RecordError as e:
            if e.reason == "template_error":  # the published template raises on it (roles, tool-call ids)
                assert dialog["name"] in skip, (family, dialog["name"], str(e))
                continue
            # data the template cannot show the model: refused, never half-trained
            assert e.reason in ("reasoning_not_rendered", "tool_calls_not_rendered", "tool_result_not_rendered")
            if e.reason == "reasoning_not_rendered":  # the marked template ignores it too
                messages = [without_reasoning(m) for m in record.messages]
                assert render(truth_tok, messages, tools=record.tools, kwargs=record.template_kwargs)[0] == \
                    render(truth_tok, record.messages, tools=record.tools, kwargs=record.template_kwargs)[0]
            continue
        assistant = [i for i, m in enumerate(record.messages) if m["role"] == "assistant"]
        assert sum(out.turns.values()) == len(assistant)
        by_turn = {i: s for s in out.samples for i in s.turns}
        for i in assistant:
            truth = ground_truth(truth_tok, record, i, stops)
            if i not in by_turn:
                assert truth in ("empty_answer", "not_servable", "no_end_of_turn"), (family, dialog["name"], i, truth)
                assert out.turns[truth] >= 1, (family, dialog["name"], i, truth, out.turns)
                continue
            got = served_turn(tok, record, by_turn[i], i)
            assert got == encode(tok, truth), (family, dialog["name"], i, tok.decode(got), truth)
            assert got[-1] in ids  # every supervised turn ends with a token serving stops on
            trained += 1
        # the marked template's own markers give the same samples
        marked = tokenize_record(truth_tok, record, stop_ids=ids)
        assert [(s.input_ids, s.labels) for s in marked.samples] == [(s.input_ids, s.labels) for s in out.samples]
    assert trained > 0 or family == "deepseek-r1-distill"


def test_deepseek_r1_turns_cannot_be_served_by_their_own_template():
    """Its generation prompt ends with <think>\\n, which no rendered assistant turn contains: counted, not trained."""
    tok = family_tokenizer("deepseek-r1-distill")
    out = tokenize_record(tok, record_of(DIALOGS[0]))
    assert out.samples == [] and dict(out.turns) == {"not_servable": 1}


def test_qwen3_multi_turn_settings_and_their_counts():
    tok = family_tokenizer("qwen3")
    dialog = next(d for d in DIALOGS if d["name"] == "system_four_turns_short_answers")
    record = record_of(dialog)
    as_served = tokenize_record(tok, record, "as_served")
    whole = tokenize_record(tok, record, "whole_dialog")
    turns = sum(m["role"] == "assistant" for m in record.messages)
    assert turns == 4
    assert len(as_served.samples) == 4 and dict(as_served.turns) == {"supervised": 4}
    assert len(whole.samples) == 1 and dict(whole.turns) == {"supervised": 1, "differs_in_history": 3}
    last, n = as_served.samples[-1], len(as_served.samples[-1].labels)
    assert whole.samples[0].input_ids[:n] == last.input_ids  # the last turn is trained the same either way
    assert whole.samples[0].labels[:n] == last.labels and set(whole.samples[0].labels[n:]) == {IGNORE_INDEX}


@pytest.mark.parametrize("family", sorted(MANIFEST))
def test_the_corpus_through_the_token_cache_gives_the_same_samples(family, tmp_path):
    """The whole corpus as one JSONL file through build_datasets (token cache, skip rules) gives exactly the
    samples of tokenizing each dialog on its own, in order."""
    from shipyard.config import DataConfig
    from shipyard.data.dataset import build_datasets

    tok = family_tokenizer(family)
    ids = stop_ids(tok, family)
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DIALOGS))
    expected = []
    for line, dialog in enumerate(DIALOGS, start=1):
        try:
            out = tokenize_record(tok, normalise_record(dialog, f"{path}:{line}"), stop_ids=ids)
        except RecordError:
            continue
        expected += [(s.input_ids, s.labels, s.source, s.turns) for s in out.samples]
    cfg = DataConfig(train=[{"path": str(path)}], on_error="skip", max_length=100_000, cache_dir=str(tmp_path / "c"))
    for run in ("built", "reused"):
        data = build_datasets(cfg, tok, seed=0, stop_ids=ids)
        assert data.cache.endswith(f"({run})")
        assert [(s.input_ids, s.labels, s.source, s.turns) for s in data.train] == expected, family

"""Chat data on the published Qwen3 template, end to end: preview = training batches; verify proves thinking parity.

One run, shared by the tests here: reasoning, tool calls, multi-turn and per-record kwargs, trained with
`data.chat_template_kwargs={enable_thinking: false}` as a user fine-tuning a reasoning model on plain data would.
"""

import json

import pytest

from shipyard.data.chat import IGNORE_INDEX
from shipyard.verify.run import format_report
from tests.conftest import run_cli
from tests.fixtures import family_tokenizer

pytestmark = pytest.mark.slow

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def dialogs() -> list[dict]:
    words = ["red fox", "blue sun", "green owl", "pink cat", "gold bee", "gray cow"]
    records = [{"messages": [{"role": "user", "content": f"reverse: {w}"},
                             {"role": "assistant", "content": " ".join(reversed(w.split()))}]} for w in words]
    records.append({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "reverse: one two"}, {"role": "assistant", "content": "two one"},
        {"role": "user", "content": "reverse: six ten"}, {"role": "assistant", "content": "ten six"}]})
    records.append({"chat_template_kwargs": {"enable_thinking": True}, "messages": [
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "3 plus 3 is 6, done"}]})
    records.append({"chat_template_kwargs": {"enable_thinking": True}, "messages": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>two and two</think>4"},
        {"role": "user", "content": "and 1+1?"}, {"role": "assistant", "content": "2", "reasoning": "one and one"}]})
    records.append({"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."}]})
    # reasoning while thinking is off by default: serving could never produce it, so it is counted, not trained
    records.append({"messages": [{"role": "user", "content": "5+5?"},
                                 {"role": "assistant", "content": "10", "reasoning_content": "five and five"}]})
    return records


@pytest.fixture(scope="module")
def qwen3_run(chat_run):
    """The run (tests/e2e/conftest.py, session-scoped: its export is verified with the other e2e exports)."""
    return chat_run


def test_preview_json_is_exactly_what_training_consumes(qwen3_run):
    _, samples, counts, batches, summary = qwen3_run
    rows = []
    for micro_batches in batches:
        for mb in micro_batches:
            for ids, labels, mask in zip(mb["input_ids"], mb["labels"], mb["attention_mask"]):
                keep = mask.bool()
                rows.append((tuple(ids[keep].tolist()), tuple(labels[keep].tolist())))
    first_epoch = rows[: len(samples)]
    assert sorted(first_epoch) == sorted((tuple(s["input_ids"]), tuple(s["labels"])) for s in samples)
    # what was trained: 6 plain + 2-turn history sample pairs + reasoning + tool turns, as counted
    assert counts["assistant_turns"] == summary["assistant_turns"] == {"not_servable": 1, "supervised": 13}
    assert counts["skipped_records"] == summary["skipped_records"] == {"total": 1, "not_servable": 1}
    assert summary["multi_turn"] == "as_served" and summary["chat_template_kwargs"] == {"enable_thinking": False}
    by_source = {}
    for s in samples:
        by_source.setdefault(s["source"].rsplit(":", 1)[1], []).append(s)
    # the 2-turn dialog without reasoning is one sample per turn: Qwen3 renders the first turn bare in history
    assert [s["turns"] for s in by_source["7"]] == [[2], [4]]
    tok = family_tokenizer("qwen3")
    supervised = [tok.decode([t for t in s["labels"] if t != IGNORE_INDEX]) for s in by_source["8"]]
    assert supervised == ["<think>\n3 plus 3 is 6, done\n</think>\n\n6<|im_end|>"]
    tool_turns = [tok.decode([t for t in s["labels"] if t != IGNORE_INDEX]) for s in by_source["10"]]
    assert tool_turns[0] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'


def test_preview_shows_supervised_tokens(qwen3_run):
    root, *_ = qwen3_run
    proc = run_cli("data", "preview", f"model.tokenizer={root / 'tokenizer'}", f"data.train={root / 'chats.jsonl'}",
                   "data.chat_template_kwargs={enable_thinking: false}", "--limit", "1", "--color", "never")
    assert proc.returncode == 0, proc.stderr
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\n[[fox red<|im_end|>]]" in proc.stdout
    assert "assistant turns: {'supervised': 1}" in proc.stdout


@pytest.mark.vllm
@pytest.mark.cli_verified("chat")
def test_verify_passes_and_catches_a_flipped_thinking_default(qwen3_run, cli_verify_chat, cli_verified):
    root, *_ = qwen3_run
    final, flipped = cli_verify_chat["final"], cli_verify_chat["flipped"]
    template = json.loads((final / "tokenizer_config.json").read_text())["chat_template"]
    assert "{%- if enable_thinking is not defined %}{%- set enable_thinking = false %}" in template
    flipped_template = json.loads((flipped / "tokenizer_config.json").read_text())["chat_template"]
    assert flipped_template == template.replace("set enable_thinking = false", "set enable_thinking = true")
    probe = json.loads((final / "shipyard_verify.json").read_text())
    assert {tuple(d["shape"]) for d in probe["dialogs"]} >= {("single_turn",), ("multi_turn", "system"),
                                                              ("reasoning", "template_kwargs"),
                                                              ("multi_turn", "tool_calls", "tools")}
    # Both directories in the one `shipyard verify ... --json` of the e2e exports (tests/e2e/conftest.py): one JSON
    # report per line, exit 1 since one fails (checked there).
    report, flipped_report = cli_verified["chat/final"], cli_verified["chat/flipped"]
    assert report["ok"] and report["template_parity"], report
    assert report["vllm"]["prompt_ids_match"] and report["template"]["dialogs"] == len(probe["dialogs"])
    assert not flipped_report["ok"]
    table = format_report(flipped_report)
    # same ids (the last turn always renders a think block) but the prompt now stops before it: the mask moved
    assert f"dialog {root / 'chats.jsonl'}:1 (single_turn), sample 1: loss mask drift at token 12 (' fox<|im_end|>" \
        in table
    assert "training did not supervise it, with the exported template's defaults it is generated by the model" \
        in table
    assert "NOT OK" in table

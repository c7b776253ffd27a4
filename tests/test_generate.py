"""`shipyard generate`: every assistant turn is the target's own greedy answer, as transformers computes it."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from shipyard.data import synthetic
from shipyard.errors import ShipyardError
from shipyard.generate import read_items, write_output
from tests.conftest import assert_user_error, run_cli

MAX_NEW_TOKENS = 24


def _write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# --- fast: no model, no vLLM -------------------------------------------------------------------------------------


def test_malformed_line_without_skip_fails_with_file_line(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # the data is read (and fails) before anything loads the model
    data = _write_jsonl(tmp_path / "data.jsonl", [synthetic.reverse_words(1, 0)[0], '{"messages": [', ""])
    out = tmp_path / "out.jsonl"
    proc = run_cli("generate", str(model), str(data), str(out))
    assert_user_error(proc, f"{data}:2: not valid JSON", "--on-error skip")
    assert not out.exists()


def test_unsupported_records_are_counted_by_reason(tmp_path):
    good = synthetic.reverse_words(3, 0)
    user = {"role": "user", "content": "reverse: a b"}
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    data = _write_jsonl(tmp_path / "data.jsonl", [
        good[0],
        {"messages": [user, call, {"role": "tool", "content": "1"}, {"role": "assistant", "content": "b a"}]},
        {**good[1], "tools": [{"type": "function", "function": {"name": "f"}}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "?"}]},
                      {"role": "assistant", "content": "a"}]},
        {"messages": [user]},
        {"messages": [{"role": "assistant", "content": "hi"}, user, {"role": "assistant", "content": "b a"}]},
        {"messages": [{"role": "robot", "content": "?"}]},
        good[1], good[2],
    ])
    items, skips = read_items(str(data), on_error="skip")
    assert [it.raw for it in items] == [good[0], good[1], good[2]] and [it.turns for it in items] == [[1]] * 3
    assert skips.report() == {"total": 6, "images": 1, "malformed": 1, "no_assistant_turn": 1,
                              "no_prompt_before_assistant_turn": 1, "tool_calls": 1, "tools": 1}
    assert skips.first["malformed"].startswith(f"{data}:7: messages[0].role is 'robot'")
    items, skips = read_items(str(data), on_error="skip", limit=1)  # stops reading at the first usable record
    assert len(items) == 1 and skips.report() == {"total": 0}
    with pytest.raises(ShipyardError, match=f"{data}:7: messages"):
        read_items(str(data))
    items, _ = read_items("synthetic:reverse_words", num_records=5, seed=3)
    assert [it.raw for it in items] == synthetic.reverse_words(5, 3)
    with pytest.raises(ShipyardError, match="did you mean 'synthetic:reverse_words'|did you mean 'reverse_words'"):
        read_items("synthetic:reverse_word")


def test_output_is_replaced_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out.jsonl"
    write_output(out, [{"a": 1}])
    with pytest.raises(TypeError):
        write_output(out, [{"a": 2}, {"b": object()}])  # a row that is not JSON
    with pytest.raises(UnicodeEncodeError):
        write_output(out, [{"a": 2}, {"b": "\ud800"}])  # fails while writing: UTF-8 has no lone surrogate
    assert out.read_text() == '{"a": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    # killed just before the rename, as a crash would: the old file is intact
    code = ("from pathlib import Path; from shipyard.generate import write_output; "
            f"write_output(Path({str(out)!r}), [{{'a': 3}}])")
    proc = subprocess.run([sys.executable, "-c", code],
                          env={**os.environ, "SHIPYARD_CRASH_AT": "before_replace:out.jsonl"})
    assert proc.returncode == -signal.SIGKILL and out.read_text() == '{"a": 1}\n'


# --- slow: a trained target, vLLM vs transformers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """The quickstart trained briefly (it reverses words well, not perfectly); returns final/."""
    out = tmp_path_factory.mktemp("generate") / "run"
    proc = run_cli("train", "quickstart", f"output_dir={out}", "train.max_steps=150", "checkpoint.every_steps=null",
                   "eval.generate=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / "final"


class Greedy:
    """transformers' greedy answer to a conversation, stopping at EOS (generation_config.json), fp32."""

    def __init__(self, directory):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(directory)

    def __call__(self, messages):
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])
        with self.torch.no_grad():
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=MAX_NEW_TOKENS)
        new = out[0, ids.shape[1]:].tolist()
        return self.tokenizer.decode(new, skip_special_tokens=True), len(new)


@pytest.mark.slow
@pytest.mark.vllm
def test_generate_regenerates_every_assistant_turn_as_transformers_greedy(target, tmp_path):
    greedy = Greedy(target)
    records = synthetic.reverse_words(18, seed=7)
    for i, r in enumerate(records):
        r["id"] = i  # extra keys are kept
        if i % 3 == 0:
            r["messages"][1]["content"] = "not the answer"  # original answers the target will change
    records[4]["messages"].insert(0, {"role": "system", "content": "Reverse the words.", "name": "sys"})
    records[5]["messages"][0]["content"] = [{"type": "text", "text": records[5]["messages"][0]["content"]}]

    # A two-turn dialog whose original first answer leads the target to another second answer than its own first
    # answer does: the output's second answer then tells which history it was generated after.
    u1 = {"role": "user", "content": "reverse: red fox sun"}
    u2 = {"role": "user", "content": "reverse: one two three four"}
    a1, _ = greedy([u1])
    after_own, _ = greedy([u1, {"role": "assistant", "content": a1}, u2])
    original = next((c for c in ("sun fox red red red", "WRONG", "moon " * 12, "x y z", "")
                     if c != a1 and greedy([u1, {"role": "assistant", "content": c}, u2])[0] != after_own), None)
    assert original is not None, "no candidate first answer changes the second one: the order cannot be told"
    multi = {"messages": [u1, {"role": "assistant", "content": original, "reasoning_content": "old thoughts"}, u2,
                          {"role": "assistant", "content": "old second answer", "name": "bot"}], "meta": {"k": [1, 2]}}
    tool = {"messages": [u1, {"role": "assistant", "content": None,
                              "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}]}
    rows = records[:10] + [multi, "this line is not JSON", tool] + records[10:]
    data = _write_jsonl(tmp_path / "data.jsonl", rows)
    inputs = [r for r in rows if isinstance(r, dict) and r is not tool]
    assert len(inputs) == 19

    out = tmp_path / "nested" / "out.jsonl"
    proc = run_cli("generate", str(target), str(data), str(out), "--on-error", "skip", "--dtype", "float32",
                   "--max-new-tokens", str(MAX_NEW_TOKENS), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    stdout = proc.stdout
    assert "read 19 records" in stdout and "(dtype float32, max_model_len 512)" in stdout
    assert re.search(r"^assistant turn 1: 19 answers, \d+ tokens in [\d.]+s \([\d,]+ tokens/s\)$", stdout, re.M), stdout
    assert re.search(r"^assistant turn 2: 1 answer, \d+ tokens", stdout, re.M), stdout
    assert "skipped records: 2, malformed 1, tool_calls 1" in stdout
    assert f"first malformed: {data}:12: not valid JSON" in stdout and f"first tool_calls: {data}:13: " in stdout

    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == 19 and [p.name for p in out.parent.iterdir()] == ["out.jsonl"]
    lengths, changed = [], 0
    for before, after in zip(inputs, written):
        extra = {k: v for k, v in before.items() if k != "messages"}
        assert {k: v for k, v in after.items() if k != "messages"} == extra
        assert len(after["messages"]) == len(before["messages"])
        history = []
        for old, new in zip(before["messages"], after["messages"]):
            if old["role"] != "assistant":
                assert new == old  # system/user turns exactly as read (the text-parts list included)
            else:
                expected, n_tokens = greedy(history)  # the conversation so far, earlier answers regenerated
                assert new["content"] == expected, (history, new)
                assert {k: v for k, v in new.items() if k != "content"} == \
                    {k: v for k, v in old.items() if k not in ("content", "reasoning_content")}
                lengths.append(n_tokens)
                changed += expected != old["content"]
            history.append(new if isinstance(new["content"], str) else {**new, "content": new["content"][0]["text"]})
    second = written[10]["messages"][3]["content"]
    assert written[10]["meta"] == {"k": [1, 2]} and written[10]["messages"][1]["content"] == a1
    assert second == after_own != greedy([u1, {"role": "assistant", "content": original}, u2])[0]

    assert len(lengths) == 20 and changed >= 8  # every "not the answer" and the two-turn dialog's answers changed
    assert f"answers: 20 regenerated, {changed} changed vs the original, " in stdout
    assert f"mean answer length: {sum(lengths) / len(lengths):.2f} tokens (EOS included)" in stdout
    assert f"wrote 19 records to {out}" in stdout

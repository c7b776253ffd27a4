"""Bad data through the CLI: a `file:line` message and exit 2, or a counted skip; never a traceback."""

import json

import pytest

from tests.conftest import assert_user_error, losses, run_cli, run_main

pytestmark = pytest.mark.slow

GOOD = {"messages": [{"role": "user", "content": "reverse: red fox"}, {"role": "assistant", "content": "fox red"}]}


def test_every_bad_input_is_named_or_counted(tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = [
        b"\xef\xbb\xbf" + json.dumps(GOOD).encode(),                      # 1: BOM, fine
        b'{"messages": "caf\xe9"}',                                       # 2: Latin-1 byte
        b'{"messages": [oops',                                            # 3: not JSON
        json.dumps({"messages": [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "  "}]}).encode(),  # 4: empty answer
        json.dumps({"messages": [{"role": "user", "content": None},
                                 {"role": "assistant", "content": "x"}]}).encode(),   # 5: null user content
        json.dumps({"messages": [{"role": "user", "content": "w?"}, {"role": "assistant", "content": "a",
                                 "reasoning_content": "r"}]}).encode(),               # 6: template has no reasoning
        json.dumps(GOOD).encode(),
    ]
    bad.write_bytes(b"\n".join(lines) + b"\n")
    proc = run_main("data", "preview", f"data.train={bad}")
    assert_user_error(proc, f"{bad}:2: not valid UTF-8 (byte 0xe9 at column 18)", "data.on_error=skip")

    proc = run_main("data", "preview", f"data.train={bad}", "data.on_error=skip", "--json")
    assert proc.returncode == 0, proc.stderr
    samples = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [s["source"] for s in samples] == [f"{bad}:1", f"{bad}:7"]
    counts = json.loads(proc.stderr.strip().splitlines()[-1])
    assert counts["skipped_records"] == {"total": 5, "empty_answer": 1, "malformed": 3, "reasoning_not_rendered": 1}

    proc = run_main("data", "preview", f"data.train={tmp_path}")
    assert_user_error(proc, f"data file '{tmp_path}' is a directory")
    proc = run_main("train", "quickstart", "train.max_steps=true")
    assert_user_error(proc, "'train.max_steps': ", "expected a number, not the boolean true")


@pytest.mark.distributed
def test_an_error_in_a_multi_process_run_is_said_once(tmp_path):
    """The data file goes missing after launch: one message, exit 2, no torchrun report, no peer tracebacks."""
    proc = run_cli("train", "quickstart", f"data.train={tmp_path / 'gone.jsonl'}", "--nproc-per-node", "2")
    assert_user_error(proc, f"data file '{tmp_path / 'gone.jsonl'}' does not exist")
    assert proc.stderr.count("does not exist") == 1 and proc.stderr.count("data.train was replaced") == 1
    assert "ChildFailedError" not in proc.stderr and "Connection closed" not in proc.stderr


def test_train_and_preview_a_hub_dataset_in_sharegpt_layout_offline(tmp_path):
    """`data.train` names a hub dataset and its split, read from an offline cache; ShareGPT rows train with the
    masks of the same dialogs written as messages; what training tokenized is reused from the token cache."""
    from tests.test_data_scale import make_hub_dataset

    home = tmp_path / "hf"
    rows = [{"conversations": [{"from": "human", "value": f"reverse: w{i} v{i} u{i}"},
                               {"from": "gpt", "value": f"u{i} v{i} w{i}"}]} for i in range(64)]
    make_hub_dataset(home, "acme/chats", {"train_sft": rows})
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "SHIPYARD_TOKEN_CACHE": str(tmp_path / "tokens")}
    source = "data.train={dataset: acme/chats, split: train_sft}"
    preview = run_cli("data", "preview", "quickstart", source, "--json", "--limit", "3", env=env)
    assert preview.returncode == 0, preview.stderr[-2000:]
    as_messages = tmp_path / "m.jsonl"
    as_messages.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": r["conversations"][0]["value"]},
        {"role": "assistant", "content": r["conversations"][1]["value"]}]}) + "\n" for r in rows[:3]))
    expected = run_main("data", "preview", "quickstart", f"data.train={as_messages}", "--json")
    got = [json.loads(line) for line in preview.stdout.splitlines()]
    want = [json.loads(line) for line in expected.stdout.splitlines()]
    assert [(s["input_ids"], s["labels"]) for s in got] == [(s["input_ids"], s["labels"]) for s in want]
    assert [s["source"] for s in got] == [f"acme/chats[train_sft] row {i}" for i in (1, 2, 3)]

    out = tmp_path / "run"
    args = ("train", "quickstart", source, f"output_dir={out}", "train.max_steps=2", "eval.generate=false")
    first = run_cli(*args, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "acme/chats[train_sft]: 64 records -> 64 samples" in first.stdout and "(built)" in first.stdout
    assert len(losses(out)) == 2
    prepared = run_cli("data", "prepare", "quickstart", source, env=env)  # what a resume or a second run reads
    assert prepared.returncode == 0 and "64 train / 0 validation samples" in prepared.stdout, prepared.stderr[-2000:]
    assert prepared.stdout.count("(reused)") == 1

"""Bad data through the CLI: a `file:line` message and exit 2, or a counted skip; never a traceback."""

import json

import pytest

from tests.conftest import assert_user_error, run_cli, run_main

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

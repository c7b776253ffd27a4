"""`shipyard train` driven through the CLI, as a user runs it."""

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, assert_user_error, losses, run_cli, run_main, tiny_overrides

pytestmark = pytest.mark.slow

GOOD = {"messages": [{"role": "user", "content": "reverse: red fox"}, {"role": "assistant", "content": "fox red"}]}


def test_train_tiny_run_writes_everything(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "quickstart", *tiny_overrides(out, steps=8), "checkpoint.every_steps=4", "train.log_every=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 8/8" in proc.stdout and "tok/s" in proc.stdout and "eta" in proc.stdout
    assert f"final checkpoint (Hugging Face, vLLM-ready): {out / 'final'}" in proc.stdout
    assert "shipyard verify" in proc.stdout  # tells the user what to try next

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["final_checkpoint"] == str(out / "final")
    assert summary["skipped_records"]["total"] == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["train/loss"] == pytest.approx(summary["final_train_loss"])
    assert (out / "loss.png").stat().st_size > 10_000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = out / "checkpoints"
    assert (ckpts / "LATEST").read_text().strip() == "step_8"
    for step in (4, 8):
        d = ckpts / f"step_{step}"
        for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (d / name).is_file(), d / name
        assert (d / "shipyard" / "optimizer" / ".metadata").is_file()
        assert json.loads((d / "shipyard" / "checkpoint.json").read_text())["data"]["samples_consumed"] == step * 8
    assert not list(ckpts.glob(".*partial"))


def test_config_show_prints_resolved_recipe():
    proc = run_main("config", "show", "quickstart", "optim.lr=0.5")
    assert proc.returncode == 0, proc.stderr
    assert "lr: 0.5" in proc.stdout and "micro_batch_size: 32" in proc.stdout and "overlength: truncate" in proc.stdout


def test_help_teaches():
    proc = run_main("train", "--help")
    assert proc.returncode == 0 and "quickstart" in proc.stdout and "KEY=VALUE" in proc.stdout


def test_unknown_config_key(tmp_path):
    """In a real process: exit 2 and one line on stderr, no traceback (the other mistakes are checked in-process)."""
    proc = run_cli("train", "quickstart", f"output_dir={tmp_path}", "optim.learning_rate=1e-3")
    assert_user_error(proc, "unknown key 'optim.learning_rate'", "valid keys here: lr")


def test_malformed_jsonl_line(tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + '{"messages": [}\n')
    proc = run_main("train", "quickstart", f"output_dir={tmp_path / 'out'}", f"data.train={data}", "data.validation=[]")
    assert_user_error(proc, f"{data}:2: not valid JSON")


def test_record_without_assistant_turn_is_counted(tmp_path):
    data = tmp_path / "chats.jsonl"
    lonely = {"messages": [{"role": "user", "content": "anyone?"}]}
    data.write_text("\n".join(json.dumps(r) for r in [GOOD, lonely, GOOD, lonely]) + "\n")
    out = tmp_path / "out"
    proc = run_main("train", "quickstart", f"output_dir={out}", f"data.train={data}", "data.validation=[]",
                    "train.max_steps=2", "train.micro_batch_size=2", "eval.generate=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no_assistant_turn': 2" in proc.stdout
    assert json.loads((out / "summary.json").read_text())["skipped_records"] == {"total": 2, "no_assistant_turn": 2}


def test_empty_dataset(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    proc = run_main("train", "quickstart", f"output_dir={tmp_path / 'out'}", f"data.train={data}", "data.validation=[]")
    assert_user_error(proc, "no training samples left in", str(data))


def test_overlength_sample_is_truncated_and_counted(tmp_path):
    data = tmp_path / "chats.jsonl"
    long = {"messages": [{"role": "user", "content": "say red"}, {"role": "assistant", "content": "red " * 100}]}
    data.write_text("\n".join(json.dumps(r) for r in [GOOD, long, GOOD]) + "\n")
    out = tmp_path / "out"
    proc = run_main("train", "quickstart", f"output_dir={out}", f"data.train={data}", "data.validation=[]",
                    "data.max_length=32", "train.max_steps=1", "train.micro_batch_size=3", "eval.generate=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["truncated_records"] == 1
    proc = run_main("train", "quickstart", f"output_dir={tmp_path / 'out2'}", f"data.train={data}",
                    "data.validation=[]", "data.max_length=32", "data.overlength=drop", "train.max_steps=1",
                    "eval.generate=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out2" / "summary.json").read_text())["skipped_records"] == {"total": 1, "overlength": 1}


def test_missing_model_path(tmp_path):
    proc = run_main("train", "quickstart", f"output_dir={tmp_path}", "model.path=./no/such/model")
    assert_user_error(proc, "model.path './no/such/model' does not exist", "qwen3-tiny")


def test_unknown_preset_suggests_closest(tmp_path):
    proc = run_main("train", "quickstart", f"output_dir={tmp_path}", "model.path=qwen3-tiy")
    assert_user_error(proc, "'qwen3-tiy'", "did you mean 'qwen3-tiny'")


def test_killed_run_resumes_with_identical_losses(tmp_path):
    """SIGKILL a real run after its first checkpoint, resume it, and compare with an uninterrupted run. Only the
    killed run needs a process of its own; the others run `shipyard.cli.main` in this one (the same losses)."""
    common = ["checkpoint.every_steps=3", "eval.generate=false"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_main("train", "quickstart", *tiny_overrides(straight, steps=12), *common).returncode == 0

    proc = subprocess.Popen(
        [sys.executable, "-m", "shipyard", "train", "quickstart", *tiny_overrides(killed, steps=12), *common],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    latest = killed / "checkpoints" / "LATEST"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = int(latest.read_text().strip().removeprefix("step_"))
    assert stopped_at < 12, "the run finished before it could be killed"

    proc = run_main("train", "quickstart", *tiny_overrides(killed, steps=12), *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from {killed / 'checkpoints' / f'step_{stopped_at}'}" in proc.stdout

    assert losses(killed) == losses(straight)
    # The summary covers the whole run, the steps before the kill included.
    def summary(d):
        return json.loads((d / "summary.json").read_text())

    assert summary(killed)["final_train_loss"] == summary(straight)["final_train_loss"] == losses(straight)[-1]
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["train/tokens"] for r in rows) == pytest.approx(summary(killed)["tokens_per_second"] * summary(killed)["train_seconds"])

    # Running a finished run again trains nothing and keeps its figures.
    before = summary(straight)
    proc = run_main("train", "quickstart", *tiny_overrides(straight, steps=12), *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already complete (12 steps): nothing left to train" in proc.stdout
    after = summary(straight)
    for key in ("final_train_loss", "tokens_per_second", "train_seconds", "steps", "final_checkpoint"):
        assert after[key] == before[key], key
    assert losses(straight) == losses(killed)


def test_kills_during_metrics_rewrite_and_publish_leave_a_resumable_run(tmp_path):
    """SIGKILL between the two renames of a checkpoint replacement, and while resume rewrites metrics.jsonl. The
    runs that are not killed run in this process (`shipyard.cli.main`)."""
    common = ["checkpoint.every_steps=4", "eval.generate=false"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert run_main("train", "quickstart", *tiny_overrides(straight, steps=8), *common).returncode == 0
    assert run_main("train", "quickstart", *tiny_overrides(run, steps=8), *common).returncode == 0
    ckpt = run / "checkpoints"

    # Retrain steps 5..8 from step 4: saving step 8 again replaces the existing step_8; die between the renames.
    again = [*tiny_overrides(run, steps=8), *common, f"train.resume={ckpt / 'step_4'}"]
    proc = run_cli("train", "quickstart", *again, env={"SHIPYARD_CRASH_AT": "publish_between_renames"})
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in ckpt.iterdir()) == [".step_8.old", ".step_8.partial", "LATEST", "step_4"]

    # Resume: the interrupted replacement is completed; then die while metrics.jsonl is cut back to step 4.
    ckpt_4_again = [*tiny_overrides(run, steps=8), *common, f"train.resume={ckpt / 'step_4'}"]
    proc = run_cli("train", "quickstart", *ckpt_4_again, env={"SHIPYARD_CRASH_AT": "before_replace:metrics.jsonl"})
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in ckpt.iterdir()) == ["LATEST", "step_4", "step_8"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))

    proc = run_main("train", "quickstart", *ckpt_4_again)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert losses(run) == losses(straight)  # the full history, each step once
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in ckpt.iterdir()) == ["LATEST", "step_4", "step_8"]

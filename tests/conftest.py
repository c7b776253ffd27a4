"""Shared fixtures: the shipped tokenizer, tiny recipes, and a CLI runner."""

from __future__ import annotations

import json
import os
import tempfile
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shipyard.config import load_recipe
from shipyard.models.load import SHIPPED_TOKENIZER

REPO = Path(__file__).resolve().parent.parent

# Deterministic CPU numerics for every test in this process (and the subprocesses it starts).
torch.set_num_threads(2)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Token caches of this test session live and die with it (a developer's ~/.cache is not touched).
os.environ.setdefault("SHIPYARD_TOKEN_CACHE", tempfile.mkdtemp(prefix="shipyard-test-tokens-"))


# One vLLM worker for every test that only needs "serves in vLLM as in transformers" (tests/served.py).
from tests.served import (  # noqa: E402,F401  (fixtures, visible to every module)
    SERVED_TIMEOUT_S,
    dist_runs,
    family_runs,
    lora_run,
    pp_qwen3,
    qwen2_audio_run,
    served,
    served_distributed,
    served_export,
    served_families,
    served_lora,
    served_pipeline,
    served_qwen2_audio,
    served_verify,
    served_vlm_pipeline,
    text_base,
    vlm_data,
    vlm_pp_qwen3,
)


def pytest_configure(config):
    config.addinivalue_line("markers", "served(group): reads `served`, the one vLLM verification of tests/served.py's "
                                       "served_<group> directories")


def pytest_collection_modifyitems(config, items):
    # `served` trains and verifies every collected group on first use: its time counts toward the test that
    # first reads it, so those tests get a timeout above what the fixture may take (tests/served.py).
    for item in items:
        if item.get_closest_marker("served") or item.get_closest_marker("cli_verified"):
            item.add_marker(pytest.mark.timeout(SERVED_TIMEOUT_S))


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)


def tiny_overrides(out_dir: Path, steps: int = 6, records: int = 256) -> list[str]:
    """Overrides that turn the quickstart into a seconds-long run writing to `out_dir`."""
    return [
        f"output_dir={out_dir}",
        f"train.max_steps={steps}",
        "train.micro_batch_size=8",
        f"data.train={{synthetic: reverse_words, num_records: {records}, seed: 0}}",
        "data.validation={synthetic: reverse_words, num_records: 16, seed: 1}",
        "eval.max_prompts=8",
        "checkpoint.every_steps=null",
        "optim.warmup_steps=2",
    ]


@pytest.fixture
def tiny_recipe(tmp_path):
    def make(*extra: str, steps: int = 6, out: Path | None = None):
        return load_recipe("quickstart", tiny_overrides(out or tmp_path / "run", steps) + list(extra))

    return make


# Each CLI run a test starts may take this long; pytest's own timeout (pyproject.toml) is three of them, so a
# module fixture's run and the test's own runs always end by their own timeout first, with their output.
CLI_TIMEOUT = 600


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: int = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    """Run `python -m shipyard ARGS` as a user would, in a new process; returns the completed process (text).

    For what only a process shows: exit codes of a real run, the launcher, no traceback on stderr. Checks of what
    a command prints or refuses run in-process (`run_main`), without paying an interpreter and imports each."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "shipyard", *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(*args: str) -> subprocess.CompletedProcess:
    """`shipyard ARGS` in this process (`shipyard.cli.main`): its exit code and what it printed."""
    import contextlib
    import io

    from shipyard.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse: --help, usage errors
            code = e.code if isinstance(e.code, int) else 2
    return subprocess.CompletedProcess(["shipyard", *args], code, out.getvalue(), err.getvalue())


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """A mistake the user can fix: exit 2, each fragment in stderr, no traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def losses(out_dir: Path) -> list[float]:
    """The per-step training losses a run logged to metrics.jsonl."""
    return [json.loads(line)["train/loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def assert_close_trajectory(a: list[float], b: list[float], steps: int, rel: float = 1e-5) -> None:
    assert len(a) == len(b) == steps
    for step, (x, y) in enumerate(zip(a, b), start=1):
        assert abs(x - y) <= rel * abs(x), f"step {step}: {x} vs {y}"

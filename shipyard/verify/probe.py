"""`shipyard_verify.json`: what training saw, kept next to the weights so `verify` can compare.

Written into every checkpoint and export: a few prompts from the run's
validation data (the prompts `verify` generates from), and one dialog with the
exact token ids and loss mask the data pipeline produced for it at training
time. A serving template that renders that dialog differently — a changed
template, a thinking-mode default, a dropped end-of-turn token — shows up as a
difference here, long before it shows up as a model that never stops.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from shipyard.data.chat import prompt_and_reference, tokenize_dialog
from shipyard.data.sources import Record

PROBE_FILE = "shipyard_verify.json"
MAX_PROMPTS = 8

BUILTIN_PROMPTS = [
    [{"role": "user", "content": "reverse: red fox sun"}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ],
]

BUILTIN_DIALOG = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "reverse: red fox sun"},
    {"role": "assistant", "content": "sun fox red"},
    {"role": "user", "content": "reverse: one two"},
    {"role": "assistant", "content": "two one"},
]


def make_probe(tokenizer: PreTrainedTokenizerBase, records: list[Record]) -> dict:
    """Prompts and a training-time rendering from `records` (validation data first), or built-ins."""
    prompts = [prompt_and_reference(r)[0] for r in records[:MAX_PROMPTS]] or BUILTIN_PROMPTS
    dialog = max(records[:64], key=lambda r: len(r.messages)).messages if records else BUILTIN_DIALOG
    sample = tokenize_dialog(tokenizer, Record(dialog, "probe"))
    return {
        "format": 1,
        "prompts": prompts,
        "training_render": {"messages": dialog, "input_ids": sample.input_ids, "labels": sample.labels},
    }


def write_probe(out_dir: Path, probe: dict) -> None:
    (out_dir / PROBE_FILE).write_text(json.dumps(probe, indent=1) + "\n")


def read_probe(directory: Path) -> dict | None:
    path = directory / PROBE_FILE
    return json.loads(path.read_text()) if path.is_file() else None

"""The names of the files shipyard reads and writes in a Hugging Face directory, and the probe file.

A leaf (standard library only): reading a directory's weights (models/weights.py), writing one
(models/save.py), adapters, exports and `verify` all name these files.
"""

from __future__ import annotations

import json
from pathlib import Path

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# An MTP head for a family vLLM has no MTP model for: kept beside the model, out of the index, because vLLM and
# transformers load only the files the index names (vLLM refuses unknown `mtp.*` tensors).
MTP_SIDE_FILE = "mtp.safetensors"
# What training saw (prompts, training-time renderings, reference tokens), kept next to the weights so `verify`
# can compare; export/probe.py builds it.
PROBE_FILE = "shipyard_verify.json"


def write_probe(out_dir: Path, probe: dict) -> None:
    (out_dir / PROBE_FILE).write_text(json.dumps(probe, indent=1) + "\n")


def read_probe(directory: Path) -> dict | None:
    path = directory / PROBE_FILE
    return json.loads(path.read_text()) if path.is_file() else None

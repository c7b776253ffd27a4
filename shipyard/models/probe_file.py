"""`shipyard_verify.json`, the probe file every checkpoint, export and adapter directory carries: where it is and
how it is read and written. What it holds and how it is made: verify/probe.py.

A leaf (no shipyard imports), so the modules that write directories (export, peft, checkpoint) and the ones that
read them (verify) share the file without importing one another.
"""

from __future__ import annotations

import json
from pathlib import Path

PROBE_FILE = "shipyard_verify.json"


def write_probe(out_dir: Path, probe: dict) -> None:
    (out_dir / PROBE_FILE).write_text(json.dumps(probe, indent=1) + "\n")


def read_probe(directory: Path) -> dict | None:
    path = directory / PROBE_FILE
    return json.loads(path.read_text()) if path.is_file() else None

"""Atomic filesystem steps: a reader sees the old content or the complete new one, never a half."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def publish(partial: Path, final: Path) -> None:
    """Rename a finished directory into place; an existing one of the same name is replaced."""
    if final.exists():
        trash = final.with_name(f".{final.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        final.rename(trash)
        partial.rename(final)
        shutil.rmtree(trash)
    else:
        partial.rename(final)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

"""Atomic filesystem steps: a reader sees the old content or the complete new one, never a half.

Each step has a fault-injection point (`crash_point`) so tests can kill the
process exactly between its parts, as a power cut or an OOM kill would.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path

log = logging.getLogger(__name__)


def crash_point(name: str, step: int | None = None) -> None:
    """Fault injection for tests: SHIPYARD_CRASH_AT=NAME (or NAME:STEP) kills this process here, as a crash would."""
    wanted = os.environ.get("SHIPYARD_CRASH_AT")
    if wanted and wanted in (name, f"{name}:{step}"):
        os.kill(os.getpid(), signal.SIGKILL)


def _old(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def publish(partial: Path, final: Path) -> None:
    """Rename a finished directory into place; an existing one of the same name is replaced.

    Replacing takes two renames (final -> .final.old, partial -> final); `recover_publish` finishes a
    replacement that a crash interrupted between them.
    """
    trash = _old(final)
    shutil.rmtree(trash, ignore_errors=True)  # left by an earlier interrupted replacement: superseded now
    if final.exists():
        final.rename(trash)
        crash_point("publish_between_renames")
        partial.rename(final)
        shutil.rmtree(trash)
    else:
        partial.rename(final)


def recover_publish(final: Path, partial: Path, complete) -> None:
    """Finish or undo an interrupted `publish(partial, final)`; `complete(dir)` tells a finished directory.

    The new directory wins when it is complete (the crash came after it was fully written); otherwise the
    old one is put back. Either way no `.old` directory is left behind.
    """
    old = _old(final)
    if not old.exists():
        return
    if final.exists():  # both renames happened; only the cleanup was lost
        shutil.rmtree(old)
    elif partial.exists() and complete(partial):
        log.warning("completing an interrupted replacement of %s", final)
        partial.rename(final)
        shutil.rmtree(old)
    else:
        log.warning("restoring %s: its replacement was interrupted before it was complete", final)
        old.rename(final)


def write_text_atomic(path: Path, text: str) -> None:
    """`path` holds the old text or all of `text` (UTF-8), never part of it: a temporary file next to it, on disk
    before it is renamed over `path`. A write that fails (a full disk, text UTF-8 cannot encode) leaves no
    temporary file behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    crash_point(f"before_replace:{path.name}")
    os.replace(tmp, path)

"""Several processes of one command on this machine, and one clear report when one of them fails.

`shipyard train --nproc-per-node N` starts N copies of itself with the
environment torchrun would give them (RANK, WORLD_SIZE, MASTER_ADDR/PORT), so
`torch.distributed` initialises as usual. It does not use torchrun's CLI
because a failure there reaches the user as torchrun's ChildFailedError
report, the peers' "Connection closed by peer" tracebacks and the failing
rank's own message, in some order. Here the first rank that fails claims
`first_failure` in a run folder shared by the ranks (an exclusive create, so
exactly one wins):

- a ShipyardError (a mistake the user can fix) is written there, the rank
  exits 2 silently, and the launcher prints the message once;
- a real crash keeps its traceback, printed by that rank only;
- ranks that fail afterwards (their peer is gone) exit quietly.

Under a plain `torchrun` (multi-node) the ranks of one node share the same
folder (named after torchrun's run id and port), so the same rules hold per node.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN_DIR_ENV = "SHIPYARD_RUN_DIR"
GRACE_SECONDS = 30  # how long peers of a failed rank may take to notice and exit before they are stopped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: str, nproc: int, rest: list[str]) -> int:
    """Run `python -m shipyard COMMAND REST` as `nproc` ranks; the exit code is 0, 2 (user error) or the crash's."""
    run_dir = Path(tempfile.mkdtemp(prefix="shipyard-ranks-"))
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "NODE_RANK": "0", RUN_DIR_ENV: str(run_dir)}
    print(f"launching {nproc} processes: shipyard {command} {' '.join(rest)}", flush=True)
    procs = [
        subprocess.Popen([sys.executable, "-m", "shipyard", command, *rest],
                         env={**base, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(nproc)
    ]
    try:
        codes = _wait(procs)
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGINT)
        codes = [p.wait() for p in procs]
    failure = read_failure(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    if failure and failure["kind"] == "error":
        print(f"error: {failure['message']}", file=sys.stderr)
        return 2
    return next((c for c in codes if c != 0), 0)


def _wait(procs: list[subprocess.Popen]) -> list[int]:
    """Wait for every rank; once one fails, give the others a grace period, then stop them."""
    deadline = None
    while any(p.poll() is None for p in procs):
        if deadline is None and any(p.returncode not in (None, 0) for p in procs):
            deadline = time.monotonic() + GRACE_SECONDS
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)
    return [p.returncode for p in procs]


# ------------------------------------------------------------------ inside a rank


def run_dir() -> Path | None:
    """The folder the ranks of this run share on this node, or None outside a multi-process run."""
    if RUN_DIR_ENV in os.environ:
        return Path(os.environ[RUN_DIR_ENV])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        name = f"shipyard-{os.environ['TORCHELASTIC_RUN_ID']}-{os.environ.get('MASTER_PORT', '')}"
        path = Path(tempfile.gettempdir()) / name
        path.mkdir(exist_ok=True)
        return path
    return None


def claim_failure(kind: str, message: str) -> bool:
    """Record this rank's failure if it is the run's first; True when it was (then this rank reports it)."""
    folder = run_dir()
    if folder is None:
        return True
    try:
        fd = os.open(folder / "first_failure", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"kind": kind, "rank": int(os.environ.get("RANK", "0")), "message": message}, f)
    return True


def read_failure(folder: Path) -> dict | None:
    path = folder / "first_failure"
    for _ in range(50):  # the winner may still be writing it
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            time.sleep(0.1)
    return None


def launched_by_shipyard() -> bool:
    return RUN_DIR_ENV in os.environ

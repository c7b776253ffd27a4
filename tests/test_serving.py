"""serving/worker.py's guard, without vLLM: a worker that hangs (as a failing vLLM engine can) is killed with
everything it started, and the error says so. (The worker serving real engines: test_verify, test_generate.)"""

import os
import signal
import time
from pathlib import Path

import pytest

from shipyard.errors import ShipyardError
from shipyard.serving import worker

# Stands in for `python -m shipyard.serving.worker`: starts a process of its own, reports progress, then hangs.
HUNG_WORKER = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(os.environ["HUNG_WORKER_CHILD"], "w").write(str(child.pid))
print("[shipyard-vllm] engine loading", flush=True)
print("engine: waiting for a lock that is never released", flush=True)
time.sleep(600)
"""


def gone(pid: int) -> bool:
    """Killed: no such process, or a zombie nobody has reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_hung_worker_is_killed_with_what_it_started(tmp_path, monkeypatch, capsys):
    (tmp_path / "hung_worker.py").write_text(HUNG_WORKER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("HUNG_WORKER_CHILD", str(tmp_path / "child.pid"))
    monkeypatch.setattr(worker, "MODULE", "hung_worker")
    started = time.monotonic()
    with pytest.raises(ShipyardError) as error:
        worker.run_jobs([{"kind": "chat"}], timeout=2)
    assert 2 <= time.monotonic() - started < 20
    assert str(error.value) == ("the vLLM worker did not finish within 2s (a vLLM engine that fails can hang instead "
                                "of raising) and was killed; its last output:\n"
                                "engine: waiting for a lock that is never released")
    assert capsys.readouterr().out == "engine loading\n"  # progress lines are passed on as they come
    child = int((tmp_path / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while not gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert gone(child), "the worker's own process outlived it"
    finally:
        if not gone(child):
            os.kill(child, signal.SIGKILL)

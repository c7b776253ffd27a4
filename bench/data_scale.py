"""Time to first step and peak host memory per rank, for realistic chat data at scale (issue 25's figures).

    python bench/data_scale.py --dialogs 20000 200000 --ranks 1 2
    python bench/data_scale.py --dialogs 200000 --ranks 2 --code /tmp/old-shipyard   # another checkout, same method

For each size and rank count: a first run (token cache empty: it tokenizes) and a
second run (cache kept), each `shipyard train quickstart data.train=FILE
train.max_steps=1`. A sampler reads every process's resident memory every 0.1 s:
per rank (the torchrun workers, or the one process) and, separately, the
tokenizing processes the ranks start. Time to first step is the wall time until
the log's `step 1/1` line. Results print as a Markdown table and go to
runs/bench/data_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from chat_data import make  # noqa: E402


class Sampler(threading.Thread):
    """Peak RSS of each process in a tree, sampled every `every` seconds."""

    def __init__(self, root: psutil.Process, every: float = 0.1):
        super().__init__(daemon=True)
        self.root, self.every, self.peak, self.cmd, self.parent = root, every, {}, {}, {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    self.peak[p.pid] = max(self.peak.get(p.pid, 0), rss)
                    if p.pid not in self.cmd:
                        self.cmd[p.pid] = " ".join(p.cmdline())
                        self.parent[p.pid] = p.ppid()
                except psutil.NoSuchProcess:
                    pass
            time.sleep(self.every)


def run(file: Path, ranks: int, cache: Path, code: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "shipyard", "train", "quickstart", f"data.train={file}", "train.max_steps=1",
           f"output_dir={out}", "checkpoint.consolidate=never", "eval.generate=false", "data.max_length=2048",
           "train.micro_batch_size=4", "train.resume=never"]
    if ranks > 1:
        cmd += ["--nproc-per-node", str(ranks)]
    env = {**os.environ, "SHIPYARD_TOKEN_CACHE": str(cache), "PYTHONPATH": str(code), "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = Sampler(psutil.Process(proc.pid))
    sampler.start()
    first_step, log = None, []
    for line in proc.stdout:
        log.append(line)
        if first_step is None and "step 1/1" in line:
            first_step = time.perf_counter() - started
    proc.wait()
    sampler.done.set()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{''.join(log[-30:])}")
    # Ranks: the processes running shipyard's training (not torchrun's agent, not the tokenizing pool).
    pool = {pid for pid, c in sampler.cmd.items() if "multiprocessing" in c}
    trainers = [pid for pid, c in sampler.cmd.items() if pid not in pool and "shipyard" in c
                and not any(sampler.parent.get(q) == pid and q not in pool for q in sampler.cmd)]
    gib = 1 << 30
    return {"first_step_s": round(first_step or float("nan"), 1),
            "rank_peak_gib": sorted(round(sampler.peak[p] / gib, 2) for p in trainers),
            "tokenizer_procs_peak_gib": sorted(round(sampler.peak[p] / gib, 2) for p in pool)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dialogs", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--code", type=Path, default=ROOT, help="the shipyard checkout to measure")
    parser.add_argument("--work", type=Path, default=Path("/tmp/shipyard-data-scale"))
    parser.add_argument("--cached", action=argparse.BooleanOptionalAction, default=True,
                        help="also time a second run on the kept cache")
    args = parser.parse_args()
    rows = []
    for n in args.dialogs:
        file = args.work / f"chats_{n}.jsonl"
        if not file.exists():
            make(n, file)
        for ranks in args.ranks:
            cache = args.work / "cache"
            shutil.rmtree(cache, ignore_errors=True)
            for kind in ("first", "cached") if args.cached else ("first",):
                result = run(file, ranks, cache, args.code.resolve(), args.work / "run")
                rows.append({"dialogs": n, "mb": round(file.stat().st_size / 1e6), "ranks": ranks, "run": kind,
                             **result})
                print(json.dumps(rows[-1]), flush=True)
    print("\n| dialogs | JSONL MB | ranks | run | first step (s) | peak per rank (GiB) | tokenizing processes (GiB) |")
    print("|---:|---:|---:|---|---:|---|---|")
    for r in rows:
        print(f"| {r['dialogs']:,} | {r['mb']} | {r['ranks']} | {r['run']} | {r['first_step_s']} | "
              f"{', '.join(map(str, r['rank_peak_gib']))} | {', '.join(map(str, r['tokenizer_procs_peak_gib'])) or '-'} |")
    out = ROOT / "runs" / "bench" / "data_scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

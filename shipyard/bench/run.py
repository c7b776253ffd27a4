"""`shipyard bench`: shipyard and HF Trainer side by side, in one invocation.

Each side runs in its own process on the same model (same seed) and the same
samples; the report gives tokens/s (real, non-padding tokens), MFU where the
GPU's peak is known, peak memory, and the ratio shipyard / HF Trainer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

from shipyard.bench.workload import Workload
from shipyard.errors import ShipyardError

PRESETS = {
    # The quickstart model on short multi-turn chats; CPU-sized (about a minute for all three runs).
    "tiny": Workload(model="qwen3-tiny", data="chats", seq_len=256, micro_batch=32, steps=60, warmup=3),
    # The reference-facts anchor: Qwen3-0.6B shape, random init, seq 4096, micro-batch 4, bf16 (GPU).
    "qwen3-0.6b": Workload(model="qwen3-0.6b", data="random", seq_len=4096, micro_batch=4, steps=20, warmup=5),
    # Llama-3-8B shape, LoRA r=16 on all linear layers, seq 4096 (GPU; compare NeMo Automodel's 12,473 tokens/s).
    "llama3-8b-lora": Workload(model="llama3-8b", data="random", seq_len=4096, micro_batch=1, steps=10, warmup=3,
                               lora={"r": 16, "alpha": 32}),
}


def run_worker(impl: str, workload: Workload, timeout: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "shipyard.bench.worker", impl, json.dumps(workload.to_json())],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    for line in proc.stdout.splitlines():
        if line.startswith("SHIPYARD_BENCH_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    tail = "\n".join(proc.stderr.strip().splitlines()[-12:])
    raise ShipyardError(f"the {impl} benchmark run failed (exit {proc.returncode}):\n{tail}")


# shipyard-side switches a benchmark can flip, one change at a time (`--shipyard compile=false`).
SWITCHES = {"compile": (True, False, "auto"), "activation_checkpointing": ("none", "selective", "full"),
            "packing": (True, False)}


def parse_switches(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        choices = SWITCHES.get(key)
        if choices is None:
            raise ShipyardError(f"--shipyard {item}: unknown switch {key!r}; known: {', '.join(SWITCHES)}")
        parsed = {"true": True, "false": False}.get(value.lower(), value)
        if parsed not in choices:
            raise ShipyardError(f"--shipyard {item}: {key} takes one of {', '.join(str(c).lower() for c in choices)}")
        out[key] = parsed
    return out


def bench(preset: str, steps: int | None = None, switches: dict | None = None, timeout: int = 1800) -> dict:
    workload = PRESETS[preset]
    if steps:
        workload = replace(workload, steps=steps)
    if switches:
        workload = replace(workload, shipyard={**workload.shipyard, **switches})
    hf = run_worker("hf_trainer", workload, timeout)
    ours = run_worker("shipyard", workload, timeout)
    report = {"preset": preset, "workload": workload.to_json(), "hf_trainer": hf, "shipyard": ours,
              "ratio": ours["tokens_per_second"] / hf["tokens_per_second"]}
    if workload.data == "chats" and "packing" not in workload.shipyard:  # short samples: show what packing adds
        packed = run_worker("shipyard", replace(workload, shipyard={**workload.shipyard, "packing": True}), timeout)
        report["shipyard_packed"] = packed
        report["packing_gain"] = packed["tokens_per_second"] / ours["tokens_per_second"]
    return report


def format_report(r: dict) -> str:
    w = r["workload"]
    lines = [
        f"shipyard bench --preset {r['preset']}: {w['model']}, {w['data']} data, seq {w['seq_len']}, micro-batch "
        f"{w['micro_batch']}, {w['steps']} measured steps after {w['warmup']} warm-up"
        + (f", LoRA r={w['lora']['r']}" if w["lora"] else "")
        + "".join(f", {k}={v}" for k, v in w["shipyard"].items()),
        f"device: {r['shipyard']['device']}",
        f"FLOPs per token: {r['shipyard']['flops_per_token'] / 1e9:.3f} G = "
        f"{'4' if w['lora'] else '6'}·N + 6·layers·heads·head_dim·seq (N = {r['shipyard']['parameters'] / 1e6:.2f}M)",
        "",
        f"  {'':<18}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'step s':>9}",
    ]
    rows = [("HF Trainer", r["hf_trainer"]), ("shipyard", r["shipyard"])]
    if "shipyard_packed" in r:
        rows.append(("shipyard + packing", r["shipyard_packed"]))
    for name, x in rows:
        mfu = f"{x['mfu']:.1%}" if x["mfu"] is not None else "n/a"
        lines.append(f"  {name:<18}{x['tokens_per_second']:>12,.0f}{mfu:>8}{x['peak_memory_gib']:>10.2f}{x['step_seconds']:>9.3f}")
    lines.append("")
    lines.append(f"shipyard / HF Trainer: {r['ratio']:.2f}x tokens/s")
    if "packing_gain" in r:
        lines.append(f"packing: {r['packing_gain']:.2f}x tokens/s over shipyard unpacked")
    if r["shipyard"]["mfu"] is None:
        lines.append("(MFU needs a GPU whose bf16 peak is known; peak memory on CPU is the process's peak RSS)")
    return "\n".join(lines)

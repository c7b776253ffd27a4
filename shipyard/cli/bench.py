"""`shipyard bench`: training throughput against HF Trainer, side by side."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure training throughput against HF Trainer, side by side",
        description="Train the same model on the same data with shipyard and with transformers.Trainer (each in its "
        "own process) and report tokens/s, MFU (FLOPs per token = 6*N + 6*layers*heads*head_dim*seq; 4*N for LoRA), "
        "peak memory and the ratio. Presets: tiny (CPU, about a minute), qwen3-0.6b and llama3-8b-lora (GPU).",
        epilog="examples:\n  shipyard bench --preset tiny\n  shipyard bench --preset qwen3-0.6b --json\n"
        "  shipyard bench --preset qwen3-0.6b --shipyard compile=false   # what per-block compile adds",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=["tiny", "qwen3-0.6b", "llama3-8b-lora"], default="tiny")
    p.add_argument("--steps", type=int, help="measured steps (default: the preset's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--shipyard", action="append", default=[], metavar="SWITCH=VALUE",
                   help="flip one shipyard setting to measure it: compile=true|false|auto, "
                   "activation_checkpointing=none|selective|full, packing=true|false (repeatable)")
    p.add_argument("--save", type=Path, metavar="FILE", help="also write the JSON report to FILE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shipyard.bench.run import bench, format_report, parse_switches

    report = bench(args.preset, steps=args.steps, switches=parse_switches(args.shipyard))
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report) if args.json else format_report(report))
    return 0

"""`shipyard export`: a vLLM-ready Hugging Face directory from a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a vLLM-ready Hugging Face directory from a checkpoint",
        description="Export a shipyard step directory (or any Hugging Face model directory) as a directory that "
        "loads unchanged in transformers and vLLM: full config.json, EOS ids in generation_config.json, chat "
        "template inlined in tokenizer_config.json, portable tokenizer class, base-model sharding.",
    )
    p.add_argument("checkpoint", help="step directory (runs/NAME/checkpoints/step_N) or HF model directory")
    p.add_argument("out_dir", help="output directory (must be empty or absent unless --force)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR (lists what it replaces)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="cast weights (default: the base model's per-tensor dtypes, else as trained)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to load its config")
    p.add_argument("--merge-lora", action="store_true",
                   help="for a LoRA checkpoint: write full weights (base + scale * B @ A) instead of the adapter")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from shipyard.export.export import export_checkpoint

    dtype = getattr(torch, args.dtype) if args.dtype else None
    result = export_checkpoint(Path(args.checkpoint), Path(args.out_dir), force=args.force, dtype=dtype,
                               trust_remote_code=args.trust_remote_code, merge_lora=args.merge_lora)
    if result.replaced:
        print(f"replaced {len(result.replaced)} entries in {result.out_dir}: {', '.join(result.replaced)}")
    print(f"exported {args.checkpoint} -> {result.out_dir} ({len(result.files)} weight file(s), {result.dtype})")
    return 0

"""`shipyard consolidate`: a sharded (multi-rank) step directory into a vLLM-ready Hugging Face directory."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from shipyard.launch import launch


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "consolidate",
        help="turn a sharded (multi-rank) step directory into a vLLM-ready Hugging Face directory",
        description="Read the DCP shards of STEP_DIR and write Hugging Face safetensors plus the metadata saved "
        "with the checkpoint, following the export rules (same code as `shipyard export`). With several "
        "processes, whole output files are divided among them.",
        epilog="examples:\n  shipyard consolidate runs/NAME/checkpoints/step_1000 hf_out/\n"
        "  shipyard consolidate runs/NAME/checkpoints/step_1000 hf_out/ --nproc-per-node 4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("step_dir", help="a step directory (runs/NAME/checkpoints/step_N)")
    p.add_argument("out_dir", help="output directory (must be empty or absent unless --force)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--nproc-per-node", type=int, metavar="N", help="split the work over N local processes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.nproc_per_node and "LOCAL_RANK" not in os.environ:
        rest = [args.step_dir, args.out_dir] + (["--force"] if args.force else [])
        return launch("consolidate", args.nproc_per_node, rest)
    from shipyard.export.export import export_checkpoint
    from shipyard.parallel.dist import destroy, init_distributed

    dist_info = init_distributed("cpu")
    result = export_checkpoint(Path(args.step_dir), Path(args.out_dir), force=args.force, dist_info=dist_info)
    destroy()  # not in a `finally`: see shipyard.cli.train.run
    if dist_info.is_main:
        print(f"consolidated {args.step_dir} -> {result.out_dir} ({len(result.files)} weight file(s), "
              f"{result.dtype}, written by {dist_info.world_size} process(es))")
    return 0

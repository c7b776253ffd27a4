"""`shipyard verify`: prove directories serve (transformers vs vLLM), one report each and a tally."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "verify",
        help="prove a directory serves: transformers vs vLLM greedy tokens and logprobs, chat-template parity",
        description="Load DIR in transformers and in vLLM (a subprocess), answer the same chat prompts greedily "
        "(the run's validation prompts when DIR came from shipyard), and compare token ids and the logprobs of the "
        "chosen tokens (within a tolerance for vLLM's dtype). Also "
        "checks that DIR's chat template renders exactly what training rendered and that every assistant turn "
        "ends with an EOS id. Exit 0 only when everything agrees.",
        epilog="examples:\n  shipyard verify runs/quickstart/final\n  shipyard verify runs/quickstart/final --json | jq .ok\n"
        "  shipyard verify runs/a/final runs/b/final exported/   # several: one vLLM worker, one JSON line each",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dirs", nargs="+", metavar="DIR",
                   help="Hugging Face directories (e.g. runs/NAME/final), adapters or drafter directories (DFlash, EAGLE-3); "
                   "several are checked with one vLLM worker (its start-up paid once)")
    p.add_argument("--target", metavar="DIR", help="a drafter's target (default: the one it was trained for)")
    p.add_argument("--json", action="store_true", help="print one JSON object per directory (one per line) instead of "
                   "the table")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens compared per prompt (default: 32)")
    p.add_argument("--logprob-tolerance", type=float, metavar="X",
                   help="largest |logprob difference| of a generated token accepted (default by vLLM's dtype: "
                   "float32 1e-3, float16 5e-2, bfloat16 1e-1)")
    p.add_argument("--allow-missing-vllm", action="store_true", help="exit 0 without vLLM installed (reports available: false)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shipyard.verify.run import format_report, verify_many

    reports = verify_many([Path(d) for d in args.dirs], target=args.target, max_new_tokens=args.max_new_tokens,
                          allow_missing_vllm=args.allow_missing_vllm, trust_remote_code=args.trust_remote_code,
                          logprob_tolerance=args.logprob_tolerance)
    if args.json:  # one object per directory, one per line
        print("\n".join(json.dumps(report) for report in reports))
    else:
        print("\n\n".join(format_report(report) for report in reports))
        if len(reports) > 1:
            failed = [r["dir"] for r in reports if not r["ok"]]
            print(f"\n{len(reports) - len(failed)} of {len(reports)} directories pass"
                  + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 0 if all(r["ok"] for r in reports) else 1

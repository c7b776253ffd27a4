"""The `shipyard` command line: the top-level parser, built from one module per command, and `main`.

Each command module owns its `add_parser(subparsers)` (arguments and --help text) and the function that runs it and
prints its report. They import only the standard library and light shipyard modules at module level, so that
`shipyard --help` stays quick; torch, transformers and vLLM are imported inside the run functions.
"""

from __future__ import annotations

import argparse
import sys

from shipyard.cli import bench, config, consolidate, data, export, generate, train, verify
from shipyard.cli.common import setup_logging
from shipyard.errors import ShipyardError
from shipyard.launch import claim_failure, launched_by_shipyard

COMMANDS = (train, config, data, export, consolidate, bench, verify, generate)  # in `shipyard --help` order

EPILOG = """\
examples:
  shipyard train                                   # the quickstart: a tiny model learns to reverse words
  shipyard train recipes/qwen3_0.6b_sft.yaml data.train=my_chats.jsonl
  shipyard train quickstart train.max_steps=100 optim.lr=1e-3
  shipyard config show quickstart                  # every setting, defaults included
  shipyard data preview my_recipe.yaml             # the supervised tokens of the first samples
  shipyard data prepare my_recipe.yaml             # tokenize into the cache every rank then memory-maps
  shipyard export runs/quickstart/checkpoints/step_500 exported/
  shipyard verify runs/quickstart/final
  shipyard generate runs/quickstart/final chats.jsonl regenerated.jsonl

recipes are YAML; overrides are dotted keys with YAML values (key.path=value).
docs: README.md
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shipyard",
        description="Fine-tune Hugging Face models and ship checkpoints that load in transformers, PEFT and vLLM.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except ShipyardError as e:
        # In a multi-process run only the first failing rank reports, and through the launcher when there is one.
        if claim_failure("error", str(e)) and not launched_by_shipyard():
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: its traceback once, from the rank where it happened first
        if claim_failure("crash", f"{type(e).__name__}: {e}"):
            raise
        return 1  # a peer failed first; this rank's error (a closed connection) is only a consequence


def entrypoint() -> None:
    sys.exit(main())

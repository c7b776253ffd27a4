"""`shipyard data preview` and `shipyard data prepare`: a recipe's data as the model will see it."""

from __future__ import annotations

import argparse
import json
import sys
import time

from shipyard.cli.common import RECIPE_AND_OVERRIDES, RECIPE_AND_OVERRIDES_HELP, split_recipe_and_overrides


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="look at training data as the model will see it")
    actions = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    preview = actions.add_parser(
        "preview",
        help="show the first training samples with their supervised tokens highlighted",
        description="Render the first records of a recipe's training data through the real pipeline (the same "
        "tokenizer, chat template, template defaults, multi-turn setting and skip rules as `shipyard train`) and "
        "show every training sample with the tokens the loss covers highlighted, then the skip counts. Look at "
        "this before training on new data: a wrong loss mask does not show in a loss curve.",
        epilog="examples:\n  shipyard data preview\n  shipyard data preview my_recipe.yaml --limit 5\n"
        "  shipyard data preview recipes/qwen3_0.6b_sft.yaml data.train=chats.jsonl data.multi_turn=whole_dialog\n"
        "  shipyard data preview my_recipe.yaml --json | jq .labels   # one JSON object per sample; -100 = not trained",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    preview.add_argument("recipe_and_overrides", nargs="*", metavar=RECIPE_AND_OVERRIDES,
                         help=RECIPE_AND_OVERRIDES_HELP)
    preview.add_argument("--limit", type=int, default=20, metavar="N", help="training records to render (default: 20)")
    preview.add_argument("--json", action="store_true",
                         help="one JSON object per sample on stdout: source (file:line), turns, input_ids, labels "
                         "(-100 where not supervised); skip counts on stderr")
    preview.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                         help="highlight with colour (auto: on a terminal) or with [[brackets]]")
    preview.set_defaults(func=run_preview)
    prepare = actions.add_parser(
        "prepare",
        help="tokenize a recipe's data into the token cache ahead of training",
        description="Read, mix and tokenize a recipe's training and validation data (in parallel processes) into the "
        "token cache that `shipyard train` then memory-maps on every rank. Training builds the cache itself when it "
        "is missing; prepare it ahead of a multi-node job, or to see the counts before paying for GPUs. The cache "
        "is keyed by everything that changes the samples: run it again after an edit and only a changed key "
        "tokenizes anew.",
        epilog="examples:\n  shipyard data prepare my_recipe.yaml\n"
        "  shipyard data prepare my_recipe.yaml data.num_proc=16 data.cache_dir=/shared/tokens",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prepare.add_argument("recipe_and_overrides", nargs="*", metavar=RECIPE_AND_OVERRIDES,
                         help=RECIPE_AND_OVERRIDES_HELP)
    prepare.set_defaults(func=run_prepare)


def run_preview(args: argparse.Namespace) -> int:
    from shipyard.config import load_recipe
    from shipyard.cli.preview import preview_datasets, print_preview, sample_json

    recipe_arg, overrides = split_recipe_and_overrides(args.recipe_and_overrides)
    recipe = load_recipe(recipe_arg, overrides)
    tokenizer, data = preview_datasets(recipe, args.limit)
    if args.json:
        for sample in data.train:
            print(sample_json(sample))
        print(json.dumps({"skipped_records": data.skipped.report(), "assistant_turns": data.turns_report()}),
              file=sys.stderr)
        return 0
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print_preview(tokenizer, recipe, data, args.limit, sys.stdout, color)
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from shipyard.config import load_recipe
    from shipyard.data.dataset import describe_sources
    from shipyard.cli.preview import preview_datasets

    recipe_arg, overrides = split_recipe_and_overrides(args.recipe_and_overrides)
    recipe = load_recipe(recipe_arg, [*overrides, "data.cache=true"])
    started = time.perf_counter()
    _, data = preview_datasets(recipe, None)
    print(f"{len(data.train):,} train / {len(data.validation):,} validation samples in {time.perf_counter() - started:.1f} s; "
          f"skipped {data.skipped.report()}, truncated {data.truncated}")
    print(describe_sources(data))
    return 0

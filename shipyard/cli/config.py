"""`shipyard config show`: the resolved recipe, defaults and overrides applied."""

from __future__ import annotations

import argparse

from shipyard.cli.common import RECIPE_AND_OVERRIDES, split_recipe_and_overrides


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("config", help="inspect recipes")
    actions = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="print the resolved recipe, defaults and overrides applied")
    show.add_argument("recipe_and_overrides", nargs="*", metavar=RECIPE_AND_OVERRIDES)
    show.set_defaults(func=run_show)


def run_show(args: argparse.Namespace) -> int:
    from shipyard.config import dump_recipe, load_recipe

    recipe_arg, overrides = split_recipe_and_overrides(args.recipe_and_overrides)
    print(dump_recipe(load_recipe(recipe_arg, overrides)), end="")
    return 0

"""What every command shares: splitting a recipe from its overrides, and the logging set-up."""

from __future__ import annotations

import logging
import os
import sys

from shipyard.launch import launched_by_shipyard

RECIPE_AND_OVERRIDES = "[RECIPE] [KEY=VALUE ...]"
RECIPE_AND_OVERRIDES_HELP = "a recipe file or shipped recipe name (default: quickstart), then dotted overrides"


def split_recipe_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """`[RECIPE] [KEY=VALUE ...]` as given: the recipe (None for the default) and the overrides."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Notes are said once: by the launching process, or by rank 0 under a plain torchrun.
    quiet_rank = launched_by_shipyard() or int(os.environ.get("RANK", "0")) > 0
    logging.getLogger("shipyard").setLevel(logging.DEBUG if verbose else logging.WARNING if quiet_rank else logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        # Through the environment, read when transformers and huggingface_hub are first imported: importing them
        # here would cost every command, `--help` included, two seconds. Ranks and vLLM workers inherit it.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers.utils.logging" in sys.modules:  # already imported (shipyard.cli.main called in-process)
            hf_logging = sys.modules["transformers.utils.logging"]
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()

"""`shipyard data preview`: the training samples of a recipe's first records, supervised tokens shown.

It runs the same code as training (the recipe's tokenizer with its template
defaults, `build_datasets` with the recipe's settings and skip rules), so what
it shows is what a run trains on: mask bugs are invisible in loss curves. It loads tokenizers and processors
(transformers), so `cli/data.py` imports it inside its run functions only.
"""

from __future__ import annotations

import json
import re
from typing import TextIO

from shipyard.config import Recipe
from shipyard.data.chat import IGNORE_INDEX, Sample, eos_token_ids
from shipyard.data.dataset import Datasets, build_datasets
from shipyard.data.images import describe, media_encoder
from shipyard.models.load import base_eos, load_processor, load_tokenizer, resolve_source

HIGHLIGHT = ("\x1b[30;42m", "\x1b[0m")  # supervised tokens: black on green
BRACKETS = ("[[", "]]")  # the same, where colour cannot be shown


def preview_datasets(recipe: Recipe, limit: int | None):
    """(tokenizer, datasets holding the samples of the first `limit` training records; all of them for None).

    A drafter recipe (task: dflash, eagle3) renders with its target's tokenizer, as its training does."""
    from shipyard.config import ModelConfig

    model = ModelConfig(path=recipe.draft.target) if recipe.draft is not None else recipe.model
    source = resolve_source(model.path)
    tokenizer = load_tokenizer(model, source, recipe.data.chat_template_kwargs)
    stop_ids = eos_token_ids(tokenizer, base_eos(model, source))
    encoder = media_encoder(load_processor(model, source, tokenizer), recipe.data)
    return tokenizer, build_datasets(recipe.data, tokenizer, recipe.seed, limit=limit, stop_ids=stop_ids, encoder=encoder)


def sample_json(sample: Sample) -> str:
    return json.dumps({"source": sample.source, "turns": list(sample.turns), "input_ids": sample.input_ids,
                       "labels": sample.labels, "images": [describe(r) for r in sample.media]})


_REPEATED_TOKEN = re.compile(r"(<[^<>\s]{1,40}>)\1{2,}")


def _collapse_repeats(text: str) -> str:
    """`<|image_pad|>` x 64 instead of 64 copies: an image's tokens, counted."""
    return _REPEATED_TOKEN.sub(lambda m: f"{m.group(1)}x{len(m.group(0)) // len(m.group(1))}", text)


def highlighted(tokenizer, sample: Sample, marks: tuple[str, str]) -> str:
    """The sample's text with every supervised run of tokens wrapped in `marks`."""
    out, run, supervised = [], [], False
    for token, label in zip(sample.input_ids, sample.labels):
        inside = label != IGNORE_INDEX
        if inside != supervised and run:
            text = tokenizer.decode(run)
            out.append(f"{marks[0]}{text}{marks[1]}" if supervised else text)
            run = []
        supervised = inside
        run.append(token)
    if run:
        text = tokenizer.decode(run)
        out.append(f"{marks[0]}{text}{marks[1]}" if supervised else text)
    return _collapse_repeats("".join(out))


def drafter_blocks(tokenizer, sample: Sample, draft) -> str:
    """What a DFlash drafter trains on in this sample: its anchors and the first block's slots and targets."""
    import torch

    from shipyard.models.dflash import block_targets, choose_anchors, slot_weights

    ids, labels = torch.tensor([sample.input_ids]), torch.tensor([sample.labels])
    rows, anchors = choose_anchors(labels, draft.anchors_per_sequence, 0)
    if len(anchors) == 0:
        return "drafter: no block (no answer token with a supervised next token)"
    targets, valid = block_targets(ids, labels, rows, anchors, draft.block_size)
    weights = slot_weights(draft.block_size, draft.slot_decay)
    slots = [f"{k}:{tokenizer.decode([int(targets[0, k])])!r}@{float(weights[k]):.2f}"
             for k in range(1, draft.block_size) if valid[0, k]]
    return (f"drafter: {len(anchors)} block(s) anchored at positions {anchors.tolist()}; the first block is "
            f"{tokenizer.decode([int(ids[0, anchors[0]])])!r} + {draft.block_size - 1} mask tokens, its slots learn "
            f"{' '.join(slots)} (slot:target@weight)")


def media_label(refs) -> str:
    import mimetypes

    kinds = {(mimetypes.guess_type(r)[0] or "image/").split("/")[0] for r in refs if not r.startswith("data:")}
    return "audio" if kinds == {"audio"} else "images"


def print_preview(tokenizer, recipe: Recipe, data: Datasets, limit: int, stream: TextIO, color: bool) -> None:
    marks = HIGHLIGHT if color else BRACKETS
    legend = "green" if color else "[[inside double brackets]]"
    print(f"first {limit} training records of {', '.join(s.describe() for s in recipe.data.train)} "
          f"-> {len(data.train)} samples (multi_turn={recipe.data.multi_turn}; supervised tokens {legend})", file=stream)
    if recipe.data.chat_template_kwargs:
        print(f"chat_template_kwargs (template defaults): {recipe.data.chat_template_kwargs}", file=stream)
    for n, sample in enumerate(data.train, start=1):
        print(f"\n--- sample {n}: {sample.source}, assistant turns {list(sample.turns)}, "
              f"{len(sample.input_ids)} tokens, {sample.num_targets} supervised"
              + (f", {media_label(sample.media)}: {', '.join(describe(r) for r in sample.media)}"
                 if sample.media else ""), file=stream)
        print(highlighted(tokenizer, sample, marks), file=stream)
        if recipe.task == "dflash":
            print(drafter_blocks(tokenizer, sample, recipe.draft), file=stream)
    print(f"\nassistant turns: {data.turns_report()}", file=stream)
    print(f"skipped records: {data.skipped.report()}; truncated samples: {data.truncated}", file=stream)

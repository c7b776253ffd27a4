"""Synthetic vision-language task for the tiny-VLM quickstart: questions about coloured shapes.

Each record is a 64x64 picture of up to four filled shapes in a 2x2 grid and one
question about it: "What is at the top left?" for the quickstart (`shapes`), or
also "How many red shapes are there?", "How many circles are there?" and
"Where is the green triangle?" (`shapes_mixed`, harder to learn). The
answers are spread out so that a model which ignores the image cannot do well
(guessing the most common answer per question scores under 40%), and they are
easy to check by eye. Deterministic: record k depends only on (seed, k), so
the same call gives byte-identical records and a longer run extends a shorter
one. Images are embedded as PNG data URIs, so nothing is written to disk.
"""

from __future__ import annotations

import base64
import io
import random

from PIL import Image, ImageDraw

IMAGE_SIZE, CELL_SIZE = 64, 32
CELLS = ("top left", "top right", "bottom left", "bottom right")  # row-major
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)
P_FILLED = 0.6
MIN_SIZE, MAX_SIZE, JITTER = 22, 28, 2  # a 28 px shape jittered by 2 px still fits its 32 px cell
QUESTION_KINDS = ("what", "count_colour", "count_shape", "where")
# The quickstart asks "What is at the ...?" only: its tiny model learns that in ~2,500 steps (the loss drops
# sharply between steps 2,000 and 2,500 at lr 2e-3); with counting and "Where is" mixed in, it stayed
# below 60% after 4,000 steps.
QUICKSTART_KINDS = ("what",)
COUNT_WEIGHT = 6  # see counted_value

Layout = list[tuple[str, str] | None]  # per cell (colour, shape), or None when empty


def random_layout(rng: random.Random) -> Layout:
    return [(rng.choice(tuple(COLOURS)), rng.choice(SHAPES)) if rng.random() < P_FILLED else None for _ in CELLS]


def draw_layout(layout: Layout, rng: random.Random) -> Image.Image:
    """Draw each shape near its cell centre; jitter in place and size keeps equal layouts from being equal images."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for cell, item in enumerate(layout):
        if item is None:
            continue
        colour, shape = item
        size = rng.randint(MIN_SIZE, MAX_SIZE)
        x0 = (cell % 2) * CELL_SIZE + (CELL_SIZE - size) // 2 + rng.randint(-JITTER, JITTER)
        y0 = (cell // 2) * CELL_SIZE + (CELL_SIZE - size) // 2 + rng.randint(-JITTER, JITTER)
        x1, y1 = x0 + size - 1, y0 + size - 1
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def unique_items(layout: Layout) -> list[tuple[str, str]]:
    """(colour, shape) pairs that occur exactly once, the only ones "Where is ...?" can be asked about."""
    items = [item for item in layout if item is not None]
    return sorted({item for item in items if items.count(item) == 1})


def counted_value(layout: Layout, index: int, values: tuple[str, ...], rng: random.Random) -> str:
    """The colour or shape to count, a value seen twice or more being 6x as likely to be asked.

    Asking uniformly would make "0" and "1" each ~41% of the answers (a cell holds a
    given colour with probability 0.2); this weighting spreads them to about
    0: 28%, 1: 33%, 2: 33%, 3: 6%, 4: 0.4%, so guessing a count does not pay.
    """
    present = [item[index] for item in layout if item is not None]
    weights = [COUNT_WEIGHT if present.count(value) >= 2 else 1 for value in values]
    return rng.choices(values, weights)[0]


def ask(layout: Layout, rng: random.Random, kinds: tuple[str, ...] = QUESTION_KINDS) -> tuple[str, str]:
    """One (question, answer) about the layout, the kind chosen uniformly among `kinds`."""
    kind = rng.choice(kinds)
    if kind == "where" and not unique_items(layout):
        kind = rng.choice([k for k in kinds if k != "where"] or ["what"])
    if kind == "what":
        # Half the time ask about a filled cell: asking uniformly would make "nothing" 40% of the answers.
        filled = [cell for cell, item in enumerate(layout) if item is not None]
        cell = rng.choice(filled) if filled and rng.random() < 0.5 else rng.randrange(len(CELLS))
        item = layout[cell]
        return f"What is at the {CELLS[cell]}?", "nothing" if item is None else " ".join(item)
    if kind == "count_colour":
        colour = counted_value(layout, 0, tuple(COLOURS), rng)
        count = sum(item is not None and item[0] == colour for item in layout)
        return f"How many {colour} shapes are there?", str(count)
    if kind == "count_shape":
        shape = counted_value(layout, 1, SHAPES, rng)
        count = sum(item is not None and item[1] == shape for item in layout)
        return f"How many {shape}s are there?", str(count)
    item = rng.choice(unique_items(layout))
    return f"Where is the {' '.join(item)}?", CELLS[layout.index(item)]


def shapes_record(rng: random.Random, kinds: tuple[str, ...] = QUESTION_KINDS) -> dict:
    layout = random_layout(rng)
    image = draw_layout(layout, rng)
    question, answer = ask(layout, rng, kinds)
    return {
        "messages": [
            {
                "role": "user",
                # Question first: the image tokens then see what is asked (causal attention), which lets a
                # from-scratch two-layer model learn the task in minutes.
                "content": [{"type": "text", "text": question}, {"type": "image", "image": png_data_uri(image)}],
            },
            {"role": "assistant", "content": answer},
        ]
    }


def record_rng(seed: int, index: int) -> random.Random:
    # One generator per record, so record k is the same whatever num_records is.
    return random.Random(seed * 1_000_003 + index)


def shapes(num_records: int, seed: int) -> list[dict]:
    """The quickstart task: "What is at the top left?" -> "red circle" (or "nothing")."""
    return [shapes_record(record_rng(seed, k), QUICKSTART_KINDS) for k in range(num_records)]


def shapes_mixed(num_records: int, seed: int) -> list[dict]:
    """All four question kinds (what, how many of a colour / a shape, where): a harder task."""
    return [shapes_record(record_rng(seed, k)) for k in range(num_records)]


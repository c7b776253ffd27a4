"""The shapes task is deterministic, its answers match its pictures, and the pictures are needed to answer."""

import base64
import io
from collections import Counter, defaultdict

import pytest
from PIL import Image

from shipyard.data.synthetic_images import CELLS, COLOURS, shapes, shapes_mixed

N = 2000


@pytest.fixture(scope="module")
def records():
    """All four question kinds (shapes_mixed); the quickstart's `shapes` asks the first kind only."""
    return shapes_mixed(N, seed=0)


def question_answer(record: dict) -> tuple[str, str]:
    user, assistant = record["messages"]
    return next(p["text"] for p in user["content"] if p["type"] == "text"), assistant["content"]


def image_of(record: dict) -> Image.Image:
    uri = next(p["image"] for p in record["messages"][0]["content"] if p["type"] == "image")
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(uri[len(prefix) :])))


def kind_of(question: str) -> str:
    if question.startswith("What is at the "):
        return "what"
    if question.startswith("Where is the "):
        return "where"
    return "count_colour" if question.endswith(" shapes are there?") else "count_shape"


def read_cell(image: Image.Image, cell: int) -> tuple[str, str] | None:
    """(colour, shape) seen in one 32x32 cell, told apart by how much of its bounding box the shape fills."""
    left, top = (cell % 2) * 32, (cell // 2) * 32
    pixels = {}
    for y in range(top, top + 32):
        for x in range(left, left + 32):
            rgb = image.getpixel((x, y))
            if rgb != (255, 255, 255):
                pixels[(x, y)] = rgb
    if not pixels:
        return None
    by_colour = {name for name, rgb in COLOURS.items() if rgb in set(pixels.values())}
    assert len(by_colour) == 1 and set(pixels.values()) <= set(COLOURS.values()), "one flat colour per cell"
    xs, ys = [x for x, _ in pixels], [y for _, y in pixels]
    fill = len(pixels) / ((max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1))
    shape = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
    return by_colour.pop(), shape


def expected_answer(question: str, grid: list) -> str:
    """The answer re-derived from what is drawn, independently of the generator's layout."""
    items = [item for item in grid if item is not None]
    kind = kind_of(question)
    if kind == "what":
        item = grid[CELLS.index(question.removeprefix("What is at the ").removesuffix("?"))]
        return "nothing" if item is None else " ".join(item)
    if kind == "count_colour":
        colour = question.split()[2]
        return str(sum(c == colour for c, _ in items))
    if kind == "count_shape":
        shape = question.split()[2].removesuffix("s")
        return str(sum(s == shape for _, s in items))
    colour, shape = question.removeprefix("Where is the ").removesuffix("?").split()
    assert items.count((colour, shape)) == 1, "only asked about a shape drawn exactly once"
    return CELLS[grid.index((colour, shape))]


def test_deterministic_and_record_k_independent_of_num_records(records):
    assert shapes_mixed(50, seed=0) == records[:50]
    assert shapes(50, seed=0) == shapes(50, seed=0)
    assert shapes(10, seed=1) == shapes(30, seed=1)[:10]
    assert shapes(10, seed=1) != shapes(10, seed=0)


def test_record_shape(records):
    user, assistant = records[0]["messages"]
    assert user["role"] == "user" and assistant["role"] == "assistant"
    assert [part["type"] for part in user["content"]] == ["text", "image"]  # the question first
    assert isinstance(assistant["content"], str)
    image = image_of(records[0])
    assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"


def test_answers_match_the_pictures(records):
    for record in records[:300]:
        image = image_of(record).convert("RGB")
        grid = [read_cell(image, cell) for cell in range(4)]
        question, answer = question_answer(record)
        assert answer == expected_answer(question, grid), question


def test_jitter_makes_pictures_differ(records):
    uris = Counter(next(p["image"] for p in record["messages"][0]["content"] if p["type"] == "image")
                   for record in records[:300])
    repeated = [uri for uri, count in uris.items() if count > 1]
    # Only the all-empty picture (~2.6% of records) may repeat; any shape is jittered in place and size.
    assert len(repeated) <= 1
    for uri in repeated:
        assert image_of({"messages": [{"content": [{"type": "image", "image": uri}]}]}).getextrema() == ((255, 255),) * 3


def test_text_only_guessing_does_badly(records):
    answers_by_question = defaultdict(Counter)
    for record in records:
        question, answer = question_answer(record)
        answers_by_question[question][answer] += 1
    # Best possible text-only model: the most frequent answer for each exact question, scored in-sample.
    accuracy = sum(c.most_common(1)[0][1] for c in answers_by_question.values()) / len(records)
    assert accuracy <= 0.40


def test_answers_are_spread_within_each_kind(records):
    answers_by_kind = defaultdict(Counter)
    for record in records:
        question, answer = question_answer(record)
        answers_by_kind[kind_of(question)][answer] += 1
    assert set(answers_by_kind) == {"what", "count_colour", "count_shape", "where"}
    for kind, answers in answers_by_kind.items():
        total = sum(answers.values())
        assert total > N / 6, kind  # each kind is about a quarter of the records
        assert answers.most_common(1)[0][1] / total <= 0.40, (kind, answers)
    assert len(answers_by_kind["what"]) == 10  # nine (colour, shape) pairs and "nothing"
    assert {"0", "1", "2", "3"} <= set(answers_by_kind["count_colour"]) & set(answers_by_kind["count_shape"])
    assert set(answers_by_kind["where"]) == set(CELLS)


def test_quickstart_task_asks_what_is_where_and_needs_the_picture():
    records = shapes(N, seed=0)
    assert {kind_of(question_answer(r)[0]) for r in records} == {"what"}
    for record in records[:300]:
        image = image_of(record).convert("RGB")
        question, answer = question_answer(record)
        assert answer == expected_answer(question, [read_cell(image, cell) for cell in range(4)]), question
    answers_by_question = defaultdict(Counter)
    for record in records:
        question, answer = question_answer(record)
        answers_by_question[question][answer] += 1
    best_guess = sum(c.most_common(1)[0][1] for c in answers_by_question.values()) / len(records)
    assert best_guess <= 0.30, best_guess

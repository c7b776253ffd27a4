"""The quickstart task: reverse a short list of words.

Deterministic for a given seed, so the quickstart, the tests and the tokenizer
builder all see the same records. A tiny model learns it in a couple of
minutes on a laptop CPU, and the result is easy to check by eye: the assistant
answers "reverse: red fox sun" with "sun fox red".
"""

from __future__ import annotations

import random

WORDS = (
    "red blue green gold pink gray black white "
    "cat dog fox owl bee cow pig ant "
    "sun moon star rain snow wind fire rock "
    "tree leaf seed root rose fern moss reed "
    "one two three four five six seven eight "
    "boat ship road city door lamp book ring"
).split()

PROMPT_PREFIX = "reverse: "
MIN_WORDS, MAX_WORDS = 3, 6


def reverse_words_record(rng: random.Random) -> dict:
    """One chat record: a user asks to reverse words, the assistant answers."""
    n = rng.randint(MIN_WORDS, MAX_WORDS)
    words = [rng.choice(WORDS) for _ in range(n)]
    return {
        "messages": [
            {"role": "user", "content": PROMPT_PREFIX + " ".join(words)},
            {"role": "assistant", "content": " ".join(reversed(words))},
        ]
    }


def reverse_words(num_records: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    """`num_records` records from `seed`; prompts in `exclude` are never produced.

    `exclude` keeps held-out evaluation prompts out of the training set, so the
    quickstart's exact-match score measures generalisation, not memory.
    """
    rng = random.Random(seed)
    records: list[dict] = []
    while len(records) < num_records:
        record = reverse_words_record(rng)
        if exclude and record["messages"][0]["content"] in exclude:
            continue
        records.append(record)
    return records


GENERATORS = {"reverse_words": reverse_words}

"""Synthetic chat tasks: reverse (the quickstart) or sort a short list of words.

Deterministic for a given seed, so the quickstart, the tests and the tokenizer
builder all see the same records. A tiny model learns reversal in well under a
minute on a laptop CPU, and the result is easy to check by eye: the assistant
answers "reverse: red fox sun" with "sun fox red". Sorting ("sort: red fox
sun" -> "fox red sun") is the second task, taught by the LoRA quickstart.
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

MIN_WORDS, MAX_WORDS = 3, 6
TASKS = {
    "reverse_words": ("reverse: ", lambda words: list(reversed(words))),
    "sort_words": ("sort: ", sorted),
}


def word_task_record(task: str, rng: random.Random) -> dict:
    """One chat record: a user asks to transform a few words, the assistant answers."""
    prefix, transform = TASKS[task]
    words = [rng.choice(WORDS) for _ in range(rng.randint(MIN_WORDS, MAX_WORDS))]
    return {
        "messages": [
            {"role": "user", "content": prefix + " ".join(words)},
            {"role": "assistant", "content": " ".join(transform(words))},
        ]
    }


def word_task(task: str, num_records: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [word_task_record(task, rng) for _ in range(num_records)]


def reverse_words(num_records: int, seed: int) -> list[dict]:
    return word_task("reverse_words", num_records, seed)


def sort_words(num_records: int, seed: int) -> list[dict]:
    return word_task("sort_words", num_records, seed)


def _shapes(num_records: int, seed: int) -> list[dict]:
    from shipyard.data.synthetic_images import shapes  # PIL: imported only when an image task is used

    return shapes(num_records, seed)


def _shapes_mixed(num_records: int, seed: int) -> list[dict]:
    from shipyard.data.synthetic_images import shapes_mixed

    return shapes_mixed(num_records, seed)


def _speech(split: str):
    def generate(num_records: int, seed: int) -> list[dict]:
        from shipyard.data.synthetic_speech import speech_task  # espeak + soundfile: only when a speech task is used

        return speech_task(split, num_records, seed)

    return generate


GENERATORS = {"reverse_words": reverse_words, "sort_words": sort_words, "shapes": _shapes, "shapes_mixed": _shapes_mixed,
              "spoken_digits": _speech("train"), "spoken_digits_heldout": _speech("heldout"),
              "spoken_digits_unseen_voices": _speech("unseen_voices")}

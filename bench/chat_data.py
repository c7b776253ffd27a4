"""Realistic chat data at any size: multi-turn dialogs shaped like public SFT sets (ultrachat-like lengths).

    python bench/chat_data.py 200000 /tmp/chats_200k.jsonl

Each dialog has 1-3 user/assistant exchanges (a system prompt in one of three),
user turns of 6-36 words and answers of 20-120 words: about 1.1 kB of JSONL per
dialog, so 200,000 dialogs are ~220 MB. Deterministic for a seed; written in
chunks, so a million dialogs need no more memory than a thousand.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

WORDS = (
    "the of and to in is that for it as with was on be by this are from or an which at not have can all more one "
    "model data system time value function method result example process number question answer problem order "
    "first second each other new use used using make made way work part case point state form level group line "
    "water light sound energy market price cost rate growth change history language science city river country "
    "because however therefore although while when where before after during between through under over about "
    "simple clear large small early late high low long short strong weak open close fast slow warm cold"
).split()
SYSTEM = ["You are a helpful assistant.", "Answer concisely and accurately.", "You are an expert tutor; explain "
          "step by step."]
ASKS = ["Can you explain", "What is", "How does", "Why is", "Write a short note about", "Compare", "Summarise"]


def sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def paragraph(rng: random.Random, words: int) -> str:
    out, left = [], words
    while left > 0:
        n = min(left, rng.randint(6, 18))
        out.append(sentence(rng, n))
        left -= n
    return " ".join(out)


def dialog(rng: random.Random) -> dict:
    messages = [{"role": "system", "content": rng.choice(SYSTEM)}] if rng.random() < 1 / 3 else []
    for _ in range(rng.choice([1, 1, 2, 2, 3])):
        ask = f"{rng.choice(ASKS)} {paragraph(rng, rng.randint(6, 36)).lower()}"
        messages += [{"role": "user", "content": ask},
                     {"role": "assistant", "content": paragraph(rng, rng.randint(20, 120))}]
    return {"messages": messages}


def make(num: int, path: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for start in range(0, num, 10_000):
            f.write("".join(json.dumps(dialog(rng)) + "\n" for _ in range(min(10_000, num - start))))
    tmp.replace(path)
    return path


if __name__ == "__main__":
    make(int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)

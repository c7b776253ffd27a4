"""`shipyard_verify.json` (hf_files.PROBE_FILE): what training saw, kept next to the weights so `verify` can compare.

Written into every checkpoint and export: a few prompts from the run's data
(the prompts `verify` generates from), and a sample of training dialogs, one of
every shape the data has (multi-turn, reasoning, tool calls, tools offered,
system prompt, per-record template kwargs), each with the exact token ids and
loss masks the data pipeline produced for it. A serving template that renders
one of them differently — a changed template, a flipped thinking-mode default,
a dropped end-of-turn token — shows up as a difference here, long before it
shows up as a model that never stops.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from shipyard.data.chat import prompt_and_reference, tokenize_record
from shipyard.data.messages import Record, shape_of

MAX_PROMPTS = 8
SPEECH_PROMPTS = 100
MAX_DIALOGS = 8

BUILTIN_PROMPTS = [
    [{"role": "user", "content": "reverse: red fox sun"}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ],
]

BUILTIN_DIALOG = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "reverse: red fox sun"},
    {"role": "assistant", "content": "sun fox red"},
    {"role": "user", "content": "reverse: one two"},
    {"role": "assistant", "content": "two one"},
]


def pick_dialogs(records: list[Record], limit: int = MAX_DIALOGS) -> list[Record]:
    """The first record of every shape, at most `limit`."""
    seen: dict[tuple, Record] = {}
    for record in records:
        seen.setdefault(shape_of(record), record)
        if len(seen) >= limit:
            break
    return list(seen.values())


def render_for_probe(tokenizer: PreTrainedTokenizerBase, record: Record, multi_turn: str,
                     stop_ids: list[int] | None = None, encoder=None) -> list[dict]:
    return [{"turns": list(s.turns), "input_ids": s.input_ids, "labels": s.labels}
            for s in tokenize_record(tokenizer, record, multi_turn, stop_ids, encoder).samples]


def with_inline_media(messages: list[dict]) -> list[dict]:
    """`messages` with every image and clip as a data: URI, so the probe travels with the directory it is
    written into."""
    out = []
    for m in messages:
        if isinstance(m["content"], list):
            m = {**m, "content": [{"type": p["type"], p["type"]: as_data_uri(p[p["type"]])}
                                  if p["type"] in ("image", "audio") else p for p in m["content"]]}
        out.append(m)
    return out


def as_data_uri(ref: str) -> str:
    if ref.startswith("data:"):
        return ref
    import base64
    import mimetypes

    kind = mimetypes.guess_type(ref)[0] or "image/png"
    return f"data:{kind};base64,{base64.b64encode(Path(ref).read_bytes()).decode()}"


HELD_OUT_PROMPTS = 200


def make_probe(tokenizer: PreTrainedTokenizerBase, validation: list[Record], train: list[Record],
               multi_turn: str = "as_served", stop_ids: list[int] | None = None, encoder=None,
               held_out: bool = False) -> dict:
    """Prompts (validation first) and training-time renderings of one dialog of every shape in `train`.

    `held_out`: also keep up to HELD_OUT_PROMPTS validation prompts, on which `verify` measures speculative
    decoding (MTP heads)."""
    records = validation + train
    count = MAX_PROMPTS
    transcribes = encoder is not None and encoder.kind == "audio"
    if transcribes:  # verify transcribes the held-out clips (word error rates in both engines)
        records, count = validation or train, SPEECH_PROMPTS
    prompts = [with_inline_media(prompt_and_reference(r)[0]) for r in records[:count]] or BUILTIN_PROMPTS
    dialogs = pick_dialogs(train or validation) or [Record(BUILTIN_DIALOG, "builtin")]
    dialogs = [Record(with_inline_media(r.messages), r.origin, r.tools, r.template_kwargs) for r in dialogs]
    from shipyard.models.greedy import prompt_inputs

    probe = {
        "format": 2,
        "prompts": prompts,
        # The ids training's pipeline makes of each prompt (image tokens expanded): verify holds vLLM's to them.
        "prompt_ids": [prompt_inputs(tokenizer, p, encoder)["input_ids"][0].tolist() for p in prompts],
        "multi_turn": multi_turn,
        "dialogs": [
            {"source": r.origin, "shape": list(shape_of(r)), "messages": r.messages, "tools": r.tools,
             "chat_template_kwargs": r.template_kwargs,
             "samples": render_for_probe(tokenizer, r, multi_turn, stop_ids, encoder)}
            for r in dialogs
        ],
    }
    if transcribes:
        probe["references"] = [prompt_and_reference(r)[1] for r in records[:count]]
    if held_out:
        probe["held_out"] = [with_inline_media(prompt_and_reference(r)[0]) for r in validation[:HELD_OUT_PROMPTS]]
    return probe


REFERENCE_TOKENS = 32


def add_reference(probe: dict, model, tokenizer: PreTrainedTokenizerBase, dtype: str, encoder=None) -> None:
    """Record the trained model's own greedy tokens and logprobs for the probe prompts.

    `verify` compares DIR's transformers answers with these: a directory whose config or weights were
    edited after training (a removed soft-cap, another rope scaling) then fails even though transformers
    and vLLM, both reading the edited config, agree with each other.
    """
    from shipyard.models.greedy import greedy, prompt_inputs

    was_training = model.training
    model.eval()
    try:
        runs = [greedy(model, prompt_inputs(tokenizer, p, encoder), REFERENCE_TOKENS) for p in probe["prompts"]]
    finally:
        model.train(was_training)
    probe["reference"] = {"dtype": dtype, "token_ids": [t for t, _ in runs], "logprobs": [lp for _, lp in runs]}

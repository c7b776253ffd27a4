"""`shipyard train`: one run, top to bottom.

recipe -> model + tokenizer -> tokenized data -> parallelism -> optimizer ->
(resume) -> steps (loss normalised by the global count of supervised tokens)
-> checkpoints -> evaluation -> export of the final checkpoint -> summary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shipyard.checkpoint.store import find_resume_dir, load_checkpoint, save_checkpoint
from shipyard.config import Recipe, dump_recipe
from shipyard.data.chat import IGNORE_INDEX
from shipyard.data.dataset import build_datasets, count_targets
from shipyard.data.loader import BatchPlan, StepBatches
from shipyard.export.export import export_checkpoint
from shipyard.export.hf import ModelMeta, WeightLayout, eos_token_ids, tied_aliases, write_hf_metadata, write_weights
from shipyard.fsutil import publish, write_text_atomic
from shipyard.models.load import load
from shipyard.parallel.dist import DistInfo, all_reduce_sum, barrier, broadcast_object, init_distributed
from shipyard.parallel.fsdp import apply_parallelism
from shipyard.peft.lora import apply_lora, peft_config_dict, resolve_trainable
from shipyard.train.evaluate import exact_match, validation_loss
from shipyard.train.loss import causal_lm_loss
from shipyard.train.metrics import MetricsLogger, plot_loss, truncate_metrics
from shipyard.train.optim import build_optimizer, build_scheduler
from shipyard.verify.probe import make_probe

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def bf16_enabled(recipe: Recipe, device: torch.device) -> bool:
    """bf16 compute on GPU (weights and optimizer stay fp32); exact fp32 on CPU unless asked."""
    mode = recipe.train.mixed_precision
    return mode == "bf16" or (mode == "auto" and device.type == "cuda")


def autocast_for(recipe: Recipe, device: torch.device):
    if not bf16_enabled(recipe, device):
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def model_meta(model, tokenizer, source) -> ModelMeta:
    base_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return ModelMeta(
        config=model.config,
        architecture=type(model).__name__,
        tokenizer=tokenizer,
        base_name=source.name,
        base_dir=source.local_dir,
        base_eos=base_eos,
        layout=WeightLayout.from_dir(source.local_dir),
    )


def setup_lora(model, recipe: Recipe, meta: ModelMeta, source, dist_info: DistInfo) -> dict:
    """Add adapters to `model`; returns what adapter checkpoints record (adapter_config.json and more).

    The adapter's `base_model_name_or_path` must load in PEFT and vLLM: a hub id or a directory. A preset has
    neither, so its initial weights are written once to OUTPUT_DIR/base_model and the adapter points there.
    """
    if source.kind == "preset":
        base_dir = (recipe.out_dir / "base_model").resolve()
        if dist_info.is_main and not base_dir.exists():
            write_base_model(base_dir, model, meta)
        barrier()
        base_name = str(base_dir)
    else:
        base_name = str(source.local_dir) if source.local_dir else source.name
    meta.base_name = base_name
    model_names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = apply_lora(model, recipe.lora, recipe.seed)
    trainable = resolve_trainable(model, recipe.lora)
    return {
        "peft_config": peft_config_dict(recipe.lora, targets, trainable, base_name, model_names),
        "lora_meta": {**recipe.lora.model_dump(mode="json"), "adapted_modules": targets, "trainable_modules": trainable},
    }


def write_base_model(out_dir: Path, model, meta: ModelMeta) -> None:
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    aliases = tied_aliases(model)
    dtype = write_weights(partial, {k: v for k, v in model.state_dict().items() if k not in aliases}, meta.layout)
    write_hf_metadata(partial, meta, dtype)
    publish(partial, out_dir)


def plan_batches(recipe: Recipe, dist_info: DistInfo) -> BatchPlan:
    t = recipe.train
    return BatchPlan(
        global_batch=t.micro_batch_size * t.grad_accum_steps * dist_info.world_size,
        micro_batch_size=t.micro_batch_size,
        grad_accum_steps=t.grad_accum_steps,
        dp_rank=dist_info.rank,
        dp_size=dist_info.world_size,
    )


def train_step(model, micro_batches, optimizer, scheduler, recipe: Recipe, dist_info: DistInfo, autocast) -> dict:
    """One optimizer step over this rank's micro-batches; returns the step's metrics."""
    device = dist_info.device
    local_targets = sum(int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) for mb in micro_batches)
    global_targets = all_reduce_sum(local_targets, device)
    # Each micro-batch contributes sum(token losses) / (supervised tokens of the whole global batch):
    # the accumulated gradient is the global per-token mean whatever the split into micro-batches and ranks.
    # Data-parallel gradient reduction averages over ranks, so the world size is multiplied back in.
    scale = dist_info.world_size / max(global_targets, 1)
    loss_sum = torch.zeros((), device=device)
    for mb in micro_batches:
        mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
        with autocast():
            summed, _ = causal_lm_loss(model, mb, recipe.train.loss_chunk_size)
        (summed * scale).backward()
        loss_sum += summed.detach()
    metrics = {}
    if recipe.train.max_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.train.max_grad_norm)
        metrics["train/grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    metrics["train/lr"] = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    metrics["train/loss"] = all_reduce_sum(loss_sum.item(), device) / max(global_targets, 1)
    metrics["train/supervised_tokens"] = int(global_targets)
    return metrics


@dataclass
class TrainResult:
    summary: dict
    model: torch.nn.Module  # the trained model, still in memory (tests compare it with the exported files)
    tokenizer: object


def train(recipe: Recipe) -> TrainResult:
    dist_info = init_distributed(recipe.train.device, need_group=recipe.parallel.fsdp == "on")
    out = recipe.out_dir
    ckpt_root = out / "checkpoints"
    main = dist_info.is_main
    say = print if main else (lambda *a, **k: None)
    started = time.perf_counter()

    seed_everything(recipe.seed)
    model, tokenizer, source = load(recipe.model, recipe.seed)
    data = build_datasets(recipe.data, tokenizer, recipe.seed)
    meta = model_meta(model, tokenizer, source)
    meta.probe = make_probe(tokenizer, data.validation_records or data.train_head)
    eos_ids = eos_token_ids(tokenizer, meta.base_eos)
    adapter = None
    if recipe.lora is not None:
        adapter = setup_lora(model, recipe, meta, source, dist_info)
    autocast = autocast_for(recipe, dist_info.device)
    model = apply_parallelism(model, recipe.parallel, dist_info, bf16=bf16_enabled(recipe, dist_info.device))
    model.train()

    plan = plan_batches(recipe, dist_info)
    total_steps = recipe.train.max_steps or max(1, math.ceil(recipe.train.epochs * len(data.train) / plan.global_batch))
    optimizer = build_optimizer(list(model.named_parameters()), recipe.optim, dist_info.device)
    scheduler = build_scheduler(optimizer, total_steps, recipe.optim)
    batches = StepBatches(data.train, plan, recipe.seed, tokenizer.pad_token_id)

    if main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(dump_recipe(recipe))
    resume_dir = broadcast_object(find_resume_dir(ckpt_root, recipe.train.resume) if main else None)
    start_step = 0
    if resume_dir is not None:
        info = load_checkpoint(resume_dir, model=model, optimizer=optimizer, dist_info=dist_info)
        scheduler.load_state_dict(info["scheduler"])
        batches.load_state_dict(info["data"])
        start_step = info["step"]
        say(f"resumed from {resume_dir} at step {start_step}")
    if main:
        truncate_metrics(out / "metrics.jsonl", start_step)

    n_params = sum(p.numel() for p in model.parameters())
    say(
        f"shipyard: {source.name} ({n_params / 1e6:.2f}M parameters) on {dist_info.device}"
        f" x{dist_info.world_size}; {len(data.train)} train / {len(data.validation)} validation samples"
        f" ({count_targets(data.train):,} supervised tokens); global batch {plan.global_batch}; {total_steps} steps"
    )
    if data.skipped.report()["total"] or data.truncated:
        say(f"data: skipped {data.skipped.report()}, truncated {data.truncated}")

    logger = MetricsLogger(out, total_steps, start_step, recipe.train.log_every, enabled=main)
    last_saved = resume_dir if start_step == total_steps else None
    train_seconds, train_tokens, last_loss = 0.0, 0, float("nan")
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        micro_batches = batches.next_step()
        metrics = train_step(model, micro_batches, optimizer, scheduler, recipe, dist_info, autocast)
        tokens = all_reduce_sum(sum(int(mb["attention_mask"].sum()) for mb in micro_batches), dist_info.device)
        elapsed = time.perf_counter() - t0
        train_seconds += elapsed
        train_tokens += tokens
        last_loss = metrics["train/loss"]
        metrics.update({"train/tokens": tokens, "train/tokens_per_second": tokens / elapsed, "train/epoch": batches.epoch})
        done = step + 1
        if recipe.train.eval_every and done % recipe.train.eval_every == 0 and data.validation:
            metrics["eval/loss"] = validation_loss(
                model, data.validation, recipe.eval.batch_size, tokenizer.pad_token_id, recipe.train.loss_chunk_size, dist_info, autocast
            )
        logger.log(done, metrics)
        every = recipe.checkpoint.every_steps
        if done == total_steps or (every and done % every == 0):
            last_saved = save_checkpoint(
                ckpt_root, done, model=model, optimizer=optimizer,
                trainer_state={"scheduler": scheduler.state_dict(), "data": batches.state_dict()},
                meta=meta, dist_info=dist_info, consolidate=recipe.checkpoint.consolidate == "every",
                keep_last=recipe.checkpoint.keep_last, adapter=adapter,
            )
    logger.close()

    summary_eval: dict = {}
    if data.validation:
        summary_eval["loss"] = validation_loss(
            model, data.validation, recipe.eval.batch_size, tokenizer.pad_token_id, recipe.train.loss_chunk_size, dist_info, autocast
        )
    if recipe.eval.generate and data.validation_records:
        with autocast():
            summary_eval.update(exact_match(model, tokenizer, data.validation_records, eos_ids, recipe.eval, dist_info))

    final_dir: Path | None = out / "final"
    if recipe.checkpoint.consolidate == "never" and dist_info.distributed and adapter is None:
        final_dir = None  # sharded only; `shipyard consolidate` makes the HF directory later
    else:
        export_checkpoint(last_saved, final_dir, force=True, dist_info=dist_info)
    summary = {
        "final_train_loss": last_loss,
        "eval": summary_eval,
        "tokens_per_second": train_tokens / train_seconds if train_seconds else 0.0,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "steps": total_steps,
        "resumed_from_step": start_step,
        "skipped_records": data.skipped.report(),
        "truncated_records": data.truncated,
        "final_checkpoint": str(final_dir) if final_dir else None,
        "last_step_checkpoint": str(last_saved),
    }
    if main:
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        plot_loss(out / "metrics.jsonl", out / "loss.png")
    return TrainResult(summary, model, tokenizer)

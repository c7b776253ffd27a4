"""`shipyard train`: one run of any task, top to bottom.

recipe -> the task's setup (models, data, runner; train/task.py) -> optimizer and schedule -> (resume) -> steps
-> checkpoints -> validation -> export of the final checkpoint -> the task's finish -> summary.

The loop holds no task or modality: SFT (train/sft.py) and the drafters (train/dflash.py, train/eagle3.py) are tasks,
and so is anything a test defines (tests/test_task.py).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shipyard.checkpoint.store import find_resume_dir, load_checkpoint, save_checkpoint
from shipyard.config import Recipe, dump_recipe
from shipyard.data.loader import BatchPlan, StepBatches
from shipyard.export.export import export_checkpoint
from shipyard.fsutil import write_text_atomic
from shipyard.parallel.dist import DistInfo, all_reduce_sum, broadcast_object, init_distributed
from shipyard.parallel.topology import Topology
from shipyard.train.dflash import DFlashTask
from shipyard.train.eagle3 import Eagle3Task
from shipyard.train.metrics import MetricsLogger, plot_loss, run_totals, truncate_metrics
from shipyard.train.optim import build_optimizer, build_scheduler
from shipyard.train.sft import SFTTask
from shipyard.train.step import train_step
from shipyard.train.task import Task

TASKS: dict[str, type[Task]] = {"sft": SFTTask, "dflash": DFlashTask, "eagle3": Eagle3Task}  # recipe.task -> its class


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def plan_batches(recipe: Recipe, topo: Topology) -> BatchPlan:
    t = recipe.train
    return BatchPlan(
        global_batch=t.micro_batch_size * t.grad_accum_steps * topo.dp_size,
        micro_batch_size=t.micro_batch_size,
        grad_accum_steps=t.grad_accum_steps,
        dp_rank=topo.dp_rank,
        dp_size=topo.dp_size,
    )


def start_or_resume(recipe: Recipe, model, optimizer, scheduler, batches, dist_info: DistInfo, model_fingerprint: dict,
                    total_steps: int, say) -> tuple[Path | None, int]:
    """Prepare the run directory and restore the newest checkpoint per train.resume; returns (its dir, its step)."""
    out, ckpt_root = recipe.out_dir, recipe.out_dir / "checkpoints"
    if dist_info.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(dump_recipe(recipe))
    resume_dir = broadcast_object(find_resume_dir(ckpt_root, recipe.train.resume) if dist_info.is_main else None)
    start_step = 0
    if resume_dir is not None:
        info = load_checkpoint(resume_dir, model=model, optimizer=optimizer, dist_info=dist_info,
                               expected_fingerprint=model_fingerprint)
        scheduler.load_state_dict(info["scheduler"])
        batches.load_state_dict(info["data"])
        start_step = info["step"]
        say(f"resumed from {resume_dir} at step {start_step}")
        if start_step >= total_steps:
            say(f"the run in {out} is already complete ({total_steps} steps): nothing left to train; evaluating and "
                "exporting its last checkpoint again (train.resume=never or another output_dir trains anew)")
    if dist_info.is_main:
        truncate_metrics(out / "metrics.jsonl", start_step)
    return resume_dir, start_step


def timed_step(runner, params, batches: StepBatches, optimizer, scheduler, recipe: Recipe, topo: Topology,
               dist_info: DistInfo) -> tuple[dict, int, float]:
    """One optimizer step on the next batches: its metrics, the tokens it trained on (all ranks), its seconds."""
    t0 = time.perf_counter()
    micro_batches = batches.next_step()
    metrics = train_step(runner, params, micro_batches, optimizer, scheduler, recipe.train.max_grad_norm, topo,
                         dist_info.device)
    tokens = all_reduce_sum(sum(int(mb["attention_mask"].sum()) for mb in micro_batches), dist_info.device,
                            group=topo.dp_group)
    return metrics, tokens, time.perf_counter() - t0


@dataclass
class TrainResult:
    summary: dict
    model: torch.nn.Module  # the trained model, still in memory (tests compare it with the exported files)
    tokenizer: object


def train(recipe: Recipe, task: Task | None = None) -> TrainResult:
    """Train `recipe` with `task` (default: the class `recipe.task` names)."""
    task = task or TASKS[recipe.task]()
    dist_info = init_distributed(recipe.train.device, need_group=recipe.parallel.fsdp is True)
    for first in task.prerequisites(recipe):  # by rank 0; the others wait for it
        if dist_info.is_main:
            train(first, TASKS[first.task]())
        broadcast_object(None)
    out = recipe.out_dir
    ckpt_root = out / "checkpoints"
    main = dist_info.is_main
    say = print if main else (lambda *a, **k: None)
    started = time.perf_counter()

    seed_everything(recipe.seed)
    run = task.setup(recipe, dist_info, say)
    model, topo = run.model, run.topo
    model.train()
    params = run.trainable
    plan = plan_batches(recipe, topo)
    total_steps = recipe.train.max_steps or max(1, math.ceil(recipe.train.epochs * len(run.data.train) / plan.global_batch))
    optimizer = build_optimizer(list(model.named_parameters()), recipe.optim, dist_info.device)
    scheduler = build_scheduler(optimizer, total_steps, recipe.optim)
    batches = StepBatches(run.data.train, plan, recipe.seed, run.tokenizer.pad_token_id, run.pack_length, run.encoder,
                          run.image_chunk_rows)

    resume_dir, start_step = start_or_resume(recipe, model, optimizer, scheduler, batches, dist_info, run.fingerprint,
                                             total_steps, say)
    say(task.headline(run, total_steps, plan.global_batch))
    for line in run.report:
        say(line)
    initial = task.before_training() if start_step == 0 else {}

    logger = MetricsLogger(out, total_steps, start_step, recipe.train.log_every, enabled=main)
    last_saved = resume_dir if start_step == total_steps else None
    train_seconds, train_tokens, last_loss = 0.0, 0, None
    for step in range(start_step, total_steps):
        metrics, tokens, elapsed = timed_step(run.runner, params, batches, optimizer, scheduler, recipe, topo, dist_info)
        train_seconds += elapsed
        train_tokens += tokens
        last_loss = metrics["train/loss"]
        metrics.update({"train/tokens": tokens, "train/tokens_per_second": tokens / elapsed, "train/epoch": batches.epoch})
        done = step + 1
        if recipe.train.eval_every and done % recipe.train.eval_every == 0 and run.data.validation:
            metrics.update(task.logged(task.evaluate()))
        logger.log(done, metrics)
        every = recipe.checkpoint.every_steps
        if done == total_steps:
            task.after_last_step()
        if done == total_steps or (every and done % every == 0):
            last_saved = save_checkpoint(
                ckpt_root, done, model=model, optimizer=optimizer,
                trainer_state={"scheduler": scheduler.state_dict(), "data": batches.state_dict()},
                meta=run.meta, dist_info=dist_info, consolidate=run.consolidate,
                keep_last=recipe.checkpoint.keep_last, adapter=run.adapter, model_fingerprint=run.fingerprint,
            )
    logger.close()
    if main:  # the whole run's figures, including steps trained before a resume
        last_loss, train_tokens, train_seconds = run_totals(out / "metrics.jsonl")

    summary_eval: dict = task.evaluate() if run.data.validation else {}
    summary_eval.update(initial)
    final_dir: Path | None = out / "final" if run.export else None  # else sharded only: `shipyard consolidate`
    if final_dir is not None:
        # A base with its own modelling code (model_type unknown to transformers, e.g. MiMo) needs it to read its config.
        export_checkpoint(last_saved, final_dir, force=True, trust_remote_code=recipe.model.trust_remote_code,
                          dist_info=dist_info)
    summary_eval.update(task.finish(final_dir, summary_eval, say))
    summary = {
        "task": task.name,
        "final_train_loss": last_loss,
        "eval": summary_eval,
        "tokens_per_second": train_tokens / train_seconds if train_seconds else 0.0,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "steps": total_steps,
        "resumed_from_step": start_step,
        **task.summary(),
        "final_checkpoint": str(final_dir) if final_dir else None,
        "last_step_checkpoint": str(last_saved),
    }
    if main:
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        plot_loss(out / "metrics.jsonl", out / "loss.png")
    return TrainResult(summary, model, run.tokenizer)

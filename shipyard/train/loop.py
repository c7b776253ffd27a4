"""`shipyard train`: one run, top to bottom.

recipe -> model + tokenizer -> tokenized data -> LoRA -> parallelism (pipeline stages, FSDP2) ->
optimizer -> (resume) -> steps -> checkpoints -> evaluation -> export of the final checkpoint -> summary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shipyard.checkpoint.base_weights import base_weights_for, fill
from shipyard.checkpoint.store import find_resume_dir, fingerprint, load_checkpoint, save_checkpoint
from shipyard.models.weights import DirectoryWeights
from shipyard.config import Recipe, dump_recipe
from shipyard.data.dataset import build_datasets, count_targets, describe_sources
from shipyard.errors import ShipyardError
from shipyard.data.loader import BatchPlan, StepBatches, eval_batches
from shipyard.export.export import export_checkpoint
from shipyard.data.chat import eos_token_ids
from shipyard.models.save import ModelMeta, WeightLayout
from shipyard.fsutil import write_text_atomic
from shipyard.data.images import media_encoder, pixel_limits
from shipyard.models.mtp_layout import existing_mtp_layers
from shipyard.models import mtp
from shipyard.models.load import load, load_processor
from shipyard.models.speechlm import is_speech_lm
from shipyard.models.vision import blank_image_inputs, freeze
from shipyard.parallel import pipeline
from shipyard.parallel.dist import (DistInfo, all_reduce_sum, broadcast_object, init_distributed, on_main,
                                    peak_host_memory_gib)
from shipyard.parallel.fsdp import apply_parallelism, use_fsdp
from shipyard.parallel.topology import Topology, build_topology
from shipyard.peft.setup import setup_lora
from shipyard.train.evaluate import exact_match
from shipyard.train.metrics import MetricsLogger, plot_loss, run_totals, truncate_metrics
from shipyard.train.optim import build_optimizer, build_scheduler
from shipyard.train.loss import isolates_packed_documents
from shipyard.train.step import LocalRunner, MTPObjective, supervised_tokens, train_step
from shipyard.verify.probe import add_reference, make_probe

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


def plan_batches(recipe: Recipe, topo: Topology) -> BatchPlan:
    t = recipe.train
    return BatchPlan(
        global_batch=t.micro_batch_size * t.grad_accum_steps * topo.dp_size,
        micro_batch_size=t.micro_batch_size,
        grad_accum_steps=t.grad_accum_steps,
        dp_rank=topo.dp_rank,
        dp_size=topo.dp_size,
    )


def build_runner(model, recipe: Recipe, topo: Topology, dist_info: DistInfo, pad_id: int, blank_image=None,
                 type_keys: tuple[str, ...] = (), weights: DirectoryWeights | None = None):
    """Split, shard and wrap the model; returns (the rank's model view for optimizer/checkpoints, runner).

    An empty model (`weights`: the files that fill it) is filled after it is split and sharded: each rank reads
    only its own part."""
    bf16 = bf16_enabled(recipe, dist_info.device)

    def place(part):
        part = apply_parallelism(part, recipe.parallel, topo, dist_info.device, bf16)
        if weights is not None:
            fill(part, dist_info.device, weights)
        return part

    if recipe.parallel.pp == 1:
        model = place(model)
        head = mtp.head_of(model)
        objective = MTPObjective(len(head.layers), recipe.model.mtp.loss_scale) if head is not None else None
        return model, LocalRunner(model, recipe.train.loss_chunk_size, autocast_for(recipe, dist_info.device),
                                  blank_image, objective)
    stage_layers = pipeline.validate(model, recipe.parallel)
    n_stages = len(stage_layers)
    stage_ids = list(range(topo.pp_rank, n_stages, topo.pp_size))  # interleaved: rank r runs r, r + pp, ...
    parts = [place(pipeline.build_stage(model, stage_layers[s], s == 0, s == n_stages - 1, blank_image))
             for s in stage_ids]
    # One module holding all of this rank's parts under their usual names, for the optimizer and checkpoints.
    mine = sorted(i for s in stage_ids for i in stage_layers[s])
    view = pipeline.build_stage(model, mine, 0 in stage_ids, n_stages - 1 in stage_ids, blank_image)
    runner = pipeline.PipelineRunner(parts, stage_ids, n_stages, topo, recipe.parallel, dist_info.device,
                                     recipe.train.loss_chunk_size, recipe.data.max_length,
                                     recipe.train.micro_batch_size, pad_id, type_keys)
    return view, runner


VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


def packing_length(model, recipe: Recipe, topo: Topology, say, is_vlm: bool = False) -> int | None:
    """Row length for packed micro-batches, or None to pad each micro-batch to its longest sample."""
    mode = recipe.data.packing
    if mode is False:
        return None
    if recipe.model.mtp is not None:
        if mode is True:
            raise ShipyardError("data.packing=true is not supported with model.mtp (MTP layers attend within one "
                                "sequence); use data.packing=false")
        return None
    if is_vlm:
        if mode is True:
            raise ShipyardError("data.packing=true is not supported for vision-language and speech models (image and "
                                "audio features are per sample); use data.packing=false")
        return None
    if topo.pp_size > 1:
        if mode is True:
            raise ShipyardError("data.packing=true is not supported with pipeline parallelism yet; use data.packing=false")
        return None
    # With sdpa/eager, packed rows need a dense block-diagonal mask, which can cost more than the padding it
    # saves (measured on the quickstart: 17.6k vs 19.6k tokens/s on CPU); varlen kernels need none.
    if mode == "auto" and model.config._attn_implementation not in VARLEN_ATTENTION:
        return None
    if not isolates_packed_documents(model, model.get_input_embeddings().num_embeddings):
        if mode is True:
            raise ShipyardError(
                f"data.packing=true, but {type(model).__name__} lets packed documents attend to each other "
                f"(attention implementation {model.config._attn_implementation!r} ignores position resets); "
                "use data.packing=false, or an attention implementation with packed-sequence support (sdpa, flash_attention_2)"
            )
        say(f"packing off: {type(model).__name__} does not keep packed documents apart")
        return None
    return recipe.data.max_length


def validation_metrics(runner, samples, batch_size: int, pad_id: int, topo: Topology, device, encoder=None,
                       image_chunk_rows: int | None = None) -> dict:
    """{"loss": ...} and, with an MTP head, each depth's loss and the offline acceptance per draft position."""
    batches = list(eval_batches(samples, batch_size, pad_id, topo.dp_rank, topo.dp_size, encoder, image_chunk_rows))
    count = all_reduce_sum(supervised_tokens(batches), device, group=topo.dp_group)
    total = all_reduce_sum(runner.eval_batches(batches, device).item(), device)
    out = {"loss": total / max(count, 1)}
    head = getattr(runner, "mtp", None)
    if head is not None:
        for k, summed in enumerate(head.depth_sums, start=1):
            out[f"loss_mtp_{k}"] = all_reduce_sum(summed, device) / max(
                all_reduce_sum(supervised_tokens(batches, ahead=k), device), 1)
        drafts = all_reduce_sum(head.drafts, device)
        per_position = [all_reduce_sum(a, device) / max(drafts, 1) for a in head.accepted]
        out.update({f"mtp_acceptance_{k}": v for k, v in enumerate(per_position, start=1)})
        out["mtp_mean_acceptance_length"] = 1 + sum(per_position)
    return out


def exact_match_of_export(final_dir: Path, recipe: Recipe, tokenizer, records, eos_ids, dist_info: DistInfo,
                          encoder=None) -> dict:
    """Exact match of a pipelined run, generated by rank 0 from the exported HF directory; the others wait.

    Pipeline stages cannot run `generate` (it needs the whole model per forward), and the export is
    the trained model whole. The in-memory tokenizer renders the prompts, as in unpipelined runs.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    def generate() -> dict:
        auto = AutoModelForImageTextToText if encoder is not None else AutoModelForCausalLM
        model = auto.from_pretrained(final_dir, trust_remote_code=recipe.model.trust_remote_code)
        model.to(dist_info.device)
        alone = DistInfo(device=dist_info.device)  # one process: no synced generation
        with autocast_for(recipe, dist_info.device)():
            return exact_match(model, tokenizer, records, eos_ids, recipe.eval, alone, encoder)

    return on_main(generate)


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


def attach_mtp(model, recipe: Recipe, source, is_vlm: bool, frozen: list[str]) -> str | None:
    """Attach (or load the base's own) MTP head per `model.mtp`; returns the start-up line about it."""
    cfg = recipe.model.mtp
    if cfg is None:
        found = existing_mtp_layers(source.local_dir, model.config) if source.local_dir else 0
        if found:
            model.config.num_nextn_predict_layers = 0  # the export will not carry the head: say so in config.json
        return (f"note: {source.name} has {found} MTP layer(s) this run does not train; the export will not carry "
                "them (set model.mtp: {} to train them)") if found else None
    if is_vlm:
        raise ShipyardError("model.mtp is for causal LMs; vision-language models are not supported yet")
    if recipe.lora is not None:
        raise ShipyardError("model.mtp with lora is not supported: the head trains in full; use "
                            "model.mtp.freeze_base=true to train only the head on a frozen base")
    if recipe.parallel.pp > 1:
        raise ShipyardError("model.mtp is not supported with pipeline parallelism (the head needs the last stage's "
                            "hidden states and the first stage's embedding); use parallel.pp=1 (FSDP2 shards it)")
    layers, how = mtp.attach(model, cfg.num_layers, source.local_dir, recipe.seed)
    if cfg.freeze_base:
        frozen += mtp.freeze_base(model)
    style = mtp.style_for(model.config)
    serving = (f"exported as {style.architecture} ({style.layout} layout)" if style.architecture
               else f"not servable by vLLM ({mtp.why_not_served(model.config)})")
    return (f"mtp: {layers} layer(s) {'loaded from the base' if how == 'loaded' else 'attached'}, "
            f"{sum(p.numel() for p in model.mtp.parameters()) / 1e6:.2f}M parameters, loss_scale {cfg.loss_scale}, "
            f"{'base frozen' if cfg.freeze_base else 'trained jointly with the base'}; {serving}")


def _acceptance_line(metrics: dict) -> str:
    per = [v for k, v in sorted(metrics.items()) if k.startswith("mtp_acceptance_")]
    return (f"per position {', '.join(f'{v:.3f}' for v in per)}; mean acceptance length "
            f"{metrics['mtp_mean_acceptance_length']:.3f} (offline, validation answers)")


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


def train(recipe: Recipe) -> TrainResult:
    dist_info = init_distributed(recipe.train.device, need_group=recipe.parallel.fsdp is True)
    out = recipe.out_dir
    ckpt_root = out / "checkpoints"
    main = dist_info.is_main
    say = print if main else (lambda *a, **k: None)
    started = time.perf_counter()

    seed_everything(recipe.seed)
    peak_host_memory_gib(dist_info, restart=True)  # host memory is reported per phase: loading, data
    # Built empty (on the meta device) where the base's files can fill it per rank after sharding; an MTP head is
    # built from the base's own layers, so those bases load whole.
    model, tokenizer, source = load(recipe.model, recipe.seed, recipe.data.chat_template_kwargs,
                                    empty=recipe.model.mtp is None)
    model, base_weights, loading = base_weights_for(model, recipe.model, source, recipe.seed)
    loading_peak = peak_host_memory_gib(dist_info, restart=True)
    meta = model_meta(model, tokenizer, source)
    meta.processor = processor = load_processor(recipe.model, source, tokenizer)
    encoder = media_encoder(processor, recipe.data)
    speech = is_speech_lm(model.config)
    if speech:
        encoder.ctc = model.config.ctc_loss_weight > 0
        if recipe.parallel.pp > 1:
            raise ShipyardError("parallel.pp > 1 is not supported for speech-LMs yet (the audio encoder would need a "
                                "stage of its own); use FSDP2 (parallel.pp=1)")
    vision = encoder is not None and not speech
    eos_ids = eos_token_ids(tokenizer, meta.base_eos)  # what serving stops on; every supervised turn ends with one
    data = build_datasets(recipe.data, tokenizer, recipe.seed, stop_ids=eos_ids, encoder=encoder)
    data_ready = (time.perf_counter() - started, peak_host_memory_gib(dist_info, restart=True))
    meta.probe = make_probe(tokenizer, data.validation_records, data.train_records, recipe.data.multi_turn, eos_ids,
                            encoder, held_out=recipe.model.mtp is not None)
    frozen = freeze(model, recipe.model.freeze) if recipe.model.freeze else []
    mtp_note = attach_mtp(model, recipe, source, vision, frozen)
    adapter = setup_lora(model, recipe, meta, source, dist_info) if recipe.lora is not None else None
    model_fingerprint = fingerprint(model)  # of the whole model, before it is split into pipeline stages
    n_params = sum(p.numel() for p in model.parameters())

    topo = build_topology(recipe.parallel, dist_info, use_fsdp(recipe.parallel, dist_info))
    blank = blank_image_inputs(processor) if vision else None
    model, runner = build_runner(model, recipe, topo, dist_info, tokenizer.pad_token_id, blank,
                                 tuple(encoder.type_keys) if encoder is not None else (), base_weights)
    loading_peak = [max(a, b) for a, b in zip(loading_peak, peak_host_memory_gib(dist_info))]
    pack_length = packing_length(model, recipe, topo, say, is_vlm=encoder is not None)
    # A pipeline's stage 0 takes each pipeline micro-batch's pixel inputs on its own (parallel/vlm_stages.py).
    image_chunk_rows = recipe.train.micro_batch_size // recipe.parallel.pp_microbatches \
        if encoder is not None and topo.pp_size > 1 else None
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    plan = plan_batches(recipe, topo)
    total_steps = recipe.train.max_steps or max(1, math.ceil(recipe.train.epochs * len(data.train) / plan.global_batch))
    optimizer = build_optimizer(list(model.named_parameters()), recipe.optim, dist_info.device)
    scheduler = build_scheduler(optimizer, total_steps, recipe.optim)
    batches = StepBatches(data.train, plan, recipe.seed, tokenizer.pad_token_id, pack_length, encoder, image_chunk_rows)

    resume_dir, start_step = start_or_resume(recipe, model, optimizer, scheduler, batches, dist_info, model_fingerprint,
                                             total_steps, say)

    layout = f"x{dist_info.world_size}" + (f" (pipeline {topo.pp_size} x data {topo.dp_size})" if topo.pp_size > 1 else "")
    say(
        f"shipyard: {source.name} ({n_params / 1e6:.2f}M parameters) on {dist_info.device} {layout}; "
        f"{len(data.train)} train / {len(data.validation)} validation samples "
        f"({count_targets(data.train):,} supervised tokens); global batch {plan.global_batch}; {total_steps} steps"
    )
    say(f"data: multi_turn={recipe.data.multi_turn}; assistant turns {data.turns_report()}; "
        f"validation: {data.validation_origin}"
        + (f"; chat_template_kwargs {recipe.data.chat_template_kwargs} (exported as the template's defaults)"
           if recipe.data.chat_template_kwargs else ""))
    say(describe_sources(data))
    say(f"data ready {data_ready[0]:.1f} s after start; peak host memory per rank while preparing it "
        f"{', '.join(f'{g:.2f}' for g in data_ready[1])} GiB")
    say(f"weights: {loading}; peak host memory per rank while loading "
        f"{', '.join(f'{g:.2f}' for g in loading_peak)} GiB")
    if speech:
        say(f"audio: {data.train.num_media()} clips in training samples at "
            f"{encoder.rate} Hz (resampled with soxr), up to {recipe.data.max_audio_seconds:g} s each; "
            f"CTC side loss weight {model.config.ctc_loss_weight}"
            + (f"; frozen: {len(frozen)} parameter tensors ({', '.join(recipe.model.freeze)})" if frozen else ""))
    elif encoder is not None:
        limits = pixel_limits(processor)
        say(f"images: {type(processor).__name__}, {data.train.num_media()} in training samples"
            + (f"; {limits[0]:,}..{limits[1]:,} pixels per image (data.min_pixels/max_pixels, exported)" if limits else "")
            + (f"; frozen: {len(frozen)} parameter tensors ({', '.join(recipe.model.freeze)})" if frozen else ""))
    elif frozen and recipe.model.freeze:
        say(f"frozen: {len(frozen)} parameter tensors ({', '.join(recipe.model.freeze)})")
    if data.skipped.report()["total"] or data.truncated:
        say(f"data: skipped {data.skipped.report()}, truncated {data.truncated}")

    if mtp_note:
        say(mtp_note)

    # A pipeline runs every batch in the training shape, so validation batches are micro-batch sized there.
    eval_rows = recipe.train.micro_batch_size if topo.pp_size > 1 else recipe.eval.batch_size

    def evaluate() -> dict:
        return validation_metrics(runner, data.validation, eval_rows, tokenizer.pad_token_id, topo, dist_info.device,
                                  encoder, image_chunk_rows)

    initial_mtp = None
    if mtp.head_of(model) is not None and data.validation and start_step == 0:
        initial_mtp = {k: v for k, v in evaluate().items() if "mtp" in k}  # the head as attached, before training
        say(f"mtp: acceptance before training {_acceptance_line(initial_mtp)}")

    logger = MetricsLogger(out, total_steps, start_step, recipe.train.log_every, enabled=main)
    last_saved = resume_dir if start_step == total_steps else None
    train_seconds, train_tokens, last_loss = 0.0, 0, None
    for step in range(start_step, total_steps):
        metrics, tokens, elapsed = timed_step(runner, params, batches, optimizer, scheduler, recipe, topo, dist_info)
        train_seconds += elapsed
        train_tokens += tokens
        last_loss = metrics["train/loss"]
        metrics.update({"train/tokens": tokens, "train/tokens_per_second": tokens / elapsed, "train/epoch": batches.epoch})
        done = step + 1
        if recipe.train.eval_every and done % recipe.train.eval_every == 0 and data.validation:
            metrics.update({f"eval/{k}": v for k, v in evaluate().items()})
        logger.log(done, metrics)
        every = recipe.checkpoint.every_steps
        if done == total_steps and dist_info.world_size == 1:
            with autocast_for(recipe, dist_info.device)():  # the function trained, as trained
                add_reference(meta.probe, model, tokenizer, "bfloat16" if bf16_enabled(recipe, dist_info.device) else "float32",
                              encoder)
        if done == total_steps or (every and done % every == 0):
            last_saved = save_checkpoint(
                ckpt_root, done, model=model, optimizer=optimizer,
                trainer_state={"scheduler": scheduler.state_dict(), "data": batches.state_dict()},
                meta=meta, dist_info=dist_info, consolidate=recipe.checkpoint.consolidate == "every",
                keep_last=recipe.checkpoint.keep_last, adapter=adapter, model_fingerprint=model_fingerprint,
            )
    logger.close()
    if main:  # the whole run's figures, including steps trained before a resume
        last_loss, train_tokens, train_seconds = run_totals(out / "metrics.jsonl")

    summary_eval: dict = {}
    if data.validation:
        summary_eval.update(evaluate())
        if initial_mtp is not None:
            summary_eval["mtp_before_training"] = initial_mtp
    generate = recipe.eval.generate and bool(data.validation_records)
    if generate and topo.pp_size == 1:
        with autocast_for(recipe, dist_info.device)():
            summary_eval.update(exact_match(model, tokenizer, data.validation_records, eos_ids, recipe.eval, dist_info,
                                            encoder))

    final_dir: Path | None = out / "final"
    if recipe.checkpoint.consolidate == "never" and dist_info.distributed and adapter is None:
        final_dir = None  # sharded only; `shipyard consolidate` makes the HF directory later
    else:
        # A base with its own modelling code (model_type unknown to transformers, e.g. MiMo) needs it to read its config.
        export_checkpoint(last_saved, final_dir, force=True, trust_remote_code=recipe.model.trust_remote_code,
                          dist_info=dist_info)
    if generate and topo.pp_size > 1:
        if final_dir is None:
            say("eval.generate is skipped: pipelined runs generate from the final export, and checkpoint.consolidate="
                "never writes none; run `shipyard consolidate`, then `shipyard verify`")
        else:
            summary_eval.update(exact_match_of_export(final_dir, recipe, tokenizer, data.validation_records, eos_ids,
                                                      dist_info, encoder))
    summary = {
        "final_train_loss": last_loss,
        "eval": summary_eval,
        "tokens_per_second": train_tokens / train_seconds if train_seconds else 0.0,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "steps": total_steps,
        "resumed_from_step": start_step,
        "skipped_records": data.skipped.report(),
        "multi_turn": recipe.data.multi_turn,
        "assistant_turns": data.turns_report(),
        "chat_template_kwargs": recipe.data.chat_template_kwargs,
        "truncated_records": data.truncated,
        "final_checkpoint": str(final_dir) if final_dir else None,
        "last_step_checkpoint": str(last_saved),
    }
    if main:
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        plot_loss(out / "metrics.jsonl", out / "loss.png")
    return TrainResult(summary, model, tokenizer)

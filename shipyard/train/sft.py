"""The SFT task: supervised fine-tuning of a causal LM, a vision-language or a speech-language model.

recipe -> model (built empty when its files can fill it per rank) + tokenizer -> tokenized data -> freezing, an
MTP head, LoRA -> pipeline stages / FSDP2 (models/, peft/ and parallel/ apply each in one place) -> the runner:
`LocalRunner` (the whole model, with or without an MTP objective) or `PipelineRunner` (stages and a schedule).
Validation: loss (and each MTP depth's loss and offline acceptance); at the end exact match of generated answers.
Modalities are the media encoder's business (data/images.py, data/audio.py): this task only passes it along.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from shipyard.checkpoint.base_weights import base_weights_for, fill
from shipyard.checkpoint.store import fingerprint
from shipyard.models.weights import DirectoryWeights
from shipyard.config import Recipe
from shipyard.data.chat import eos_token_ids
from shipyard.data.dataset import build_datasets, count_targets, describe_sources
from shipyard.data.images import media_encoder
from shipyard.data.loader import eval_batches, supervised_tokens
from shipyard.errors import ShipyardError
from shipyard.models.save import ModelMeta, WeightLayout
from shipyard.models.mtp_layout import existing_mtp_layers
from shipyard.models import mtp
from shipyard.models.load import auto_model_class, load, load_processor
from shipyard.models.vision import freeze
from shipyard.parallel import pipeline
from shipyard.parallel.dist import DistInfo, all_reduce_sum, on_main, peak_host_memory_gib
from shipyard.parallel.fsdp import apply_parallelism, use_fsdp
from shipyard.parallel.topology import Topology, build_topology
from shipyard.peft.setup import setup_lora
from shipyard.speculative.acceptance import acceptance_per_position, mean_acceptance_length
from shipyard.train.evaluate import exact_match
from shipyard.train.loss import isolates_packed_documents
from shipyard.train.precision import autocast_for, bf16_enabled
from shipyard.train.step import LocalRunner, MTPObjective
from shipyard.train.task import Setup, Task
from shipyard.export.probe import add_reference, make_probe

log = logging.getLogger(__name__)


class SFTTask(Task):
    name = "sft"

    def setup(self, recipe: Recipe, dist_info: DistInfo, say) -> Setup:
        self.recipe, self.dist_info = recipe, dist_info
        started = time.perf_counter()
        peak_host_memory_gib(dist_info, restart=True)  # host memory is reported per phase: loading, data
        # Built empty (on the meta device) where the base's files can fill it per rank after sharding; an MTP head
        # is built from the base's own layers, so those bases load whole.
        model, tokenizer, source = load(recipe.model, recipe.seed, recipe.data.chat_template_kwargs,
                                        empty=recipe.model.mtp is None)
        model, base_weights, loading = base_weights_for(model, recipe.model, source, recipe.seed)
        loading_peak = peak_host_memory_gib(dist_info, restart=True)
        meta = model_meta(model, tokenizer, source)
        meta.processor = processor = load_processor(recipe.model, source, tokenizer)
        encoder = media_encoder(processor, recipe.data)
        if encoder is not None:
            encoder.configure(model.config, recipe.parallel)  # the modality's own settings and limits
        eos_ids = eos_token_ids(tokenizer, meta.base_eos)  # what serving stops on; every supervised turn ends with one
        data = build_datasets(recipe.data, tokenizer, recipe.seed, stop_ids=eos_ids, encoder=encoder)
        data_ready, data_peak = time.perf_counter() - started, peak_host_memory_gib(dist_info, restart=True)
        meta.probe = make_probe(tokenizer, data.validation_records, data.train_records, recipe.data.multi_turn,
                                eos_ids, encoder, held_out=recipe.model.mtp is not None)
        frozen = freeze(model, recipe.model.freeze) if recipe.model.freeze else []
        mtp_note = attach_mtp(model, recipe, source, frozen)
        adapter = setup_lora(model, recipe, meta, source, dist_info) if recipe.lora is not None else None
        model_fingerprint = fingerprint(model)  # of the whole model, before it is split into pipeline stages
        self.n_params = sum(p.numel() for p in model.parameters())

        topo = build_topology(recipe.parallel, dist_info, use_fsdp(recipe.parallel, dist_info))
        blank = encoder.blank_inputs() if encoder is not None else None
        model, runner = build_runner(model, recipe, topo, dist_info, tokenizer.pad_token_id, blank,
                                     tuple(encoder.type_keys) if encoder is not None else (), base_weights)
        loading_peak = [max(a, b) for a, b in zip(loading_peak, peak_host_memory_gib(dist_info))]
        pack_length = packing_length(model, recipe, topo, say, is_vlm=encoder is not None)
        # A pipeline's stage 0 takes each pipeline micro-batch's pixel inputs on its own (parallel/vlm_stages.py).
        image_chunk_rows = recipe.train.micro_batch_size // recipe.parallel.pp_microbatches \
            if encoder is not None and topo.pp_size > 1 else None
        self.model, self.runner, self.tokenizer, self.data, self.topo = model, runner, tokenizer, data, topo
        self.encoder, self.eos_ids, self.meta, self.image_chunk_rows = encoder, eos_ids, meta, image_chunk_rows
        self.source = source

        report = [
            f"data: multi_turn={recipe.data.multi_turn}; assistant turns {data.turns_report()}; "
            f"validation: {data.validation_origin}"
            + (f"; chat_template_kwargs {recipe.data.chat_template_kwargs} (exported as the template's defaults)"
               if recipe.data.chat_template_kwargs else ""),
            describe_sources(data),
            f"data ready {data_ready:.1f} s after start; peak host memory per rank while preparing it "
            f"{', '.join(f'{g:.2f}' for g in data_peak)} GiB",
            f"weights: {loading}; peak host memory per rank while loading "
            f"{', '.join(f'{g:.2f}' for g in loading_peak)} GiB",
        ]
        if encoder is not None:
            report.append(encoder.describe(data.train.num_media()))
        if frozen and recipe.model.freeze:
            report.append(f"frozen: {len(frozen)} parameter tensors ({', '.join(recipe.model.freeze)})")
        if data.skipped.report()["total"] or data.truncated:
            report.append(f"data: skipped {data.skipped.report()}, truncated {data.truncated}")
        if mtp_note:
            report.append(mtp_note)
        consolidate_never = recipe.checkpoint.consolidate == "never" and dist_info.distributed and adapter is None
        return Setup(model=model, runner=runner, tokenizer=tokenizer, data=data, meta=meta,
                     fingerprint=model_fingerprint, topo=topo, encoder=encoder, pack_length=pack_length,
                     image_chunk_rows=image_chunk_rows, adapter=adapter,
                     consolidate=recipe.checkpoint.consolidate == "every", export=not consolidate_never,
                     report=report)

    def headline(self, setup: Setup, total_steps: int, global_batch: int) -> str:
        topo, info = self.topo, self.dist_info
        layout = f"x{info.world_size}" + (f" (pipeline {topo.pp_size} x data {topo.dp_size})" if topo.pp_size > 1 else "")
        return (f"shipyard: {self.source.name} ({self.n_params / 1e6:.2f}M parameters) on {info.device} {layout}; "
                f"{len(self.data.train)} train / {len(self.data.validation)} validation samples "
                f"({count_targets(self.data.train):,} supervised tokens); global batch {global_batch}; "
                f"{total_steps} steps")

    def evaluate(self) -> dict:
        # A pipeline runs every batch in the training shape, so validation batches are micro-batch sized there.
        rows = self.recipe.train.micro_batch_size if self.topo.pp_size > 1 else self.recipe.eval.batch_size
        return validation_metrics(self.runner, self.data.validation, rows, self.tokenizer.pad_token_id, self.topo,
                                  self.dist_info.device, self.encoder, self.image_chunk_rows)

    def before_training(self) -> dict:
        if mtp.head_of(self.model) is None or not self.data.validation:
            return {}
        initial = {k: v for k, v in self.evaluate().items() if "mtp" in k}  # the head as attached
        print_main = print if self.dist_info.is_main else (lambda *a: None)
        print_main(f"mtp: acceptance before training {_acceptance_line(initial)}")
        return {"mtp_before_training": initial}

    def after_last_step(self) -> None:
        if self.dist_info.world_size == 1:  # the function trained, as trained: the probe's reference answers
            recipe, device = self.recipe, self.dist_info.device
            with autocast_for(recipe, device)():
                add_reference(self.meta.probe, self.model, self.tokenizer,
                              "bfloat16" if bf16_enabled(recipe, device) else "float32", self.encoder)

    def finish(self, final_dir: Path | None, figures: dict, say) -> dict:
        recipe, records = self.recipe, self.data.validation_records
        if not (recipe.eval.generate and records):
            return {}
        if self.topo.pp_size == 1:
            with autocast_for(recipe, self.dist_info.device)():
                return exact_match(self.model, self.tokenizer, records, self.eos_ids, recipe.eval, self.dist_info,
                                   self.encoder)
        if final_dir is None:
            say("eval.generate is skipped: pipelined runs generate from the final export, and checkpoint.consolidate="
                "never writes none; run `shipyard consolidate`, then `shipyard verify`")
            return {}
        return exact_match_of_export(final_dir, recipe, self.tokenizer, records, self.eos_ids, self.dist_info,
                                     self.encoder)

    def summary(self) -> dict:
        return {
            "skipped_records": self.data.skipped.report(),
            "multi_turn": self.recipe.data.multi_turn,
            "assistant_turns": self.data.turns_report(),
            "chat_template_kwargs": self.recipe.data.chat_template_kwargs,
            "truncated_records": self.data.truncated,
        }


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
        accepted = [all_reduce_sum(a, device) for a in head.accepted]
        per_position = acceptance_per_position(accepted, drafts)
        out.update({f"mtp_acceptance_{k}": v for k, v in enumerate(per_position, start=1)})
        out["mtp_mean_acceptance_length"] = mean_acceptance_length(accepted, drafts)
    return out


def exact_match_of_export(final_dir: Path, recipe: Recipe, tokenizer, records, eos_ids, dist_info: DistInfo,
                          encoder=None) -> dict:
    """Exact match of a pipelined run, generated by rank 0 from the exported HF directory; the others wait.

    Pipeline stages cannot run `generate` (it needs the whole model per forward), and the export is
    the trained model whole. The in-memory tokenizer renders the prompts, as in unpipelined runs.
    """
    from transformers import AutoConfig

    def generate() -> dict:
        auto = auto_model_class(AutoConfig.from_pretrained(final_dir, trust_remote_code=recipe.model.trust_remote_code))
        model = auto.from_pretrained(final_dir, trust_remote_code=recipe.model.trust_remote_code)
        model.to(dist_info.device)
        alone = DistInfo(device=dist_info.device)  # one process: no synced generation
        with autocast_for(recipe, dist_info.device)():
            return exact_match(model, tokenizer, records, eos_ids, recipe.eval, alone, encoder)

    return on_main(generate)


def attach_mtp(model, recipe: Recipe, source, frozen: list[str]) -> str | None:
    """Attach (or load the base's own) MTP head per `model.mtp`; returns the start-up line about it."""
    cfg = recipe.model.mtp
    if cfg is None:
        found = existing_mtp_layers(source.local_dir, model.config) if source.local_dir else 0
        if found:
            model.config.num_nextn_predict_layers = 0  # the export will not carry the head: say so in config.json
        return (f"note: {source.name} has {found} MTP layer(s) this run does not train; the export will not carry "
                "them (set model.mtp: {} to train them)") if found else None
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



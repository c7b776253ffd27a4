"""Pipeline parallelism for unmodified Hugging Face decoder models (torch.distributed.pipelining).

A stage is the model with the other stages' parts removed: its decoder layers
live in a ModuleDict keyed by their original indices, so parameter names (and
checkpoint keys, and HF safetensors keys) are exactly the unpipelined ones.
Stage 0 owns the embeddings; the last stage owns the final norm, the LM head
and the loss. Tied input/output embeddings are held by both (Megatron's
embedding group): the two copies start equal, their gradients are summed
after backward, so they take identical optimizer steps and stay one tensor.
Forwards are patched per instance, not forked: the inner model
takes token ids on stage 0 and hidden states elsewhere, and builds its causal
mask and rotary embeddings once per stage when no padding mask is supplied
(a padding mask can change every micro-batch, so then they are rebuilt).
A model whose own forward is already pipeline-aware sets `_pp_keeps_forward`.
"""

from __future__ import annotations

import inspect
import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from shipyard.config import ParallelConfig
from shipyard.data.chat import IGNORE_INDEX
from shipyard.data.loader import supervised_tokens
from shipyard.errors import ShipyardError
from shipyard.models.logits import chunked_cross_entropy, logit_transform
from shipyard.models.structure import clean_name, decoder_layers, shallow_copy, tied_aliases
from shipyard.models.vision import vision_tower
from shipyard.parallel.topology import Topology
from shipyard.parallel.vlm_stages import build_vlm_stage, multimodal_positions, validate_vlm

ALTERNATIVES = "use data parallelism instead (parallel.pp=1 with FSDP2, activation checkpointing to save memory)"


def virtual_stages(cfg: ParallelConfig) -> int:
    return 2 if cfg.pp_schedule == "interleaved_1f1b" else 1


def keeps_own_forward(model: nn.Module) -> bool:
    return bool(getattr(model, "_pp_keeps_forward", False))


def validate(model: nn.Module, cfg: ParallelConfig) -> list[list[int]]:
    """Check `model` can be pipelined as configured; returns the layer indices of each stage."""
    name = type(model).__name__
    try:
        layers = decoder_layers(model)
    except ShipyardError:
        raise ShipyardError(f"{name} cannot be pipelined: no recognisable decoder layer list; {ALTERNATIVES}") from None
    if not keeps_own_forward(model):
        inner = model.get_decoder()
        missing = [a for a in ("embed_tokens", "norm", "rotary_emb") if getattr(inner, a, None) is None]
        if missing or model.get_output_embeddings() is None:
            raise ShipyardError(
                f"{name} cannot be pipelined with the generic stage forward: its decoder lacks "
                f"{', '.join(missing) or 'an LM head'}; {ALTERNATIVES}, or give the model a pipeline-aware "
                "forward and set `_pp_keeps_forward = True` on it"
            )
    n_stages = cfg.pp * virtual_stages(cfg)
    n_layers = len(layers)
    if n_stages > n_layers:
        raise ShipyardError(
            f"{name} has {n_layers} decoder layers, fewer than the {n_stages} pipeline stages asked for "
            f"(parallel.pp={cfg.pp}, schedule {cfg.pp_schedule}); use at most {n_layers} stages or {ALTERNATIVES}"
        )
    other_ties = _ties_besides_embeddings(model)
    if other_ties:
        pairs = ", ".join(f"{a} = {src}" for a, src in other_ties.items())
        raise ShipyardError(
            f"{name} ties weights other than its input and output embeddings ({pairs}); only that tie is kept "
            f"in sync across pipeline stages. Untie them or {ALTERNATIVES}"
        )
    stages = stage_layer_ids(n_layers, n_stages, cfg.pp_split)
    if vision_tower(model) is not None:  # a vision-language model: its own stages (parallel/vlm_stages.py)
        if ties_embeddings(model):
            raise ShipyardError(f"{name} ties its input and output embeddings; pipelining a vision-language model "
                                f"with tied embeddings is not supported yet: {ALTERNATIVES}")
        validate_vlm(model, len(stages[0]))
    return stages


def ties_embeddings(model: nn.Module) -> bool:
    """Whether the LM head is the input embedding's very Parameter (tie_word_embeddings, as loaded)."""
    try:
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # a stage without them
        return False
    return head is not None and embed is not None and head.weight is embed.weight


def _ties_besides_embeddings(model: nn.Module) -> dict[str, str]:
    """{alias: canonical} of shared parameters other than the input/output embedding tie."""
    aliases = tied_aliases(model)
    if not ties_embeddings(model):
        return aliases
    embedding = model.get_input_embeddings().weight
    names = {clean_name(n) for n, p in model.named_parameters(remove_duplicate=False) if p is embedding}
    return {alias: source for alias, source in aliases.items() if source not in names}


def stage_layer_ids(n_layers: int, n_stages: int, split: list[int] | None) -> list[list[int]]:
    if split is None:
        base, extra = divmod(n_layers, n_stages)
        bounds = [0]
        for s in range(n_stages):
            bounds.append(bounds[-1] + base + (1 if s < extra else 0))
    else:
        bounds = [0, *split, n_layers]
        if len(split) != n_stages - 1 or any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise ShipyardError(
                f"parallel.pp_split {split}: give the first layer of stages 1..{n_stages - 1}, increasing, within "
                f"1..{n_layers - 1} (e.g. {[round(n_layers * k / n_stages) for k in range(1, n_stages)]})"
            )
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


# ------------------------------------------------------------------ stage modules


def build_stage(model: nn.Module, layer_ids: list[int], first: bool, last: bool, blank_image: dict | None = None
                ) -> nn.Module:
    """A stage: a shallow copy of `model` holding only its parts; submodules are shared, not copied.

    With tied embeddings the first and last stages keep both the embedding and the LM head module:
    they hold one Parameter, and keeping both names makes the stage's state dict (and checkpoint keys,
    and tied aliases) exactly those of the whole model, so the weight is saved once, as HF expects.
    A vision-language model's stages are built in parallel/vlm_stages.py (vision on stage 0).
    """
    if vision_tower(model) is not None:  # a vision-language model: its own stages (parallel/vlm_stages.py)
        return build_vlm_stage(model, layer_ids, first, last, blank_image)
    stage = shallow_copy(model)
    inner = shallow_copy(model.get_decoder())
    layers = decoder_layers(model)
    inner.layers = nn.ModuleDict({str(i): layers[i] for i in layer_ids})
    holds_tied = ties_embeddings(model) and (first or last)
    if not first and not holds_tied:
        inner.embed_tokens = None
    if not last:
        inner.norm = None
        if not holds_tied:
            stage.lm_head = None
    stage.model = inner
    if not keeps_own_forward(model):
        inner._pp_first = first  # not `embed_tokens is not None`: a tied last stage holds it too
        inner._pp_mask_cache = {}
        inner._pp_mask_builds = 0
        inner.forward = types.MethodType(_inner_stage_forward, inner)
        stage.forward = types.MethodType(_causal_lm_stage_forward, stage)
    return stage


def _causal_lm_stage_forward(self, x, attention_mask=None, position_ids=None):
    """Token ids (stage 0) or hidden states in; hidden states out (after the final norm on the last stage)."""
    return self.model(x, attention_mask=attention_mask, position_ids=position_ids)


def _inner_stage_forward(self, x, attention_mask=None, position_ids=None):
    hidden = self.embed_tokens(x) if self._pp_first else x
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # nothing is padded: the mask is the plain causal one, cacheable
    masks, position_ids, rotary = _masks_and_rotary(self, hidden, attention_mask, position_ids)
    for index, layer in self.layers.items():
        layer_type = self.config.layer_types[int(index)] if hasattr(self.config, "layer_types") else "full_attention"
        hidden = layer(
            hidden,
            attention_mask=masks[layer_type],
            position_ids=position_ids,
            position_embeddings=rotary[layer_type] if isinstance(rotary, dict) else rotary,
        )
    return self.norm(hidden) if self.norm is not None else hidden


def _rotary(inner, hidden, position_ids):
    """The rotary embeddings: one pair, or one per layer type where local and global layers rotate differently
    (Gemma 3, OLMo 3: the rotary module then takes the layer type, as their own forward passes it)."""
    if "layer_type" not in inspect.signature(inner.rotary_emb.forward).parameters:
        return inner.rotary_emb(hidden, position_ids)
    return {t: inner.rotary_emb(hidden, position_ids, t) for t in set(inner.config.layer_types)}


def _masks_and_rotary(inner, hidden, attention_mask, position_ids):
    """The stage's causal mask mapping and rotary embeddings, built once per stage when safe to reuse.

    Without a padding mask and with default positions they depend only on (rows, length, dtype, device):
    constant across micro-batches and steps, so non-first stages do not rebuild them for every
    micro-batch. With a padding mask (it can differ per batch) or explicit positions (packing)
    they are rebuilt for each call.
    """
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    cacheable = attention_mask is None and position_ids is None
    key = (*hidden.shape[:2], hidden.dtype, hidden.device)
    if cacheable and key in inner._pp_mask_cache:
        return inner._pp_mask_cache[key]
    if position_ids is None:
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    kwargs = dict(config=inner.config, inputs_embeds=hidden, attention_mask=attention_mask,
                  past_key_values=None, position_ids=position_ids)
    masks = {"full_attention": create_causal_mask(**kwargs)}
    if "sliding_attention" in getattr(inner.config, "layer_types", []) or []:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    inner._pp_mask_builds += 1
    result = (masks, position_ids, _rotary(inner, hidden, position_ids))
    if cacheable:
        inner._pp_mask_cache[key] = result
    return result


# ----------------------------------------------------------------------- running


class PipelineRunner:
    """This rank's stages and schedule; runs training and evaluation micro-batches through them.

    Every batch goes through in the training shape, `rows` x `seq_len`: stages infer the activation
    shapes they exchange on the first step and keep them, so evaluation batches are filled up to it.
    """

    def __init__(self, parts: list[nn.Module], stage_ids: list[int], n_stages: int, topo: Topology,
                 cfg: ParallelConfig, device: torch.device, chunk_size: int, seq_len: int, rows: int, pad_id: int,
                 type_keys: tuple[str, ...] = ()):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        self.parts, self.topo, self.chunk_size, self.seq_len, self.pad_id = parts, topo, chunk_size, seq_len, pad_id
        self.rows, self.n_micro = rows, cfg.pp_microbatches
        self.type_keys = type_keys  # image-position ids of a vision-language model's batches
        if rows % self.n_micro:
            raise ShipyardError(
                f"train.micro_batch_size ({rows}) must be a multiple of parallel.pp_microbatches ({self.n_micro})"
            )
        self.scale = 1.0
        self.loss_sum = torch.zeros((), device=device)
        self.has_last = any(s == n_stages - 1 for s in stage_ids)
        self.has_first = 0 in stage_ids
        self.stages = [
            PipelineStage(part, s, n_stages, device, group=topo.pp_group) for part, s in zip(parts, stage_ids)
        ]
        # (get_output_embeddings asks for the input embeddings too, which a VLM's last stage does not hold)
        head = next((getattr(p, "lm_head", None) or p.get_output_embeddings() for p, s in zip(parts, stage_ids)
                     if s == n_stages - 1), None)
        self._head = head
        self._transform = logit_transform(parts[-1].config.get_text_config())
        self._tied = next((p.get_input_embeddings().weight for p in parts if ties_embeddings(p)), None)
        # The gradient norm counts the tied weight once, on the first stage; the last stage's copy is the same.
        self.held_elsewhere = frozenset({id(self._tied)} if self._tied is not None and not self.has_first else ())
        kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}[cfg.pp_schedule]
        stages = self.stages if kind is ScheduleInterleaved1F1B else self.stages[0]
        # Losses are sums scaled by 1 / (global supervised tokens): no extra averaging over micro-batches.
        self.schedule = kind(stages, n_microbatches=self.n_micro, loss_fn=self._loss, scale_grads=False)

    def _loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        h, t = hidden[:, :-1][keep], targets[keep]
        scale, softcap = self._transform
        summed = chunked_cross_entropy(h, self._head.weight, t, self.chunk_size, self._head.bias, scale, softcap)
        return summed * self.scale

    def _pad(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`batch` in the training shape: padded to `seq_len`, and filler rows (attending normally,
        supervising nothing) up to `rows`."""
        rows, length = batch["input_ids"].shape
        if length > self.seq_len:
            raise ShipyardError(f"a batch is longer ({length}) than data.max_length ({self.seq_len})")
        if rows > self.rows:
            raise ShipyardError(f"a batch has {rows} rows, more than train.micro_batch_size ({self.rows})")
        fill = self.rows - rows
        pad = (0, self.seq_len - length, 0, fill)
        padded = {
            "input_ids": F.pad(batch["input_ids"], pad, value=self.pad_id),
            "labels": F.pad(batch["labels"], pad, value=IGNORE_INDEX),
            "attention_mask": F.pad(F.pad(batch["attention_mask"], (0, 0, 0, fill), value=1), (0, self.seq_len - length), value=0),
        }
        for key in self.type_keys:
            padded[key] = F.pad(batch[key], pad, value=0)
        if "image_chunks" in batch:  # filler rows come last and hold no images
            padded["image_chunks"] = batch["image_chunks"] + [{}] * (self.n_micro - len(batch["image_chunks"]))
        return padded

    def _image_kwargs(self, batch: dict, device) -> dict[str, torch.Tensor]:
        """A vision-language batch's extra stage inputs; its pixel inputs go to stage 0 by micro-batch index."""
        chunks = [{k: v.to(device) for k, v in c.items()} for c in batch.pop("image_chunks")]
        for part in self.parts:
            part._pp_images = chunks
        per_chunk = self.rows // self.n_micro
        kwargs = {"chunk_index": torch.arange(self.n_micro, device=device).repeat_interleave(per_chunk)}
        kwargs.update({key: batch[key] for key in self.type_keys})
        positions = multimodal_positions(self.parts[0], batch, chunks, per_chunk, next(iter(self.type_keys), None))
        if positions is not None:
            kwargs["position_ids"] = positions.transpose(0, 1)  # rows first: the schedule splits inputs by rows
        return kwargs

    def _run(self, batch: dict[str, torch.Tensor], device, train: bool) -> None:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self._pad(batch).items()}
        extra = self._image_kwargs(batch, device) if "image_chunks" in batch else {}
        args = (batch["input_ids"],) if self.has_first else ()
        run = self.schedule.step if train else self.schedule.eval
        # The schedule reports each micro-batch's loss; on the first step a stage also runs a shape-inference
        # forward whose values are meaningless, so the loss is read from here, not from inside the loss function.
        losses: list[torch.Tensor] = []
        run(*args, target=batch["labels"], losses=losses, attention_mask=batch["attention_mask"], **extra)
        if self.has_last:
            self.loss_sum += sum(loss.detach() for loss in losses) / self.scale

    def _sum_tied_grad(self) -> None:
        """Sum the tied embedding's gradient over the first and last stage of this replica.

        Each stage saw one use of the weight (the lookup on the first, the LM head on the last); their sum is
        the whole model's gradient, so both copies take the same optimizer step. Under FSDP both stages shard
        the weight alike, so the local shards add up element for element.
        """
        if self._tied is None or not self._tied.requires_grad:
            return
        if self._tied.grad is None:
            self._tied.grad = torch.zeros_like(self._tied)
        grad = self._tied.grad
        dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=self.topo.embed_group)

    def targets(self, micro_batches) -> int:  # the runner interface of train/step.py
        return supervised_tokens(micro_batches)

    def begin_step(self, micro_batches, topo: Topology, device) -> None:
        pass

    def step_metrics(self, metrics: dict, device) -> dict:
        return metrics

    def train_micro_batches(self, micro_batches, scale: float, device) -> torch.Tensor:
        """Forward and backward of this step's micro-batches; returns this rank's loss sum (0 off the last stage)."""
        self.scale = scale
        self.loss_sum = torch.zeros((), device=device)
        for mb in micro_batches:
            self._run(mb, device, train=True)
        self._sum_tied_grad()
        return self.loss_sum

    @torch.no_grad()
    def eval_batches(self, batches, device) -> torch.Tensor:
        """Summed token loss of `batches` (at most `rows` rows each); 0 off the last stage."""
        self.scale = 1.0
        self.loss_sum = torch.zeros((), device=device)
        for part in self.parts:
            part.eval()
        for batch in batches:
            self._run(batch, device, train=False)
        for part in self.parts:
            part.train()
        return self.loss_sum

    def mask_builds(self) -> list[int]:
        return [p.get_decoder()._pp_mask_builds for p in self.parts]

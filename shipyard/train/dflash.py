"""The DFlash task (`task: dflash`): a DFlash drafter for a frozen target.

target (frozen, loaded once, FSDP2-sharded on several ranks) + its tokenizer -> the chat data, tokenized as
for SFT -> the drafter (models/dflash.py) -> per step: the target's hidden states at the chosen layers (no
gradients), blocks anchored at answer positions, weighted block loss -> checkpoints (the drafter only; its
directory is in vLLM's DFlash format) -> validation: loss and the offline acceptance length tau -> export.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager

import torch

from shipyard.config import Recipe
from shipyard.data.dataset import count_targets
from shipyard.models import dflash
from shipyard.models.logits import chunked_cross_entropy
from shipyard.models.structure import hidden_states_entering
from shipyard.models.vision import vision_on_blank_image
from shipyard.parallel.dist import DistInfo
from shipyard.parallel.topology import Topology
from shipyard.speculative.acceptance import answer_spans, block_table, greedy_tokens, perfect_table, replay_drafts
from shipyard.train.drafter import Built, DrafterTask
from shipyard.train.precision import autocast_for
from shipyard.train.task import Setup


@contextmanager
def target_features(target: torch.nn.Module, layer_ids: list[int]):
    """Inside the block, `captured[i]` receives the hidden state leaving the target's decoder layer i (vLLM's
    DFlash target layer ids; models/structure.hidden_states_entering reads them where the next layer takes them)."""
    with hidden_states_entering(target, [i + 1 for i in layer_ids]) as entering:
        yield LayerOutputs(entering)


class LayerOutputs:
    """`captured[i]`: the output of layer i, i.e. what entered layer i + 1."""

    def __init__(self, entering: dict):
        self.entering = entering

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.entering[i + 1]


_NOT_INPUTS = ("labels", "attention_mask", "position_ids")


def drafter_positions(target: torch.nn.Module, batch: dict) -> torch.Tensor | None:
    """The positions vLLM gives a DFlash drafter: an M-RoPE target's temporal row (text after an image continues
    from the image's compressed positions), plain RoPE over them; None (0..S-1) for other targets."""
    base = getattr(target, "model", None)
    if "image_grid_thw" not in batch or not hasattr(base, "get_rope_index"):
        return None
    types = next((batch[k] for k in ("mm_token_type_ids", "token_type_ids") if k in batch),
                 torch.zeros_like(batch["input_ids"]))
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
    position_ids, _ = base.get_rope_index(batch["input_ids"], mm_token_type_ids=types,
                                          image_grid_thw=batch["image_grid_thw"], attention_mask=mask)
    return position_ids[0]


class DFlashRunner:
    """Turns micro-batches into drafter gradients; the target runs without gradients."""

    held_elsewhere: frozenset[int] = frozenset()

    def __init__(self, drafter, target, config, gamma: float, anchors: int, seed: int, chunk_size: int,
                 autocast=contextlib.nullcontext, blank_image: dict | None = None):
        self.drafter, self.target, self.config = drafter, target, config
        self.autocast = autocast  # bf16 autocast with train.mixed_precision (both models' forwards), else exact fp32
        # A vision-language target runs its vision tower on this blank image in micro-batches without images, so
        # every rank gathers the same FSDP2 units in the same order (models/vision.py); it adds exactly 0.
        self.blank_image = blank_image
        self.block, self.mask_id = config.block_size, config.dflash_config["mask_token_id"]
        self.layer_ids = config.dflash_config["target_layer_ids"]
        self.gamma, self.weights = gamma, dflash.slot_weights(self.block, gamma)
        self.anchors, self.seed, self.chunk_size = anchors, seed, chunk_size

    def _seed(self, batch) -> int:  # the same anchors on resume: derived from the batch itself
        return self.seed * 7919 + int(batch["input_ids"].sum())

    def begin_step(self, micro_batches, topo: Topology, device) -> None:  # the runner interface of train/step.py
        pass

    def step_metrics(self, metrics: dict, device) -> dict:
        return metrics

    def targets(self, micro_batches) -> float:
        """The step's normaliser: the summed slot weights of every trained block position."""
        return sum(dflash.weight_sum(b["labels"], b["input_ids"], self.anchors, self._seed(b), self.block, self.gamma)
                   for b in micro_batches)

    @torch.no_grad()
    def features(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's chosen layer outputs [R, S, K*H] and its final hidden states (for greedy tokens)."""
        inputs = {k: v for k, v in batch.items() if k not in _NOT_INPUTS}
        with target_features(self.target, self.layer_ids) as captured, \
                vision_on_blank_image(self.target, self.blank_image, active="pixel_values" not in batch):
            out = self.target(**inputs, attention_mask=batch["attention_mask"], use_cache=False,
                              output_hidden_states=True)
        return torch.cat([captured[i] for i in self.layer_ids], dim=-1), out.hidden_states[-1]

    def block_states(self, batch, features, rows, anchors) -> torch.Tensor:
        ids = dflash.block_inputs(batch["input_ids"], rows, anchors, self.block, self.mask_id)
        embeds = self.target.get_input_embeddings()(ids).detach()
        return self.drafter(features, embeds, anchors, rows, drafter_positions(self.target, batch))

    def loss(self, batch, rows, anchors, features) -> torch.Tensor:
        states = self.block_states(batch, features, rows, anchors)
        targets, valid = dflash.block_targets(batch["input_ids"], batch["labels"], rows, anchors, self.block)
        head = self.target.get_output_embeddings()
        weight = head.weight
        if torch.is_autocast_enabled(weight.device.type):
            # Autocast keeps the low-precision copy of trainable weights only: the frozen head (vocab x hidden) would
            # be cast again for every slot and chunk, and again in each chunk's recompute. Cast once.
            weight = weight.to(torch.get_autocast_dtype(weight.device.type))
        # Zero times the states keeps the loss on the drafter's graph when no position is trained (a micro-batch
        # whose answers were all cut): backward then runs, with zero gradients, and sharded ranks stay in step.
        total = states.float().sum() * 0.0
        for k in range(1, self.block):  # one weight per slot: chunked CE per slot, weighted
            keep = valid[:, k]
            if keep.any():
                total = total + self.weights[k] * chunked_cross_entropy(
                    states[keep, k], weight, targets[keep, k], self.chunk_size, head.bias)
        return total

    def train_micro_batches(self, micro_batches, scale: float, device) -> torch.Tensor:
        loss_sum = torch.zeros((), device=device)
        for mb in micro_batches:
            mb = {k: v.to(device) for k, v in mb.items()}
            rows, anchors = dflash.choose_anchors(mb["labels"], self.anchors, self._seed(mb))
            with self.autocast():
                features, _ = self.features(mb)
                summed = self.loss(mb, rows, anchors, features)
            (summed * scale).backward()
            loss_sum += summed.detach()
        return loss_sum

    @torch.no_grad()
    def evaluate(self, batches, device) -> dict:
        """Weighted block loss, and tau replayed over the answers with the target's greedy tokens as correct."""
        self.drafter.eval()
        loss, weight, drafts, ceiling_drafts = 0.0, 0.0, 0, 0
        accepted, ceiling_accepted = [0] * (self.block - 1), [0] * (self.block - 1)
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with self.autocast():
                features, final = self.features(batch)
            rows, anchors = dflash.choose_anchors(batch["labels"], 10**9, 0)  # every answer position
            if len(anchors) == 0:
                continue
            with self.autocast():
                states = self.block_states(batch, features, rows, anchors).float()
            final = final.float()  # the replay below compares greedy tokens in fp32, whatever the forward ran in
            targets, valid = dflash.block_targets(batch["input_ids"], batch["labels"], rows, anchors, self.block)
            head = self.target.get_output_embeddings()
            for k in range(1, self.block):
                keep = valid[:, k]
                if keep.any():
                    loss += float(self.weights[k] * chunked_cross_entropy(states[keep, k], head.weight,
                                                                          targets[keep, k], 4096, head.bias))
            weight += float((valid * self.weights.to(valid.device)).sum())
            drafted = greedy_tokens(self.target, states)  # [N, B]: slot k's token for position anchor + k
            greedy = greedy_tokens(self.target, final).tolist()  # greedy[r][t]: the target's token for t + 1
            for r, labels in enumerate(batch["labels"].tolist()):
                mine = (rows == r).nonzero().squeeze(1)
                by_anchor = {int(anchors[i]): drafted[i].tolist() for i in mine}
                correct = [-1] + greedy[r]
                for start, end in answer_spans(labels):
                    table = block_table(by_anchor, self.block, len(labels))
                    drafts += replay_drafts(table, correct, start, end, accepted)
                    ceiling_drafts += replay_drafts(perfect_table(correct, self.block - 1, len(labels)), correct,
                                                    start, end, ceiling_accepted)
        self.drafter.train()
        return {"loss": loss, "weight": weight, "accepted": accepted, "drafts": drafts,
                "ceiling_accepted": ceiling_accepted, "ceiling_drafts": ceiling_drafts}


class DFlashTask(DrafterTask):
    """A DFlash drafter for a frozen target (`draft.target`): the drafter trains, the target only runs."""

    name = "dflash"

    def build(self, recipe: Recipe, target, tokenizer, data) -> Built:
        draft = recipe.draft
        text = target.config.get_text_config()
        layer_ids = draft.target_layer_ids or dflash.default_target_layer_ids(text.num_hidden_layers)
        dflash.check_layer_ids(layer_ids, text.num_hidden_layers)
        used = data.train.token_ids()
        mask_id = dflash.mask_token_id(tokenizer, target.get_input_embeddings().num_embeddings, draft.mask_token, used)
        config = dflash.drafter_config(target.config, draft.num_layers, draft.block_size, layer_ids, mask_id)
        drafter = dflash.DFlashDrafter(config)
        drafter.init_weights(recipe.seed)
        self.layer_ids, self.mask_id = layer_ids, mask_id
        return Built(drafter, config, dflash.ARCHITECTURE)

    def make_runner(self, drafter, target, config, recipe: Recipe, dist_info: DistInfo, blank_image):
        return DFlashRunner(drafter, target, config, recipe.draft.slot_decay, recipe.draft.anchors_per_sequence,
                            recipe.seed, recipe.train.loss_chunk_size, autocast_for(recipe, dist_info.device),
                            blank_image)

    def headline(self, setup: Setup, total_steps: int, global_batch: int) -> str:
        draft, data = self.recipe.draft, self.data
        n_params = sum(p.numel() for p in setup.model.parameters())
        return (f"shipyard dflash: drafter of {draft.num_layers} layer(s) ({n_params / 1e6:.2f}M parameters) for "
                f"{draft.target} ({sum(p.numel() for p in self.target.parameters()) / 1e6:.2f}M, frozen) on "
                f"{self.dist_info.device} x{self.dist_info.world_size} "
                f"({'bf16 autocast, fp32 weights' if self.bf16 else 'fp32'}); block size {draft.block_size}, target "
                f"layers {self.layer_ids}, mask token {self.tokenizer.convert_ids_to_tokens(self.mask_id)!r} "
                f"({self.mask_id}), gamma {draft.slot_decay:g}; {len(data.train)} train / {len(data.validation)} "
                f"validation samples ({count_targets(data.train):,} supervised tokens); {total_steps} steps")

"""The EAGLE-3 task (`task: eagle3`): an EAGLE-3 drafter for a frozen target.

target (frozen, FSDP2-sharded on several ranks; train/drafter.py) -> per step: the target's aux hidden states
before the final norm (hooks, models/structure.hidden_states_entering; no gradients) -> the drafter unrolled for
`draft.ttt_steps` training-time-test steps (models/eagle3.py), each predicting one token further on its own previous
output -> cross-entropy on answer tokens, summed over steps -> checkpoints (the drafter only, in vLLM's EAGLE-3
layout) -> validation: loss and the offline acceptance length tau (speculative/acceptance.py) -> export.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from shipyard.config import Recipe
from shipyard.data.dataset import count_targets
from shipyard.models import eagle3
from shipyard.models.logits import chunked_cross_entropy
from shipyard.models.structure import hidden_states_entering
from shipyard.models.vision import vision_on_blank_image
from shipyard.parallel.dist import DistInfo
from shipyard.parallel.topology import Topology
from shipyard.speculative.acceptance import answer_spans, greedy_tokens, perfect_table, replay_drafts
from shipyard.train.drafter import Built, DrafterTask
from shipyard.train.precision import autocast_for
from shipyard.train.task import Setup

_NOT_INPUTS = ("labels", "attention_mask", "position_ids")


@torch.no_grad()
def draft_tokens(drafter, target, input_ids: torch.Tensor, features: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """[R, S] target ids per step: step k's greedy draft from each position i (for the token at i + 2 + k), with
    the true tokens as the steps' inputs: where the earlier steps were accepted they are the drafted ones, so the
    acceptance replay counts what vLLM's drafting loop accepts."""
    embed = target.get_input_embeddings()
    embeds = [embed(ids) for ids in eagle3.step_inputs(input_ids, steps)]
    weight, bias = drafter.head(target)
    return [drafter.draft_to_target(F.linear(s.float(), weight.float(), None if bias is None else bias.float())
                                    .argmax(-1)) for s in drafter(features, embeds)[1]]


class Eagle3Runner:
    """Turns micro-batches into drafter gradients; the target runs without gradients."""

    held_elsewhere: frozenset[int] = frozenset()

    def __init__(self, drafter, target, config, steps: int, chunk_size: int, autocast=contextlib.nullcontext,
                 blank_image: dict | None = None):
        self.drafter, self.target, self.config, self.steps = drafter, target, config, steps
        self.autocast = autocast  # bf16 autocast with train.mixed_precision (both models' forwards), else exact fp32
        self.blank_image = blank_image  # a vision-language target's vision tower runs on it without images
        self.aux_ids, self.chunk_size = config.eagle_aux_hidden_state_layer_ids, chunk_size

    def begin_step(self, micro_batches, topo: Topology, device) -> None:  # the runner interface of train/step.py
        pass

    def step_metrics(self, metrics: dict, device) -> dict:
        return metrics

    def targets(self, micro_batches) -> float:
        """The step's normaliser: supervised (position, step) pairs."""
        return float(sum(eagle3.count_targets(b["labels"], self.steps) for b in micro_batches))

    @torch.no_grad()
    def features(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's aux hidden states [R, S, n_aux * H] and its final hidden states (for greedy tokens)."""
        inputs = {k: v for k, v in batch.items() if k not in _NOT_INPUTS}
        with hidden_states_entering(self.target, self.aux_ids) as captured, \
                vision_on_blank_image(self.target, self.blank_image, active="pixel_values" not in batch):
            out = self.target(**inputs, attention_mask=batch["attention_mask"], use_cache=False,
                              output_hidden_states=True)
        return torch.cat([captured[i] for i in self.aux_ids], dim=-1), out.hidden_states[-1]

    def normed_steps(self, input_ids: torch.Tensor, features: torch.Tensor) -> list[torch.Tensor]:
        embed = self.target.get_input_embeddings()
        embeds = [embed(ids).detach() for ids in eagle3.step_inputs(input_ids, self.steps)]
        return self.drafter(features, embeds)[1]

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = self.drafter.head(self.target)
        if torch.is_autocast_enabled(weight.device.type):  # cast the frozen head once, not per chunk (as DFlash)
            weight = weight.to(torch.get_autocast_dtype(weight.device.type))
        return weight, bias

    def loss(self, batch, features) -> torch.Tensor:
        states = self.normed_steps(batch["input_ids"], features)
        weight, bias = self.head()
        # Zero times the states keeps the loss on the drafter's graph when no position is trained.
        total = states[0].float().sum() * 0.0
        for state, (targets, valid) in zip(states, eagle3.step_targets(batch["input_ids"], batch["labels"],
                                                                       self.steps)):
            draft_targets = self.drafter.target_to_draft(targets)
            keep = valid & (draft_targets >= 0)
            if keep.any():
                total = total + chunked_cross_entropy(state[keep], weight, draft_targets[keep], self.chunk_size, bias)
        return total

    def train_micro_batches(self, micro_batches, scale: float, device) -> torch.Tensor:
        loss_sum = torch.zeros((), device=device)
        for mb in micro_batches:
            mb = {k: v.to(device) for k, v in mb.items()}
            with self.autocast():
                features, _ = self.features(mb)
                summed = self.loss(mb, features)
            (summed * scale).backward()
            loss_sum += summed.detach()
        return loss_sum

    @torch.no_grad()
    def evaluate(self, batches, device) -> dict:
        """Loss, and tau replayed over the answers with the target's greedy tokens as correct."""
        self.drafter.eval()
        loss, weight = 0.0, 0.0
        drafts, ceiling_drafts = 0, 0
        accepted, ceiling_accepted = [0] * self.steps, [0] * self.steps
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with self.autocast():
                features, final = self.features(batch)
                loss += float(self.loss(batch, features))
            weight += eagle3.count_targets(batch["labels"], self.steps)
            with self.autocast():
                drafted = [d.tolist() for d in draft_tokens(self.drafter, self.target, batch["input_ids"], features,
                                                            self.steps)]
            greedy = greedy_tokens(self.target, final.float()).tolist()  # greedy[r][t]: the target's token for t + 1
            for r, labels in enumerate(batch["labels"].tolist()):
                correct = [-1] + greedy[r]
                table = [d[r] for d in drafted]  # table[k][i]: step k's draft from position i (depth k + 1)
                for start, end in answer_spans(labels):
                    drafts += replay_drafts(table, correct, start, end, accepted)
                    ceiling_drafts += replay_drafts(perfect_table(correct, self.steps, len(labels)), correct,
                                                    start, end, ceiling_accepted)
        self.drafter.train()
        return {"loss": loss, "weight": weight, "accepted": accepted, "drafts": drafts,
                "ceiling_accepted": ceiling_accepted, "ceiling_drafts": ceiling_drafts}


class Eagle3Task(DrafterTask):
    """An EAGLE-3 drafter for a frozen target (`draft.target`), served by vLLM with `method: eagle3`."""

    name = "eagle3"

    def build(self, recipe: Recipe, target, tokenizer, data) -> Built:
        draft = recipe.draft
        text = target.config.get_text_config()
        aux_ids = draft.aux_layer_ids or eagle3.default_aux_layer_ids(text.num_hidden_layers)
        eagle3.check_aux_layer_ids(aux_ids, text.num_hidden_layers)
        draft_ids = None
        if draft.draft_vocab_size is not None:
            draft_ids = eagle3.draft_vocabulary(data.train.answer_token_counts(), draft.draft_vocab_size,
                                                text.vocab_size)
        config = eagle3.drafter_config(target.config, aux_ids, draft.draft_vocab_size)
        config.ttt_steps = draft.ttt_steps
        config.num_speculative_tokens = draft.speculative_tokens
        drafter = eagle3.Eagle3Drafter(config)
        drafter.init_weights(recipe.seed, target.get_output_embeddings().weight.detach(), draft_ids)
        self.aux_ids = aux_ids
        return Built(drafter, config, config.architectures[0])

    def make_runner(self, drafter, target, config, recipe: Recipe, dist_info: DistInfo, blank_image):
        return Eagle3Runner(drafter, target, config, recipe.draft.ttt_steps, recipe.train.loss_chunk_size,
                            autocast_for(recipe, dist_info.device), blank_image)

    def headline(self, setup: Setup, total_steps: int, global_batch: int) -> str:
        draft, data, config = self.recipe.draft, self.data, self.runner.config
        n_params = sum(p.numel() for p in setup.model.parameters() if p.requires_grad)
        vocab = (f"draft vocabulary {config.draft_vocab_size} of {config.vocab_size}"
                 if config.draft_vocab_size < config.vocab_size else "the target's vocabulary and LM head")
        return (f"shipyard eagle3: drafter ({n_params / 1e6:.2f}M trained parameters) for {draft.target} "
                f"({sum(p.numel() for p in self.target.parameters()) / 1e6:.2f}M, frozen) on "
                f"{self.dist_info.device} x{self.dist_info.world_size} "
                f"({'bf16 autocast, fp32 weights' if self.bf16 else 'fp32'}); aux layers {self.aux_ids} (pre-norm), "
                f"{draft.ttt_steps} training-time-test steps, {vocab}; {len(data.train)} train / "
                f"{len(data.validation)} validation samples ({count_targets(data.train):,} supervised tokens); "
                f"{total_steps} steps")

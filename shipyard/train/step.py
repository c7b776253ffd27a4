"""One optimizer step, the same for a plain model and for a pipeline stage.

A runner turns micro-batches into gradients and returns the summed token loss
it saw: `LocalRunner` runs forward and backward on the whole model,
`PipelineRunner` (parallel/pipeline.py) drives its stages through a schedule.
The step normalises by the supervised tokens of the whole global batch
(summed over the data-parallel group), so the gradient is the global per-token
mean whatever the split into micro-batches, pipeline micro-batches and ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from shipyard.data.chat import IGNORE_INDEX
from shipyard.parallel.dist import all_reduce_sum
from shipyard.parallel.topology import Topology
from shipyard.train.loss import causal_lm_loss


class LocalRunner:
    held_elsewhere: frozenset[int] = frozenset()  # ids of parameters whose gradient another pipeline stage counts

    def __init__(self, model: torch.nn.Module, chunk_size: int, autocast, blank_image: dict | None = None):
        self.model, self.chunk_size, self.autocast = model, chunk_size, autocast
        self.blank_image = blank_image  # vision-language models: run the vision tower in text-only batches

    def train_micro_batches(self, micro_batches, scale: float, device) -> torch.Tensor:
        loss_sum = torch.zeros((), device=device)
        for mb in micro_batches:
            mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
            with self.autocast():
                summed, _ = causal_lm_loss(self.model, mb, self.chunk_size, self.blank_image)
            (summed * scale).backward()
            loss_sum += summed.detach()
        return loss_sum

    @torch.no_grad()
    def eval_batches(self, batches, device) -> torch.Tensor:
        self.model.eval()
        loss_sum = torch.zeros((), device=device)
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with self.autocast():
                summed, _ = causal_lm_loss(self.model, batch, self.chunk_size, self.blank_image)
            loss_sum += summed
        self.model.train()
        return loss_sum


def supervised_tokens(batches) -> int:
    return sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)


def clip_grad_norm(parameters: list[torch.nn.Parameter], max_norm: float, pp_group=None,
                   held_elsewhere: frozenset[int] = frozenset()) -> float:
    """Clip by the norm over all parameters of the model, including those on other pipeline stages.

    A weight tied across stages (embeddings) has the same gradient on two stages: `held_elsewhere` names the
    copies (by id) that another stage counts; they are left out of the norm but clipped like the rest.
    """
    grads = [p.grad for p in parameters if p.grad is not None and id(p) not in held_elsewhere]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):  # FSDP: the norm over this stage's shards, across the data-parallel group
        norm = norm.full_tensor()
    if pp_group is not None:
        squared = norm**2
        dist.all_reduce(squared, group=pp_group)
        norm = squared.sqrt()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return float(norm)


def train_step(runner, parameters, micro_batches, optimizer, scheduler, max_grad_norm, topo: Topology, device) -> dict:
    """One optimizer step over this rank's micro-batches; returns the step's metrics."""
    global_targets = all_reduce_sum(supervised_tokens(micro_batches), device, group=topo.dp_group)
    # Data-parallel gradient reduction averages over the dp ranks, so their count is multiplied back in.
    scale = topo.dp_size / max(global_targets, 1)
    loss_sum = runner.train_micro_batches(micro_batches, scale, device)
    metrics = {}
    if max_grad_norm is not None:
        metrics["train/grad_norm"] = clip_grad_norm(parameters, max_grad_norm, topo.pp_group, runner.held_elsewhere)
    metrics["train/lr"] = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # Only last pipeline stages hold losses; each data-parallel replica's last stage counts once.
    metrics["train/loss"] = all_reduce_sum(loss_sum.item(), device) / max(global_targets, 1)
    metrics["train/supervised_tokens"] = int(global_targets)
    return metrics

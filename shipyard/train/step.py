"""One optimizer step, the same for every task, plain model or pipeline stage.

A runner turns micro-batches into gradients and returns the summed loss it saw: `LocalRunner` runs forward and
backward on the whole model (the SFT task, with or without an MTP head), `PipelineRunner` (parallel/pipeline.py)
drives its stages through a schedule, a drafter task brings its own. Every runner has:

- `targets(micro_batches)`: what its loss is normalised by (supervised tokens; a drafter's summed slot weights);
- `begin_step(micro_batches, topo, device)`: anything it needs from the whole global batch before the step;
- `train_micro_batches(micro_batches, scale, device)`: forward and backward, returns the summed loss;
- `step_metrics(metrics, device)`: the step's metrics with its own parts added;
- `held_elsewhere`: ids of parameters whose gradient another pipeline stage counts.

The step normalises by the targets of the whole global batch (summed over the data-parallel group), so the
gradient is the global mean whatever the split into micro-batches, pipeline micro-batches and ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from shipyard.data.loader import supervised_tokens
from shipyard.parallel.dist import all_reduce_sum
from shipyard.parallel.topology import Topology
from shipyard.train.loss import causal_lm_loss, mtp_losses


class MTPObjective:
    """The MTP part of the loss: `loss_scale` x the mean over depths of each depth's per-token loss.

    Each depth is normalised by its own global supervised-token count, like the main loss (`begin_step` sets
    `depth_scales`); the runner leaves each depth's summed loss in `depth_sums`.
    """

    def __init__(self, depths: int, loss_scale: float):
        self.depths, self.loss_scale = depths, loss_scale
        self.depth_scales = [0.0] * depths
        self.depth_targets = [0] * depths
        self.depth_sums: list[float] = [0.0] * depths
        self.accepted: list[int] = [0] * depths
        self.drafts = 0

    def begin_step(self, micro_batches, topo: Topology, device) -> None:
        self.depth_targets = [all_reduce_sum(supervised_tokens(micro_batches, ahead=k), device, group=topo.dp_group)
                              for k in range(1, self.depths + 1)]
        self.depth_scales = [self.loss_scale / self.depths * topo.dp_size / max(n, 1) for n in self.depth_targets]

    def step_metrics(self, metrics: dict, device) -> dict:
        """loss = main + loss_scale x mean over depths; each part logged on its own."""
        depth_losses = [all_reduce_sum(s, device) / max(n, 1) for s, n in zip(self.depth_sums, self.depth_targets)]
        metrics["train/loss_main"] = metrics["train/loss"]
        metrics.update({f"train/loss_mtp_{k}": v for k, v in enumerate(depth_losses, start=1)})
        metrics["train/loss"] = metrics["train/loss_main"] + self.loss_scale * sum(depth_losses) / len(depth_losses)
        return metrics


class LocalRunner:
    held_elsewhere: frozenset[int] = frozenset()  # ids of parameters whose gradient another pipeline stage counts

    def __init__(self, model: torch.nn.Module, chunk_size: int, autocast, blank_image: dict | None = None,
                 mtp: MTPObjective | None = None):
        self.model, self.chunk_size, self.autocast = model, chunk_size, autocast
        self.blank_image = blank_image  # vision-language models: run the vision tower in text-only batches
        self.mtp = mtp

    def targets(self, micro_batches) -> int:
        return supervised_tokens(micro_batches)

    def begin_step(self, micro_batches, topo: Topology, device) -> None:
        if self.mtp is not None:
            self.mtp.begin_step(micro_batches, topo, device)

    def step_metrics(self, metrics: dict, device) -> dict:
        return self.mtp.step_metrics(metrics, device) if self.mtp is not None else metrics

    def _losses(self, batch, acceptance: bool = False):
        if self.mtp is None:
            return causal_lm_loss(self.model, batch, self.chunk_size, self.blank_image)[0], []
        out = mtp_losses(self.model, batch, self.chunk_size, acceptance)
        if acceptance:
            self.mtp.accepted = [a + b for a, b in zip(self.mtp.accepted, out.accepted)]
            self.mtp.drafts += out.drafts
        return out.main, out.depths

    def train_micro_batches(self, micro_batches, scale: float, device) -> torch.Tensor:
        loss_sum = torch.zeros((), device=device)
        depth_sums = [0.0] * (self.mtp.depths if self.mtp else 0)
        for mb in micro_batches:
            mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
            with self.autocast():
                summed, depths = self._losses(mb)
            total = summed * scale
            for k, d in enumerate(depths):
                total = total + d * self.mtp.depth_scales[k]
                depth_sums[k] += float(d.detach())
            total.backward()
            loss_sum += summed.detach()
        if self.mtp:
            self.mtp.depth_sums = depth_sums
        return loss_sum

    @torch.no_grad()
    def eval_batches(self, batches, device) -> torch.Tensor:
        self.model.eval()
        loss_sum = torch.zeros((), device=device)
        if self.mtp:
            self.mtp.depth_sums, self.mtp.accepted, self.mtp.drafts = [0.0] * self.mtp.depths, [0] * self.mtp.depths, 0
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with self.autocast():
                summed, depths = self._losses(batch, acceptance=True)
            loss_sum += summed
            for k, d in enumerate(depths):
                self.mtp.depth_sums[k] += float(d)
        self.model.train()
        return loss_sum


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
    global_targets = all_reduce_sum(runner.targets(micro_batches), device, group=topo.dp_group)
    # Data-parallel gradient reduction averages over the dp ranks, so their count is multiplied back in.
    scale = topo.dp_size / max(global_targets, 1)
    runner.begin_step(micro_batches, topo, device)
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
    return runner.step_metrics(metrics, device)

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
from shipyard.train.loss import causal_lm_loss, mtp_losses


class MTPObjective:
    """The MTP part of the loss: `loss_scale` x the mean over depths of each depth's per-token loss.

    train_step sets `depth_scales` (each depth's weight divided by its global supervised-token count, like the
    main loss) before a step; the runner leaves each depth's summed loss in `depth_sums`.
    """

    def __init__(self, depths: int, loss_scale: float):
        self.depths, self.loss_scale = depths, loss_scale
        self.depth_scales = [0.0] * depths
        self.depth_sums: list[float] = [0.0] * depths
        self.accepted: list[int] = [0] * depths
        self.drafts = 0


class LocalRunner:
    held_elsewhere: frozenset[int] = frozenset()  # ids of parameters whose gradient another pipeline stage counts

    def __init__(self, model: torch.nn.Module, chunk_size: int, autocast, blank_image: dict | None = None,
                 mtp: MTPObjective | None = None):
        self.model, self.chunk_size, self.autocast = model, chunk_size, autocast
        self.blank_image = blank_image  # vision-language models: run the vision tower in text-only batches
        self.mtp = mtp

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


def supervised_tokens(batches, ahead: int = 0) -> int:
    """Supervised next-token targets; `ahead` k: targets of MTP depth k (token t + k + 1 from position t)."""
    return sum(int((b["labels"][:, 1 + ahead:] != IGNORE_INDEX).sum()) for b in batches)


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
    # What the loss is normalised by: supervised tokens, or a runner's own count (DFlash: summed slot weights).
    count = runner.targets(micro_batches) if hasattr(runner, "targets") else supervised_tokens(micro_batches)
    global_targets = all_reduce_sum(count, device, group=topo.dp_group)
    # Data-parallel gradient reduction averages over the dp ranks, so their count is multiplied back in.
    scale = topo.dp_size / max(global_targets, 1)
    mtp = getattr(runner, "mtp", None)
    if mtp is not None:  # each depth normalised by its own global target count, like the main loss
        depth_targets = [all_reduce_sum(supervised_tokens(micro_batches, ahead=k), device, group=topo.dp_group)
                         for k in range(1, mtp.depths + 1)]
        mtp.depth_scales = [mtp.loss_scale / mtp.depths * topo.dp_size / max(n, 1) for n in depth_targets]
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
    if mtp is not None:  # loss = main + loss_scale x mean over depths; each part logged on its own
        depth_losses = [all_reduce_sum(s, device) / max(n, 1) for s, n in zip(mtp.depth_sums, depth_targets)]
        metrics["train/loss_main"] = metrics["train/loss"]
        metrics.update({f"train/loss_mtp_{k}": v for k, v in enumerate(depth_losses, start=1)})
        metrics["train/loss"] = metrics["train/loss_main"] + mtp.loss_scale * sum(depth_losses) / len(depth_losses)
    return metrics

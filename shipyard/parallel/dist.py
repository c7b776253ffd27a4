"""Process-group setup and the few collectives the training loop needs.

A single-process run never initialises torch.distributed; every helper here
degrades to the obvious local answer, so the same loop code serves 1 or N ranks.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(requested_device: str = "auto", need_group: bool = False) -> DistInfo:
    """Join the process group torchrun set up (RANK/WORLD_SIZE in the environment), if any.

    `need_group` makes a one-process group when there is none (FSDP2 on a single GPU needs a mesh).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if world_size == 1 and not need_group and not dist.is_initialized():
        return DistInfo(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        else:  # a single process outside torchrun
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: float | int, device: torch.device, group=None) -> float:
    """Sum over `group` (default: all ranks)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return t.item()


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn):
    """Run `fn` on rank 0 and hand its result to every rank; a ShipyardError it raises is raised everywhere."""
    from shipyard.errors import ShipyardError

    result, error = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = fn()
        except ShipyardError as e:
            error = str(e)
    result, error = broadcast_object((result, error))
    if error is not None:
        raise ShipyardError(error)
    return result


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def own_peak_memory_gib(restart: bool = False) -> float:
    """This process's peak resident memory (GiB) since it started or since the last `restart`.

    Linux's VmHWM, which writing 5 to /proc/self/clear_refs resets: start-up measures data preparation and loading
    each on its own. Elsewhere the peak since start (ru_maxrss), without restarts."""
    try:
        status = Path("/proc/self/status").read_text()
        peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / (1 << 20)
        if restart:
            Path("/proc/self/clear_refs").write_text("5")
        return peak
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # KiB on Linux


def peak_host_memory_gib(info: DistInfo, restart: bool = False) -> list[float]:
    """Each rank's peak resident host memory (GiB) since start or the last restart, gathered to every rank."""
    mine = own_peak_memory_gib(restart)
    if not (info.distributed and dist.is_initialized()):
        return [mine]
    gathered: list[float] = [0.0] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered

"""Where this rank sits: its pipeline stage and its data-parallel replica.

Ranks form a (pp, dp) grid, pipeline outermost: rank = pp_rank * dp_size + dp_rank.
Ranks with the same dp_rank form one pipeline and see the same data; ranks with
the same pp_rank hold the same stage and average gradients (FSDP2/HSDP over
`fsdp_mesh`). Everything that reduces over "the data" uses `dp_group`.
The first and last stage of one pipeline form its `embed_group` (Megatron's
embedding group), which sums the gradient of tied input/output embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from shipyard.config import ParallelConfig
from shipyard.errors import ShipyardError
from shipyard.parallel.dist import DistInfo


@dataclass
class Topology:
    pp_rank: int = 0
    pp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    dp_group: object = None  # None: the default group when pp_size == 1, or no group at all
    pp_group: object = None
    embed_group: object = None  # this pipeline's first and last stage ranks; None on middle stages
    fsdp_mesh: DeviceMesh | None = None

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def build_topology(cfg: ParallelConfig, dist_info: DistInfo, use_fsdp: bool) -> Topology:
    world = dist_info.world_size
    pp = cfg.pp
    if world % pp:
        raise ShipyardError(
            f"parallel.pp ({pp}) must divide the number of processes ({world}); launch with "
            f"`shipyard train ... --nproc-per-node {pp}` (or a multiple of {pp} to add data parallelism)"
        )
    dp = world // pp
    shard = cfg.dp_shard if cfg.dp_shard > 0 else dp // cfg.dp_replicate
    if cfg.dp_replicate * shard != dp:
        raise ShipyardError(
            f"parallel.dp_replicate ({cfg.dp_replicate}) x parallel.dp_shard ({shard}) must equal the data-parallel "
            f"size: {world} processes / parallel.pp {pp} = {dp}"
        )
    rank = dist_info.rank
    topo = Topology(pp_rank=rank // dp, pp_size=pp, dp_rank=rank % dp, dp_size=dp)
    if pp > 1:
        # Every rank creates every group, in the same order (a torch.distributed requirement).
        for p in range(pp):
            group = dist.new_group([p * dp + d for d in range(dp)])
            if p == topo.pp_rank:
                topo.dp_group = group
        for d in range(dp):
            group = dist.new_group([p * dp + d for p in range(pp)])
            if d == topo.dp_rank:
                topo.pp_group = group
        topo.embed_group = _embed_group(topo) if pp > 2 else topo.pp_group
    return _with_mesh(topo, dist_info, cfg, shard) if use_fsdp else topo


def _embed_group(topo: Topology):
    """The group of each pipeline's first and last stage ranks (every rank creates all, in order)."""
    mine = None
    for d in range(topo.dp_size):
        group = dist.new_group([d, (topo.pp_size - 1) * topo.dp_size + d])
        if d == topo.dp_rank and (topo.first_stage or topo.last_stage):
            mine = group
    return mine


def _with_mesh(topo: Topology, dist_info: DistInfo, cfg: ParallelConfig, shard: int) -> Topology:
    device = dist_info.device.type
    mesh = init_device_mesh(device, (topo.pp_size, cfg.dp_replicate, shard), mesh_dim_names=("pp", "dp_replicate", "dp_shard"))
    topo.fsdp_mesh = mesh["dp_shard"] if cfg.dp_replicate == 1 else mesh["dp_replicate", "dp_shard"]
    return topo

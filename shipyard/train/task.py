"""A task: what one kind of training run builds, evaluates and reports. train/loop.py runs every task the same way.

The loop owns what every run shares: the process group, seeding, the optimizer and its schedule, the step
batches, resume, the steps, logging, checkpoints, the final export and the summary. A task owns what differs:

- `setup`: the models it builds (which of them train, which stay frozen), the data, the runner that turns a
  micro-batch into gradients (train/step.py), what checkpoints record, and its start-up report;
- `evaluate`: validation figures, on every rank;
- hooks around the steps (`before_training`, `after_last_step`) and after the export (`finish`), each returning
  figures for the summary.

SFT (train/sft.py, with or without LoRA, an MTP head, images or audio) and the DFlash drafter (train/dflash.py)
are tasks; a new objective is a new Task subclass and touches no loop code (tests/test_task.py defines one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from shipyard.config import Recipe
from shipyard.data.dataset import Datasets
from shipyard.models.save import ModelMeta
from shipyard.parallel.dist import DistInfo
from shipyard.parallel.topology import Topology


@dataclass
class Setup:
    """What a task hands the loop."""

    model: torch.nn.Module  # what trains: the optimizer's parameters, what checkpoints hold (this rank's view)
    runner: object  # micro-batches -> gradients (the runner interface of train/step.py)
    tokenizer: object
    data: Datasets  # or anything with .train (the samples steps draw from) and .validation (may be empty)
    meta: ModelMeta  # what checkpoints and the export record besides the weights
    fingerprint: dict  # what a checkpoint must match to be resumed (checkpoint/store.fingerprint)
    topo: Topology
    encoder: object | None = None  # a media encoder (images, audio) the batches need
    pack_length: int | None = None  # row length of packed micro-batches; None pads each to its longest
    image_chunk_rows: int | None = None  # pipelined vision-language runs: rows per pipeline micro-batch
    adapter: dict | None = None  # a LoRA run's adapter description (checkpoints write adapter directories)
    consolidate: bool = False  # write safetensors with every checkpoint, not only the final export
    export: bool = True  # the last checkpoint becomes OUTPUT_DIR/final (False: sharded only, consolidated later)
    report: list[str] = field(default_factory=list)  # start-up lines, printed after the loop's own

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


class Task:
    """The interface; every method but `setup` has a default that does nothing."""

    name = "task"

    def prerequisites(self, recipe: Recipe) -> list[Recipe]:
        """Runs to train first (a shipped drafter recipe's target that was not trained yet)."""
        return []

    def setup(self, recipe: Recipe, dist_info: DistInfo, say) -> Setup:
        raise NotImplementedError

    def headline(self, setup: Setup, total_steps: int, global_batch: int) -> str:
        """The start-up line that opens the report."""
        n = sum(p.numel() for p in setup.model.parameters())
        return (f"shipyard {self.name}: {n / 1e6:.2f}M parameters; {len(setup.data.train)} train / "
                f"{len(setup.data.validation)} validation samples; global batch {global_batch}; {total_steps} steps")

    def evaluate(self) -> dict:
        """Validation figures (called on every rank; the loop calls it only when there is validation data)."""
        return {}

    def logged(self, figures: dict) -> dict:
        """What a periodic evaluation (train.eval_every) logs of `figures`."""
        return {f"eval/{k}": v for k, v in figures.items() if isinstance(v, (int, float))}

    def before_training(self) -> dict:
        """Figures of the model as built, before the first step of a new run (not on resume)."""
        return {}

    def after_last_step(self) -> None:
        """Right after the last optimizer step, before its checkpoint is saved."""

    def finish(self, final_dir: Path | None, figures: dict, say) -> dict:
        """After the export (`final_dir`, None when the run writes none), with the final validation `figures`: more
        figures that need the finished model (exact match), and report lines."""
        return {}

    def summary(self) -> dict:
        """The task's own fields of summary.json."""
        return {}

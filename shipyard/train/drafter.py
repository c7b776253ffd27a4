"""What every drafter task shares (`task: dflash`, `task: eagle3`): a frozen target, its data, and acceptance.

`DrafterTask` loads the target once (frozen, evaluation mode), tokenizes the chat data with its tokenizer as SFT
does, shards target and drafter alike (FSDP2 on several ranks), writes the held-out probe `verify` serves, and
reduces the runner's acceptance replay over ranks into tau, the ceiling and acceptance per position. A drafter
task adds its drafter, its runner and its config (`build`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from shipyard.checkpoint.store import fingerprint
from shipyard.config import ModelConfig, Recipe
from shipyard.data.chat import eos_token_ids
from shipyard.data.dataset import build_datasets, describe_sources
from shipyard.data.images import media_encoder
from shipyard.data.loader import eval_batches
from shipyard.errors import ShipyardError
from shipyard.export.probe import make_probe
from shipyard.models.load import load, load_processor
from shipyard.models.save import ModelMeta
from shipyard.parallel.dist import DistInfo, all_reduce_sum
from shipyard.parallel.fsdp import apply_parallelism, use_fsdp
from shipyard.parallel.topology import build_topology
from shipyard.speculative.acceptance import acceptance_per_position, mean_acceptance_length
from shipyard.train.precision import bf16_enabled
from shipyard.train.task import Setup, Task


@dataclass
class Built:
    """What a drafter task builds on the loaded target: the drafter (unsharded), its config, its architecture."""

    drafter: torch.nn.Module
    config: object
    architecture: str


class DrafterTask(Task):
    """A drafter for a frozen target (`draft.target`): the drafter trains, the target only runs."""

    def prerequisites(self, recipe: Recipe) -> list[Recipe]:
        """`runs/<recipe>/final` of a shipped recipe that has not run yet: train it first (quickstart_dflash)."""
        from shipyard.config import load_recipe, shipped_recipes

        p = Path(recipe.draft.target)
        if p.exists() or p.name != "final" or p.parent.parent.name != "runs" or p.parent.name not in shipped_recipes():
            return []
        print(f"draft.target {p} does not exist yet: training the `{p.parent.name}` recipe first")
        return [load_recipe(p.parent.name, [f"output_dir={p.parent}"])]

    def build(self, recipe: Recipe, target, tokenizer, data) -> Built:
        """The drafter for this target, its weights initialised."""
        raise NotImplementedError

    def make_runner(self, drafter, target, config, recipe: Recipe, dist_info: DistInfo, blank_image):
        raise NotImplementedError

    def setup(self, recipe: Recipe, dist_info: DistInfo, say) -> Setup:
        draft = recipe.draft
        if recipe.parallel.pp > 1 or recipe.lora is not None:
            raise ShipyardError(f"task: {self.name} trains the whole drafter on one pipeline stage: parallel.pp must "
                                "be 1 and lora unset")
        torch.manual_seed(recipe.seed)
        target_cfg = ModelConfig(path=draft.target, trust_remote_code=recipe.model.trust_remote_code)
        target, tokenizer, source = load(target_cfg, recipe.seed, recipe.data.chat_template_kwargs)
        if not tokenizer.chat_template:
            raise ShipyardError(f"draft.target {draft.target}: its tokenizer has no chat template; the drafter learns "
                                "the target's answers to chat prompts, rendered as the target serves them")
        target.requires_grad_(False)
        target.eval()
        processor = load_processor(target_cfg, source, tokenizer)
        encoder = media_encoder(processor, recipe.data)
        if encoder is not None:
            encoder.configure(target.config, recipe.parallel)
        eos_ids = eos_token_ids(tokenizer, getattr(target.generation_config, "eos_token_id", None))
        data = build_datasets(recipe.data, tokenizer, recipe.seed, stop_ids=eos_ids, encoder=encoder)
        self.recipe, self.dist_info, self.data, self.encoder = recipe, dist_info, data, encoder
        self.tokenizer = tokenizer
        built = self.build(recipe, target, tokenizer, data)
        config = built.config
        config.shipyard_target = source.name if source.kind == "hub" else str(source.local_dir or source.name)
        model_fingerprint = fingerprint(built.drafter)

        topo = build_topology(recipe.parallel, dist_info, use_fsdp(recipe.parallel, dist_info))
        self.bf16 = bf16_enabled(recipe, dist_info.device)  # both models' forwards in bf16 autocast; fp32 weights
        target = apply_parallelism(target, recipe.parallel, topo, dist_info.device, self.bf16)
        drafter = apply_parallelism(built.drafter, recipe.parallel, topo, dist_info.device, self.bf16)
        blank = encoder.blank_inputs() if encoder is not None else None
        self.runner = self.make_runner(drafter, target, config, recipe, dist_info, blank)
        probe = make_probe(tokenizer, data.validation_records, data.train_records, recipe.data.multi_turn, eos_ids,
                           encoder, held_out=True)
        meta = ModelMeta(config=config, architecture=built.architecture, tokenizer=tokenizer, base_name=draft.target,
                         base_eos=getattr(target.generation_config, "eos_token_id", None), probe=probe)
        self.topo, self.target = topo, target
        report = [describe_sources(data)]
        if data.skipped.report()["total"] or data.truncated:
            report.append(f"data: skipped {data.skipped.report()}, truncated {data.truncated}")
        return Setup(model=drafter, runner=self.runner, tokenizer=tokenizer, data=data, meta=meta,
                     fingerprint=model_fingerprint, topo=topo, encoder=encoder, consolidate=True, report=report)

    def evaluate(self) -> dict:
        """The runner's loss and acceptance replay over the validation answers, summed over ranks."""
        device, topo = self.dist_info.device, self.topo
        rows = list(eval_batches(self.data.validation, self.recipe.eval.batch_size, self.tokenizer.pad_token_id,
                                 topo.dp_rank, topo.dp_size, self.encoder))
        raw = self.runner.evaluate(rows, device)
        drafts = all_reduce_sum(raw["drafts"], device)
        accepted = [all_reduce_sum(a, device) for a in raw["accepted"]]
        ceiling = [all_reduce_sum(a, device) for a in raw["ceiling_accepted"]]
        ceiling_drafts = all_reduce_sum(raw["ceiling_drafts"], device)
        return {"loss": all_reduce_sum(raw["loss"], device) / max(all_reduce_sum(raw["weight"], device), 1e-9),
                "mean_acceptance_length": mean_acceptance_length(accepted, drafts),
                "ceiling_mean_acceptance_length": mean_acceptance_length(ceiling, ceiling_drafts),
                "acceptance_per_position": acceptance_per_position(accepted, drafts), "drafts": drafts}

    def logged(self, figures: dict) -> dict:
        return {"eval/loss": figures["loss"], "eval/tau": figures["mean_acceptance_length"]}

    def finish(self, final_dir: Path | None, figures: dict, say) -> dict:
        if figures:
            say(f"drafter: tau {figures['mean_acceptance_length']:.3f} (ceiling "
                f"{figures['ceiling_mean_acceptance_length']:.3f}) offline on {len(self.data.validation)} validation "
                "answers, counted to each answer's end")
        return {}

    def summary(self) -> dict:
        device = self.dist_info.device
        return {
            "mixed_precision": "bf16" if self.bf16 else "no",  # what the forwards ran in (train.mixed_precision)
            # rank 0's peak GPU memory (what bf16 saves; bench/dflash_precision.py); None on CPU
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "skipped_records": self.data.skipped.report(),
            "target": self.recipe.draft.target,
        }

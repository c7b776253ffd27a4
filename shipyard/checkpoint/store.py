"""Save and resume training checkpoints, atomically.

    OUTPUT_DIR/checkpoints/
      LATEST                 the name of the newest complete step directory
      step_N/                a Hugging Face directory (config, tokenizer, safetensors) ...
        shipyard/            ... plus what resuming needs:
          checkpoint.json    step, data position, scheduler, tied weights, base layout, model fingerprint
          optimizer/         torch.distributed.checkpoint (DCP) shards, keyed by parameter name
          model/             DCP shards of the weights (multi-rank runs; absent when safetensors suffice)
          rng/rank_K.pt      each rank's RNG states

A step directory is written as `.step_N.partial` and renamed when complete;
LATEST is replaced atomically after the rename. A crash at any point leaves
the previous complete checkpoint and LATEST untouched, and resume ignores
partial directories (and says so).

Weights and optimizer state are keyed by Hugging Face parameter names, and DCP
reshards on load, so a checkpoint resumes on any world size.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from shipyard.errors import ShipyardError
from shipyard.fsutil import crash_point, publish, recover_publish, write_text_atomic
from shipyard.export.export import write_weight_files
from shipyard.models.save import (ModelMeta, WeightLayout, dominant_dtype, write_hf_metadata, write_index,
                                  write_weights)
from shipyard.models.structure import clean_name, tied_aliases
from shipyard.models.weights import DirectoryWeights, dcp_load, dcp_save
from shipyard.parallel.dist import DistInfo, barrier, broadcast_object
from shipyard.peft.adapter_dir import read_adapter, write_adapter_dir

log = logging.getLogger(__name__)

LATEST = "LATEST"
META = Path("shipyard") / "checkpoint.json"
# Optimizer state keyed by parameter name throughout, param-group settings included: nested param groups are
# keyed by group index, and pipeline stages hold different parameters in same-numbered groups, of which DCP
# keeps one rank's copy (the other stage then resumes with groups that lack lr, betas, ...).
FLAT_OPTIM = StateDictOptions(flatten_optimizer_state_dict=True)


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def fingerprint(model: torch.nn.Module) -> dict:
    """Architecture and parameter shapes: what a checkpoint must match to be resumed into `model`."""
    return {
        "architecture": type(model).__name__.removeprefix("FSDP"),
        "parameters": {name: list(p.shape) for name, p in model.state_dict().items()},
    }


def _rng_state() -> dict:
    """RNG states as tensors and plain values, so `torch.load(weights_only=True)` reads them back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trained_state(model: torch.nn.Module, aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    """Full CPU tensors of the trained parameters (every rank takes part in gathering shards)."""
    out = {}
    for name, param in model.named_parameters():
        name = clean_name(name)
        if param.requires_grad and name not in aliases:
            full = param.full_tensor() if isinstance(param, DTensor) else param
            out[name] = full.detach().cpu()
    return out


def model_state_for_save(model: torch.nn.Module, aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    """The model's weights by HF name (sharded DTensors under FSDP), tied aliases dropped."""
    return {k: v for k, v in get_model_state_dict(model).items() if k not in aliases}


def _write_weights(partial: Path, model, aliases: dict, meta: ModelMeta, dist_info: DistInfo, consolidate: bool,
                   adapter: dict | None) -> torch.dtype:
    """The weights part of a step directory; returns their dtype. Three layouts:

    - LoRA: a Hugging Face PEFT adapter directory of what is trained (small: gathered to rank 0);
    - one process: HF safetensors, which are also the exact (fp32) resumable copy;
    - several ranks: DCP shards, plus HF safetensors written in parallel when `consolidate`.
    """
    if adapter is not None:
        state = trained_state(model, aliases)
        if dist_info.is_main:
            write_adapter_dir(partial, state, adapter["peft_config"], adapter["lora_meta"], meta.tokenizer, meta.probe)
        return next(iter(state.values())).dtype
    state = model_state_for_save(model, aliases)
    if not dist_info.distributed:
        full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}  # 1-rank FSDP
        write_weights(partial, full, WeightLayout())
        return dominant_dtype({k: (v.shape, v.dtype) for k, v in full.items()})
    dcp_save(state, partial / "shipyard" / "model")
    if consolidate:
        barrier()
        plan, shapes = write_weight_files(
            partial, DirectoryWeights(partial, source="dcp"), layout=WeightLayout(), dtype=None, aliases={},
            rank=dist_info.rank, world_size=dist_info.world_size,
        )
        if dist_info.is_main:
            write_index(partial, plan, shapes)
    return dominant_dtype({k: (v.shape, v.dtype) for k, v in state.items()})


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    meta: ModelMeta,
    dist_info: DistInfo,
    consolidate: bool = True,
    keep_last: int | None = None,
    adapter: dict | None = None,
    model_fingerprint: dict | None = None,
) -> Path:
    """Write step_N atomically; every rank calls this. Returns the final directory.

    One process writes the weights as HF safetensors (the resumable copy too: fp32, exact). Several ranks
    write DCP shards, and with `consolidate` also the safetensors, each rank writing whole files.
    """
    final = root / step_dir_name(step)
    partial = root / f".{final.name}.partial"
    if dist_info.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "shipyard" / "rng").mkdir(parents=True)
    barrier()

    aliases = tied_aliases(model)
    weights_dtype = _write_weights(partial, model, aliases, meta, dist_info, consolidate, adapter)
    crash_point("model_saved", step)
    dcp_save(get_optimizer_state_dict(model, optimizer, options=FLAT_OPTIM), partial / "shipyard" / "optimizer")
    torch.save(_rng_state(), partial / "shipyard" / "rng" / f"rank_{dist_info.rank:05d}.pt")
    crash_point("optimizer_saved", step)

    if dist_info.is_main:
        if adapter is None:
            # HF metadata is written at save time, so consolidation later needs nothing but this directory.
            write_hf_metadata(partial, meta, weights_dtype)
        info = {
            "step": step,
            "world_size": dist_info.world_size,
            "consolidated": consolidate or not dist_info.distributed or adapter is not None,
            "adapter": adapter is not None,
            "tied": aliases,
            "base_model": meta.base_name,
            "base_layout": meta.layout.to_json(),
            "fingerprint": model_fingerprint or fingerprint(model),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **trainer_state,
        }
        (partial / META).write_text(json.dumps(info, indent=2) + "\n")
    crash_point("metadata_written", step)
    barrier()
    if dist_info.is_main:
        publish(partial, final)
        crash_point("renamed", step)
        _write_latest(root, final.name)
        if keep_last:
            prune(root, keep_last)
    barrier()
    return final


def _write_latest(root: Path, name: str) -> None:
    write_text_atomic(root / LATEST, name + "\n")


def complete_steps(root: Path) -> list[Path]:
    steps = [p for p in root.glob("step_*") if (p / META).is_file() and p.name[5:].isdigit()]
    return sorted(steps, key=lambda p: int(p.name[5:]))


def prune(root: Path, keep_last: int) -> None:
    for old in complete_steps(root)[:-keep_last]:
        shutil.rmtree(old)


def clean_interrupted_saves(root: Path) -> None:
    """Before resuming: finish interrupted publishes, and delete what a crash left that nothing will resume from."""
    for old in root.glob(".step_*.old"):
        final = root / old.name[1:].removesuffix(".old")
        recover_publish(final, root / f".{final.name}.partial", lambda d: (d / META).is_file())
    partials = sorted(root.glob(".step_*.partial"))
    if partials:
        log.warning("removing incomplete checkpoint directories (a save was interrupted): %s",
                    ", ".join(p.name for p in partials))
        for partial in partials:
            shutil.rmtree(partial)
    for tmp in root.glob(".*.tmp"):
        tmp.unlink()


def find_resume_dir(root: Path, resume: str) -> Path | None:
    """The checkpoint to resume from per `train.resume` (auto | never | a step directory)."""
    if root.is_dir():
        clean_interrupted_saves(root)
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / META).is_file():
            raise ShipyardError(f"train.resume: '{resume}' is not a complete shipyard step directory (no {META})")
        return path
    latest = root / LATEST
    if latest.is_file():
        candidate = root / latest.read_text().strip()
        if (candidate / META).is_file():
            return candidate
        log.warning("%s names %s, which is not a complete checkpoint; using the newest complete one", latest, candidate.name)
    steps = complete_steps(root)
    return steps[-1] if steps else None


def read_meta(step_dir: Path) -> dict:
    return json.loads((step_dir / META).read_text())


def check_fingerprint(step_dir: Path, current: dict, info: dict) -> None:
    saved = info["fingerprint"]
    problem = None
    if saved["architecture"] != current["architecture"]:
        problem = f"it holds a {saved['architecture']}, this run builds a {current['architecture']}"
    else:
        for name, shape in current["parameters"].items():
            if saved["parameters"].get(name) != shape:
                problem = f"parameter '{name}' has shape {saved['parameters'].get(name)} there and {shape} here"
                break
        else:
            extra = set(saved["parameters"]) - set(current["parameters"])
            if extra:
                problem = f"it has parameters this model lacks, e.g. '{sorted(extra)[0]}'"
    if problem:
        raise ShipyardError(
            f"cannot resume from {step_dir}: it was written for a different model ({problem}). "
            "Use another output_dir, or train.resume=never to start over (the old checkpoints stay)."
        )


def _load_weights(step_dir: Path, model: torch.nn.Module, info: dict) -> None:
    aliases = info.get("tied", {})
    dcp_dir = step_dir / "shipyard" / "model"
    if dcp_dir.is_dir():
        state = {k: v for k, v in get_model_state_dict(model).items() if k not in aliases}
        dcp_load(state, dcp_dir)
        set_model_state_dict(model, state, options=StateDictOptions(strict=False))
        return
    if info.get("adapter"):
        _, full = read_adapter(step_dir)  # only the trained parameters; the base comes from model.path
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    weights = DirectoryWeights(step_dir)
    full = weights.load(list(weights.shapes))
    result = set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
    missing = set(result.missing_keys) - set(aliases)
    if missing:
        raise ShipyardError(f"{step_dir}: weights missing for {sorted(missing)[:5]}")


def _load_optimizer(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore optimizer state saved flat (by parameter name), or nested (checkpoints from before FLAT_OPTIM)."""
    nested = "param_groups.0.params" in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    options = StateDictOptions() if nested else FLAT_OPTIM
    state = get_optimizer_state_dict(model, optimizer, options=options)
    dcp_load(state, path)
    set_optimizer_state_dict(model, optimizer, state, options=options)


def load_checkpoint(
    step_dir: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, dist_info: DistInfo,
    expected_fingerprint: dict | None = None,
) -> dict:
    """Restore weights, optimizer and RNG into the live objects; returns checkpoint.json's content.

    `expected_fingerprint` describes the whole model when `model` is only this rank's pipeline stages.
    """
    info = read_meta(step_dir)
    check_fingerprint(step_dir, expected_fingerprint or fingerprint(model), info)
    _load_weights(step_dir, model, info)
    _load_optimizer(step_dir / "shipyard" / "optimizer", model, optimizer)
    rng_file = step_dir / "shipyard" / "rng" / f"rank_{dist_info.rank:05d}.pt"
    if info["world_size"] == dist_info.world_size and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        log.warning("world size changed (%d -> %d): RNG states not restored", info["world_size"], dist_info.world_size)
    return broadcast_object(info)

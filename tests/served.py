"""Directories whose tests need only "serves in vLLM as in transformers": verified together by ONE vLLM worker.

A vLLM worker's start (a Python process, vLLM's import, its first engine) costs 15-20 s on 2 cores; test_export,
test_families, test_lora, test_distributed, test_pipeline, test_verify and test_vlm_training each paid it for
their own directories.
Here every such set of directories is a session fixture `served_<group>`, and `served` verifies all the groups
that the collected tests name (`@pytest.mark.served("<group>")`) with one `verify_many` call, so running a single
file still builds only that file's groups. The trained runs the groups come from are session fixtures too, shared
with the other tests that read them (`text_base`: test_verify's and test_lora's 60-step quickstart, once).

Imported by tests/conftest.py (fixtures must be visible to every module's tests).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

# The time `served` may take: every group's training (CLI runs bounded by conftest.CLI_TIMEOUT each) and the vLLM
# worker (shipyard.verify.run.VLLM_TIMEOUT_S). A test that reads `served` gets this pytest timeout (conftest.py).
SERVED_TIMEOUT_S = 3600


class Reports(dict):
    """Reports by "<group>/<name>"; a group whose directories could not be built fails only its own tests."""

    def __init__(self, reports: dict, failed: dict[str, str]):
        super().__init__(reports)
        self.failed = failed

    def __missing__(self, key: str):
        group = key.split("/")[0]
        pytest.fail(f"{key}: its group could not be built: {self.failed.get(group, 'no such directory')}")


def collect_groups(request, marker: str, prefix: str) -> tuple[list[str], dict[str, Path], dict[str, str]]:
    """The groups the collected tests are marked with, their directories by "<group>/<name>", and the groups whose
    fixture failed (with the error): one group's failed training must not fail every group's test."""
    groups = sorted({m.args[0] for item in request.session.items for m in item.iter_markers(marker)})
    dirs: dict[str, Path] = {}
    failed: dict[str, str] = {}
    for group in groups:
        try:
            group_dirs = request.getfixturevalue(f"{prefix}{group}")
        except (Exception, pytest.fail.Exception) as e:  # noqa: BLE001  (reported to the group's tests)
            failed[group] = f"{type(e).__name__}: {str(e)[-3000:]}"
            continue
        for name, directory in group_dirs.items():
            dirs[f"{group}/{name}"] = directory
    return groups, dirs, failed


@pytest.fixture(scope="session")
def served(request) -> dict[str, dict]:
    """{"<group>/<name>": verify report} for every group a collected test is marked with; one vLLM worker."""
    from shipyard.verify.run import verify_many

    groups, dirs, failed = collect_groups(request, "served", "served_")
    started = time.perf_counter()
    # trust_remote_code: test_export's custom-code directory needs it; without an auto_map it changes nothing.
    reports = verify_many(list(dirs.values()), trust_remote_code=True) if dirs else []
    print(f"\nserved: verified {len(dirs)} directories of {len(groups)} groups ({', '.join(groups)}) with one vLLM "
          f"worker in {time.perf_counter() - started:.0f}s")
    return Reports(dict(zip(dirs, reports)), failed)


def assert_serves(report: dict, name: str = "") -> None:
    """Loaded in vLLM; greedy tokens, rendered prompt ids and logprobs as transformers'; template parity; ok."""
    v = report["vllm"]
    assert v["available"] and v.get("loaded"), (name, v.get("error"))
    assert v["greedy_match"] and v["prompt_ids_match"], (name, v["per_prompt"])
    assert v["logprobs"]["ok"], (name, v["logprobs"])
    assert report["template_parity"], (name, report["template"])
    assert report["ok"], (name, report)


# ------------------------------------------------------------------ trained runs shared by several modules


@pytest.fixture(scope="session")
def text_base(tmp_path_factory) -> Path:
    """The quickstart trained 60 steps on 2,000 records (peaked enough logits that greedy comparisons between
    engines are meaningful); returns final/. test_verify's `trained` and test_lora's `base`."""
    from shipyard.config import load_recipe
    from shipyard.train.loop import train
    from tests.conftest import tiny_overrides

    out = tmp_path_factory.mktemp("text_base") / "run"
    train(load_recipe("quickstart", tiny_overrides(out, steps=60, records=2000) + ["eval.generate=false"]))
    return out / "final"


@pytest.fixture(scope="session")
def lora_run(text_base, tmp_path_factory):
    """test_lora's adapter run on `text_base` (30 steps, a checkpoint at 15): (output dir, TrainResult)."""
    from shipyard.config import load_recipe
    from shipyard.train.loop import train
    from tests.test_lora import lora_overrides

    out = tmp_path_factory.mktemp("lora") / "run"
    result = train(load_recipe("quickstart", lora_overrides(out, text_base, 30, "checkpoint.every_steps=15")))
    return out, result


@pytest.fixture(scope="session")
def dist_runs(tmp_path_factory) -> Path:
    """test_distributed's reference runs: root/one (one process, the quickstart preset) and root/two (FSDP2 on two
    ranks, from the preset's initial weights saved as a folder: built empty, each rank filling only its shards)."""
    from tests.fixtures import preset_folder
    from tests.test_distributed import run

    from shipyard.config import load_recipe
    from shipyard.train.loop import train
    from tests.test_distributed import args

    root = tmp_path_factory.mktemp("dist")
    train(load_recipe("quickstart", args(root / "one", 1)[2:]))  # in this process: the same run without a start-up
    proc = run(root / "two", 2, f"model.path={preset_folder(root / 'base')}")
    assert "weights: built empty, each rank reading only the tensors it keeps" in proc.stdout
    return root


@pytest.fixture(scope="session")
def pp_qwen3(tmp_path_factory) -> Path:
    """A PP=2, 1F1B, 4 micro-batch run of the Qwen3-style model; its checkpoints serve several tests."""
    from tests.test_pipeline import run_pp

    out = tmp_path_factory.mktemp("pp") / "pp_qwen3"
    proc = run_pp(out, "qwen3-tiny-4l", 2, "parallel.pp_schedule=1f1b", "parallel.pp_microbatches=4")
    assert "(pipeline 2 x data 1)" in proc.stdout
    return out


@pytest.fixture(scope="session")
def family_runs(tmp_path_factory):
    """test_families' matrix: every family trained in full from its tiny preset, then LoRA on that fine-tuned
    model (Qwen3-MoE's with its experts adapted), and the Qwen3-MoE adapter merged; ({(family, mode):
    TrainResult}, {(family, mode): final dir}, s)."""
    from shipyard.config import load_recipe
    from shipyard.export.export import export_checkpoint
    from shipyard.train.loop import train
    from tests.conftest import tiny_overrides
    from tests.test_families import FAMILIES, MOE_LORA, RECORDS, STEPS

    root = tmp_path_factory.mktemp("families")
    runs, dirs = {}, {}
    started = time.perf_counter()
    for family, preset in FAMILIES.items():
        common = ["eval.generate=false"]
        full, lora = root / family / "full", root / family / "lora"
        runs[family, "full"] = train(load_recipe(
            "quickstart", tiny_overrides(full, steps=STEPS, records=RECORDS) + [f"model.path={preset}", *common]))
        runs[family, "lora"] = train(load_recipe(
            "quickstart", tiny_overrides(lora, steps=STEPS, records=RECORDS)
            + [f"model.path={full / 'final'}", "lora.r=8", *common, *MOE_LORA.get(family, [])]))
        dirs[family, "full"], dirs[family, "lora"] = full / "final", lora / "final"
    # How an MoE LoRA run serves on vLLM's CPU build (no MoE-LoRA kernels there): merged into the base weights,
    # expert adapters included.
    dirs["qwen3-moe", "lora-merged"] = export_checkpoint(
        dirs["qwen3-moe", "lora"], root / "qwen3-moe" / "lora-merged", merge_lora=True).out_dir
    return runs, dirs, time.perf_counter() - started


@pytest.fixture(scope="session")
def vlm_data(tmp_path_factory) -> dict[str, Path]:
    """test_vlm_training's data: image records with text-only ones mixed in, image-only validation records."""
    from tests.test_vlm_training import write_data

    return write_data(tmp_path_factory.mktemp("vlm-data"))


@pytest.fixture(scope="session")
def vlm_pp_qwen3(vlm_data, tmp_path_factory) -> Path:
    """test_vlm_training's Qwen3-VL pair: root/pp1 (one process), root/pp2 (two pipeline stages)."""
    from tests.test_vlm_training import train_pp_pair

    return train_pp_pair(tmp_path_factory.mktemp("vlm_pp"), vlm_data, "qwen3-vl-tiny")


# ------------------------------------------------------------------ the groups `served` verifies


@pytest.fixture(scope="session")
def served_families(family_runs) -> dict[str, Path]:
    _, dirs, _ = family_runs
    return {"/".join(key): directory for key, directory in dirs.items()}


@pytest.fixture(scope="session")
def served_export(tmp_path_factory) -> dict[str, Path]:
    """Each defect test_export normalises, exported (custom code included)."""
    import torch

    from shipyard.export.export import export_checkpoint
    from tests.fixtures import (
        save_model_dir,
        with_custom_code_in_subfolder,
        with_stale_quantization_config,
        with_unknown_tokenizer_class,
    )

    root = tmp_path_factory.mktemp("export_served")
    sources = {
        "transformers5_files": save_model_dir(root / "a"),
        "unknown_tokenizer_class": with_unknown_tokenizer_class(root / "b"),
        "stale_quantization_config": with_stale_quantization_config(root / "c"),
        "untied": save_model_dir(root / "d", preset="qwen3-tiny-untied"),
        "custom_code": with_custom_code_in_subfolder(root / "e"),
        "sharded_bf16": save_model_dir(root / "f", dtype=torch.bfloat16, max_shard_size="120KB"),
    }
    return {name: export_checkpoint(src, root / f"out_{name}", trust_remote_code=True).out_dir
            for name, src in sources.items()}


@pytest.fixture(scope="session")
def served_lora(lora_run, tmp_path_factory) -> dict[str, Path]:
    from shipyard.export.export import export_checkpoint

    out, _ = lora_run
    merged = export_checkpoint(out / "final", tmp_path_factory.mktemp("lora_served") / "merged",
                               merge_lora=True).out_dir
    return {"adapter": out / "final", "merged": merged}


@pytest.fixture(scope="session")
def served_distributed(dist_runs) -> dict[str, Path]:
    return {"two_ranks": dist_runs / "two" / "final"}


@pytest.fixture(scope="session")
def served_pipeline(pp_qwen3) -> dict[str, Path]:
    return {"pp2": pp_qwen3 / "final"}


@pytest.fixture(scope="session")
def served_vlm_pipeline(vlm_pp_qwen3) -> dict[str, Path]:
    return {"pp2": vlm_pp_qwen3 / "pp2" / "final"}


@pytest.fixture(scope="session")
def served_verify(text_base, tmp_path_factory) -> dict[str, Path]:
    """The trained checkpoint, and a copy whose chat template renders the user turn differently."""
    from tests.fixtures import edit_json

    broken = tmp_path_factory.mktemp("verify_served") / "broken"
    shutil.copytree(text_base, broken)
    cfg = json.loads((broken / "tokenizer_config.json").read_text())
    edit_json(broken / "tokenizer_config.json",
              chat_template=cfg["chat_template"].replace("'\\n' + message['content']", "': ' + message['content']"))
    return {"trained": text_base, "broken": broken}


@pytest.fixture(scope="session")
def qwen2_audio_run(tmp_path_factory):
    """test_qwen2_audio's run: the tiny Qwen2-Audio on the speech quickstart's clips, audio tower frozen, 3 steps,
    in this process: (output dir, TrainResult)."""
    from shipyard.config import load_recipe
    from shipyard.train.loop import train

    out = tmp_path_factory.mktemp("qwen2_audio") / "run"
    result = train(load_recipe("quickstart_speech", [
        f"output_dir={out}", "model.path=qwen2-audio-tiny", "model.freeze=[audio_encoder]", "train.max_steps=3",
        "data.train={synthetic: spoken_digits, num_records: 12, seed: 0}", "data.max_length=160",
        "data.validation=[{synthetic: spoken_digits_heldout, num_records: 4, seed: 1}]", "train.micro_batch_size=4",
        "checkpoint.every_steps=null", "eval.generate=false", "optim.warmup_steps=0"]))
    return out, result


@pytest.fixture(scope="session")
def served_qwen2_audio(qwen2_audio_run) -> dict[str, Path]:
    return {"final": qwen2_audio_run[0] / "final"}

"""Vision-language training: frozen parts stay bit-identical, LoRA loads in PEFT, FSDP2 equals one process.

Runs use the tiny Qwen3-VL preset on the package's synthetic shapes task plus text-only records (a mixed
dataset is the common case, and text-only micro-batches take the vision-idle path).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForImageTextToText

from shipyard.config import load_recipe
from shipyard.data.synthetic import reverse_words
from shipyard.data.synthetic_images import shapes
from shipyard.models.load import load
from shipyard.models.vision import parameter_groups
from shipyard.train.loop import train
from tests.conftest import assert_close_trajectory, losses, run_cli

pytestmark = pytest.mark.slow


def write_data(root: Path) -> dict[str, Path]:
    """Image records with text-only ones mixed in, and image-only validation records."""
    records = shapes(96, 0)
    records[::2] = reverse_words(48, 0)  # every other record is text-only
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shapes(8, 1)))
    return {"train": root / "train.jsonl", "val": root / "val.jsonl"}


@pytest.fixture(scope="module")
def data(vlm_data) -> dict[str, Path]:
    return vlm_data  # tests/served.py: session-scoped, as the pipelined Qwen3-VL runs there read it


def overrides(out: Path, data: dict, steps: int, *extra: str, batch: int = 8) -> list[str]:
    return [f"output_dir={out}", f"train.max_steps={steps}", f"train.micro_batch_size={batch}",
            f"data.train={data['train']}", f"data.validation={data['val']}", "checkpoint.every_steps=null",
            "eval.generate=false", "optim.warmup_steps=2", *extra]


# Multi-rank and pipelined runs also generate (exact match) at the end: the whole path a user runs.
GENERATE = ("eval.generate=true", "eval.max_prompts=4", "eval.max_new_tokens=4")


def assert_same_run(reference, run, steps: int) -> None:
    """Per-step losses and validation loss within 1e-5 relative; the exports hold the same tensors and give the
    same logits on an image prompt (raw weights are not compared: Adam turns 1e-7 differences in near-zero
    gradients, from summing in another order, into lr-sized steps of single elements)."""
    from transformers import AutoProcessor

    from shipyard.data.images import ImageEncoder
    from shipyard.data.messages import normalise_record
    from shipyard.models.greedy import prompt_inputs

    assert_close_trajectory(losses(reference), losses(run), steps)
    want, got = (json.loads((d / "summary.json").read_text())["eval"] for d in (reference, run))
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert (got["exact_match"], got["num_prompts"]) == (want["exact_match"], want["num_prompts"]) and got["num_prompts"]
    a, b = (load_file(d / "final" / "model.safetensors") for d in (reference, run))
    assert a.keys() == b.keys()
    processor = AutoProcessor.from_pretrained(reference / "final")
    inputs = prompt_inputs(processor.tokenizer, normalise_record(shapes(1, 7)[0], "probe").messages[:1],
                           ImageEncoder(processor))
    with torch.no_grad():
        logits = [AutoModelForImageTextToText.from_pretrained(d / "final")(**inputs).logits for d in (reference, run)]
    assert torch.allclose(logits[0], logits[1], rtol=1e-4, atol=1e-4), (logits[0] - logits[1]).abs().max()


@pytest.fixture(scope="module")
def base(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vlm") / "base"
    train(load_recipe("quickstart_vlm", overrides(out, data, 30)))
    return out / "final"


def test_frozen_vision_tower_is_bit_identical_and_has_no_optimizer_state(data, tmp_path):
    recipe = load_recipe("quickstart_vlm", overrides(tmp_path / "run", data, 6, "model.freeze=[vision_tower]"))
    initial, _, _ = load(recipe.model, recipe.seed)
    groups = parameter_groups(initial)
    before = {k: v.clone() for k, v in initial.state_dict().items()}
    result = train(recipe)
    after = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert groups["vision_tower"] and groups["projector"]
    for name in groups["vision_tower"]:
        assert torch.equal(after[name], before[name]), name
    changed = [n for n in groups["projector"] + groups["language_model"] if not torch.equal(after[n], before[n])]
    assert len(changed) > 0.9 * len(groups["projector"] + groups["language_model"])
    assert all(p.grad is None for n, p in result.model.named_parameters() if n in groups["vision_tower"])
    step = tmp_path / "run" / "checkpoints" / "step_6" / "shipyard" / "optimizer"
    keys = FileSystemReader(step).read_metadata().state_dict_metadata
    tower = [k for k in keys if any(n in k for n in groups["vision_tower"])]
    assert tower == [] and any("merger" in k for k in keys)


def test_lora_adapts_the_language_model_and_loads_in_peft(base, data, tmp_path):
    from peft import PeftModel

    from shipyard.data.images import ImageEncoder
    from shipyard.data.messages import normalise_record
    from shipyard.models.greedy import prompt_inputs
    from transformers import AutoProcessor

    result = train(load_recipe("quickstart_vlm", overrides(tmp_path / "lora", data, 10, f"model.path={base}",
                                                           "lora={r: 8, alpha: 16}", "optim.lr=3e-3")))
    final = tmp_path / "lora" / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    adapted = json.loads((final / "shipyard_lora.json").read_text())["adapted_modules"]
    assert len(adapted) == 2 * 7 and all(n.startswith("model.language_model.layers.") for n in adapted)

    processor = AutoProcessor.from_pretrained(base)
    record = normalise_record(shapes(1, 7)[0], "probe")
    inputs = prompt_inputs(processor.tokenizer, record.messages[:1], ImageEncoder(processor))
    with torch.no_grad():
        ours = result.model.eval()(**inputs).logits
        plain = AutoModelForImageTextToText.from_pretrained(base).eval()
        base_logits = plain(**inputs).logits
        theirs = PeftModel.from_pretrained(plain, final).eval()(**inputs).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()
    assert (ours - base_logits).abs().max() > 1e-3  # the adapter changed the model


@pytest.mark.distributed
def test_fsdp_two_ranks_equal_one_rank(data, tmp_path):
    """Global batch 4 either way. Half the records are text-only, so some 2-sample micro-batches hold no image:
    that rank runs the vision tower on a blank image while the other runs it on real ones."""
    for ranks in (1, 2):
        args = overrides(tmp_path / f"r{ranks}", data, 8, "optim.lr=1e-3", *GENERATE, batch=4 // ranks)
        if ranks == 1:  # the reference in this process: a new interpreter would add only its start-up
            train(load_recipe("quickstart_vlm", args))
            continue
        proc = run_cli("train", "quickstart_vlm", *args, "--nproc-per-node", "2")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert_same_run(tmp_path / "r1", tmp_path / "r2", 8)


def train_pp_pair(root: Path, data: dict, preset: str) -> Path:
    """root/pp1 (one process) and root/pp2 (two pipeline stages) of `preset`, 6 steps each."""
    for pp in (1, 2):
        args = overrides(root / f"pp{pp}", data, 6, "optim.lr=1e-3", "parallel.pp_microbatches=4", *GENERATE,
                         f"model.path={preset}")
        extra = ["parallel.pp=2", "--nproc-per-node", "2"] if pp == 2 else []
        proc = run_cli("train", "quickstart_vlm", *args, *extra)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return root


@pytest.mark.distributed
@pytest.mark.vllm
@pytest.mark.parametrize("preset", [pytest.param("qwen3-vl-tiny", marks=pytest.mark.served("vlm_pipeline")),
                                    "idefics3-tiny"])
def test_pipeline_two_stages_equal_one_process(data, tmp_path, preset, request):
    """Stage 0 runs the vision tower, projector and decoder layer 0 (Qwen3-VL: with deepstack and M-RoPE
    positions passed on); stage 1 sees hidden states."""
    if preset == "qwen3-vl-tiny":  # session-scoped (tests/served.py): its pipelined export is served too
        root = request.getfixturevalue("vlm_pp_qwen3")
    else:
        root = train_pp_pair(tmp_path, data, preset)
    assert_same_run(root / "pp1", root / "pp2", 6)
    if preset == "qwen3-vl-tiny":  # the pipelined run's export serves: the whole path, verify included
        report = request.getfixturevalue("served")["vlm_pipeline/pp2"]  # the suite's one vLLM worker
        assert report["ok"] and report["vllm"]["training_prompt_ids_match"], report

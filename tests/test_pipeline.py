"""Pipeline parallelism on CPU (gloo): equal to one process, same names, clear refusals."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from torch import nn

from shipyard.config import DataConfig, ModelConfig, ParallelConfig, load_recipe
from shipyard.data.loader import collate
from shipyard.errors import ShipyardError
from shipyard.models.load import load
from shipyard.data.dataset import build_datasets
from shipyard.parallel import pipeline
from shipyard.train.loop import train
from shipyard.train.step import LocalRunner, supervised_tokens
from tests.conftest import REPO, assert_close_trajectory, losses, run_cli
from tests.fixtures import random_model

STEPS = 10


def overrides(out, preset, ranks_dp=1, *extra):
    return [
        f"output_dir={out}", f"model.path={preset}", f"train.max_steps={STEPS}", f"train.micro_batch_size={8 // ranks_dp}",
        "data.train={synthetic: reverse_words, num_records: 300, seed: 0}",
        "data.validation={synthetic: reverse_words, num_records: 16, seed: 1}",
        "optim.lr=1e-3", "optim.warmup_steps=2", "checkpoint.every_steps=5", "eval.generate=false", *extra,
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single-process runs of both tiny architectures."""
    root = tmp_path_factory.mktemp("pp")
    for preset in ("qwen3-tiny-4l", "llama-tiny"):
        train(load_recipe("quickstart", overrides(root / preset, preset)))
    return root


def run_pp(out, preset, nproc=2, *extra):
    proc = run_cli("train", "quickstart", *overrides(out, preset, nproc // 2, "parallel.pp=2", *extra),
                   "--nproc-per-node", str(nproc))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def pp_qwen3(tmp_path_factory):
    """A PP=2, 1F1B, 4 micro-batch run of the Qwen3-style model; its checkpoints serve several tests."""
    out = tmp_path_factory.mktemp("pp") / "pp_qwen3"
    proc = run_pp(out, "qwen3-tiny-4l", 2, "parallel.pp_schedule=1f1b", "parallel.pp_microbatches=4")
    assert "(pipeline 2 x data 1)" in proc.stdout
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_1f1b_equals_one_process_qwen3(reference, pp_qwen3):
    assert_close_trajectory(losses(reference / "qwen3-tiny-4l"), losses(pp_qwen3), STEPS)


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_1f1b_equals_one_process_llama(reference, tmp_path):
    run_pp(tmp_path / "pp", "llama-tiny", 2, "parallel.pp_schedule=1f1b", "parallel.pp_microbatches=4")
    assert_close_trajectory(losses(reference / "llama-tiny"), losses(tmp_path / "pp"), STEPS)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("schedule", ["gpipe", "interleaved_1f1b"])
def test_other_schedules_equal_one_process(reference, tmp_path, schedule):
    run_pp(tmp_path / "pp", "qwen3-tiny-4l", 2, f"parallel.pp_schedule={schedule}")
    assert_close_trajectory(losses(reference / "qwen3-tiny-4l"), losses(tmp_path / "pp"), STEPS)


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_times_dp2_equals_one_process(reference, tmp_path):
    proc = run_pp(tmp_path / "pp", "qwen3-tiny-4l", 4)
    assert "(pipeline 2 x data 2)" in proc.stdout
    assert_close_trajectory(losses(reference / "qwen3-tiny-4l"), losses(tmp_path / "pp"), STEPS)


@pytest.mark.slow
@pytest.mark.distributed
def test_gradients_and_mask_caching_per_stage(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(REPO / "tests" / "pipeline_worker.py"), "qwen3-tiny-4l", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the same batch through the whole model in one process
    model, tokenizer, _ = load(ModelConfig(path="qwen3-tiny-4l"), seed=0)
    cfg = DataConfig(train=[{"synthetic": "reverse_words", "num_records": 8, "seed": 0}], max_length=48)
    batch = collate(build_datasets(cfg, tokenizer, seed=0).train, tokenizer.pad_token_id)
    n = supervised_tokens([batch])
    loss = LocalRunner(model, 2048, lambda: torch.autocast("cpu", enabled=False)).train_micro_batches([batch], 1.0 / n, "cpu")
    expected = {name: p.grad for name, p in model.named_parameters()}

    got = {**torch.load(tmp_path / "grads_0.pt"), **torch.load(tmp_path / "grads_1.pt")}
    assert set(got) == set(expected)  # every parameter, under its usual name, on exactly one stage
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-5, atol=1e-7), name
    assert json.loads((tmp_path / "loss_1.json").read_text()) == pytest.approx(float(loss), rel=1e-6)

    for rank in (0, 1):
        counts = json.loads((tmp_path / f"masks_{rank}.json").read_text())
        assert counts["unpadded"] == 1, counts  # 3 steps x 4 micro-batches of full-length rows: built once
        assert counts["padded"] == 2 * 4, counts  # padded rows: rebuilt for every micro-batch


@pytest.mark.slow
@pytest.mark.distributed
def test_pp_checkpoint_has_hf_keys_and_resumes_without_pp(reference, pp_qwen3, tmp_path):
    pp_run = pp_qwen3
    keys = set(safe_open(pp_run / "final" / "model.safetensors", "pt").keys())
    base = random_model("qwen3-tiny-4l")
    assert keys == set(base.state_dict())  # exactly the Hugging Face key set, lm_head included (untied)
    step = pp_run / "checkpoints" / "step_5" / "shipyard" / "model"
    assert len(list(step.glob("*.distcp"))) == 2  # each stage wrote its own parameters

    resumed = tmp_path / "resumed"
    shutil.copytree(pp_run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_10")
    shutil.rmtree(resumed / "final")
    (resumed / "checkpoints" / "LATEST").write_text("step_5\n")
    result = train(load_recipe("quickstart", overrides(resumed, "qwen3-tiny-4l")))
    assert result.summary["resumed_from_step"] == 5
    assert_close_trajectory(losses(reference / "qwen3-tiny-4l"), losses(resumed), STEPS)


@pytest.mark.slow
@pytest.mark.distributed
def test_unpipelined_checkpoint_resumes_with_pp(reference, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(reference / "qwen3-tiny-4l", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_10")
    shutil.rmtree(resumed / "final")
    (resumed / "checkpoints" / "LATEST").write_text("step_5\n")
    proc = run_pp(resumed, "qwen3-tiny-4l", 2)
    assert "resumed from" in proc.stdout
    assert_close_trajectory(losses(reference / "qwen3-tiny-4l"), losses(resumed), STEPS)


@pytest.mark.slow
@pytest.mark.vllm
def test_pp_export_serves_in_vllm(pp_qwen3):
    from shipyard.verify.run import verify

    report = verify(pp_qwen3 / "final")
    assert report["ok"], report


# ------------------------------------------------------------------ validation


def test_refuses_tied_weights_across_stages():
    with pytest.raises(ShipyardError, match=r"ties weights across pipeline stages \(lm_head.weight = model.embed_tokens.weight\).*tie_word_embeddings=false"):
        pipeline.validate(random_model("qwen3-tiny"), ParallelConfig(pp=2))


def test_refuses_more_stages_than_layers():
    with pytest.raises(ShipyardError, match=r"has 2 decoder layers, fewer than the 4 pipeline stages.*parallel.pp=1 with FSDP2"):
        pipeline.validate(random_model("qwen3-tiny-untied"), ParallelConfig(pp=4))
    with pytest.raises(ShipyardError, match=r"fewer than the 8 pipeline stages.*interleaved_1f1b"):
        pipeline.validate(random_model("qwen3-tiny-4l"), ParallelConfig(pp=4, pp_schedule="interleaved_1f1b"))


def test_refuses_model_without_decoder_layers():
    class Blob(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.Sequential(nn.Linear(4, 4))

        def get_decoder(self):
            return self

    with pytest.raises(ShipyardError, match="Blob cannot be pipelined: no recognisable decoder layer list"):
        pipeline.validate(Blob(), ParallelConfig(pp=2))


def test_refuses_decoder_without_generic_parts_unless_it_opts_out():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=64, n_head=2, vocab_size=512, tie_word_embeddings=False))
    with pytest.raises(ShipyardError, match=r"GPT2LMHeadModel cannot be pipelined with the generic stage forward: its decoder lacks embed_tokens, norm, rotary_emb"):
        pipeline.validate(gpt2, ParallelConfig(pp=2))
    gpt2._pp_keeps_forward = True  # its own forward is pipeline-aware: no patching, only the split is checked
    assert pipeline.validate(gpt2, ParallelConfig(pp=2)) == [[0, 1], [2, 3]]


def test_balanced_and_explicit_splits():
    assert pipeline.stage_layer_ids(5, 2, None) == [[0, 1, 2], [3, 4]]
    assert pipeline.stage_layer_ids(4, 2, [1]) == [[0], [1, 2, 3]]
    with pytest.raises(ShipyardError, match=r"parallel.pp_split \[3, 1\]"):
        pipeline.stage_layer_ids(4, 3, [3, 1])


def test_stage_keeps_original_names():
    model = random_model("qwen3-tiny-4l")
    last = pipeline.build_stage(model, [2, 3], first=False, last=True)
    names = [n for n, _ in last.named_parameters()]
    assert names[0].startswith("model.layers.2.") and "lm_head.weight" in names
    assert not [n for n in names if "embed_tokens" in n or "layers.0." in n]
    first = pipeline.build_stage(model, [0, 1], first=True, last=False)
    assert "model.embed_tokens.weight" in dict(first.named_parameters()) and first.lm_head is None
    assert len(model.model.layers) == 4 and model.lm_head is not None  # the original is untouched

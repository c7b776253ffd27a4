"""Pipeline parallelism on CPU (gloo): equal to one process (tied embeddings too), same names, clear refusals.

Every run keeps a validation set whose size (21) is not a multiple of any micro-batch, and generates
(eval.generate): the pipelined runs must give the single-process validation loss and exact match, and an
export that loads in transformers with the same logits.
"""

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
from shipyard.models.structure import tied_aliases
from shipyard.models.load import load
from shipyard.data.dataset import build_datasets
from shipyard.parallel import pipeline
from shipyard.train.loop import train
from shipyard.data.loader import supervised_tokens
from shipyard.train.step import LocalRunner
from tests.conftest import REPO, assert_close_trajectory, losses, run_cli
from tests.fixtures import preset_folder, random_model

STEPS = 10


def overrides(out, preset, ranks_dp=1, *extra):
    return [
        f"output_dir={out}", f"model.path={preset}", f"train.max_steps={STEPS}", f"train.micro_batch_size={8 // ranks_dp}",
        "data.train={synthetic: reverse_words, num_records: 300, seed: 0}",
        "data.validation={synthetic: reverse_words, num_records: 21, seed: 1}",
        "eval.batch_size=16", "eval.max_prompts=4", "eval.generate=true",
        "optim.lr=1e-3", "optim.warmup_steps=2", "checkpoint.every_steps=5", *extra,
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single-process runs of the tiny architectures: the quickstart's tied qwen3-tiny, and two untied ones."""
    root = tmp_path_factory.mktemp("pp")
    for preset in ("qwen3-tiny", "qwen3-tiny-4l", "llama-tiny"):
        train(load_recipe("quickstart", overrides(root / preset, preset)))
    return root


def assert_same_run(reference_dir, run_dir):
    """Per-step losses, validation loss, exact match and the exported model of `run_dir` equal one process's."""
    assert_close_trajectory(losses(reference_dir), losses(run_dir), STEPS)
    want, got = (json.loads((d / "summary.json").read_text())["eval"] for d in (reference_dir, run_dir))
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert (got["exact_match"], got["num_prompts"]) == (want["exact_match"], want["num_prompts"])
    assert_same_export(reference_dir / "final", run_dir / "final")


def assert_same_export(reference_dir, export_dir):
    from transformers import AutoModelForCausalLM

    names = [set(safe_open(d / "model.safetensors", "pt").keys()) for d in (reference_dir, export_dir)]
    assert names[1] == names[0]  # tied: the embedding once, no lm_head.weight, as transformers writes it
    want, got = (AutoModelForCausalLM.from_pretrained(d) for d in (reference_dir, export_dir))
    assert got.config.tie_word_embeddings == want.config.tie_word_embeddings
    ids = torch.arange(3, 43).reshape(2, 20)
    with torch.no_grad():
        assert torch.allclose(got(ids).logits, want(ids).logits, rtol=1e-4, atol=1e-4)


def run_pp(out, preset, nproc=2, *extra, env=None, ok=True):
    proc = run_cli("train", "quickstart", *overrides(out, preset, nproc // 2, "parallel.pp=2", *extra),
                   "--nproc-per-node", str(nproc), env=env)
    assert (proc.returncode == 0) == ok, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


# pp_qwen3, the PP=2 1F1B run of the Qwen3-style model several tests read, is session-scoped in tests/served.py
# (its export is served by the suite's one vLLM worker).


@pytest.fixture(scope="module")
def pp_tied(tmp_path_factory):
    """The quickstart model (tied embeddings) in 2 stages: the embedding on one, the LM head on the other."""
    out = tmp_path_factory.mktemp("pp") / "pp_tied"
    run_pp(out, "qwen3-tiny", 2)
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_1f1b_equals_one_process_qwen3(reference, pp_qwen3):
    assert_same_run(reference / "qwen3-tiny-4l", pp_qwen3)


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_tied_embeddings_equal_one_process(reference, pp_tied):
    assert_same_run(reference / "qwen3-tiny", pp_tied)
    info = json.loads((pp_tied / "checkpoints" / "step_10" / "shipyard" / "checkpoint.json").read_text())
    assert info["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}  # resumable unpipelined too


@pytest.mark.slow
@pytest.mark.distributed
def test_pp_resumes_after_a_kill(reference, pp_tied, tmp_path):
    """Killed right after the step-5 checkpoint, run again: the uninterrupted run's numbers, tied weight in sync."""
    out = tmp_path / "pp"
    run_pp(out, "qwen3-tiny", 2, env={"SHIPYARD_CRASH_AT": "renamed:5"}, ok=False)
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == ["step_5"]
    proc = run_pp(out, "qwen3-tiny", 2)
    assert "resumed from" in proc.stdout
    assert losses(out) == pytest.approx(losses(pp_tied), rel=1e-6)
    assert_same_run(reference / "qwen3-tiny", out)


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_1f1b_equals_one_process_llama(reference, tmp_path):
    run_pp(tmp_path / "pp", "llama-tiny", 2, "parallel.pp_schedule=1f1b", "parallel.pp_microbatches=4")
    assert_close_trajectory(losses(reference / "llama-tiny"), losses(tmp_path / "pp"), STEPS)


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_equals_one_process_gemma3_per_layer_type_rotary(tmp_path):
    """Gemma 3's local and global layers rotate with different bases: each stage must pass each layer its own."""
    train(load_recipe("quickstart", overrides(tmp_path / "one", "gemma3-tiny")))
    run_pp(tmp_path / "pp", "gemma3-tiny", 2)
    assert_same_run(tmp_path / "one", tmp_path / "pp")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("schedule", ["gpipe", "interleaved_1f1b"])
def test_other_schedules_equal_one_process(reference, tmp_path, schedule):
    run_pp(tmp_path / "pp", "qwen3-tiny-4l", 2, f"parallel.pp_schedule={schedule}")
    assert_close_trajectory(losses(reference / "qwen3-tiny-4l"), losses(tmp_path / "pp"), STEPS)


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_times_dp2_equals_one_process(reference, tmp_path):
    """FSDP2 inside each stage, with the tied embedding's shards summed across the first and last stage; the base
    is the preset's initial weights as a folder, so each rank fills only its stage's shards from the files."""
    proc = run_pp(tmp_path / "pp", str(preset_folder(tmp_path / "base", "qwen3-tiny")), 4)
    assert "(pipeline 2 x data 2)" in proc.stdout
    assert "weights: built empty, each rank reading only the tensors it keeps" in proc.stdout
    assert_same_run(reference / "qwen3-tiny", tmp_path / "pp")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("preset", ["qwen3-tiny-4l", "qwen3-tiny"])
def test_gradients_and_mask_caching_per_stage(tmp_path, preset):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(REPO / "tests" / "pipeline_worker.py"), preset, str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the same batch through the whole model in one process
    model, tokenizer, _ = load(ModelConfig(path=preset), seed=0)
    cfg = DataConfig(train=[{"synthetic": "reverse_words", "num_records": 8, "seed": 0}], max_length=48)
    batch = collate(build_datasets(cfg, tokenizer, seed=0).train, tokenizer.pad_token_id)
    n = supervised_tokens([batch])
    loss = LocalRunner(model, 2048, lambda: torch.autocast("cpu", enabled=False)).train_micro_batches([batch], 1.0 / n, "cpu")
    expected = {name: p.grad for name, p in model.named_parameters()}

    first, last = torch.load(tmp_path / "grads_0.pt"), torch.load(tmp_path / "grads_1.pt")
    # every parameter under its usual name, on exactly one stage; a tied embedding on both, with the summed gradient
    assert set(first) & set(last) == ({"model.embed_tokens.weight"} if preset == "qwen3-tiny" else set())
    got = {**first, **last}
    assert set(got) == set(expected)
    for name in set(first) & set(last):
        assert torch.equal(first[name], last[name]), name
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
@pytest.mark.served("pipeline")
def test_pp_export_serves_in_vllm(served):
    report = served["pipeline/pp2"]  # pp_qwen3's export (tests/served.py)
    assert report["ok"], report


# ------------------------------------------------------------------ validation


def test_tied_embeddings_live_on_first_and_last_stage_only():
    model = random_model("qwen3-tiny-4l")
    model.lm_head.weight = model.model.embed_tokens.weight  # tie_word_embeddings, as a loaded model has it
    assert pipeline.validate(model, ParallelConfig(pp=4)) == [[0], [1], [2], [3]]
    for ids, first, last in (([0], True, False), ([3], False, True)):
        stage = pipeline.build_stage(model, ids, first, last)
        # both names of the one Parameter: the stage's state dict and tied aliases are the whole model's
        assert tied_aliases(stage) == {"lm_head.weight": "model.embed_tokens.weight"}
    middle = pipeline.build_stage(model, [1], False, False)
    assert middle.model.embed_tokens is None and middle.lm_head is None


def test_refuses_other_tied_weights_across_stages():
    model = random_model("qwen3-tiny-4l")
    model.model.layers[3].mlp.up_proj.weight = model.model.layers[0].mlp.up_proj.weight
    tie = r"\(model.layers.3.mlp.up_proj.weight = model.layers.0.mlp.up_proj.weight\)"
    with pytest.raises(ShipyardError, match=r"ties weights other than its input and output embeddings " + tie):
        pipeline.validate(model, ParallelConfig(pp=2))


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


def test_pp2_lora_on_tied_preset_equals_one_process(tmp_path):
    """A LoRA recipe pipelined: the adapters train as in one process, and the adapter directory is written."""
    lora = ["lora={r: 8, alpha: 16}", "eval.generate=false"]
    one, pp = tmp_path / "one", tmp_path / "pp"
    train(load_recipe("quickstart", overrides(one, "qwen3-tiny", 1, *lora)))
    run_pp(pp, "qwen3-tiny", 2, *lora)
    assert_close_trajectory(losses(one), losses(pp), STEPS)
    assert json.loads((pp / "final" / "adapter_config.json").read_text())["peft_type"] == "LORA"

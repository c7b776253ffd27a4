"""Numbers the training loop must get exactly right."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shipyard.config import load_recipe
from shipyard.data.dataset import build_datasets
from shipyard.data.loader import collate
from shipyard.models.load import load
from shipyard.parallel.topology import Topology
from shipyard.train.loop import train
from shipyard.train.precision import autocast_for
from shipyard.train.step import LocalRunner, train_step
from shipyard.models.logits import chunked_cross_entropy
from shipyard.train.loss import causal_lm_loss, isolates_packed_documents
from shipyard.train.optim import build_optimizer, build_scheduler, lr_factor


def grads_after_one_step(recipe, samples, micro_batch_size, accum):
    model, _, _ = load(recipe.model, seed=0)
    optimizer = build_optimizer(list(model.named_parameters()), recipe.optim, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, 10, recipe.optim)
    optimizer.step = lambda: None  # keep the weights and gradients of this one step for comparison
    optimizer.zero_grad = lambda set_to_none=True: None
    micro = [collate(samples[i : i + micro_batch_size], pad_id=0) for i in range(0, len(samples), micro_batch_size)]
    assert len(micro) == accum
    runner = LocalRunner(model, recipe.train.loss_chunk_size, autocast_for(recipe, torch.device("cpu")))
    params = [p for p in model.parameters() if p.requires_grad]
    metrics = train_step(runner, params, micro, optimizer, scheduler, None, Topology(), torch.device("cpu"))
    return {n: p.grad.clone() for n, p in model.named_parameters()}, metrics["train/loss"]


@pytest.mark.filterwarnings(r"ignore:Seems like `optimizer.step\(\)` has been overridden")
def test_grad_accumulation_equals_big_batch(tiny_recipe, tokenizer):
    recipe = tiny_recipe()
    samples = build_datasets(recipe.data, tokenizer, seed=0).train[:4]
    assert len({len(s.input_ids) for s in samples}) > 1  # different lengths: padding differs between splits
    big, loss_big = grads_after_one_step(recipe, samples, micro_batch_size=4, accum=1)
    acc, loss_acc = grads_after_one_step(recipe, samples, micro_batch_size=1, accum=4)
    assert loss_big == pytest.approx(loss_acc, rel=1e-6)
    for name in big:
        assert torch.allclose(big[name], acc[name], atol=1e-6, rtol=0), name


def test_chunked_loss_matches_transformers_loss_and_grads(tokenizer):
    from shipyard.models.presets import preset_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config("qwen3-tiny-untied"))
    ids = torch.randint(0, 512, (3, 33))
    mask = torch.ones_like(ids)
    mask[2, 20:] = 0
    labels = ids.clone()
    labels[:, :7] = -100
    labels[mask == 0] = -100
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    (ref * 1).backward()
    ref_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    total, n = causal_lm_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, chunk_size=5)
    (total / n).backward()
    assert (total / n).item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(model.lm_head.weight.grad, ref_grad, atol=1e-7)


def test_chunked_cross_entropy_never_builds_all_logits():
    hidden = torch.randn(100, 16, requires_grad=True)
    weight = torch.randn(1000, 16, requires_grad=True)
    targets = torch.randint(0, 1000, (100,))
    shapes = []
    original = torch.nn.functional.linear

    def spy(x, w, b=None):
        shapes.append(tuple(x.shape))
        return original(x, w, b)

    torch.nn.functional.linear = spy
    try:
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=32)
        loss.backward()
    finally:
        torch.nn.functional.linear = original
    assert max(s[0] for s in shapes) == 32  # forward and recompute in backward: one chunk of rows at a time
    ref = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_schedules():
    from shipyard.config import OptimConfig

    cos = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, 100, cos) == pytest.approx(0.1)
    assert lr_factor(9, 100, cos) == pytest.approx(1.0)
    assert lr_factor(10, 100, cos) == pytest.approx(1.0)
    assert lr_factor(100, 100, cos) == pytest.approx(0.1)
    wsd = OptimConfig(lr=1.0, warmup_steps=0, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(79, 100, wsd) == 1.0
    assert lr_factor(89, 100, wsd) == pytest.approx(0.5)
    assert lr_factor(99, 100, wsd) == pytest.approx(0.0)


def losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows}


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run_bitwise(tiny_recipe, tmp_path):
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    extra = ("checkpoint.every_steps=4", "train.grad_accum_steps=2", "eval.generate=false")
    train(tiny_recipe(*extra, steps=10, out=full_dir))

    # Simulate a run that stopped right after its step-4 checkpoint.
    shutil.copytree(full_dir, cut_dir)
    ckpts = cut_dir / "checkpoints"
    for step in (8, 10):
        shutil.rmtree(ckpts / f"step_{step}")
    (ckpts / "LATEST").write_text("step_4\n")
    result = train(tiny_recipe(*extra, steps=10, out=cut_dir))
    assert result.summary["resumed_from_step"] == 4

    full, resumed = losses(full_dir), losses(cut_dir)
    assert sorted(resumed) == list(range(1, 11))
    assert [full[s] for s in range(1, 11)] == [resumed[s] for s in range(1, 11)]  # bitwise, not approx
    a = AutoModelForCausalLM.from_pretrained(full_dir / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(cut_dir / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_final_checkpoint_loads_in_transformers_with_equal_logits(tiny_recipe, tmp_path):
    result = train(tiny_recipe(steps=4, out=tmp_path / "run"))
    final = tmp_path / "run" / "final"
    assert result.summary["final_checkpoint"] == str(final)
    loaded = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    ids = tok.apply_chat_template([{"role": "user", "content": "reverse: red fox sun"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    trained = result.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, trained(ids).logits)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("final_train_loss", "eval", "tokens_per_second", "wall_seconds", "steps", "skipped_records", "final_checkpoint"):
        assert key in summary
    assert summary["steps"] == 4 and 0.0 <= summary["eval"]["exact_match"] <= 1.0


@pytest.mark.slow
def test_activation_checkpointing_and_compile_keep_losses_and_names(tiny_recipe, tmp_path):
    from safetensors import safe_open

    def run(name, *extra):
        train(tiny_recipe("eval.generate=false", *extra, steps=4, out=tmp_path / name))
        return losses(tmp_path / name)

    plain = run("plain")
    assert run("ac", "parallel.activation_checkpointing=full") == plain  # recomputation is exact on CPU
    assert run("sac", "parallel.activation_checkpointing=selective") == plain
    compiled = run("compiled", "parallel.compile=true", "parallel.activation_checkpointing=full")
    assert compiled == pytest.approx(plain, rel=1e-6)
    for name in ("ac", "compiled"):
        keys = list(safe_open(tmp_path / name / "final" / "model.safetensors", "pt").keys())
        assert keys and not [k for k in keys if "_orig_mod" in k or "_checkpoint_wrapped_module" in k]


@pytest.mark.parametrize("mode, recomputes_matmuls", [("none", False), ("selective", False), ("full", True)])
def test_selective_checkpointing_recomputes_no_matmul(mode, recomputes_matmuls):
    from torch.utils.flop_counter import FlopCounterMode

    from shipyard.models.structure import decoder_layers
    from shipyard.parallel.fsdp import checkpointed
    from tests.fixtures import random_model

    def backward_flops(mode):
        model = random_model()
        layers = decoder_layers(model)
        for key, layer in list(layers.named_children()):
            setattr(layers, key, checkpointed(layer, mode))
        ids = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        return counter.get_total_flops(), loss.item()

    (flops, loss), (plain_flops, plain_loss) = backward_flops(mode), backward_flops("none")
    assert loss == plain_loss
    # Full recomputation repeats every forward matmul in backward; selective keeps their outputs.
    assert (flops > plain_flops) == recomputes_matmuls
    assert flops >= plain_flops


def test_packed_rows_keep_documents_apart(tokenizer):
    from shipyard.data.chat import Sample
    from shipyard.data.loader import pack

    a, b, c = Sample([1, 5, 6, 7], [-100, -100, 6, 7]), Sample([1, 8, 9], [-100, 8, 9]), Sample([1, 4], [-100, 4])
    batch = pack([a, b, c], pad_id=0, row_length=6)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 1, 4], [1, 8, 9, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    # a document's first label is never a target of the previous document's last token
    assert batch["labels"].tolist() == [[-100, -100, 6, 7, -100, 4], [-100, 8, 9, -100, -100, -100]]
    assert batch["attention_mask"].sum() == 9


def test_packed_loss_equals_unpacked_loss(tokenizer):
    from shipyard.config import DataConfig
    from shipyard.data.loader import collate, pack
    from tests.fixtures import random_model

    samples = build_datasets(DataConfig(train=[{"synthetic": "reverse_words", "num_records": 12}]), tokenizer, 0).train
    model = random_model("qwen3-tiny")
    assert isolates_packed_documents(model, 512)
    with torch.no_grad():
        padded, n1 = causal_lm_loss(model, collate(samples, 0), chunk_size=64)
        packed_batch = pack(samples, 0, row_length=64)
        packed, n2 = causal_lm_loss(model, packed_batch, chunk_size=64)
    assert packed_batch["input_ids"].shape[0] < len(samples)  # fewer rows: packing happened
    assert n1 == n2 and packed.item() == pytest.approx(padded.item(), rel=1e-5)


@pytest.mark.slow
def test_packed_training_follows_the_unpacked_trajectory(tiny_recipe, tmp_path):
    def run(name, packing):
        train(tiny_recipe(f"data.packing={packing}", "optim.lr=1e-3", "eval.generate=false", steps=10, out=tmp_path / name))
        return losses(tmp_path / name)

    unpacked, packed = run("unpacked", "false"), run("packed", "true")
    assert packed == pytest.approx(unpacked, rel=1e-5)  # the same samples per step, laid out differently

"""Multi-token-prediction heads: the loss against an independent reference, frozen-base training, export round
trips in both layouts, the base-head guard, bitwise resume and FSDP2 equivalence."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from shipyard.config import load_recipe
from shipyard.errors import ShipyardError
from shipyard.models import mtp
from shipyard.models.presets import preset_config
from shipyard.models.weights import DirectoryWeights
from shipyard.train.loss import mtp_losses
from shipyard.data.loader import supervised_tokens
from tests.conftest import run_cli, tiny_overrides

IGNORE = -100


# ------------------------------------------------------------------ 1. the loss against an independent reference

# What each preset's family must train, written out here rather than read from mtp.STYLES:
# (hidden state depth 1 reads, what depth k hands to depth k + 1); both zero the embedding at position 0.
FAMILY_SEMANTICS = {"qwen2-tiny": ("pre_norm", "post_norm"), "qwen3-tiny": ("post_norm", "pre_norm")}


def _causal_float_mask(n: int) -> torch.Tensor:
    mask = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)
    return mask[None, None]  # [1, 1, n, n]: added to the attention scores


def _reference_losses(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, depths: int):
    """(main, [depth 1.., ...]) summed CE, computed row by row on the unpadded tokens without mtp_outputs."""
    hidden_in, chain = FAMILY_SEMANTICS[model.name_or_path]
    inner = model.model
    embed, lm_head = inner.embed_tokens, model.lm_head
    main = torch.zeros((), dtype=torch.float64)
    per_depth = [torch.zeros((), dtype=torch.float64) for _ in range(depths)]
    for b in range(ids.shape[0]):
        n_real = int(mask[b].sum())
        assert bool(mask[b, :n_real].all()) and not bool(mask[b, n_real:].any())  # right padding
        x, y = ids[b : b + 1, :n_real], labels[b, :n_real]
        captured = {}
        handle = inner.norm.register_forward_hook(lambda _m, args, _out: captured.__setitem__("pre", args[0]))
        try:
            out = model(input_ids=x, output_hidden_states=True, use_cache=False)
        finally:
            handle.remove()
        post, pre = out.hidden_states[-1], captured["pre"]
        assert torch.allclose(inner.norm(pre), post, atol=1e-6)  # the hook caught the final norm's input
        keep = y[1:] != IGNORE
        main += F.cross_entropy(lm_head(post[0, :-1])[keep], y[1:][keep], reduction="sum").double()

        previous = pre if hidden_in == "pre_norm" else post
        for k in range(1, depths + 1):
            n = n_real - k  # positions t = 0..n_real-k-1 read token t + k
            layer = model.mtp.layers[k - 1]
            e = embed(x[:, k:]).clone()
            e[:, 0] = 0.0  # zero_first_embedding
            fused = layer.eh_proj(torch.cat([layer.enorm(e), layer.hnorm(previous[:, :n])], dim=-1))
            positions = torch.arange(n).unsqueeze(0)
            rope = inner.rotary_emb(fused, positions)
            h = layer.block(fused, attention_mask=_causal_float_mask(n), position_ids=positions,
                            position_embeddings=rope)
            h = h[0] if isinstance(h, tuple) else h
            normed = layer.final_norm(h)
            # position t predicts token t + k + 1: only t <= n_real - k - 2 has one
            targets = y[k + 1 :]
            logits = lm_head(normed[0, : n - 1])
            keep = targets != IGNORE
            per_depth[k - 1] += F.cross_entropy(logits[keep], targets[keep], reduction="sum").double()
            previous = normed if chain == "post_norm" else h
    return main, per_depth


def _randomise(module: torch.nn.Module, generator: torch.Generator, scale: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


@pytest.mark.parametrize("preset, layout", [("qwen2-tiny", "mimo"), ("qwen3-tiny", "shipyard")])
def test_mtp_losses_equal_an_independent_reference(preset, layout):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config(preset))
    model.name_or_path = preset
    model.eval()
    assert mtp.style_for(model.config).layout == layout
    assert mtp.attach(model, 2, None, seed=0) == (2, "attached")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.mtp.layers:  # norms start at identity: make each one different so order mistakes show
            for norm in (layer.enorm, layer.hnorm, layer.final_norm):
                norm.weight.copy_(1.0 + 0.5 * torch.randn(norm.weight.shape, generator=g))
        model.model.norm.weight.copy_(1.0 + 0.5 * torch.randn(model.model.norm.weight.shape, generator=g))
    for layer in model.mtp.layers:  # the blocks start as copies of the base's last block: set them apart
        _randomise(layer.block, g, 0.02)

    seq = 14
    ids = torch.randint(3, 512, (2, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    ids[1, 9:] = 0  # right padding with the pad id
    labels = ids.clone()
    labels[:, :4] = IGNORE  # the prompt
    labels[0, 7] = IGNORE  # a hole inside an answer
    labels[mask == 0] = IGNORE
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    with torch.no_grad():
        got = mtp_losses(model, batch, chunk_size=5)
        main, per_depth = _reference_losses(model, ids, mask, labels, depths=2)
    assert len(got.depths) == 2
    assert float(got.main) == pytest.approx(float(main), rel=1e-5, abs=1e-5)
    for k, (a, b) in enumerate(zip(got.depths, per_depth), start=1):
        assert float(a) == pytest.approx(float(b), rel=1e-5, abs=1e-5), f"depth {k}: {float(a)} vs {float(b)}"
    # The depths do not all agree with each other (a swapped depth or a shared block would show)
    assert abs(float(per_depth[0]) - float(per_depth[1])) > 1e-3

    # Depth k is counted over its own supervised targets (labels[t + k + 1]): the count the step normalises by
    for k in (1, 2):
        assert supervised_tokens([batch], ahead=k) == int((labels[:, k + 1 :] != IGNORE).sum())


@pytest.mark.filterwarnings(r"ignore:Seems like `optimizer.step\(\)` has been overridden")
def test_train_step_normalises_each_depth_by_its_own_global_count():
    """Two micro-batches of one row: gradients and logged losses equal those of the one-batch objective
    main / N_0 + loss_scale x mean_k(depth_k / N_k), with N_k the supervised targets of depth k."""
    from shipyard.config import OptimConfig
    from shipyard.parallel.topology import Topology
    from shipyard.train.optim import build_optimizer, build_scheduler
    from shipyard.train.step import LocalRunner, MTPObjective, train_step

    def fresh():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(preset_config("qwen3-tiny"))
        mtp.attach(model, 2, None, seed=0)
        return model

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 512, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    labels = ids.clone()
    labels[0, :1] = IGNORE  # supervised from position 1: each depth loses targets at the front
    labels[1, :5] = IGNORE  # row 1 has few targets: per-row and global normalisation differ
    labels[mask == 0] = IGNORE
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    counts = [int((labels[:, 1 + k :] != IGNORE).sum()) for k in range(3)]
    assert len(set(counts)) == 3

    ref_model = fresh()
    out = mtp_losses(ref_model, batch, chunk_size=64)
    scale = 0.3
    objective = out.main / counts[0] + scale / 2 * (out.depths[0] / counts[1] + out.depths[1] / counts[2])
    objective.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref_model.named_parameters() if p.grad is not None}
    assert any(n.startswith("mtp.") for n in ref_grads)

    model = fresh()
    optimizer = build_optimizer(list(model.named_parameters()), OptimConfig(), torch.device("cpu"))
    scheduler = build_scheduler(optimizer, 10, OptimConfig())
    optimizer.step = lambda: None  # keep this step's gradients
    optimizer.zero_grad = lambda set_to_none=True: None
    runner = LocalRunner(model, 64, lambda: contextlib.nullcontext(), None, MTPObjective(2, scale))
    micro = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(2)]
    metrics = train_step(runner, [p for p in model.parameters() if p.requires_grad], micro, optimizer, scheduler,
                         None, Topology(), torch.device("cpu"))
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == ref_grads.keys()
    for name in ref_grads:
        tol = 1e-5 * float(ref_grads[name].abs().max())
        assert torch.allclose(got[name], ref_grads[name], rtol=1e-5, atol=tol), name
    main = float(out.main.detach()) / counts[0]
    depths = [float(out.depths[k].detach()) / counts[k + 1] for k in range(2)]
    assert metrics["train/loss_main"] == pytest.approx(main, rel=1e-6)
    assert metrics["train/loss_mtp_1"] == pytest.approx(depths[0], rel=1e-6)
    assert metrics["train/loss_mtp_2"] == pytest.approx(depths[1], rel=1e-6)
    assert metrics["train/loss"] == pytest.approx(main + scale * sum(depths) / 2, rel=1e-6)


# ------------------------------------------------------------------ runs shared by the tests below


def _recipe(out: Path, *extra: str, steps: int):
    return load_recipe("quickstart", tiny_overrides(out, steps) + ["eval.generate=false", *extra])


def _train(out: Path, *extra: str, steps: int):
    from shipyard.train.loop import train

    recipe = _recipe(out, *extra, steps=steps)
    return recipe, train(recipe)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step}"


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    weights = DirectoryWeights(directory)
    return weights.load(sorted(weights.shapes))


FROZEN_STEPS = 20


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    """qwen2-tiny, one MTP layer trained on a frozen base (exported in the MiMo layout)."""
    out = tmp_path_factory.mktemp("mtp") / "frozen"
    recipe, result = _train(out, "model.path=qwen2-tiny", "model.mtp={freeze_base: true}", "optim.lr=1e-2",
                            steps=FROZEN_STEPS)
    return out, recipe, result


@pytest.fixture(scope="module")
def qwen3_run(tmp_path_factory):
    """qwen3-tiny (no vLLM MTP model: the head goes to the side file), two layers trained jointly."""
    out = tmp_path_factory.mktemp("mtp") / "qwen3"
    recipe, result = _train(out, "model.mtp={num_layers: 2, loss_scale: 0.5}", steps=3)
    return out, recipe, result


# ------------------------------------------------------------------ 2. frozen base


@pytest.mark.slow
def test_frozen_base_stays_bit_identical_while_the_head_learns(frozen_run):
    from shipyard.models.load import load

    out, recipe, _ = frozen_run
    fresh, _, _ = load(recipe.model, recipe.seed)
    base_state = {n: t.clone() for n, t in fresh.state_dict().items()}
    mtp.attach(fresh, 1, None, seed=recipe.seed)
    head_state = {f"mtp.{n}": t for n, t in fresh.mtp.state_dict().items()}

    trained = _tensors(_step_dir(out, FROZEN_STEPS))
    tied = json.loads((_step_dir(out, FROZEN_STEPS) / "shipyard" / "checkpoint.json").read_text())["tied"]
    base_names = [n for n in trained if not n.startswith("mtp.")]
    assert sorted(base_names) == sorted(n for n in base_state if n not in tied)
    for name in base_names:
        assert torch.equal(trained[name], base_state[name]), f"{name} moved on a frozen base"

    mtp_names = sorted(n for n in trained if n.startswith("mtp."))
    assert mtp_names == sorted(head_state) and any(".block." in n for n in mtp_names)
    unchanged = [n for n in mtp_names if torch.equal(trained[n], head_state[n])]
    assert not unchanged, f"MTP tensors that did not train: {unchanged}"

    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["eval"]["mtp_before_training"], summary["eval"]
    assert after["loss_mtp_1"] < before["loss_mtp_1"] - 0.5, (before, after)
    for key in ("loss", "loss_mtp_1", "mtp_acceptance_1", "mtp_mean_acceptance_length"):
        assert key in after
    assert set(before) == {"loss_mtp_1", "mtp_acceptance_1", "mtp_mean_acceptance_length"}
    assert after["mtp_mean_acceptance_length"] == pytest.approx(1 + after["mtp_acceptance_1"])
    assert 0.0 <= after["mtp_acceptance_1"] <= 1.0

    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, FROZEN_STEPS + 1))
    for r in rows:  # loss = main + loss_scale (default 0.3) x mean over depths
        assert r["train/loss"] == pytest.approx(r["train/loss_main"] + 0.3 * r["train/loss_mtp_1"], rel=1e-12)
    assert rows[-1]["train/loss_mtp_1"] < rows[0]["train/loss_mtp_1"]


# ------------------------------------------------------------------ 3. export round trips

MIMO_RENAMES = {"enorm": "token_layernorm", "hnorm": "hidden_layernorm", "eh_proj": "input_proj",
                "final_norm": "final_layernorm"}


def _checkpoint_name_of_mimo(name: str) -> str:
    """model.mtp_layers.{i}.X -> mtp.layers.{i}.{enorm,...,block.X}, written out independently of mtp_layout."""
    rest = name.removeprefix("model.mtp_layers.")
    layer, part = rest.split(".", 1)
    inverse = {v: k for k, v in MIMO_RENAMES.items()}
    top = part.split(".", 1)[0]
    if top in inverse:
        return f"mtp.layers.{layer}.{inverse[top]}.{part.split('.', 1)[1]}"
    return f"mtp.layers.{layer}.block.{part}"


def _swap_columns(w: torch.Tensor) -> torch.Tensor:
    h = w.shape[1] // 2
    return torch.cat([w[:, h:], w[:, :h]], dim=1)


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_mimo_export_round_trips_every_mtp_tensor(frozen_run, tmp_path):
    from shipyard.export.export import export_checkpoint

    out, _, _ = frozen_run
    final = out / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["MiMoForCausalLM"] and config["num_nextn_predict_layers"] == 1
    assert not (final / "mtp.safetensors").exists()
    exported = load_file(final / "model.safetensors")
    assert not [n for n in exported if n.startswith("mtp.")]

    # final/ -> the step checkpoint: every tensor accounted for, MTP ones renamed, input_proj halves swapped
    checkpoint = _tensors(_step_dir(out, FROZEN_STEPS))
    mapped = {}
    for name, t in exported.items():
        if name.startswith("model.mtp_layers."):
            source = _checkpoint_name_of_mimo(name)
            mapped[source] = _swap_columns(t) if source.endswith(".eh_proj.weight") else t
        else:
            mapped[name] = t
    _assert_same_tensors(mapped, checkpoint)
    mtp_served = sorted(n for n in exported if n.startswith("model.mtp_layers.0."))
    for part in MIMO_RENAMES.values():
        assert f"model.mtp_layers.0.{part}.weight" in mtp_served
    assert "model.mtp_layers.0.self_attn.q_proj.weight" in mtp_served
    eh = checkpoint["mtp.layers.0.eh_proj.weight"]
    assert not torch.equal(eh, _swap_columns(eh))  # the swap is visible

    # final/ -> export again: the same tensors, names and config
    again = tmp_path / "again"
    export_checkpoint(final, again)
    _assert_same_tensors(_tensors(again), _tensors(final))
    config_again = json.loads((again / "config.json").read_text())
    assert config_again["architectures"] == ["MiMoForCausalLM"] and config_again["num_nextn_predict_layers"] == 1


HEAD_PARTS = ("enorm", "hnorm", "eh_proj", "final_norm", "block")


def _checkpoint_name_of_side(name: str) -> str:
    """A side-file name -> the checkpoint's name (block tensors without their `block.` prefix get it back)."""
    layer, rest = name.removeprefix("mtp.layers.").split(".", 1)
    return name if rest.split(".", 1)[0] in HEAD_PARTS else f"mtp.layers.{layer}.block.{rest}"


@pytest.mark.slow
def test_side_file_export_round_trips_and_transformers_still_loads(qwen3_run, tmp_path):
    from shipyard.export.export import export_checkpoint

    out, _, result = qwen3_run
    final, step = out / "final", _step_dir(out, 3)
    side = load_file(final / "mtp.safetensors")
    assert sorted({n.split(".")[2] for n in side}) == ["0", "1"] and all(n.startswith("mtp.layers.") for n in side)
    index = json.loads((final / "model.safetensors.index.json").read_text())
    assert "mtp.safetensors" not in index["weight_map"].values()
    assert not [n for n in index["weight_map"] if n.startswith("mtp.")]
    config = json.loads((final / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 2 and config["architectures"] == ["Qwen3ForCausalLM"]

    # final/ -> the step checkpoint: every tensor accounted for, values exact (no column swap in this layout)
    checkpoint = _tensors(step)
    exported = _tensors(final)
    mapped = {(_checkpoint_name_of_side(n) if n.startswith("mtp.") else n): t for n, t in exported.items()}
    assert len(mapped) == len(exported)
    _assert_same_tensors(mapped, checkpoint)
    assert {_checkpoint_name_of_side(n) for n in side} == {n for n in checkpoint if n.startswith("mtp.")}

    # final/ -> export again: the same tensors under the same names, the head again beside the index
    again = tmp_path / "again"
    export_checkpoint(final, again)
    _assert_same_tensors(_tensors(again), exported)
    _assert_same_tensors(load_file(again / "mtp.safetensors"), side)
    again_index = json.loads((again / "model.safetensors.index.json").read_text())
    assert again_index["weight_map"] == index["weight_map"]

    loaded = AutoModelForCausalLM.from_pretrained(final).eval()
    assert not hasattr(loaded, "mtp")
    ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits)

    summary = json.loads((out / "summary.json").read_text())["eval"]
    for key in ("loss_mtp_1", "loss_mtp_2", "mtp_acceptance_1", "mtp_acceptance_2"):
        assert key in summary and key in summary["mtp_before_training"]
    assert summary["mtp_acceptance_2"] <= summary["mtp_acceptance_1"]  # a depth-2 draft needs depth 1 accepted
    assert summary["mtp_mean_acceptance_length"] == pytest.approx(
        1 + summary["mtp_acceptance_1"] + summary["mtp_acceptance_2"])
    for r in _metrics(out):  # loss = main + loss_scale x mean over the two depths
        assert r["train/loss"] == pytest.approx(
            r["train/loss_main"] + 0.5 * (r["train/loss_mtp_1"] + r["train/loss_mtp_2"]) / 2, rel=1e-12)


@pytest.mark.slow
def test_side_file_keeps_shipyards_own_names(qwen3_run):
    out, _, _ = qwen3_run
    side = load_file(out / "final" / "mtp.safetensors")
    checkpoint = DirectoryWeights(_step_dir(out, 3)).shapes
    assert sorted(side) == sorted(n for n in checkpoint if n.startswith("mtp."))


# ------------------------------------------------------------------ 4. the guard


@pytest.mark.slow
@pytest.mark.parametrize("run, steps, layers", [("frozen_run", FROZEN_STEPS, 1), ("qwen3_run", 3, 2)])
def test_a_base_with_a_head_is_loaded_never_reinitialised(request, run, steps, layers):
    """final/ as model.path with model.mtp={}: its head is loaded as trained (MiMo layout: input_proj's halves
    swapped back; side file); asking for another number of layers is refused."""
    from shipyard.models.load import load
    from shipyard.train.sft import attach_mtp

    out = request.getfixturevalue(run)[0]
    final = out / "final"
    checkpoint = _tensors(_step_dir(out, steps))
    recipe = load_recipe("quickstart", tiny_overrides(out / "unused", 1) + [f"model.path={final}", "model.mtp={}"])
    model, _, source = load(recipe.model, recipe.seed)
    note = attach_mtp(model, recipe, source, [])
    assert f"{layers} layer(s) loaded from the base" in note
    state = model.mtp.state_dict()
    assert sorted(f"mtp.{n}" for n in state) == sorted(n for n in checkpoint if n.startswith("mtp."))
    for name, t in state.items():
        assert torch.equal(t, checkpoint[f"mtp.{name}"]), name
    # the base's own weights load as trained too
    for name, t in model.state_dict().items():
        if not name.startswith("mtp.") and name in checkpoint:
            assert torch.equal(t, checkpoint[name]), name

    with pytest.raises(ShipyardError, match="already has an MTP head"):
        mtp.attach(model, None, final, seed=0)

    wrong = layers + 1
    recipe2 = load_recipe("quickstart", tiny_overrides(out / "unused", 1)
                          + [f"model.path={final}", f"model.mtp={{num_layers: {wrong}}}"])
    model2, _, source2 = load(recipe2.model, recipe2.seed)
    with pytest.raises(ShipyardError) as err:
        attach_mtp(model2, recipe2, source2, [])
    assert f"num_layers is {wrong}" in str(err.value) and f"already has {layers} MTP layer" in str(err.value)
    assert mtp.head_of(model2) is None


def test_attaching_twice_is_refused():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config("qwen3-tiny"))
    mtp.attach(model, 1, None, seed=0)
    head = model.mtp
    with pytest.raises(ShipyardError, match="already has an MTP head"):
        mtp.attach(model, 1, None, seed=0)
    assert model.mtp is head and len(head.layers) == 1


# ------------------------------------------------------------------ 5. resume


@pytest.mark.slow
def test_resume_mid_run_is_bitwise_equal(tmp_path):
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    extra = ("model.path=qwen2-tiny", "model.mtp={}", "checkpoint.every_steps=4", "train.grad_accum_steps=2")
    _train(full_dir, *extra, steps=8)

    # A run that stopped right after its step-4 checkpoint.
    shutil.copytree(full_dir, cut_dir)
    shutil.rmtree(_step_dir(cut_dir, 8))
    shutil.rmtree(cut_dir / "final")
    (cut_dir / "checkpoints" / "LATEST").write_text("step_4\n")
    _, result = _train(cut_dir, *extra, steps=8)
    assert result.summary["resumed_from_step"] == 4

    full, resumed = _metrics(full_dir), _metrics(cut_dir)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    keys = ("train/loss", "train/loss_main", "train/loss_mtp_1", "train/grad_norm", "train/supervised_tokens")
    for a, b in zip(full, resumed):
        assert [a[k] for k in keys] == [b[k] for k in keys], a["step"]  # bitwise, not approx
    assert full[-1]["train/loss_mtp_1"] != full[0]["train/loss_mtp_1"]

    for sub in (Path("checkpoints") / "step_8", Path("final")):
        a, b = _tensors(full_dir / sub), _tensors(cut_dir / sub)
        assert any(n.startswith(("mtp.", "model.mtp_layers.")) for n in a)
        _assert_same_tensors(a, b)
    eval_a = json.loads((full_dir / "summary.json").read_text())["eval"]
    eval_b = json.loads((cut_dir / "summary.json").read_text())["eval"]
    for key in ("loss", "loss_mtp_1", "mtp_acceptance_1"):
        assert eval_a[key] == eval_b[key], key


# ------------------------------------------------------------------ 6. FSDP2


DIST_STEPS, GLOBAL_BATCH = 4, 16


def _cli_args(out: Path, ranks: int) -> list[str]:
    return [
        "train", "quickstart", f"output_dir={out}", f"train.max_steps={DIST_STEPS}",
        f"train.micro_batch_size={GLOBAL_BATCH // ranks}", "checkpoint.every_steps=null",
        "data.train={synthetic: reverse_words, num_records: 200, seed: 0}",
        "data.validation={synthetic: reverse_words, num_records: 16, seed: 1}",
        "eval.generate=false", "optim.warmup_steps=2", "optim.lr=1e-3",
        "model.path=qwen2-tiny", "model.mtp={}",
    ] + (["--nproc-per-node", str(ranks)] if ranks > 1 else [])


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_two_ranks_equal_one_rank(tmp_path):
    runs = {}
    for ranks in (1, 2):
        out = tmp_path / f"x{ranks}"
        if ranks == 1:  # the reference in this process: a new interpreter would add only its start-up
            from shipyard.train.loop import train

            train(load_recipe("quickstart", _cli_args(out, ranks)[2:]))
        else:
            proc = run_cli(*_cli_args(out, ranks))
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        runs[ranks] = _metrics(out)
    one, two = runs[1], runs[2]
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, DIST_STEPS + 1))
    for a, b in zip(one, two):
        assert a["train/supervised_tokens"] == b["train/supervised_tokens"]
        for key in ("train/loss", "train/loss_main", "train/loss_mtp_1"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (a["step"], key, a[key], b[key])
    for out in (tmp_path / "x1", tmp_path / "x2"):
        assert (out / "final" / "model.safetensors").is_file()
    s1 = json.loads((tmp_path / "x1" / "summary.json").read_text())["eval"]
    s2 = json.loads((tmp_path / "x2" / "summary.json").read_text())["eval"]
    assert s1["loss_mtp_1"] == pytest.approx(s2["loss_mtp_1"], rel=1e-5)
    assert s1["mtp_before_training"]["loss_mtp_1"] == pytest.approx(s2["mtp_before_training"]["loss_mtp_1"], rel=1e-5)


@pytest.mark.slow
def test_a_hub_id_base_with_a_head_is_loaded_like_its_folder(frozen_run, tmp_path):
    """The same MiMo-layout base named by its hub id (offline cache): the head is loaded, not re-initialised."""
    import os
    import subprocess
    import sys

    final = frozen_run[0] / "final"
    repo = tmp_path / "hf" / "hub" / "models--acme--mimo-tiny"
    shutil.copytree(final, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    code = f"""
from shipyard.config import load_recipe
from shipyard.models.load import load
from shipyard.train.sft import attach_mtp
from tests.conftest import tiny_overrides
from pathlib import Path
for path in ("acme/mimo-tiny", {str(final)!r}):
    recipe = load_recipe("quickstart", tiny_overrides(Path({str(tmp_path)!r}) / "x", 1) + [f"model.path={{path}}", "model.mtp={{}}"])
    model, _, source = load(recipe.model, recipe.seed)
    print(attach_mtp(model, recipe, source, []))
    print(sorted((k, float(v.double().sum())) for k, v in model.mtp.state_dict().items()))
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert "1 layer(s) loaded from the base" in lines[-4] and "1 layer(s) loaded from the base" in lines[-2]
    assert lines[-3] == lines[-1]  # the same head tensors by hub id and by folder

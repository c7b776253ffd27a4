"""DFlash drafters (task: dflash): the block mask against a brute-force reference and end to end, unshifted
block targets, slot weights, anchor choice, the training loss against an independent reference, clear errors
before any step, bitwise resume, FSDP2 equivalence and the vLLM DFlash export layout."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from shipyard.config import DraftConfig, load_recipe
from shipyard.errors import ShipyardError
from shipyard.models import dflash
from shipyard.models.presets import preset_config
from shipyard.models.weights import DirectoryWeights
from tests.conftest import assert_user_error, run_cli, tiny_overrides

IGNORE = -100


def _tiny_drafter(block: int = 4, layers: int = 2, layer_ids=(0, 1), mask_id: int = 0, seed: int = 0,
                  std: float = 0.1) -> dflash.DFlashDrafter:
    config = dflash.drafter_config(preset_config("qwen3-tiny"), layers, block, list(layer_ids), mask_id)
    drafter = dflash.DFlashDrafter(config)
    drafter.init_weights(seed, std=std)  # larger than the default 0.02: outputs visibly depend on their inputs
    return drafter.eval()


# ------------------------------------------------------------------ 1. what a block sees


def _reference_visibility(anchors: list[int], seq: int, block: int) -> torch.Tensor:
    out = torch.zeros(len(anchors), block, seq + block, dtype=torch.bool)
    for n, a in enumerate(anchors):
        for i in range(block):
            for j in range(seq + block):
                if j < seq:
                    out[n, i, j] = j < a  # the target context strictly before the anchor
                else:
                    out[n, i, j] = True  # every token of its own block (bidirectional)
    return out


@pytest.mark.parametrize("seq,block", [(12, 4), (16, 8), (5, 2)])
def test_block_visibility_equals_a_brute_force_reference(seq, block):
    g = torch.Generator().manual_seed(seq * 31 + block)
    anchors = [0, seq - 1] + torch.randint(0, seq, (6,), generator=g).tolist()
    got = dflash.block_visibility(torch.tensor(anchors), seq, block)
    ref = _reference_visibility(anchors, seq, block)
    assert got.dtype == torch.bool and got.shape == ref.shape == (len(anchors), block, seq + block)
    assert torch.equal(got, ref)
    assert not got[0, :, :seq].any()  # anchor 0: no context at all
    assert int(got[1, 0, :seq].sum()) == seq - 1  # anchor S-1: everything but itself


def _drafter_inputs(drafter, rows: int = 2, seq: int = 12, blocks: int = 3, seed: int = 0):
    cfg = drafter.config
    k = len(cfg.dflash_config["target_layer_ids"])
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, seq, k * cfg.hidden_size, generator=g)
    embeds = torch.randn(blocks, cfg.block_size, cfg.hidden_size, generator=g)
    return features, embeds


@torch.no_grad()
def test_a_block_sees_only_the_context_before_its_anchor_and_its_own_tokens():
    drafter = _tiny_drafter(block=4)
    features, embeds = _drafter_inputs(drafter, rows=2, seq=12, blocks=3)
    anchors, rows = torch.tensor([5, 0, 11]), torch.tensor([0, 1, 1])
    base = drafter(features, embeds, anchors, rows)
    assert base.shape == (3, 4, drafter.config.hidden_size)

    def changed(n: int, f=None, e=None) -> float:
        out = drafter(features if f is None else f, embeds if e is None else e, anchors, rows)
        return float((out[n] - base[n]).abs().max())

    # Block 0 (row 0, anchor 5): positions >= 5 of its row, and all of row 1, are invisible to it.
    f = features.clone()
    f[0, 5:] += torch.randn_like(f[0, 5:]) * 3
    f[1] += 3.0
    assert changed(0, f=f) <= 1e-6
    # ... position 4 (just before the anchor) and position 0 are seen.
    for pos in (4, 0):
        f = features.clone()
        f[0, pos] += 3.0
        assert changed(0, f=f) > 1e-4, pos
    # Block 1 (row 1, anchor 0) sees no context: its row can change entirely.
    f = features.clone()
    f[1] = torch.randn_like(f[1])
    assert changed(1, f=f) <= 1e-6
    assert changed(2, f=f) > 1e-4  # block 2 (row 1, anchor 11) does see row 1
    # Block 2 (anchor S-1) sees positions 0..10 but not 11.
    f = features.clone()
    f[1, 11] += 3.0
    assert changed(2, f=f) <= 1e-6
    f = features.clone()
    f[1, 10] += 3.0
    assert changed(2, f=f) > 1e-4
    # Inside a block attention is bidirectional: the last slot changes the first slot's state.
    e = embeds.clone()
    e[0, -1] += 3.0
    out = drafter(features, e, anchors, rows)
    assert float((out[0, 0] - base[0, 0]).abs().max()) > 1e-4
    # ... and never crosses blocks: changing block 0's tokens leaves blocks 1 and 2 as they were.
    assert torch.allclose(out[1:], base[1:], rtol=0, atol=1e-6)


@torch.no_grad()
def test_blocks_computed_together_equal_each_computed_alone():
    drafter = _tiny_drafter(block=4)
    features, embeds = _drafter_inputs(drafter, rows=2, seq=12, blocks=4, seed=1)
    anchors, rows = torch.tensor([3, 3, 7, 0]), torch.tensor([0, 1, 0, 1])
    together = drafter(features, embeds, anchors, rows)
    for n in range(4):
        alone = drafter(features, embeds[n : n + 1], anchors[n : n + 1], rows[n : n + 1])
        torch.testing.assert_close(together[n], alone[0], rtol=0, atol=1e-5)
        # ... and equal to running the block on its own row only
        own = drafter(features[rows[n] : rows[n] + 1], embeds[n : n + 1], anchors[n : n + 1], torch.tensor([0]))
        torch.testing.assert_close(together[n], own[0], rtol=0, atol=1e-5)
    # Blocks 0 and 1 share an anchor but not a row: their context differs, so do their states.
    assert float((together[0] - together[1]).abs().max()) > 1e-4


def test_drafter_backward_is_bitwise_reproducible():
    assert not torch.are_deterministic_algorithms_enabled()
    drafter = _tiny_drafter(block=8).train()
    features, embeds = _drafter_inputs(drafter, rows=4, seq=32, blocks=64, seed=2)
    rows, anchors = torch.arange(64) % 4, torch.arange(64) % 28 + 1  # 16 blocks per row

    def grads() -> dict[str, torch.Tensor]:
        drafter.zero_grad(set_to_none=True)
        drafter(features, embeds, anchors, rows).pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in drafter.named_parameters()}

    first = grads()
    for _ in range(5):
        again = grads()
        for name in first:
            assert torch.equal(first[name], again[name]), name


# ------------------------------------------------------------------ 2. unshifted targets, block inputs


def test_block_targets_are_unshifted_and_valid_only_where_supervised():
    input_ids = torch.tensor([[10, 11, 12, 13, 14, 15],
                              [20, 21, 22, 23, 24, 25]])
    labels = torch.tensor([[IGNORE, IGNORE, 12, 13, 14, 15],
                           [IGNORE, 21, 22, IGNORE, 24, 25]])
    rows, anchors = torch.tensor([0, 0, 1, 1]), torch.tensor([2, 4, 1, 4])
    targets, valid = dflash.block_targets(input_ids, labels, rows, anchors, 4)
    # slot k -> token anchor + k; beyond the sequence: clamped and never valid
    assert torch.equal(targets, torch.tensor([[12, 13, 14, 15],
                                              [14, 15, 15, 15],
                                              [21, 22, 23, 24],
                                              [24, 25, 25, 25]]))
    assert torch.equal(valid, torch.tensor([[False, True, True, True],
                                            [False, True, False, False],
                                            [False, True, False, True],  # token 23 is not supervised
                                            [False, True, False, False]]))
    # slot 0 (the anchor itself) never has a loss, even when supervised
    assert not valid[:, 0].any()

    ids = dflash.block_inputs(input_ids, rows, anchors, 4, mask_id=7)
    assert torch.equal(ids, torch.tensor([[12, 7, 7, 7], [14, 7, 7, 7], [21, 7, 7, 7], [24, 7, 7, 7]]))


# ------------------------------------------------------------------ 3. slot weights


def test_slot_weights_and_default_gamma():
    w = dflash.slot_weights(8, 4.0)
    expected = torch.tensor([0.0] + [math.exp(-(k - 1) / 4) for k in range(1, 8)])
    assert w.shape == (8,) and w.dtype == torch.float32
    assert w[0] == 0.0 and w[1] == 1.0
    torch.testing.assert_close(w, expected, rtol=1e-6, atol=0)
    assert float(w[7]) == pytest.approx(math.exp(-1.5), rel=1e-6)

    assert DraftConfig(target="t", block_size=16).slot_decay == 7.0
    assert DraftConfig(target="t", block_size=8).slot_decay == 4.0
    assert DraftConfig(target="t", block_size=6).slot_decay == 3.0
    assert DraftConfig(target="t", block_size=8, gamma=2.5).slot_decay == 2.5
    assert DraftConfig(target="t").block_size == 16


# ------------------------------------------------------------------ 4. anchors


def _span_labels(rows: int, seq: int, seed: int) -> torch.Tensor:
    """Random supervised spans (answers), some of length one (no anchor there), some to the sequence end."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((rows, seq), IGNORE)
    for r in range(rows):
        t = int(torch.randint(0, 4, (), generator=g))
        while t < seq:
            n = int(torch.randint(1, 9, (), generator=g))
            labels[r, t : t + n] = torch.randint(0, 100, (min(n, seq - t),), generator=g)
            t += n + int(torch.randint(1, 5, (), generator=g))
    labels[0, -5:] = 1  # a span that reaches the last position
    return labels


def _eligible(labels: torch.Tensor, r: int) -> list[int]:
    row = labels[r].tolist()
    return [p for p in range(len(row) - 1) if row[p] != IGNORE and row[p + 1] != IGNORE]


def test_anchors_are_supervised_positions_with_a_supervised_next_token():
    labels = _span_labels(5, 40, seed=3)
    rows, pos = dflash.choose_anchors(labels, 10**9, seed=0)
    # Without a limit: exactly every eligible position, in order.
    expected = [(r, p) for r in range(5) for p in _eligible(labels, r)]
    assert list(zip(rows.tolist(), pos.tolist())) == expected
    assert (39 not in pos[rows == 0].tolist()) and 38 in pos[rows == 0].tolist()  # never the last position

    limit = 4
    counts = [len(_eligible(labels, r)) for r in range(5)]
    assert max(counts) > limit and min(counts) >= 1
    picks = {}
    for seed in (0, 0, 1):
        rows, pos = dflash.choose_anchors(labels, limit, seed)
        for r in range(5):
            mine = pos[rows == r].tolist()
            assert len(mine) == min(limit, counts[r]), r
            assert mine == sorted(set(mine))
            assert set(mine) <= set(_eligible(labels, r))
        picks.setdefault(seed, []).append((rows.tolist(), pos.tolist()))
    assert picks[0][0] == picks[0][1]  # deterministic for one seed
    assert picks[0][0] != picks[1][0]  # another seed picks other anchors

    nothing = torch.full((2, 8), IGNORE)
    nothing[1, 3] = 5  # a single supervised token: no anchor (its next token is not supervised)
    rows, pos = dflash.choose_anchors(nothing, 4, 0)
    assert rows.numel() == pos.numel() == 0


# ------------------------------------------------------------------ 5. the loss against an independent reference


def _reference_features(target, ids: torch.Tensor, layer_ids: list[int]) -> torch.Tensor:
    """[1, n, K*H]: decoder layer outputs before the final norm (vLLM's aux hidden states), without hooks on layers."""
    captured = {}
    inner = target.model
    handle = inner.norm.register_forward_hook(lambda _m, args, _out: captured.__setitem__("pre", args[0]))
    try:
        out = target(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    last = len(inner.layers) - 1
    # hidden_states[i + 1] is layer i's output, except the last, which transformers returns after the norm
    return torch.cat([captured["pre"] if i == last else out.hidden_states[i + 1] for i in layer_ids], dim=-1)


BLOCK, GAMMA, MASK_ID, LAYER_IDS, SEQ = 8, 3.0, 1, [0, 1], 24


def _loss_setup():
    """A random qwen3-tiny target, a random drafter and one micro-batch: 3 rows, one with two answers, one padded."""
    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_config(preset_config("qwen3-tiny")).eval().requires_grad_(False)
    drafter = _tiny_drafter(block=BLOCK, layers=2, layer_ids=LAYER_IDS, mask_id=MASK_ID, seed=3).train()
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, target.config.vocab_size, (3, SEQ), generator=g)
    mask = torch.ones(3, SEQ, dtype=torch.long)
    labels = torch.full((3, SEQ), IGNORE)
    labels[0, 6:] = input_ids[0, 6:]  # an answer to the end
    labels[1, 3:9] = input_ids[1, 3:9]  # two answers
    labels[1, 12:20] = input_ids[1, 12:20]
    labels[2, 5:15] = input_ids[2, 5:15]  # right padding after 16 tokens
    input_ids[2, 16:], mask[2, 16:] = 0, 0
    return target, drafter, {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def test_training_loss_equals_an_independent_reference():
    from shipyard.train.dflash import DFlashRunner

    target, drafter, batch = _loss_setup()
    config, block, gamma, mask_id, layer_ids, seq = drafter.config, BLOCK, GAMMA, MASK_ID, LAYER_IDS, SEQ
    input_ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]

    runner = DFlashRunner(drafter, target, config, gamma=gamma, anchors=5, seed=11, chunk_size=7)
    rows, anchors = dflash.choose_anchors(labels, 5, runner._seed(batch))
    assert len(anchors) == 15  # 5 per row: row 0 has 17 candidates, row 1 12, row 2 9
    features, _ = runner.features(batch)
    got = runner.loss(batch, rows, anchors, features)
    got.backward()
    got_grads = {n: p.grad.clone() for n, p in drafter.named_parameters()}
    drafter.zero_grad(set_to_none=True)

    # Reference: each row on its own unpadded tokens, one block per drafter call, CE by hand.
    ref = torch.zeros((), dtype=torch.float64)
    weight = 0.0
    embed, head = target.get_input_embeddings(), target.lm_head
    for r, a in zip(rows.tolist(), anchors.tolist()):
        n_real = int(mask[r].sum())
        with torch.no_grad():
            feats = _reference_features(target, input_ids[r : r + 1, :n_real], layer_ids)
        block_ids = torch.tensor([[int(input_ids[r, a])] + [mask_id] * (block - 1)])
        states = drafter(feats, embed(block_ids), torch.tensor([a]), torch.tensor([0]))[0]
        for k in range(1, block):
            if a + k < seq and int(labels[r, a + k]) != IGNORE:
                w = math.exp(-(k - 1) / gamma)
                logits = head(states[k]).double()
                ref = ref + w * (torch.logsumexp(logits, -1) - logits[int(input_ids[r, a + k])])
                weight += w
    ref.backward()
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-5)
    assert float(got.detach()) > 1.0  # a real loss, not an empty sum
    for name, grad in got_grads.items():
        tol = 1e-4 * float(grad.abs().max()) + 1e-7
        torch.testing.assert_close(grad, drafter.get_parameter(name).grad.float(), rtol=1e-4, atol=tol)

    # The step's normaliser: the summed weights of the valid slots of exactly these blocks.
    assert runner.targets([batch]) == pytest.approx(weight, rel=1e-6)


def _perfect_replay(spans: list[tuple[int, int]], depth: int) -> tuple[list[int], int]:
    """A drafter that is always right, inside each answer: every step accepts min(depth, tokens left)."""
    accepted, drafts = [0] * depth, 0
    for start, end in spans:
        m = start
        while m < end:
            ok = min(depth, end - m)
            drafts += 1
            for j in range(ok):
                accepted[j] += 1
            m += ok + 1
    return accepted, drafts


def test_a_micro_batch_with_no_anchor_trains_with_zero_gradients():
    """All answers cut: no block to train. The step must still run backward (sharded ranks stay in step)."""
    from shipyard.train.dflash import DFlashRunner

    target, drafter, batch = _loss_setup()
    batch = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    runner = DFlashRunner(drafter, target, drafter.config, gamma=GAMMA, anchors=5, seed=11, chunk_size=7)
    assert runner.targets([batch]) == 0
    loss = runner.train_micro_batches([batch], 1.0, torch.device("cpu"))
    assert float(loss) == 0.0
    grads = [p.grad for p in drafter.parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.any() for g in grads)


def test_bf16_autocast_runs_the_forwards_in_bf16_and_stays_close_to_fp32():
    from shipyard.train.dflash import DFlashRunner

    target, drafter, batch = _loss_setup()
    exact = DFlashRunner(drafter, target, drafter.config, gamma=GAMMA, anchors=5, seed=11, chunk_size=7)
    mixed = DFlashRunner(drafter, target, drafter.config, gamma=GAMMA, anchors=5, seed=11, chunk_size=7,
                         autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    rows, anchors = dflash.choose_anchors(batch["labels"], 5, exact._seed(batch))
    with mixed.autocast():
        features, _ = mixed.features(batch)  # the residual stream stays fp32; its matmuls run in bf16
        low = float(mixed.loss(batch, rows, anchors, features))
    features, _ = exact.features(batch)
    high = float(exact.loss(batch, rows, anchors, features))
    assert low != high and low == pytest.approx(high, rel=0.02)
    assert all(p.dtype == torch.float32 for p in drafter.parameters())  # master weights stay fp32
    raw = mixed.evaluate([batch], torch.device("cpu"))
    assert raw["loss"] == pytest.approx(exact.evaluate([batch], torch.device("cpu"))["loss"], rel=0.02)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
])
def test_evaluate_loss_weight_and_ceiling(device):
    from shipyard.train.dflash import DFlashRunner
    from shipyard.speculative.acceptance import answer_spans

    target, drafter, batch = _loss_setup()
    target, drafter = target.to(device), drafter.to(device)
    runner = DFlashRunner(drafter, target, drafter.config, gamma=GAMMA, anchors=5, seed=11, chunk_size=7)
    raw = runner.evaluate([batch], torch.device(device))
    assert drafter.training  # evaluate puts it back

    # Every answer position is a block; loss and weight as training computes them for those blocks.
    on = {k: v.to(device) for k, v in batch.items()}
    rows, anchors = dflash.choose_anchors(on["labels"], 10**9, 0)
    assert len(anchors) == 17 + 12 + 9
    with torch.no_grad():
        features, _ = runner.features(on)
        expected = float(runner.loss(on, rows, anchors, features))
    weight = dflash.weight_sum(batch["labels"], batch["input_ids"], 10**9, 0, BLOCK, GAMMA)
    assert raw["loss"] == pytest.approx(expected, rel=1e-5)
    assert raw["weight"] == pytest.approx(weight, rel=1e-6)

    spans = [s for row in batch["labels"].tolist() for s in answer_spans(row)]
    assert spans == [(6, 23), (3, 8), (12, 19), (5, 14)]
    accepted, drafts = _perfect_replay(spans, BLOCK - 1)
    assert (raw["ceiling_accepted"], raw["ceiling_drafts"]) == (accepted, drafts)
    assert sum(raw["accepted"]) <= sum(accepted) and raw["drafts"] >= drafts


# ------------------------------------------------------------------ shared runs


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    """A (barely) trained quickstart model: a Hugging Face directory with a chat template."""
    from shipyard.train.loop import train

    out = tmp_path_factory.mktemp("dflash") / "target"
    train(load_recipe("quickstart", tiny_overrides(out, steps=2, records=64) + ["eval.generate=false"]))
    return out / "final"


def _dflash_overrides(out: Path, target: Path, steps: int, *extra: str, records: int = 128) -> list[str]:
    return [
        f"output_dir={out}", f"draft.target={target}", f"train.max_steps={steps}", "train.micro_batch_size=8",
        "checkpoint.every_steps=null", "train.eval_every=null", "optim.warmup_steps=2",
        f"data.train={{synthetic: reverse_words, num_records: {records}, seed: 0}}",
        "data.validation={synthetic: reverse_words, num_records: 8, seed: 1}", *extra,
    ]


def _train_dflash(out: Path, target: Path, steps: int, *extra: str, records: int = 128) -> dict:
    from shipyard.train.loop import train

    return train(load_recipe("quickstart_dflash", _dflash_overrides(out, target, steps, *extra,
                                                                     records=records))).summary


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    weights = DirectoryWeights(directory)
    return weights.load(sorted(weights.shapes))


RUN_STEPS, EVERY = 6, 3
RUN_EXTRA = (f"checkpoint.every_steps={EVERY}", f"train.eval_every={EVERY}")


@contextlib.contextmanager
def _deterministic():
    """torch's deterministic kernels: the drafter's context gather (`k[rows]` in DFlashLayer.forward) has a
    backward that scatter-adds with atomics, so without them two identical runs differ in the last bits (see
    test_drafter_backward_is_bitwise_reproducible). Resume is checked bitwise under them."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.fixture(scope="module")
def drafter_run(target_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dflash") / "full"
    with _deterministic():
        return out, _train_dflash(out, target_dir, RUN_STEPS, *RUN_EXTRA)


# ------------------------------------------------------------------ 6. bad input: clear errors before any step


def _assert_nothing_trained(out: Path) -> None:
    assert not (out / "metrics.jsonl").exists()
    assert not (out / "checkpoints").exists()
    assert not (out / "final").exists()


@pytest.mark.parametrize("override,fragments", [
    ("draft.mask_token=notatoken", ("draft.mask_token", "notatoken", "vocabulary")),
    ("draft.target_layer_ids=[0,7]", ("draft.target_layer_ids", "[7]", "0..1")),
    ("draft.target_layer_ids=[-1]", ("draft.target_layer_ids", "[-1]")),
])
def test_bad_draft_settings_fail_before_any_step(target_dir, tmp_path, override, fragments):
    out = tmp_path / "run"
    with pytest.raises(ShipyardError) as e:
        _train_dflash(out, target_dir, 2, override, records=16)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)
    _assert_nothing_trained(out)


def test_target_without_chat_template_fails_before_any_step(target_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(target_dir, bare)
    config_path = bare / "tokenizer_config.json"
    tok = json.loads(config_path.read_text())
    assert tok.pop("chat_template")
    config_path.write_text(json.dumps(tok))
    for jinja in bare.glob("*.jinja"):
        jinja.unlink()
    out = tmp_path / "run"
    with pytest.raises(ShipyardError, match="chat template") as e:
        _train_dflash(out, bare, 2, records=16)
    assert str(bare) in str(e.value)
    _assert_nothing_trained(out)


@pytest.mark.parametrize("override,fragments", [
    ("draft.block_size=1", ("draft.block_size",)),
    ("data.max_length=60", ("data.max_length", "60", "multiple of draft.block_size", "8")),
])
def test_bad_recipe_is_refused_at_validation(tmp_path, override, fragments):
    with pytest.raises(ShipyardError) as e:
        load_recipe("quickstart_dflash", _dflash_overrides(tmp_path / "run", tmp_path / "nowhere", 2, override))
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)
    fine = load_recipe("quickstart_dflash", _dflash_overrides(tmp_path / "run", tmp_path / "t", 2))
    assert fine.draft.block_size == 8 and fine.data.max_length == 64


@pytest.mark.slow
def test_cli_exits_2_on_bad_draft_settings(target_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "quickstart_dflash", *_dflash_overrides(out, target_dir, 2, "draft.mask_token=notatoken",
                                                                    records=16))
    assert_user_error(proc, "draft.mask_token", "notatoken")
    _assert_nothing_trained(out)
    proc = run_cli("train", "quickstart_dflash", *_dflash_overrides(out, target_dir, 2, "draft.block_size=1"))
    assert_user_error(proc, "draft.block_size")
    _assert_nothing_trained(out)


def test_check_pairs_refuses_a_drafter_for_another_target():
    target = preset_config("qwen3-tiny")
    good = dflash.drafter_config(target, 1, 8, [0, 1], 0)
    dflash.check_pairs(good, target, "here")  # the same sizes pass
    wider = dflash.drafter_config(target, 1, 8, [0, 1], 0)
    wider.hidden_size = target.hidden_size * 2
    with pytest.raises(ShipyardError, match="hidden_size is 256, the target's 128") as e:
        dflash.check_pairs(wider, target, "drafter X")
    assert str(e.value).startswith("drafter X")
    other_vocab = dflash.drafter_config(target, 1, 8, [0, 1], 0)
    other_vocab.vocab_size = target.vocab_size + 1
    with pytest.raises(ShipyardError, match="vocab_size"):
        dflash.check_pairs(other_vocab, target, "here")
    deeper = dflash.drafter_config(target, 1, 8, [0, 1], 0)
    deeper.num_target_layers = target.num_hidden_layers + 2
    with pytest.raises(ShipyardError, match="target layers"):
        dflash.check_pairs(deeper, target, "here")


def test_layer_id_helpers():
    assert dflash.default_target_layer_ids(36) == [1, 9, 17, 25, 33]
    assert dflash.default_target_layer_ids(2) == [0, 1]
    assert dflash.default_target_layer_ids(5) == [0, 1, 2, 3, 4]
    dflash.check_layer_ids([0, 1], 2)
    for bad in ([0, 2], [], [-1]):
        with pytest.raises(ShipyardError, match="draft.target_layer_ids"):
            dflash.check_layer_ids(bad, 2)


# ------------------------------------------------------------------ 7. resume


@pytest.mark.slow
def test_resume_mid_run_is_bitwise_equal(drafter_run, target_dir, tmp_path):
    full_dir, full_summary = drafter_run
    assert full_summary["resumed_from_step"] == 0
    # A copy of the run as it was when it stopped right after saving step 3 (the learning-rate schedule spans
    # max_steps, so a run started with max_steps=3 would be another run), resumed to step 6.
    cut_dir = tmp_path / "cut"
    shutil.copytree(full_dir, cut_dir)
    shutil.rmtree(cut_dir / "checkpoints" / f"step_{RUN_STEPS}")
    shutil.rmtree(cut_dir / "final")
    (cut_dir / "checkpoints" / "LATEST").write_text(f"step_{EVERY}\n")
    with _deterministic():
        resumed = _train_dflash(cut_dir, target_dir, RUN_STEPS, *RUN_EXTRA)
    assert resumed["resumed_from_step"] == EVERY

    full, cut = _metrics(full_dir), _metrics(cut_dir)
    assert [r["step"] for r in full] == [r["step"] for r in cut] == list(range(1, RUN_STEPS + 1))
    keys = ("train/loss", "train/grad_norm", "train/lr", "train/supervised_tokens", "train/tokens")
    for a, b in zip(full, cut):
        assert [a[k] for k in keys] == [b[k] for k in keys], a["step"]  # bitwise, not approx
    assert full[EVERY - 1]["eval/loss"] == cut[EVERY - 1]["eval/loss"]
    assert full[-1]["eval/loss"] == cut[-1]["eval/loss"]
    assert full[-1]["train/loss"] < full[0]["train/loss"]  # it learns

    for sub in (Path("checkpoints") / f"step_{RUN_STEPS}", Path("final")):
        a, b = _tensors(full_dir / sub), _tensors(cut_dir / sub)
        assert a.keys() == b.keys() and a
        for name in a:
            assert torch.equal(a[name], b[name]), (sub, name)
    assert full_summary["eval"]["loss"] == resumed["eval"]["loss"]
    assert full_summary["eval"]["mean_acceptance_length"] == resumed["eval"]["mean_acceptance_length"]



@pytest.mark.slow
def test_bf16_training_on_cpu_stays_close_to_fp32_and_exports_fp32_weights(drafter_run, target_dir, tmp_path,
                                                                           capsys):
    """`train.mixed_precision: bf16` on CPU: both forwards run in bf16 autocast (the start-up line says so), the
    first steps' losses stay within 0.5% of the fp32 run's (the same data, anchors and first learning rates), and
    the export holds the fp32 master weights. tests/e2e/test_cli_vlm.py serves a bf16-trained drafter in vLLM;
    bench/gpu.sh measures what bf16 buys on a GPU."""
    fp32_dir, _ = drafter_run
    out = tmp_path / "bf16"
    summary = _train_dflash(out, target_dir, 2, "train.mixed_precision=bf16")
    assert "(bf16 autocast, fp32 weights)" in capsys.readouterr().out
    assert summary["mixed_precision"] == "bf16" and summary["peak_gpu_memory_gib"] is None
    low, high = _metrics(out), _metrics(fp32_dir)[:2]
    for a, b in zip(low, high):
        assert a["train/loss"] != b["train/loss"] and a["train/loss"] == pytest.approx(b["train/loss"], rel=5e-3)
    tensors, reference = _tensors(out / "final"), _tensors(fp32_dir / "final")
    assert tensors.keys() == reference.keys()
    assert all(t.dtype == torch.float32 for t in tensors.values())

# ------------------------------------------------------------------ 8. FSDP2


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_two_ranks_equal_one_rank(drafter_run, target_dir, tmp_path):
    one_dir, _ = drafter_run  # micro-batch 8 on one rank
    two_dir = tmp_path / "two"
    args = _dflash_overrides(two_dir, target_dir, RUN_STEPS, *RUN_EXTRA, "train.micro_batch_size=4")
    proc = run_cli("train", "quickstart_dflash", *args, "--nproc-per-node", "2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    one, two = _metrics(one_dir), _metrics(two_dir)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, RUN_STEPS + 1))
    for a, b in zip(one, two):
        assert a["train/supervised_tokens"] == b["train/supervised_tokens"]
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-5 * abs(a["train/loss"]), (a["step"], a, b)
    for step in (EVERY, RUN_STEPS):
        a, b = one[step - 1]["eval/loss"], two[step - 1]["eval/loss"]
        assert abs(a - b) <= 1e-5 * abs(a), (step, a, b)
    a, b = _tensors(one_dir / "final"), _tensors(two_dir / "final")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name



def _step_rows_with_images(recorded: list[list[dict]]) -> list[list[bool]]:
    """Per step, per row of its one micro-batch: does the row hold an image?"""
    out = []
    for (mb,) in recorded:
        types = next((mb[k] for k in ("mm_token_type_ids", "token_type_ids") if k in mb), None)
        out.append([bool(types is not None and types[r].any()) for r in range(mb["input_ids"].shape[0])])
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_vlm_target_two_ranks_with_text_and_image_micro_batches_equal_one_process(vlm_data, tmp_path):
    """A Qwen3-VL target under FSDP2 where, in one step, one rank's micro-batch is text-only and the other's has
    an image: the text-only rank runs the target's vision tower on the blank image (models/vision.py), so both
    ranks gather the same vision blocks' weights; without it they issue different collectives."""
    from shipyard.data.loader import StepBatches
    from shipyard.train.loop import train

    steps = 4

    def args(out: Path, micro: int) -> list[str]:
        return _dflash_overrides(out, Path("qwen3-vl-tiny"), steps, f"train.micro_batch_size={micro}") + [
            f"data.train={vlm_data['train']}", f"data.validation={vlm_data['val']}"]

    recorded: list = []
    next_step = StepBatches.next_step
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StepBatches, "next_step", lambda self: recorded.append(next_step(self)) or recorded[-1])
        one = train(load_recipe("quickstart_dflash", args(tmp_path / "one", 2))).summary
    # Two ranks split each step's two rows: rank 0 takes row 0, rank 1 row 1 (data/loader.py).
    rows = _step_rows_with_images(recorded)
    assert any(a != b for a, b in rows), rows  # some step gives one rank an image and the other none

    proc = run_cli("train", "quickstart_dflash", *args(tmp_path / "two", 1), "--nproc-per-node", "2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        assert x["train/supervised_tokens"] == y["train/supervised_tokens"]
        assert abs(x["train/loss"] - y["train/loss"]) <= 1e-5 * abs(x["train/loss"]), (x["step"], x, y)
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["eval"]["loss"] == pytest.approx(one["eval"]["loss"], rel=1e-5)

# ------------------------------------------------------------------ 9. export layout


def _vllm_dflash_names(layers: int) -> set[str]:
    names = {"fc.weight", "hidden_norm.weight", "norm.weight"}
    for i in range(layers):
        p = f"layers.{i}."
        names |= {f"{p}self_attn.{x}_proj.weight" for x in "qkvo"}
        names |= {f"{p}self_attn.{x}_norm.weight" for x in "qk"}
        names |= {f"{p}mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        names |= {f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight"}
    return names


@pytest.mark.slow
def test_export_is_in_vllms_dflash_layout(drafter_run, target_dir):
    from shipyard.verify.drafter import is_drafter_dir, load_drafter

    out, summary = drafter_run
    final = out / "final"
    assert Path(summary["final_checkpoint"]) == final
    target = json.loads((target_dir / "config.json").read_text())
    config = json.loads((final / "config.json").read_text())
    layers = config["num_hidden_layers"]
    assert layers == 2  # the quickstart_dflash recipe's num_layers

    tensors = _tensors(final)
    assert set(tensors) == _vllm_dflash_names(layers)
    assert not any("embed" in n or "lm_head" in n for n in tensors)
    h, k = target["hidden_size"], len(config["dflash_config"]["target_layer_ids"])
    assert tensors["fc.weight"].shape == (h, k * h)
    assert tensors["layers.0.self_attn.q_proj.weight"].shape == (target["num_attention_heads"] * target["head_dim"], h)
    assert tensors["layers.0.self_attn.k_proj.weight"].shape == (target["num_key_value_heads"] * target["head_dim"], h)

    assert config["architectures"] == ["DFlashDraftModel"]
    assert config["model_type"] == "qwen3"
    assert config["block_size"] == 8
    assert config["hidden_size"] == h and config["vocab_size"] == target["vocab_size"]
    assert config["num_target_layers"] == target["num_hidden_layers"] == 2
    assert config["dflash_config"]["target_layer_ids"] == [0, 1]  # default for a 2-layer target
    mask_id = config["dflash_config"]["mask_token_id"]
    assert isinstance(mask_id, int) and 0 <= mask_id < target["vocab_size"]
    assert config["tie_word_embeddings"] is False
    assert is_drafter_dir(final) and not is_drafter_dir(target_dir)

    drafter = load_drafter(final)
    assert isinstance(drafter, dflash.DFlashDrafter) and not drafter.training
    for name, tensor in drafter.state_dict().items():
        assert torch.equal(tensor, tensors[name]), name
    dflash.check_pairs(drafter.config, AutoConfig.from_pretrained(target_dir), "export")
    # the exported drafter equals the last checkpoint's weights
    last = _tensors(out / "checkpoints" / f"step_{RUN_STEPS}")
    assert last.keys() == tensors.keys() and all(torch.equal(last[n], tensors[n]) for n in last)


def test_data_preview_shows_the_drafter_blocks(target_dir):
    """`shipyard data preview` on a drafter recipe renders with the target's tokenizer and shows each sample's
    anchors and what the first block's slots learn (unshifted: the tokens after the anchor, with their weights)."""
    proc = run_cli("data", "preview", "quickstart_dflash", f"draft.target={target_dir}",
                   "data.train={synthetic: reverse_words, num_records: 4, seed: 0}", "--limit", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("drafter:"))
    answer = proc.stdout.rsplit("[[", 1)[1].split("]]")[0]  # the sample's answer, e.g. "white sun pink five<|im_end|>"
    first_word, rest = answer.split(" ", 1)
    assert f"the first block is '{first_word}' + 7 mask tokens" in line
    assert "1:' " + rest.split(" ")[0] + "'@1.00" in line and "2:" in line and "@0.78" in line

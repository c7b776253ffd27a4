"""EAGLE-3 drafters (task: eagle3): the target's pre-norm aux hidden states, training-time-test unrolling against
vLLM's drafting loop, step inputs and targets, the default aux layers, clear errors, the export's weight check
(vLLM's declared names and shapes), a reduced draft vocabulary (d2t offsets), bitwise resume and FSDP2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from shipyard.config import load_recipe
from shipyard.errors import ShipyardError
from shipyard.models import eagle3
from shipyard.models.presets import preset_config
from shipyard.models.structure import hidden_states_entering
from shipyard.models.weights import DirectoryWeights
from tests.conftest import run_cli, tiny_overrides

IGNORE = -100


def _tiny_drafter(aux=(0, 1, 2), seed: int = 0, std: float = 0.1, vocab: int | None = None) -> eagle3.Eagle3Drafter:
    target = preset_config("qwen3-tiny")
    drafter = eagle3.Eagle3Drafter(eagle3.drafter_config(target, list(aux), vocab))
    drafter.init_weights(seed, std=std)  # larger than the default 0.02: outputs visibly depend on their inputs
    return drafter.eval()


# ------------------------------------------------------------------ 1. what the drafter reads


@torch.no_grad()
def test_aux_features_are_the_targets_layer_outputs_before_the_final_norm():
    """id 0 = the embedding output, id i = decoder layer i - 1's output, id L = the last layer's output before the
    final norm (vLLM adds hidden + residual there): transformers' hidden_states[L] is after the norm and differs."""
    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_config(preset_config("qwen3-tiny")).eval()
    ids = torch.randint(3, target.config.vocab_size, (2, 9))
    with hidden_states_entering(target, [0, 1, 2]) as captured:
        out = target(input_ids=ids, output_hidden_states=True, use_cache=False)
    states = out.hidden_states
    assert len(states) == 3
    assert torch.equal(captured[0], target.get_input_embeddings()(ids)) and torch.equal(captured[0], states[0])
    assert torch.equal(captured[1], states[1])
    assert torch.equal(target.model.norm(captured[2]), states[2])  # the final norm of id 2 is the model's output
    assert not torch.allclose(captured[2], states[2], atol=1e-3)  # ... and id 2 itself is before it


def test_default_aux_layers_are_valid_for_2_and_36_layer_targets():
    assert eagle3.default_aux_layer_ids(2) == [0, 1, 2]
    assert eagle3.default_aux_layer_ids(36) == [2, 18, 33]  # vLLM's (2, L//2, L-3)
    for layers in (1, 2, 3, 4, 5, 6, 7, 8, 28, 36, 80):
        ids = eagle3.default_aux_layer_ids(layers)
        eagle3.check_aux_layer_ids(ids, layers)  # vLLM collects ids 0..L (models/qwen2.py: idx + 1)
        assert len(ids) >= 2 and ids == sorted(set(ids)) and 0 <= ids[0] and ids[-1] <= layers
    with pytest.raises(ShipyardError, match=r"draft.aux_layer_ids \[0, 3\].*0..2"):
        eagle3.check_aux_layer_ids([0, 3], 2)


# ------------------------------------------------------------------ 2. training-time test = vLLM's drafting loop


@torch.no_grad()
def _vllm_drafting(drafter, features, embeds, anchor: int, steps: int, own: bool = True) -> list[torch.Tensor]:
    """vLLM's drafting from `anchor` (v1/spec_decode: a pass over positions 0..anchor on the target's features, then
    one token per step at anchor + k on the previous step's pre-norm output), with a KV cache between passes."""
    layer, attn = drafter.midlayer, drafter.midlayer.self_attn
    keys, values = [], []

    def run(embed, hidden, positions):
        x = torch.cat([layer.input_layernorm(embed), layer.hidden_norm(hidden)], dim=-1)[None]
        q, k, v = attn.qkv(x, drafter.rotary_emb(x, positions[None]))
        keys.append(k)
        values.append(v)
        key, value = torch.cat(keys, dim=-2), torch.cat(values, dim=-2)
        new, total = len(positions), key.shape[-2]
        visible = torch.ones(new, total, dtype=torch.bool).tril(total - new)  # the cache and the new tokens causally
        residual = hidden + attn.attend(q, key, value, visible)[0]
        return residual + layer.mlp(layer.post_attention_layernorm(residual))

    first = drafter.fc(features[0, : anchor + 1])
    out = [run(embeds[0][0, : anchor + 1], first, torch.arange(anchor + 1))[-1:]]
    for k in range(1, steps):
        hidden = out[-1] if own else first[-1:]
        out.append(run(embeds[k][0, anchor: anchor + 1], hidden, torch.tensor([anchor + k])))
    return [o[0] for o in out]


@torch.no_grad()
def test_unrolled_steps_equal_vllms_drafting_loop_on_the_drafters_own_outputs():
    drafter = _tiny_drafter(seed=3)
    g = torch.Generator().manual_seed(0)
    seq, steps, h = 12, 4, drafter.config.hidden_size
    features = torch.randn(1, seq, 3 * h, generator=g)
    ids = torch.randint(3, drafter.config.vocab_size, (1, seq), generator=g)
    embed = torch.nn.Embedding(drafter.config.vocab_size, h)
    embeds = [embed(x) for x in eagle3.step_inputs(ids, steps)]
    pre, normed = drafter(features, embeds)
    assert len(pre) == len(normed) == steps and pre[0].shape == (1, seq, h)
    for anchor in (0, 5, seq - steps - 1):
        reference = _vllm_drafting(drafter, features, embeds, anchor, steps)
        for k in range(steps):
            torch.testing.assert_close(pre[k][0, anchor], reference[k], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(normed[k][0, anchor], drafter.norm(reference[k]), rtol=1e-5, atol=1e-5)
        # A drafter fed the target's features at every step (trained one step deep) computes something else.
        stale = _vllm_drafting(drafter, features, embeds, anchor, steps, own=False)
        assert all(float((stale[k] - reference[k]).abs().max()) > 1e-3 for k in range(1, steps))
    # Step 0 is causal: position i never sees later positions' features.
    changed = features.clone()
    changed[0, 7:] += 3.0
    later = drafter(changed, embeds)[0]
    assert torch.equal(later[0][0, :7], pre[0][0, :7]) and not torch.allclose(later[0][0, 7], pre[0][0, 7])


def test_step_inputs_and_targets_shift_one_token_per_step():
    ids = torch.arange(10, 18).unsqueeze(0)  # positions 0..7
    labels = torch.full_like(ids, IGNORE)
    labels[0, 4:] = ids[0, 4:]
    inputs = eagle3.step_inputs(ids, 3, pad_id=0)
    assert inputs[0].tolist() == [[11, 12, 13, 14, 15, 16, 17, 0]]  # step 0 at i consumes token i + 1
    assert inputs[2].tolist() == [[13, 14, 15, 16, 17, 0, 0, 0]]
    (t0, v0), (_, v1), (t2, v2) = eagle3.step_targets(ids, labels, 3)
    assert t0[0, :6].tolist() == [12, 13, 14, 15, 16, 17] and v0.tolist() == [[0, 0, 1, 1, 1, 1, 0, 0]]
    assert t2[0, :4].tolist() == [14, 15, 16, 17] and v2.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]
    assert eagle3.count_targets(labels, 3) == int(v0.sum()) + int(v1.sum()) + int(v2.sum()) == 12


# ------------------------------------------------------------------ 3. recipes and bad input


def test_recipe_settings_of_the_other_drafter_task_are_refused():
    base = ["draft.target=x"]
    recipe = load_recipe("quickstart_eagle3", base)
    assert recipe.draft.ttt_steps == 6 and recipe.draft.speculative_tokens == 6
    with pytest.raises(ShipyardError, match="draft.block_size is a setting of task: dflash"):
        load_recipe("quickstart_eagle3", base + ["draft.block_size=8"])
    with pytest.raises(ShipyardError, match="draft.ttt_steps is a setting of task: eagle3"):
        load_recipe("quickstart_dflash", base + ["draft.ttt_steps=3"])
    with pytest.raises(ShipyardError, match="num_speculative_tokens .7. exceeds draft.ttt_steps .6."):
        load_recipe("quickstart_eagle3", base + ["draft.num_speculative_tokens=7"])


def test_families_without_a_vllm_eagle3_class_are_refused():
    assert eagle3.family_of(preset_config("llama-tiny"), "x") == "llama"
    with pytest.raises(ShipyardError, match="Qwen3 and Llama.*'gemma2', not supported"):
        eagle3.drafter_config(preset_config("gemma2-tiny"), [0, 1], None)


def test_weight_check_names_what_vllm_would_miss():
    llama = eagle3.Eagle3Drafter(eagle3.drafter_config(preset_config("llama-tiny"), [0, 2, 4], None))
    config = llama.config
    shapes = {n: tuple(t.shape) for n, t in llama.state_dict().items()}
    assert set(shapes) == set(eagle3.expected_weights(config)) and "midlayer.self_attn.q_norm.weight" not in shapes
    eagle3.check_weights(config, shapes, "ok")
    with pytest.raises(ShipyardError, match=r"missing \['fc.weight'\]"):
        eagle3.check_weights(config, {n: s for n, s in shapes.items() if n != "fc.weight"}, "x")
    with pytest.raises(ShipyardError, match=r"misshaped \['fc.weight \(128, 256\) \(vLLM declares \(128, 384\)\)'\]"):
        eagle3.check_weights(config, {**shapes, "fc.weight": (128, 256)}, "x")


# ------------------------------------------------------------------ 4. training runs


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    """A (barely) trained quickstart model: a Hugging Face directory with a chat template."""
    from shipyard.train.loop import train

    out = tmp_path_factory.mktemp("eagle3") / "target"
    train(load_recipe("quickstart", tiny_overrides(out, steps=2, records=64) + ["eval.generate=false"]))
    return out / "final"


RUN_STEPS, EVERY = 4, 2


def _overrides(out: Path, target: Path, steps: int, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"draft.target={target}", f"train.max_steps={steps}", "train.micro_batch_size=8",
            "draft.ttt_steps=3", f"checkpoint.every_steps={EVERY}", f"train.eval_every={EVERY}",
            "optim.warmup_steps=2", "data.train={synthetic: reverse_words, num_records: 64, seed: 0}",
            "data.validation={synthetic: reverse_words, num_records: 8, seed: 1}", *extra]


def _train(out: Path, target: Path, steps: int, *extra: str) -> dict:
    from shipyard.train.loop import train

    return train(load_recipe("quickstart_eagle3", _overrides(out, target, steps, *extra))).summary


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    weights = DirectoryWeights(directory)
    return weights.load(sorted(weights.shapes))


@pytest.fixture(scope="module")
def drafter_run(target_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("eagle3") / "full"
    return out, _train(out, target_dir, RUN_STEPS)


def test_export_holds_exactly_what_vllms_class_declares(drafter_run, target_dir, tmp_path):
    from shipyard.export.export import export_checkpoint
    from shipyard.verify.drafter import is_drafter_dir, load_drafter, method_of

    out, summary = drafter_run
    final = out / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["Eagle3Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    assert config["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]  # written: vLLM's default crashes on 2 layers
    assert config["num_hidden_layers"] == 1 and config["draft_vocab_size"] == config["vocab_size"]
    tensors = _tensors(final)
    assert {n: tuple(t.shape) for n, t in tensors.items()} == eagle3.expected_weights(
        load_drafter(final).config)  # no embedding, no LM head (vLLM shares the target's), no d2t
    assert method_of(final) == "eagle3" and is_drafter_dir(final) and not is_drafter_dir(target_dir)
    assert summary["eval"]["mean_acceptance_length"] <= summary["eval"]["ceiling_mean_acceptance_length"]
    assert len(summary["eval"]["acceptance_per_position"]) == 3

    # A checkpoint missing fc.weight, or with it misshaped, is refused before anything is written.
    for name, broken in (("missing", None), ("misshaped", torch.zeros(128, 256))):
        src = tmp_path / name
        shutil.copytree(final, src)
        state = load_file(src / "model.safetensors")
        if broken is None:
            del state["fc.weight"]
        else:
            state["fc.weight"] = broken
        save_file(state, src / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ShipyardError, match=f"{name} \\['fc.weight"):
            export_checkpoint(src, tmp_path / f"{name}_out")
        assert not (tmp_path / f"{name}_out").exists()


def test_resume_mid_run_is_bitwise_equal(drafter_run, target_dir, tmp_path):
    full_dir, full_summary = drafter_run
    cut_dir = tmp_path / "cut"
    shutil.copytree(full_dir, cut_dir)
    shutil.rmtree(cut_dir / "checkpoints" / f"step_{RUN_STEPS}")
    shutil.rmtree(cut_dir / "final")
    (cut_dir / "checkpoints" / "LATEST").write_text(f"step_{EVERY}\n")
    resumed = _train(cut_dir, target_dir, RUN_STEPS)
    assert resumed["resumed_from_step"] == EVERY
    full, cut = _metrics(full_dir), _metrics(cut_dir)
    keys = ("train/loss", "train/grad_norm", "train/lr", "train/supervised_tokens")
    for a, b in zip(full, cut):
        assert [a[k] for k in keys] == [b[k] for k in keys], a["step"]  # bitwise
    assert full[-1]["train/loss"] < full[0]["train/loss"]  # it learns
    a, b = _tensors(full_dir / "final"), _tensors(cut_dir / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert full_summary["eval"] == resumed["eval"]


def test_reduced_draft_vocabulary_exports_its_head_and_d2t_offsets(target_dir, tmp_path):
    from shipyard.verify.drafter import load_drafter

    out = tmp_path / "vocab"
    _train(out, target_dir, 1, "draft.draft_vocab_size=48", "checkpoint.every_steps=null", "train.eval_every=null")
    final = out / "final"
    config = json.loads((final / "config.json").read_text())
    tensors = _tensors(final)
    assert config["draft_vocab_size"] == 48 and tensors["d2t"].dtype == torch.int64
    assert tensors["lm_head.weight"].shape == (48, config["hidden_size"])
    target_ids = torch.arange(48) + tensors["d2t"]  # offsets: target id = draft id + d2t[draft id]
    assert bool((target_ids[1:] > target_ids[:-1]).all()) and int(target_ids.max()) < config["vocab_size"]
    target_head = _tensors(target_dir)
    head = target_head.get("lm_head.weight", target_head["model.embed_tokens.weight"])
    assert torch.equal(tensors["lm_head.weight"], head[target_ids])  # the target's rows, frozen
    drafter = load_drafter(final)
    assert drafter.target_to_draft(target_ids).tolist() == list(range(48))


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_two_ranks_equal_one_rank(drafter_run, target_dir, tmp_path):
    one_dir, _ = drafter_run  # micro-batch 8 on one rank
    two_dir = tmp_path / "two"
    proc = run_cli("train", "quickstart_eagle3", *_overrides(two_dir, target_dir, RUN_STEPS, "train.micro_batch_size=4"),
                   "--nproc-per-node", "2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    one, two = _metrics(one_dir), _metrics(two_dir)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, RUN_STEPS + 1))
    for a, b in zip(one, two):
        assert a["train/supervised_tokens"] == b["train/supervised_tokens"]
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-5 * abs(a["train/loss"]), (a["step"], a, b)
    a, b = _tensors(one_dir / "final"), _tensors(two_dir / "final")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name

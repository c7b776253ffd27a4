"""`verify` for a drafter directory (DFlash, EAGLE-3): serve target + drafter in vLLM and measure what it buys.

vLLM runs the held-out prompts plainly, with `speculative_config={"method": "dflash" or "eagle3", ...}` and with
its n-gram drafter. Lossless means the speculative answers equal the plain ones. vLLM's acceptance counters also count drafts
accepted after an answer's stop token (the target keeps emitting end-of-turn there), so tau is re-counted by
replaying vLLM's plain answers through the drafter in torch (speculative/acceptance.py), only inside each answer; the
ceiling is the same replay with a perfect drafter. vLLM's raw figure is reported beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shipyard.errors import ShipyardError
from shipyard.hf_files import read_probe
from shipyard.models import dflash, eagle3
from shipyard.models.structure import hidden_states_entering
from shipyard.models.weights import DirectoryWeights
from shipyard.speculative.acceptance import (acceptance_per_position, block_table, greedy_tokens,
                                             mean_acceptance_length, perfect_table, replay_drafts)
from shipyard.verify.inputs import directory_encoder, model_len_for, served_dialog
from shipyard.verify.speculative import MAX_PROMPTS, NGRAM, SPEC_MAX_NEW_TOKENS

VLLM_DTYPE = "float32"


METHODS = {dflash.ARCHITECTURE: "dflash", **{a: "eagle3" for a in eagle3.ARCHITECTURES}}  # architecture -> vLLM's
NAMES = {"dflash": "DFlash", "eagle3": "EAGLE-3"}


def method_of(directory: Path) -> str | None:
    """vLLM's speculative method for a drafter directory, None for anything else."""
    path = Path(directory) / "config.json"
    architectures = json.loads(path.read_text()).get("architectures") or [] if path.is_file() else []
    return METHODS.get(architectures[0]) if len(architectures) == 1 else None


def is_drafter_dir(directory: Path) -> bool:
    return method_of(directory) is not None


def target_of(directory: Path, target: str | None) -> Path:
    config = json.loads((Path(directory) / "config.json").read_text())
    name = target or config.get("shipyard_target")
    if not name:
        raise ShipyardError(f"{directory}: a drafter without a recorded target; pass --target TARGET_DIR")
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ShipyardError(f"{directory}: its target {name} is not a Hugging Face directory here; pass "
                            "--target TARGET_DIR (vLLM serves the target from a directory)")
    return path


def load_drafter(directory: Path) -> torch.nn.Module:
    """The drafter as shipyard's module, every tensor of the directory in its place (none missing, none extra)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    method = method_of(directory)
    drafter = dflash.DFlashDrafter(config) if method == "dflash" else eagle3.Eagle3Drafter(config)
    weights = DirectoryWeights(Path(directory))
    state = weights.load(list(weights.shapes))
    expected = set(drafter.state_dict())
    if set(state) != expected:
        raise ShipyardError(f"{directory}: drafter weights do not match the {NAMES[method]} layout: missing "
                            f"{sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]}")
    drafter.load_state_dict(state)
    return drafter.eval()


def with_answer(inputs: dict, answer: list[int]) -> dict:
    """A prompt's model inputs (pixels included) followed by `answer`'s tokens."""
    ids = torch.cat([inputs["input_ids"], torch.tensor([answer], dtype=inputs["input_ids"].dtype)], dim=1)
    out = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            out[key] = torch.cat([inputs[key], torch.zeros(1, len(answer), dtype=inputs[key].dtype)], dim=1)
    return out


def depth_of(drafter) -> int:
    """Tokens drafted per target step when served."""
    config = drafter.config
    return config.block_size - 1 if isinstance(drafter, dflash.DFlashDrafter) else config.num_speculative_tokens


def dflash_table(target, drafter, inputs: dict, tokens: list[int], beyond: list[int]) -> list[list[int]]:
    """The DFlash drafter's table over one answer: a block anchored at every answer position."""
    from shipyard.train.dflash import drafter_positions, target_features

    config = drafter.config
    block, ids = config.block_size, config.dflash_config["target_layer_ids"]
    batch = with_answer(inputs, tokens[inputs["input_ids"].shape[1]:])
    with target_features(target, ids) as captured:
        target(**batch, use_cache=False)
    features = torch.cat([captured[i] for i in ids], dim=-1)
    anchors = torch.arange(inputs["input_ids"].shape[1], len(tokens) - 1)
    rows = torch.zeros_like(anchors)
    block_ids = dflash.block_inputs(batch["input_ids"], rows, anchors, block, config.dflash_config["mask_token_id"])
    states = drafter(features, target.get_input_embeddings()(block_ids), anchors, rows,
                     drafter_positions(target, batch))
    drafted = greedy_tokens(target, states).tolist()  # drafted[i][k]: slot k of the block anchored at anchors[i]
    return block_table(dict(zip(anchors.tolist(), drafted)), block, len(tokens))


def eagle3_table(target, drafter, inputs: dict, tokens: list[int], beyond: list[int]) -> list[list[int]]:
    """The EAGLE-3 drafter's table: its unrolled steps from every position, over the answer and the target's tokens
    past its end (the inputs of the late drafts vLLM's raw counters count)."""
    from shipyard.train.eagle3 import draft_tokens

    ids = drafter.config.eagle_aux_hidden_state_layer_ids
    batch = with_answer(inputs, tokens[inputs["input_ids"].shape[1]:] + beyond)
    with hidden_states_entering(target, ids) as captured:
        target(**batch, use_cache=False)
    features = torch.cat([captured[i] for i in ids], dim=-1)
    drafted = draft_tokens(drafter, target, batch["input_ids"], features, depth_of(drafter))
    return [d[0].tolist() for d in drafted]  # [k][i]: step k's draft from position i (depth k + 1)


@torch.no_grad()
def replay(target, drafter, prompts: list[dict], answers: list[list[int]]) -> dict:
    """tau and acceptance per position of `drafter` on these answers, and of a perfect drafter (the ceiling).

    `prompts`: each prompt's model inputs (input_ids, and pixel inputs for a vision-language target)."""
    depth = depth_of(drafter)
    table_of = dflash_table if isinstance(drafter, dflash.DFlashDrafter) else eagle3_table
    accepted, ceiling_accepted, drafts, ceiling_drafts = [0] * depth, [0] * depth, 0, 0
    raw_accepted = [0] * depth
    for inputs, answer in zip(prompts, answers):
        if len(answer) < 2:
            continue
        batch = with_answer(inputs, answer)
        tokens = batch["input_ids"][0].tolist()
        start = inputs["input_ids"].shape[1]
        # The target's greedy tokens past the answer's end: what vLLM's verification compares late drafts with.
        beyond = target.generate(**batch, max_new_tokens=depth + 1, do_sample=False, eos_token_id=[-1],
                                 pad_token_id=0)[0, len(tokens):].tolist()
        table = table_of(target, drafter, inputs, tokens, beyond)
        perfect = perfect_table(tokens, depth, len(tokens))
        drafts += replay_drafts(table, tokens, start, len(tokens) - 1, accepted)
        replay_drafts(table, tokens + beyond, start, len(tokens) - 1, raw_accepted, reach=len(tokens) - 1 + depth + 1)
        ceiling_drafts += replay_drafts(perfect, tokens, start, len(tokens) - 1, ceiling_accepted)
    return {
        "mean_acceptance_length": mean_acceptance_length(accepted, drafts),
        "acceptance_per_position": acceptance_per_position(accepted, drafts),
        "drafts": drafts,
        "ceiling_mean_acceptance_length": mean_acceptance_length(ceiling_accepted, ceiling_drafts),
        # Counted as vLLM's raw counters count (late drafts included): equal to them when vLLM drafts what
        # shipyard's drafter drafts.
        "replayed_raw_accepted_per_position": raw_accepted,
    }


def prepare(directory: Path, target: str | None) -> dict:
    """The vLLM job for a drafter directory, and what the report needs."""
    from transformers import AutoConfig, AutoTokenizer

    from shipyard.data.images import media_of
    from shipyard.models.load import auto_model_class
    from shipyard.models.greedy import prompt_inputs

    directory = Path(directory)
    target_dir = target_of(directory, target)
    drafter = load_drafter(directory)
    target_config = AutoConfig.from_pretrained(target_dir)
    method = method_of(directory)
    (dflash if method == "dflash" else eagle3).check_pairs(drafter.config, target_config,
                                                           f"{directory} with target {target_dir}")
    probe = read_probe(directory) or {}
    dialogs = (probe.get("held_out") or probe.get("prompts") or [])[:MAX_PROMPTS]
    if not dialogs:
        raise ShipyardError(f"{directory}: no held-out prompts recorded (shipyard_verify.json)")
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    auto = auto_model_class(target_config)
    model = auto.from_pretrained(target_dir, dtype=torch.float32).eval()
    encoder = directory_encoder(target_dir, model, tokenizer, False)
    inputs = [prompt_inputs(tokenizer, d, encoder) for d in dialogs]
    longest = max(x["input_ids"].shape[1] for x in inputs)
    depth = depth_of(drafter)
    job = {"kind": "speculative", "model": str(target_dir), "tokenizer": str(target_dir),
           "dialogs": [served_dialog(d) for d in dialogs],
           "dtype": VLLM_DTYPE,
           "max_new_tokens": SPEC_MAX_NEW_TOKENS,
           "max_model_len": model_len_for(model, [[0] * longest], SPEC_MAX_NEW_TOKENS + depth + 1),
           "speculative": {"method": method, "model": str(directory), "num_speculative_tokens": depth},
           "control": NGRAM}
    if encoder is not None:
        job["images_per_prompt"] = max(1, max(len(media_of(d)) for d in dialogs))
    return {"dir": str(directory), "target": str(target_dir), "job": job, "drafter": drafter, "model": model,
            "inputs": inputs}


def finish(prep: dict, vllm_version: str | None, result: dict | None) -> dict:
    method = prep["job"]["speculative"]["method"]
    report = {"dir": prep["dir"], "kind": f"{method}_drafter", "target": prep["target"],
              "vllm": {"available": result is not None, "version": vllm_version}}
    if result is None:
        report.update(ok=False, speculative={"method": method, "error": "vLLM is not installed"})
        return report
    if not result["ok"]:
        report.update(ok=False, speculative={"method": method, "lossless": False, "error": result["error"]})
        return report
    plain, spec, control = result["plain"], result["speculative"], result["control"]
    same = [a == b for a, b in zip(plain["token_ids"], spec["token_ids"])]
    c = spec["counters"]
    prompts_equal = [x["input_ids"][0].tolist() == p for x, p in zip(prep["inputs"], plain["prompt_token_ids"])]
    measured = replay(prep["model"], prep["drafter"], prep["inputs"], plain["token_ids"])
    raw_drafts = max(c["num_drafts"], 1)
    ngram = control["counters"]
    spec_report = {
        "method": method,
        "num_speculative_tokens": prep["job"]["speculative"]["num_speculative_tokens"],
        "prompts": len(same),
        "lossless": all(same),
        "lossless_prompts": sum(same),
        "prompt_ids_equal": all(prompts_equal),  # the replay's prompts are vLLM's, image tokens included
        **measured,
        "vllm_raw_mean_acceptance_length": 1 + c["num_accepted_tokens"] / raw_drafts,
        "vllm_raw_acceptance_per_position": [a / raw_drafts for a in c["num_accepted_tokens_per_pos"]],
        "vllm_raw_drafts": c["num_drafts"],
        "vllm_raw_accepted_per_position": c["num_accepted_tokens_per_pos"],
        "ngram_mean_acceptance_length": 1 + ngram["num_accepted_tokens"] / max(ngram["num_drafts"], 1),
        "ngram_lossless": control["token_ids"] == plain["token_ids"],
        "tokens_per_second": {"plain": plain["tokens_per_second"], method: spec["tokens_per_second"],
                              "ngram": control["tokens_per_second"]},
    }
    report["speculative"] = spec_report
    report["vllm"]["dtype"] = VLLM_DTYPE
    report["ok"] = spec_report["lossless"] and spec_report["prompt_ids_equal"] and \
        spec_report["mean_acceptance_length"] <= spec_report["ceiling_mean_acceptance_length"] + 1e-9
    return report


def format_report(report: dict) -> str:
    s = report["speculative"]
    name = NAMES[s["method"]]
    lines = [f"shipyard verify {report['dir']} ({name} drafter for {report['target']})"]
    if "error" in s:
        lines += [f"  vLLM {name} speculative decoding FAILED: {s['error']}", "NOT OK"]
        return "\n".join(lines)
    tps = s["tokens_per_second"]
    lines += [
        f"  vLLM {report['vllm']['version']} ({report['vllm']['dtype']}), {s['prompts']} held-out prompts, "
        f"{s['num_speculative_tokens']} drafted tokens per step: "
        f"{'lossless' if s['lossless'] else 'NOT LOSSLESS'} ({s['lossless_prompts']}/{s['prompts']} answers equal "
        "plain greedy)",
        f"    {'':<28} {'tau':>7} {'tokens/s':>10}",
        f"    {'no speculation':<28} {1.0:>7.3f} {tps['plain']:>10,.0f}",
        f"    {name + ' (to each answer end)':<28} {s['mean_acceptance_length']:>7.3f} {tps[s['method']]:>10,.0f}",
        f"    {name + ' (vLLM raw counters)':<28} {s['vllm_raw_mean_acceptance_length']:>7.3f}",
        f"    {'ceiling (perfect drafter)':<28} {s['ceiling_mean_acceptance_length']:>7.3f}",
        f"    {'vLLM n-gram':<28} {s['ngram_mean_acceptance_length']:>7.3f} {tps['ngram']:>10,.0f}",
        "    acceptance per position: " + ", ".join(f"{a:.2f}" for a in s["acceptance_per_position"]),
        "OK" if report["ok"] else "NOT OK",
    ]
    return "\n".join(lines)

"""`verify` for a directory with an MTP head: serve it with vLLM's speculative decoding and measure acceptance.

vLLM runs the held-out prompts twice, greedily: plain, and with `speculative_config={"method": "mtp", ...}`.
Lossless means both produce the same tokens. vLLM's acceptance counters are global and also count drafts
"accepted" after an answer's stop token, so the acceptance reported as the result is re-counted here, exactly, by
replaying vLLM's own greedy answers through the exported head in transformers: after each target step that
produced token m, the head drafts tokens m+1.. from position m-1; drafts count as accepted while they equal the
answer's tokens, and only inside the answer. vLLM's raw figures are reported beside it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shipyard.models import mtp
from shipyard.models.mtp_layout import existing_mtp_layers, style_for
from shipyard.speculative.acceptance import acceptance_per_position, mtp_drafts, replay_drafts
from shipyard.train.loss import forward_hidden

SPEC_MAX_NEW_TOKENS = 64
MAX_PROMPTS = 200
# vLLM's n-gram drafter on the same target: its own baseline, and a control: when MTP and n-gram are both lossy,
# the engine (not the exported head) is at fault, since a drafter cannot change what verification accepts.
NGRAM = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def mtp_layers_in(model_dir: Path, config) -> int:
    if not getattr(config, "num_nextn_predict_layers", 0):
        return 0
    return existing_mtp_layers(model_dir, config)


def speculative_job(model_dir: Path, tokenizer_dir: Path, config, dialogs: list[list[dict]], layers: int,
                    max_model_len: int) -> dict:
    style = style_for(config)
    n = min(layers, style.max_served_depths)
    job = {"kind": "speculative", "model": str(model_dir), "tokenizer": str(tokenizer_dir), "dialogs": dialogs,
           "max_new_tokens": SPEC_MAX_NEW_TOKENS, "max_model_len": max_model_len,
           "speculative": {"method": "mtp", "num_speculative_tokens": n}, "control": NGRAM}
    if style.layout == "nemotron_h" and not torch.cuda.is_available():
        # vLLM's CPU build: with prefix caching on, speculative decoding of a Mamba hybrid calls a Triton kernel
        # (mamba_utils.precopy_mamba_align_fused_kernel) and crashes; off, it runs (docs/notes/mtp-on-vllm.md).
        job["engine"] = {"enable_prefix_caching": False}
    return job


@torch.no_grad()
def replay_acceptance(model, prompts: list[list[int]], answers: list[list[int]], n_spec: int) -> dict:
    """Acceptance per draft position, counted only inside each answer, by replaying vLLM's greedy answers."""
    model.eval()
    device = next(model.parameters()).device
    accepted, drafts = [0] * n_spec, 0
    for prompt, answer in zip(prompts, answers):
        if not answer:
            continue
        x = torch.tensor([prompt + answer], device=device)
        ones = torch.ones_like(x)
        captured = forward_hidden(model, {"input_ids": x, "attention_mask": ones}, None, pre_norm=True)
        outs = mtp.mtp_outputs(model, captured.get("pre_norm"), captured["hidden"], x, ones)
        drafted = [d[0] for d in mtp_drafts(model, outs[:n_spec])]  # drafted[j-1][t]: token t + j + 1
        tokens = x[0].tolist()
        drafts += replay_drafts(drafted, tokens, len(prompt), len(tokens) - 1, accepted)
    per_position = acceptance_per_position(accepted, drafts)
    return {"drafts": drafts, "acceptance_per_position": per_position, "mean_acceptance_length": 1 + sum(per_position)}


def speculative_report(model, result: dict, n_spec: int) -> dict:
    plain, spec = result["plain"], result["speculative"]
    counters = spec["counters"]
    same = [a == b for a, b in zip(plain["token_ids"], spec["token_ids"])]
    replay = replay_acceptance(model, plain["prompt_token_ids"], plain["token_ids"], n_spec)
    raw_drafts = max(counters["num_drafts"], 1)
    return {
        "method": "mtp",
        "served": True,
        "num_speculative_tokens": n_spec,
        "prompts": len(same),
        "lossless": all(same),
        "lossless_prompts": sum(same),
        "mean_acceptance_length": replay["mean_acceptance_length"],
        "acceptance_per_position": replay["acceptance_per_position"],
        "drafts": replay["drafts"],
        "vllm_raw_mean_acceptance_length": 1 + counters["num_accepted_tokens"] / raw_drafts,
        "vllm_raw_acceptance_per_position": [a / raw_drafts for a in counters["num_accepted_tokens_per_pos"]],
        "vllm_raw_drafts": counters["num_drafts"],
        "tokens_per_second": {"plain": plain["tokens_per_second"], "mtp": spec["tokens_per_second"]},
    } | _control(result)


def _control(result: dict) -> dict:
    control = result.get("control")
    if control is None:
        return {}
    c = control["counters"]
    same = [a == b for a, b in zip(result["plain"]["token_ids"], control["token_ids"])]
    out = {"ngram_lossless": all(same), "ngram_mean_acceptance_length": 1 + c["num_accepted_tokens"] / max(c["num_drafts"], 1)}
    out["tokens_per_second_ngram"] = control["tokens_per_second"]
    return out


def not_served(config) -> dict:
    return {"method": "mtp", "served": False, "reason": mtp.why_not_served(config)}


def format_speculative(s: dict) -> list[str]:
    if not s.get("served"):
        return [f"  MTP head: not served by vLLM: {s['reason']}"]
    per = ", ".join(f"{a:.3f}" for a in s["acceptance_per_position"])
    raw = ", ".join(f"{a:.3f}" for a in s["vllm_raw_acceptance_per_position"])
    tps = s["tokens_per_second"]
    return [
        f"  MTP speculative decoding in vLLM ({s['num_speculative_tokens']} draft token(s), {s['prompts']} held-out "
        f"prompts): {'lossless' if s['lossless'] else 'NOT LOSSLESS'} ({s['lossless_prompts']}/{s['prompts']} "
        "answers equal plain greedy)",
        f"    acceptance per position {per}; mean acceptance length {s['mean_acceptance_length']:.3f} "
        f"(counted to each answer's end, {s['drafts']} drafts)",
        f"    vLLM's raw counters: per position {raw}; mean acceptance length "
        f"{s['vllm_raw_mean_acceptance_length']:.3f} ({s['vllm_raw_drafts']} drafts, drafts after a stop included)",
        f"    tokens/s: {tps['plain']:,.0f} plain, {tps['mtp']:,.0f} with MTP"
        + (f", {s['tokens_per_second_ngram']:,.0f} with vLLM's n-gram drafter (mean acceptance length "
           f"{s['ngram_mean_acceptance_length']:.3f}, {'lossless' if s['ngram_lossless'] else 'NOT lossless'})"
           if "ngram_lossless" in s else ""),
    ] + ([f"    the n-gram drafter is not lossless on this target either: vLLM's speculative decoding of this model "
          "is at fault, not the exported head (a drafter cannot change which tokens verification keeps)"]
         if not s["lossless"] and s.get("ngram_lossless") is False else [])

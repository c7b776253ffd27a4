"""Evaluation by generation: exact match of greedy answers on held-out prompts.

Exact match renders each validation dialog up to its last assistant turn with
the chat template, generates greedily until an end-of-turn token, and compares
the answer with the reference (whitespace-stripped). It is generic for any
chat data and is the quickstart's pass/fail number.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from shipyard.config import EvalConfig
from shipyard.data.chat import prompt_and_reference, render_text
from shipyard.data.images import ImageEncoder, media_of
from shipyard.data.messages import Record, text_of
from shipyard.parallel.dist import DistInfo


@torch.no_grad()
def greedy_answers(
    model, tokenizer: PreTrainedTokenizerBase, prompts: list[str], eos_ids: list[int], cfg: EvalConfig, device, synced: bool = False
) -> list[str]:
    """Greedy completions of rendered chat prompts, decoded without special tokens."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right: pad prompts on the left
    answers = []
    try:
        for start in range(0, len(prompts), cfg.batch_size):
            texts = prompts[start : start + cfg.batch_size]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=cfg.max_new_tokens,
                do_sample=False,
                eos_token_id=eos_ids,
                pad_token_id=tokenizer.pad_token_id,
                synced_gpus=synced,  # FSDP: every rank must run the same number of forwards
            )
            new = out[:, enc["input_ids"].shape[1] :]
            answers.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train()
    return answers


@torch.no_grad()
def greedy_answers_with_images(model, encoder: ImageEncoder, prompts: list[str], images: list[list[str]],
                               eos_ids: list[int], cfg: EvalConfig, device, synced: bool = False) -> list[str]:
    """Greedy completions of rendered prompts with their images, one prompt at a time (no padding to get
    wrong around image tokens; a VLM eval is a few hundred short prompts)."""
    model.eval()
    tokenizer = encoder.tokenizer
    answers = []
    try:
        for text, refs in zip(prompts, images):
            ids = torch.tensor([encoder.encode(text, refs)])
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **encoder.media_inputs(refs)}
            if refs:
                inputs.update(encoder.type_ids(ids))
            out = model.generate(**{k: v.to(device) for k, v in inputs.items()}, max_new_tokens=cfg.max_new_tokens,
                                 do_sample=False, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
                                 synced_gpus=synced)
            answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    finally:
        model.train()
    return answers


def exact_match(
    model, tokenizer, records: list[Record], eos_ids: list[int], cfg: EvalConfig, dist_info: DistInfo,
    encoder: ImageEncoder | None = None,
) -> dict:
    """{"exact_match": fraction, "num_prompts": n, "examples": first few (prompt, expected, got)}."""
    records = records[: cfg.max_prompts]
    pairs = [prompt_and_reference(r) for r in records]
    texts = [render_text(tokenizer, p, add_generation_prompt=True, tools=r.tools, kwargs=r.template_kwargs)
             for (p, _), r in zip(pairs, records)]
    if encoder is not None:
        answers = greedy_answers_with_images(model, encoder, texts, [media_of(p) for p, _ in pairs], eos_ids, cfg,
                                             dist_info.device, synced=dist_info.distributed)
    else:
        answers = greedy_answers(model, tokenizer, texts, eos_ids, cfg, dist_info.device, synced=dist_info.distributed)
    hits = [a.strip() == ref.strip() for a, (_, ref) in zip(answers, pairs)]
    examples = [
        {"prompt": text_of(p[-1]["content"]), "expected": ref, "got": a.strip()}
        for (p, ref), a in list(zip(pairs, answers))[:5]
    ]
    result = {"exact_match": sum(hits) / max(len(hits), 1), "num_prompts": len(hits), "examples": examples}
    if encoder is not None and hasattr(encoder, "ctc_targets"):  # a speech-LM: word error rates of its transcripts
        refs = [ref for _, ref in pairs]
        result["wer"] = word_error_rate(refs, answers)
        by_source: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            by_source.setdefault(source_of(r.origin), []).append(i)
        if len(by_source) > 1:
            result["wer_by_source"] = {name: word_error_rate([refs[i] for i in idx], [answers[i] for i in idx])
                                       for name, idx in by_source.items()}
    return result


def source_of(origin: str) -> str:
    """The data source of a record's origin ("synthetic:NAME#i" -> "synthetic:NAME", "file.jsonl:12" -> "file.jsonl")."""
    return origin.rsplit("#", 1)[0] if origin.startswith("synthetic:") else origin.rsplit(":", 1)[0]


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Word errors (substitutions, deletions, insertions) per reference word, over all pairs (jiwer)."""
    import jiwer

    if not references:
        return 0.0
    # jiwer refuses empty references; a pair with none counts its hypothesis words as insertions.
    kept = [(r.strip(), h.strip()) for r, h in zip(references, hypotheses) if r.strip()]
    inserted = sum(len(h.split()) for r, h in zip(references, hypotheses) if not r.strip())
    words = sum(len(r.split()) for r, _ in kept)
    errors = jiwer.process_words([r for r, _ in kept], [h for _, h in kept]) if kept else None
    wrong = (errors.substitutions + errors.deletions + errors.insertions) if errors else 0
    return (wrong + inserted) / max(words, 1)

"""What verify gives the two engines besides the directory: its media encoder (transformers' half), the dialogs
as a client sends them and a context length just long enough for them (the vLLM job, serving/worker.py)."""

from __future__ import annotations

from pathlib import Path

from shipyard.data.images import encoder_for


def directory_encoder(model_dir: Path, model, tokenizer, trust_remote_code: bool):
    """A multimodal directory's own processor (its saved pixel limits / audio features), wired to its tokenizer."""
    from shipyard.export.export import load_processor_of

    return encoder_for(load_processor_of(model_dir, model.config, tokenizer, trust_remote_code))


def served_dialog(dialog: list[dict]) -> list[dict]:
    """A probe dialog as a client sends it to vLLM: images and clips as OpenAI image_url / audio_url parts
    (data: URIs)."""
    def part(p: dict) -> dict:
        if p["type"] in ("image", "audio"):
            return {"type": f"{p['type']}_url", f"{p['type']}_url": {"url": p[p["type"]]}}
        return p

    return [{**m, "content": [part(p) for p in m["content"]]} if isinstance(m["content"], list) else m
            for m in dialog]


def model_len_for(model, prompt_ids: list[list[int]], max_new_tokens: int) -> int:
    """A context just long enough for the prompts (vLLM sizes its KV cache by it), within the model's limit."""
    needed = max(len(p) for p in prompt_ids) + max_new_tokens + 16
    if getattr(model.config, "vision_config", None) is not None:
        needed = max(needed, 1024)  # vLLM sizes its profiling run by the largest image the processor allows
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None) or needed
    return min(needed, limit)

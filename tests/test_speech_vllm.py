"""The speech-LM served by vLLM through shipyard's plugin (`shipyard.serving.vllm_plugin`, installed as a
`vllm.general_plugins` entry point) gives transformers' greedy tokens and prompt ids.

A tiny random speech-LM (the `speech-qwen3-tiny` preset) is saved as a plain Hugging Face directory; eight clips of
0.3 s to 3 s (so eight different `<|audio|>` expansions) are transcribed greedily by transformers here and by vLLM
in a subprocess (this file run as a script), with torch.compile on as served: `enforce_eager` would skip vLLM's
dummy-input profiling run, which runs the audio tower on the longest clip profiled. `LLM.generate` takes the
prompts transformers gets; one `LLM.chat` call with an `audio_url` part checks that vLLM's chat rendering gives
the ids training uses (placeholder, newline, text).
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

RATE = 16_000
SECONDS = (0.3, 0.55, 0.8, 1.1, 1.45, 1.9, 2.4, 3.0)
NEW_TOKENS = 12
QUESTION = "Transcribe."
AUDIO_TOKEN = "<|audio|>"


def clips() -> list[np.ndarray]:
    """Sine sweeps over noise, a different length and pitch each (float32, exactly representable in a WAV)."""
    rng = np.random.default_rng(0)
    out = []
    for i, s in enumerate(SECONDS):
        t = np.arange(int(s * RATE)) / RATE
        f0, f1 = 200 + 150 * i, 900 + 300 * i
        sweep = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * s)))
        out.append((0.3 * sweep + 0.05 * rng.standard_normal(t.size)).astype(np.float32))
    return out


def wav_data_url(samples: np.ndarray) -> str:
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, samples, RATE, format="WAV", subtype="FLOAT")
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()


def build_model_dir(out: Path, preset: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    import shipyard.models.speechlm  # noqa: F401  (registers the speech-LM with transformers)
    from shipyard.models.speech_presets import SPEECH_PRESETS

    torch.manual_seed(0)
    config, processor = SPEECH_PRESETS[preset]()
    model = AutoModelForCausalLM.from_config(config)
    model.reset_audio_convolutions()
    with torch.no_grad():  # std 0.1, not 0.02: a random tiny LM's logits are otherwise near-tied (tests/fixtures.py)
        for name, param in model.named_parameters():
            if param.ndim == 2 and name.startswith(("language_model.", "projector.")):
                param.normal_(0, 0.1)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    GenerationConfig(eos_token_id=processor.tokenizer.eos_token_id).save_pretrained(out)
    # vLLM serves a hybrid backbone under its own name (configuration.HYBRID_ARCHITECTURE), which save_pretrained
    # does not write: it names the class, and AutoModelForCausalLM builds the plain one for every backbone.
    data = json.loads((out / "config.json").read_text())
    data["architectures"] = [config.architecture]
    (out / "config.json").write_text(json.dumps(data, indent=2))
    return out


def transformers_greedy(directory: Path, audio: list[np.ndarray]) -> dict:
    """Per clip: the chat-rendered prompt, its ids with the placeholder expanded, the greedy new tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(directory)
    prompt = processor.tokenizer.apply_chat_template([{"role": "user", "content": f"{AUDIO_TOKEN}\n{QUESTION}"}],
                                                     add_generation_prompt=True, tokenize=False)
    greedy = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                              pad_token_id=processor.tokenizer.pad_token_id)
    prompt_ids, tokens = [], []
    with torch.no_grad():
        for clip in audio:
            batch = processor(text=[prompt], audio=[clip], sampling_rate=RATE)
            out = model.generate(**batch, generation_config=greedy)
            ids = batch["input_ids"][0].tolist()
            assert ids.count(processor.audio_token_id) == processor.audio_token_count(len(clip))
            prompt_ids.append(ids)
            tokens.append(out[0, len(ids):].tolist())
    assert len(set(map(len, prompt_ids))) == len(audio)  # every clip its own expansion
    assert len(set(map(tuple, tokens))) > 1, "the audio changes nothing: the comparison would prove little"
    return {"prompt": prompt, "prompt_ids": prompt_ids, "tokens": tokens}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """Both backbones' transformers references, and vLLM's answers from ONE subprocess (one engine at a time)."""
    root = tmp_path_factory.mktemp("speech_vllm")
    audio = clips()
    np.savez(root / "audio.npz", *audio)
    jobs, reference = [], {}
    for name, preset, chat in (("qwen3", "speech-qwen3-tiny", True), ("nemotron_h", "speech-nemotron-h-tiny", False)):
        directory = build_model_dir(root / name, preset)
        reference[name] = transformers_greedy(directory, audio)
        jobs.append({"name": name, "model": str(directory), "prompt": reference[name]["prompt"], "chat": chat})
    (root / "request.json").write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_LOGGING_LEVEL": "WARNING"}
    env.pop("TORCHDYNAMO_DISABLE", None)  # compiled, as served
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, str(root)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads((root / "result.json").read_text())
    print(f"\nvLLM subprocess {time.perf_counter() - started:.0f}s; engine starts "
          + ", ".join(f"{k} {r['load_seconds']:.0f}s" for k, r in results.items()))
    return {name: (reference[name], results[name]) for name in reference}


def _assert_same(reference: dict, result: dict) -> None:
    assert result["compiled"], "compilation was off: vLLM skipped its dummy-input profiling run"
    for i, (ids, want) in enumerate(zip(result["prompt_token_ids"], reference["prompt_ids"])):
        assert ids == want, f"clip {i} ({SECONDS[i]} s): prompt ids differ"
    for i, (got, want) in enumerate(zip(result["token_ids"], reference["tokens"])):
        assert got == want, f"clip {i} ({SECONDS[i]} s): vLLM {got} != transformers {want}"


def test_vllm_serves_the_speech_lm_like_transformers(served):
    reference, result = served["qwen3"]
    assert result["architecture"] == "ShipyardSpeechLMForConditionalGeneration"
    _assert_same(reference, result)
    # LLM.chat with an audio_url part renders "<|audio|>\nTranscribe." as training does, then expands it.
    assert result["chat_prompt_token_ids"] == reference["prompt_ids"][-1]
    assert result["chat_token_ids"] == reference["tokens"][-1]


def test_vllm_serves_the_hybrid_backbone_like_transformers(served):
    """NemotronH (Mamba + attention + MLP blocks): vLLM's hybrid cache manager, sized through its NemotronH."""
    reference, result = served["nemotron_h"]
    assert result["architecture"] == "ShipyardSpeechLMHybridForConditionalGeneration"
    _assert_same(reference, result)


def serve(workdir: Path) -> None:
    """The vLLM side (run in a subprocess: vLLM spawns workers and takes the CPU). One engine at a time."""
    import gc

    from vllm import LLM, SamplingParams

    # As shipyard.serving.engine.settle_heap (not imported: that module disables torch.compile, which this test
    # needs on): engine starts walk only their own objects.
    gc.collect()
    gc.freeze()

    with np.load(workdir / "audio.npz") as f:
        audio = [f[f"arr_{i}"] for i in range(len(f.files))]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    results = {}
    for job in json.loads((workdir / "request.json").read_text()):
        started = time.perf_counter()
        llm = LLM(model=job["model"], dtype="float32", seed=0, max_model_len=512, max_num_seqs=len(audio),
                  gpu_memory_utilization=float(os.environ.get("SHIPYARD_VLLM_GPU_MEMORY_UTILIZATION", "0.3")),
                  kv_cache_memory_bytes=64 << 20, limit_mm_per_prompt={"audio": 1})
        loaded = time.perf_counter() - started
        outputs = llm.generate([{"prompt": job["prompt"], "multi_modal_data": {"audio": (clip, RATE)}}
                                for clip in audio], params, use_tqdm=False)
        config = llm.llm_engine.vllm_config
        result = {
            "load_seconds": loaded,
            "architecture": config.model_config.architecture,
            "compiled": not config.model_config.enforce_eager and config.compilation_config.mode != 0,
            "prompt_token_ids": [list(o.prompt_token_ids) for o in outputs],
            "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        }
        if job["chat"]:
            chat = llm.chat([{"role": "user", "content": [
                {"type": "audio_url", "audio_url": {"url": wav_data_url(audio[-1])}},
                {"type": "text", "text": QUESTION}]}], params, use_tqdm=False)[0]
            result.update(chat_prompt_token_ids=list(chat.prompt_token_ids),
                          chat_token_ids=list(chat.outputs[0].token_ids))
        results[job["name"]] = result
        del llm
        gc.collect()
        gc.freeze()
    (workdir / "result.json").write_text(json.dumps(results))


if __name__ == "__main__":
    serve(Path(sys.argv[1]))

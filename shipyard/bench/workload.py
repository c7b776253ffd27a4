"""What a benchmark trains: the model shape, the data, and how FLOPs are counted.

Both sides (shipyard and HF Trainer) build the same model from the same seed
and train on the same samples; only the training machinery differs.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen3Config

from shipyard.data.chat import Sample, tokenize_dialog
from shipyard.data.messages import Record
from shipyard.data.synthetic import word_task_record
from shipyard.models.presets import PRESETS, preset_config

# Shapes of public models, random init (as the throughput anchors in the reference facts).
SHAPES = {
    "qwen3-0.6b": lambda: Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1_000_000.0,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=151645, pad_token_id=151643,
    ),
    "llama3-8b": lambda: LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500_000.0, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=128009, pad_token_id=128004,
    ),
}

# Dense bf16 peak of the GPUs we report MFU for (TFLOP/s).
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


@dataclass
class Workload:
    model: str = "qwen3-tiny"  # a shipyard preset or a key of SHAPES
    data: str = "chats"  # chats: short multi-turn dialogs of varied length; random: full-length random tokens
    seq_len: int = 256
    micro_batch: int = 32
    steps: int = 30  # measured steps
    warmup: int = 5  # steps run before measuring (compile, allocator, caches)
    lora: dict | None = None  # {"r": 16, "alpha": 32}: LoRA on all linear layers
    seed: int = 0
    shipyard: dict = field(default_factory=dict)  # shipyard-only settings: packing, compile

    def to_json(self) -> dict:
        return asdict(self)


def model_config(name: str) -> PretrainedConfig:
    if name in PRESETS:
        return preset_config(name)
    return SHAPES[name]()


def build_model(w: Workload, attn: str = "sdpa") -> torch.nn.Module:
    config = model_config(w.model)
    config._attn_implementation = attn
    torch.manual_seed(w.seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def samples(w: Workload, tokenizer) -> list[Sample]:
    """Enough samples for warmup + measured steps, identical for both sides."""
    n = (w.steps + w.warmup) * w.micro_batch
    rng = random.Random(w.seed)
    if w.data == "random":
        vocab = model_config(w.model).vocab_size
        out = []
        for _ in range(n):
            ids = [rng.randrange(vocab) for _ in range(w.seq_len)]
            out.append(Sample(ids, [-100] + ids[1:]))
        return out
    out = []
    for i in range(n):  # 1 to 4 turns of reverse/sort requests: short, and of varied length
        messages = []
        for _ in range(rng.randint(1, 4)):
            task = rng.choice(["reverse_words", "sort_words"])
            messages += word_task_record(task, rng)["messages"]
        s = tokenize_dialog(tokenizer, Record(messages, f"bench#{i}"))
        out.append(Sample(s.input_ids[: w.seq_len], s.labels[: w.seq_len]))
    return out


def flops_per_token(w: Workload, n_params: int) -> float:
    """6·N (forward + backward of every weight) + 6·layers·heads·head_dim·seq (attention scores and values).

    LoRA computes no weight gradients for the frozen base: 4·N is the usual count (forward 2N, input
    gradients 2N), as in NeMo Automodel's published LoRA figures.
    """
    c = model_config(w.model)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attention = 6 * c.num_hidden_layers * c.num_attention_heads * head_dim * w.seq_len
    return (4 if w.lora else 6) * n_params + attention


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)

"""The shipped recipes: every one validates, and every one that names models on the hub trains 2 steps against tiny
stand-ins of those models, placed in an offline Hugging Face cache under the recipe's own hub ids.

A stand-in keeps what loading and training the real model depend on: its model_type and architectures, the
family's published chat template on the shipped tokenizer, MiMo's own modelling code with its MTP layer in
MiMo's checkpoint layout, Qwen3-VL's processor, a transformers parakeet CTC checkpoint; all at 2 layers and
hidden 64 (128 where a preset already has that shape), saved in bf16 as hub checkpoints are. Hub datasets get a
tiny copy in the offline datasets cache, with the real dataset's columns and splits; a recipe whose data is the
user's own file (my_chats.jsonl) trains on a small file of the right kind (text, images or audio).

The 2-step run keeps the recipe's task, model section (freezing, MTP, speech encoder), LoRA, draft, optimizer,
checkpointing, activation checkpointing, compile and FSDP settings; only sizes (steps, batch, evaluation prompts),
the output folder, the world size (one process: pipeline stages off) and the precision (exact fp32 on a CPU, as
`auto` gives; bf16 stays the GPU's) are overridden. A recipe naming a hub model or dataset with no stand-in here
fails with a message saying to add one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from shipyard.config import dump_recipe, load_recipe, shipped_recipes, validate_recipe
from shipyard.errors import ShipyardError
from shipyard.models.structure import clean_name
from shipyard.models.load import resolve_source
from tests.conftest import losses
from tests.fixtures import SNAPSHOT, family_tokenizer, hub_dataset_into_cache, into_hub_cache

RECIPES = sorted(shipped_recipes())
VOCAB = 576  # the shipped tokenizer's 512 tokens plus a family's control tokens, rounded up to a multiple of 64


def hub_models(recipe) -> list[str]:
    """The models a recipe names by hub id (org/name, not a folder here): base, speech encoder, drafter target."""
    names = [recipe.model.path, recipe.model.speech.encoder if recipe.model.speech else None,
             recipe.draft.target if recipe.draft else None]
    return [n for n in names if n and re.fullmatch(r"[\w.-]+/[\w.-]+", n) and not Path(n).exists()]


def hub_datasets(recipe) -> list[str]:
    return sorted({s.dataset for s in [*recipe.data.train, *recipe.data.validation] if s.dataset})


def _names_hub_models(name: str) -> bool:
    try:
        return bool(hub_models(load_recipe(name)))
    except ShipyardError:  # an invalid recipe: the validation test below says why
        return False


HUB_RECIPES = [name for name in RECIPES if _names_hub_models(name)]


# ------------------------------------------------------------------ (a) every recipe validates


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates_and_says_what_it_sets(name):
    recipe = load_recipe(name)
    assert validate_recipe(yaml.safe_load(dump_recipe(recipe))) == recipe  # every default written out reads back
    if recipe.parallel.pp > 1:
        assert recipe.train.micro_batch_size % recipe.parallel.pp_microbatches == 0
    text = shipped_recipes()[name].read_text()
    if hub_models(recipe):  # the real jobs: each says how to launch it
        assert re.search(rf"shipyard train (recipes/)?{re.escape(name)}(\.yaml)? ", text), name
    # A stated global batch ("global batch: 2 x 4 x 8 GPUs = 64 sequences") is micro-batch x accumulation x ranks
    # of the settings it sits next to; multi-GPU recipes state it.
    stated = re.search(r"global batch: (\d+) x (\d+) x (\d+) [\w -]+?= (\d+)", text)
    assert stated or "--nproc-per-node" not in text, name
    if stated:
        micro, accum, ranks, total = map(int, stated.groups())
        assert (micro, accum, micro * accum * ranks) == (recipe.train.micro_batch_size, recipe.train.grad_accum_steps,
                                                         total), name


def test_the_real_jobs_are_shipped():
    assert {"qwen3_8b_sft", "qwen3_8b_lora", "qwen3_30b_a3b_lora", "llama3.1_70b_sft_pp", "qwen3_vl_8b_sft",
            "mimo_7b_mtp", "qwen3_8b_dflash", "speech_parakeet_qwen3_1.7b"} <= set(HUB_RECIPES)


# ------------------------------------------------------------------ stand-ins of the hub models


def _save_causal_lm(folder: Path, config, tokenizer) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _tiny(**extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=32, **extra)


def qwen3(folder: Path, tied: bool) -> Path:
    from transformers import Qwen3Config

    tok = family_tokenizer("qwen3")
    config = Qwen3Config(**_tiny(tie_word_embeddings=tied, max_position_embeddings=40960, rope_theta=1e6,
                                 bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    return _save_causal_lm(folder, config, tok)


def qwen3_moe(folder: Path) -> Path:
    from transformers import Qwen3MoeConfig

    tok = family_tokenizer("qwen3")
    config = Qwen3MoeConfig(**_tiny(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                                    tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id))
    return _save_causal_lm(folder, config, tok)


def llama3(folder: Path) -> Path:
    from transformers import LlamaConfig

    tok = family_tokenizer("llama3")
    config = LlamaConfig(**_tiny(tie_word_embeddings=False, rope_theta=5e5, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id))
    return _save_causal_lm(folder, config, tok)


def qwen3_vl(folder: Path) -> Path:
    from transformers import AutoModelForImageTextToText

    from shipyard.models.vision_presets import qwen3_vl as preset

    config, processor = preset()
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# MiMo's checkpoint: a Qwen2 model whose model.mtp_layers hold its MTP layer (token/hidden norms, input_proj over
# [hidden, embedding], a decoder block, a final norm), loaded by MiMo's own code (model_type "mimo"). This code
# builds the same modules under the same names; the base's forward never runs them, as in MiMo's.
_MIMO_CONFIG = '''from transformers import Qwen2Config


class MiMoConfig(Qwen2Config):
    model_type = "mimo"

    def __init__(self, num_nextn_predict_layers=0, **kwargs):
        self.num_nextn_predict_layers = num_nextn_predict_layers
        super().__init__(**kwargs)
'''
_MIMO_MODEL = '''from torch import nn
from transformers import Qwen2ForCausalLM, Qwen2Model
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2MLP, Qwen2RMSNorm

from .configuration_mimo import MiMoConfig


class MiMoMTPLayers(nn.Module):
    def __init__(self, config):
        super().__init__()
        for norm in ("input_layernorm", "post_attention_layernorm", "token_layernorm", "hidden_layernorm",
                     "final_layernorm"):
            setattr(self, norm, Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps))
        self.input_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.self_attn = Qwen2Attention(config, layer_idx=0)
        self.mlp = Qwen2MLP(config)


class MiMoModel(Qwen2Model):
    config_class = MiMoConfig

    def __init__(self, config):
        super().__init__(config)
        self.mtp_layers = nn.ModuleList([MiMoMTPLayers(config) for _ in range(config.num_nextn_predict_layers)])


class MiMoForCausalLM(Qwen2ForCausalLM):
    config_class = MiMoConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = MiMoModel(config)
        self.post_init()
'''


def mimo(folder: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    tok = family_tokenizer("qwen2.5")
    config = Qwen2Config(**_tiny(tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id))
    torch.manual_seed(0)
    state = Qwen2ForCausalLM(config).state_dict()
    hidden, prefix = config.hidden_size, "model.mtp_layers.0."
    block = Qwen2DecoderLayer(config, layer_idx=0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.1)
    state.update({prefix + k: v for k, v in block.state_dict().items()})
    for norm in ("token_layernorm", "hidden_layernorm", "final_layernorm"):
        state[f"{prefix}{norm}.weight"] = 1 + 0.1 * torch.randn(hidden)
    state[prefix + "input_proj.weight"] = 0.1 * torch.randn(hidden, 2 * hidden)
    folder.mkdir(parents=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    data = {**config.to_dict(), "model_type": "mimo", "architectures": ["MiMoForCausalLM"], "dtype": "bfloat16",
            "num_nextn_predict_layers": 1, "auto_map": {"AutoConfig": "configuration_mimo.MiMoConfig",
                                                        "AutoModelForCausalLM": "modeling_mimo.MiMoForCausalLM"}}
    (folder / "config.json").write_text(json.dumps(data, indent=2))
    (folder / "configuration_mimo.py").write_text(_MIMO_CONFIG)
    (folder / "modeling_mimo.py").write_text(_MIMO_MODEL)
    tok.save_pretrained(folder)
    return folder


def parakeet_ctc(folder: Path) -> Path:
    from transformers import ParakeetCTCConfig, ParakeetForCTC

    # Parakeet's front end as published (80 mel bins, 8x subsampling), 2 conformer blocks of hidden 64.
    encoder = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                   conv_kernel_size=9, subsampling_factor=8, subsampling_conv_channels=32, num_mel_bins=80)
    torch.manual_seed(0)
    ParakeetForCTC(ParakeetCTCConfig(encoder_config=encoder, vocab_size=32)).to(torch.bfloat16).save_pretrained(folder)
    return folder


def qwen2_audio(folder: Path) -> Path:
    """The tiny Qwen2-Audio preset, saved as the hub checkpoint is: bf16, the published weight layout
    (language_model.model.*, audio_tower.*: what transformers converts on load), its processor and template."""
    from transformers import AutoModelForMultimodalLM

    from shipyard.models.save import served_name
    from shipyard.models.speech_presets import qwen2_audio as preset

    config, processor = preset()
    torch.manual_seed(0)
    state = AutoModelForMultimodalLM.from_config(config).state_dict()
    folder.mkdir(parents=True)
    save_file({served_name(k, config): v.to(torch.bfloat16).contiguous() for k, v in state.items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@dataclass(frozen=True)
class StandIn:
    build: Callable[[Path], Path]  # writes the stand-in's hub files into a folder
    model_type: str  # as the real model's config.json says
    architecture: str
    reads_images: bool = False
    reads_audio: bool = False


STAND_INS = {
    "Qwen/Qwen3-0.6B": StandIn(lambda d: qwen3(d, tied=True), "qwen3", "Qwen3ForCausalLM"),
    "Qwen/Qwen3-1.7B": StandIn(lambda d: qwen3(d, tied=True), "qwen3", "Qwen3ForCausalLM"),
    "Qwen/Qwen3-8B": StandIn(lambda d: qwen3(d, tied=False), "qwen3", "Qwen3ForCausalLM"),
    "Qwen/Qwen3-30B-A3B": StandIn(qwen3_moe, "qwen3_moe", "Qwen3MoeForCausalLM"),
    "meta-llama/Llama-3.1-70B-Instruct": StandIn(llama3, "llama", "LlamaForCausalLM"),
    "Qwen/Qwen3-VL-8B-Instruct": StandIn(qwen3_vl, "qwen3_vl", "Qwen3VLForConditionalGeneration", reads_images=True),
    "XiaomiMiMo/MiMo-7B-Base": StandIn(mimo, "mimo", "MiMoForCausalLM"),
    "nvidia/parakeet-ctc-0.6b": StandIn(parakeet_ctc, "parakeet_ctc", "ParakeetForCTC"),
    "Qwen/Qwen2-Audio-7B-Instruct": StandIn(qwen2_audio, "qwen2_audio", "Qwen2AudioForConditionalGeneration",
                                            reads_audio=True),
}


# ------------------------------------------------------------------ stand-ins of the hub datasets


def _dialog(i: int) -> list[dict]:
    words = [f"w{i}", f"v{i % 7}", f"u{i % 5}"]
    return [{"role": "user", "content": "reverse: " + " ".join(words)},
            {"role": "assistant", "content": " ".join(reversed(words))}]


def _ultrachat(n: int, start: int) -> list[dict]:  # HuggingFaceH4/ultrachat_200k: prompt, prompt_id, messages
    return [{"prompt": _dialog(i)[0]["content"], "prompt_id": f"{i:064x}", "messages": _dialog(i)}
            for i in range(start, start + n)]


def _alpaca(n: int) -> list[dict]:  # yahma/alpaca-cleaned: instruction, input, output
    return [{"instruction": "Reverse the words.", "input": " ".join([f"w{i}", f"v{i % 7}"]),
             "output": " ".join([f"v{i % 7}", f"w{i}"])} for i in range(n)]


def _tulu(n: int) -> list[dict]:  # allenai/tulu-3-sft-mixture: id, messages, source
    return [{"id": f"tulu-{i}", "messages": _dialog(i), "source": "stand-in"} for i in range(n)]


DATASETS = {
    "HuggingFaceH4/ultrachat_200k": {"train_sft": _ultrachat(24, 0), "test_sft": _ultrachat(6, 100)},
    "yahma/alpaca-cleaned": {"train": _alpaca(32)},
    "allenai/tulu-3-sft-mixture": {"train": _tulu(32)},
}


# ------------------------------------------------------------------ the user's own files, by kind


def _text_file(folder: Path) -> Path:
    path = folder / "my_chats.jsonl"
    path.write_text("".join(json.dumps({"messages": _dialog(i)}) + "\n" for i in range(24)))
    return path


def _image_file(folder: Path) -> Path:
    from shipyard.data.synthetic_images import shapes

    path = folder / "my_images.jsonl"
    records = shapes(12, seed=0) + [{"messages": _dialog(i)} for i in range(4)]  # text-only records mix in
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _audio_file(folder: Path) -> Path:
    import soundfile

    clips = folder / "clips"
    clips.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        samples = (0.1 * np.sin(2 * np.pi * (200 + 40 * i) * np.arange(8000 + 800 * i) / 16000)
                   + 0.01 * rng.standard_normal(8000 + 800 * i)).astype(np.float32)
        soundfile.write(clips / f"{i:04d}.wav", samples, 16000)
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "audio", "audio": f"clips/{i:04d}.wav"},
                                         {"type": "text", "text": "Transcribe the audio."}]},
            {"role": "assistant", "content": f"tone {i}"}]})
    path = folder / "my_speech.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------ the offline cache


@pytest.fixture(scope="module")
def offline_hub(tmp_path_factory):
    """An HF_HOME holding a stand-in of every hub model and dataset the shipped recipes name, and this process
    pointed at it offline (huggingface_hub and datasets read their cache paths at import: set them here too)."""
    import datasets
    import huggingface_hub

    home = tmp_path_factory.mktemp("hf_home")
    build = tmp_path_factory.mktemp("stand_ins")
    recipes = [load_recipe(name) for name in HUB_RECIPES]
    models = sorted({m for r in recipes for m in hub_models(r)})
    names = sorted({d for r in recipes for d in hub_datasets(r)})
    missing = [m for m in models if m not in STAND_INS] + [d for d in names if d not in DATASETS]
    assert not missing, f"add a stand-in to tests/test_recipes.py for {missing} (a shipped recipe names it)"
    snapshots = {m: into_hub_cache(home, m, STAND_INS[m].build(build / m.replace("/", "--"))) for m in models}
    for name in names:
        hub_dataset_into_cache(home, name, DATASETS[name])
    threads = torch.get_num_threads()
    # Matmuls 64 wide gain nothing from a second thread, and two threads spin against each other when the cores
    # are busy with other work (30x slower per matmul measured on a loaded 2-core machine): one, for this module.
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        yield snapshots
    torch.set_num_threads(threads)


def tiny_overrides(recipe, out: Path, data_dir: Path) -> list[str]:
    """What makes the recipe run 2 small steps in one CPU process; nothing about the model or its training."""
    overrides = [f"output_dir={out}", "train.max_steps=2", "train.micro_batch_size=2", "train.grad_accum_steps=2",
                 "eval.max_prompts=2", "eval.max_new_tokens=4", "eval.batch_size=4",
                 # bf16 autocast on GPU as the recipe says, exact fp32 here: without native bf16 a CPU emulates it
                 # (2.5x slower than fp32 per tiny matmul on this machine)
                 "train.mixed_precision=auto"]
    if recipe.parallel.pp > 1:  # one process holds every stage
        overrides += ["parallel.pp=1", "parallel.pp_split=null"]
    own_files = [s for s in recipe.data.train if s.path is not None and not Path(s.path).expanduser().exists()]
    if own_files:  # the user's own data: a small file of the kind the model reads
        kind = (_audio_file if recipe.model.speech or STAND_INS[recipe.model.path].reads_audio else _image_file if STAND_INS[recipe.model.path].reads_images
                else _text_file)
        overrides.append(f"data.train={kind(data_dir)}")
    return overrides


# ------------------------------------------------------------------ (b, c) 2 steps against the stand-ins


@pytest.mark.parametrize("name", HUB_RECIPES)
def test_recipe_trains_two_steps_on_stand_ins_from_the_offline_cache(name, offline_hub, tmp_path, capsys):
    recipe = load_recipe(name)
    out = tmp_path / "run"
    tiny = load_recipe(name, tiny_overrides(recipe, out, tmp_path))
    # What the recipe is about is unchanged: only sizes, the output folder and the process layout differ.
    for section in ("task", "model", "lora", "draft", "optim", "checkpoint"):
        assert getattr(tiny, section) == getattr(recipe, section), section
    for key in ("activation_checkpointing", "compile", "fsdp"):
        assert getattr(tiny.parallel, key) == getattr(recipe.parallel, key), key

    for model in hub_models(recipe):  # each hub id resolves to its stand-in's snapshot, offline
        source = resolve_source(model)
        assert (source.kind, source.local_dir) == ("hub", offline_hub[model].resolve()), model
        assert offline_hub[model].name == SNAPSHOT

    if recipe.task == "dflash":
        from shipyard.train.loop import train

        summary, trained = train(tiny).summary, None
    else:
        from shipyard.train.loop import train

        result = train(tiny)
        summary, trained = result.summary, result.model
    printed = capsys.readouterr().out

    steps = losses(out)
    assert summary["steps"] == 2 and len(steps) == 2, printed[-2000:]
    assert all(math.isfinite(x) and x > 0 for x in steps), steps
    final = out / "final"
    if recipe.task == "dflash":  # the drafter names the target it trained against
        config = json.loads((final / "config.json").read_text())
        assert config["shipyard_target"] == recipe.draft.target  # the hub id, not this machine's cache path
        assert summary["eval"]["drafts"] > 0 and summary["eval"]["mean_acceptance_length"] >= 1.0
    elif recipe.lora is not None:  # a PEFT adapter on the stand-in base
        adapter = json.loads((final / "adapter_config.json").read_text())
        assert adapter["r"] == recipe.lora.r
        assert adapter["base_model_name_or_path"] == recipe.model.path  # the hub id, not this machine's cache path
    else:
        config = json.loads((final / "config.json").read_text())
        stand_in = STAND_INS[recipe.model.path]
        if recipe.model.speech is None:  # the export is the stand-in's architecture
            assert (config["model_type"], config["architectures"]) == (stand_in.model_type, [stand_in.architecture])
        else:  # one model of the stand-in encoder (hidden 64) and the stand-in LLM
            audio = config["audio_config"]
            assert (audio["model_type"], audio["hidden_size"]) == ("parakeet_encoder", 64)
            assert config["text_config"]["model_type"] == stand_in.model_type
    if recipe.model.mtp is not None:  # the base's own head, not a new one
        assert "mtp: 1 layer(s) loaded from the base" in printed, printed[-2000:]
    if trained is not None:
        assert_frozen_weights_kept(trained, offline_hub, recipe)


def assert_frozen_weights_kept(model, snapshots: dict, recipe) -> None:
    """Every parameter training left frozen (model.freeze, a LoRA base) still equals the stand-in's weight."""
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    if not recipe.model.freeze and recipe.lora is None:
        assert not frozen
        return
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMultimodalLM

    # The stand-in as transformers loads it (fused experts are separate tensors on disk, as in the real checkpoint).
    stand_in = STAND_INS[recipe.model.path]
    auto = AutoModelForImageTextToText if stand_in.reads_images else \
        AutoModelForMultimodalLM if stand_in.reads_audio else AutoModelForCausalLM
    base = auto.from_pretrained(snapshots[recipe.model.path], dtype=torch.float32).state_dict()
    for name, param in frozen.items():
        key = clean_name(name)  # without the activation-checkpointing wrapper's part
        if recipe.model.speech is not None:  # the speech-LM holds the LLM as language_model
            key = key.removeprefix("language_model.")
        assert key in base, f"{name}: frozen, but not a weight of {recipe.model.path}"
        want = base[key]
        assert torch.equal(param.detach()[: want.shape[0]], want), name  # embeddings may have grown rows

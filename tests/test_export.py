"""`shipyard export`: every normalisation on a directory that needs it, and the exports serve in vLLM."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

from shipyard.errors import ShipyardError
from shipyard.export.export import export_checkpoint
from tests.conftest import run_cli
from tests.fixtures import (
    copy_dir,
    edit_json,
    random_model,
    save_model_dir,
    with_custom_code_in_subfolder,
    with_stale_quantization_config,
    with_unknown_tokenizer_class,
)


def read(path):
    return json.loads(path.read_text())


def tensor_names(directory):
    names = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for n in st.keys():
                names[n] = (f.name, st.get_slice(n).get_dtype())
    return names


def test_transformers5_tokenizer_files_are_normalised(tmp_path):
    src = save_model_dir(tmp_path / "src")
    # What transformers 5 writes, and older loaders / vLLM setups choke on:
    raw = read(src / "tokenizer_config.json")
    template = (src / "chat_template.jinja").read_text()
    assert "chat_template" not in raw and isinstance(raw["extra_special_tokens"], list)
    assert raw["tokenizer_class"] == "TokenizersBackend"

    out = export_checkpoint(src, tmp_path / "out").out_dir
    cfg = read(out / "tokenizer_config.json")
    assert cfg["chat_template"] == template and not (out / "chat_template.jinja").exists()
    assert cfg["extra_special_tokens"] == {"im_start_token": "<|im_start|>"}
    assert cfg["additional_special_tokens"] == ["<|im_start|>"]
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    for junk in ("backend", "is_local", "local_files_only"):
        assert junk not in cfg
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == template and "<|im_start|>" in tok.all_special_tokens


def test_config_is_full_and_generation_config_minimal(tmp_path):
    out = export_checkpoint(save_model_dir(tmp_path / "src"), tmp_path / "out").out_dir
    cfg = read(out / "config.json")
    assert set(Qwen3Config().to_dict()) - {"_name_or_path", "transformers_version"} <= set(cfg)  # defaults included
    assert cfg["model_type"] == "qwen3" and cfg["architectures"] == ["Qwen3ForCausalLM"]
    assert cfg["dtype"] == cfg["torch_dtype"] == "float32"
    gen = read(out / "generation_config.json")
    assert gen == {"eos_token_id": 2, "pad_token_id": 0, "transformers_version": gen["transformers_version"]}


def test_unknown_tokenizer_class_becomes_loadable(tmp_path):
    # transformers 5 falls back to the generic class; transformers 4 (and vLLM builds on it) raise
    # "Tokenizer class AcmeInternalTokenizer does not exist". The export names a class both know.
    src = with_unknown_tokenizer_class(tmp_path / "src")
    out = export_checkpoint(src, tmp_path / "out").out_dir
    assert read(out / "tokenizer_config.json")["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert AutoTokenizer.from_pretrained(out)("reverse: red")["input_ids"]


def test_stale_quantization_config_is_removed(tmp_path):
    src = with_stale_quantization_config(tmp_path / "src")
    out = export_checkpoint(src, tmp_path / "out").out_dir
    assert "quantization_config" not in read(out / "config.json")
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("preset, tied", [("qwen3-tiny", True), ("qwen3-tiny-untied", False)])
def test_tied_embeddings_saved_once_and_reloaded(tmp_path, preset, tied):
    src = save_model_dir(tmp_path / "src", preset=preset)
    out = export_checkpoint(src, tmp_path / "out").out_dir
    names = tensor_names(out)
    assert ("lm_head.weight" in names) != tied
    assert read(out / "config.json")["tie_word_embeddings"] is tied
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 280, 201, 281, 28, 374]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, random_model(preset)(ids).logits)


def test_custom_code_copied_with_folder_structure(tmp_path):
    src = with_custom_code_in_subfolder(tmp_path / "src")
    out = export_checkpoint(src, tmp_path / "out", trust_remote_code=True).out_dir
    for rel in ("custom_code/modeling_tiny.py", "custom_code/configuration_tiny.py", "custom_code/helpers.py"):
        assert (out / rel).read_text() == (src / rel).read_text()
    assert read(out / "config.json")["auto_map"]["AutoModelForCausalLM"] == "custom_code/modeling_tiny.TinyForCausalLM"
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "TinyForCausalLM"


def test_sharding_and_dtypes_follow_the_base(tmp_path):
    src = save_model_dir(tmp_path / "src", dtype=torch.bfloat16, max_shard_size="120KB")
    src_index = read(src / "model.safetensors.index.json")["weight_map"]
    assert len(set(src_index.values())) > 1
    out = export_checkpoint(src, tmp_path / "out").out_dir
    assert read(out / "model.safetensors.index.json")["weight_map"] == src_index
    assert {n: d for n, (_, d) in tensor_names(out).items()} == {n: "BF16" for n in src_index}
    assert read(out / "config.json")["dtype"] == "bfloat16"


@pytest.mark.parametrize("defect, message", [
    ("no_tokenizer", "no tokenizer found"),
    ("no_chat_template", "has no chat template"),
    ("no_eos", "no EOS token"),
    ("unknown_architecture", "unknown architecture ['AcmeForCausalLM']"),
])
def test_missing_pieces_fail_before_writing(tmp_path, defect, message):
    src = save_model_dir(tmp_path / "src")
    if defect == "no_tokenizer":
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (src / f).unlink()
    elif defect == "no_chat_template":
        (src / "chat_template.jinja").unlink()
    elif defect == "no_eos":
        (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
        edit_json(src / "tokenizer_config.json", eos_token=None)
    else:
        edit_json(src / "config.json", architectures=["AcmeForCausalLM"])
    out = tmp_path / "out"
    with pytest.raises(ShipyardError, match=message.replace("[", r"\[").replace("]", r"\]")):
        export_checkpoint(src, out)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_cli_refuses_non_empty_out_dir_unless_force(tmp_path):
    src = save_model_dir(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("precious")
    proc = run_cli("export", str(src), str(out))
    assert proc.returncode == 2 and "is not empty (1 entries: old.txt)" in proc.stderr and "--force" in proc.stderr
    assert (out / "old.txt").exists()
    proc = run_cli("export", str(src), str(out), "--force")
    assert proc.returncode == 0, proc.stderr
    assert "replaced 1 entries" in proc.stdout and "old.txt" in proc.stdout
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.served("export")
def test_every_normalised_export_serves_in_vllm(served):
    """Each directory above, exported, loads in vLLM and gives transformers' greedy tokens (tests/served.py builds
    them; one vLLM worker verifies them with the suite's other served directories)."""
    names = ["transformers5_files", "unknown_tokenizer_class", "stale_quantization_config", "untied", "custom_code",
             "sharded_bf16"]
    for name in names:
        report = served[f"export/{name}"]
        v = report["vllm"]
        assert v["available"] and v.get("loaded"), (name, v.get("error"))
        assert v["greedy_match"] and v["prompt_ids_match"], (name, v["per_prompt"])
        assert all(r["matched_tokens"] == 32 for r in v["per_prompt"])
        assert report["template_parity"] and report["ok"], (name, report["template"])


@pytest.mark.parametrize("rope", [{"rope_type": "default", "rope_theta": 1e6},
                                  {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0,
                                   "original_max_position_embeddings": 4096}])
def test_config_json_keeps_the_top_level_rope_fields_older_readers_use(tmp_path, rope):
    """transformers 4 (and what is pinned to it) reads rope_theta/rope_scaling; 5 reads rope_parameters."""
    from transformers import AutoConfig, Qwen3Config

    from shipyard.models.save import write_config

    config = Qwen3Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=32, intermediate_size=64, vocab_size=100, rope_parameters=dict(rope))
    write_config(tmp_path, config, torch.bfloat16, "Qwen3ForCausalLM")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["rope_theta"] == rope["rope_theta"] == data["rope_parameters"]["rope_theta"]
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    assert data["rope_scaling"] == (scaling if rope["rope_type"] != "default" else None)
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters == config.rope_parameters


def _into_hub_cache(home, repo_id: str, folder) -> None:
    """`folder` as the snapshot of `repo_id` in a Hugging Face cache at `home`, as a download leaves it."""
    import shutil

    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


@pytest.mark.slow
def test_a_hub_id_base_is_followed_like_its_folder(tmp_path):
    """model.path as a hub id, from an offline cache: the export keeps the base's bf16, its shard layout and
    its custom code, as from the snapshot folder itself."""
    bf16 = save_model_dir(tmp_path / "bf16", dtype=torch.bfloat16, max_shard_size="120KB")
    custom = with_custom_code_in_subfolder(tmp_path / "custom")
    home = tmp_path / "hf"
    _into_hub_cache(home, "acme/tiny-bf16", bf16)
    _into_hub_cache(home, "acme/tiny-custom", custom)
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    common = ["train.max_steps=1", "eval.generate=false", "data.train={synthetic: reverse_words, num_records: 32}",
              "data.validation=[]", "train.micro_batch_size=4"]
    proc = run_cli("train", "quickstart", "model.path=acme/tiny-bf16", f"output_dir={tmp_path / 'a'}", *common, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = tmp_path / "a" / "final"
    index = read(bf16 / "model.safetensors.index.json")["weight_map"]
    assert read(final / "model.safetensors.index.json")["weight_map"] == index
    assert {d for _, d in tensor_names(final).values()} == {"BF16"} and read(final / "config.json")["dtype"] == "bfloat16"

    proc = run_cli("train", "quickstart", "model.path=acme/tiny-custom", "model.trust_remote_code=true",
                   f"output_dir={tmp_path / 'b'}", *common, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = tmp_path / "b" / "final"
    for rel in ("custom_code/modeling_tiny.py", "custom_code/configuration_tiny.py", "custom_code/helpers.py"):
        assert (final / rel).read_text() == (custom / rel).read_text()
    assert type(AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)).__name__ == "TinyForCausalLM"

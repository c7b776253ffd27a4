"""Real data at scale: column formats, hub datasets, mixtures, and the token cache (same samples, built once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from shipyard.config import DataConfig
from shipyard.data.chat import eos_token_ids, tokenize_record
from shipyard.data.dataset import build_datasets, fit_length, record_key
from shipyard.data.sources import SkipCounter, read_sources
from shipyard.data.token_cache import SampleStore
from shipyard.errors import ShipyardError
from tests.fixtures import hub_dataset_into_cache

ROOT = Path(__file__).resolve().parents[1]
DIALOGS = [
    [("system", "Be brief."), ("user", "reverse: red fox"), ("assistant", "fox red")],
    [("user", "sort: b a"), ("assistant", "a b"), ("user", "again: d c"), ("assistant", "c d")],
    [("user", "hello"), ("assistant", "hi there")],
]


def messages(dialog):
    return [{"role": r, "content": c} for r, c in dialog]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference_samples(tokenizer, cfg: DataConfig, stop_ids=None):
    """Samples the way shipyard made them before the cache: every record in memory, tokenized in order."""
    skipped = SkipCounter()
    records = read_sources(cfg.train, cfg.on_error, skipped, cfg.image_root)
    out = []
    for record in records:
        for sample in tokenize_record(tokenizer, record, cfg.multi_turn, stop_ids).samples:
            fit = fit_length(sample, cfg.max_length, cfg.overlength, None)
            if not isinstance(fit, str):
                out.append(fit)
    return out


def as_tuples(samples):
    return [(tuple(s.input_ids), tuple(s.labels), s.source, tuple(s.turns), tuple(s.media)) for s in samples]


# ------------------------------------------------------------------ formats


def test_sharegpt_prompt_completion_and_alpaca_give_the_messages_samples(tmp_path, tokenizer):
    as_messages = build_datasets(DataConfig(train=[{"path": str(write_jsonl(
        tmp_path / "m.jsonl", [{"messages": messages(d)} for d in DIALOGS]))}]), tokenizer, 0).train
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = build_datasets(DataConfig(train=[{"path": str(write_jsonl(
        tmp_path / "s.jsonl", [{"conversations": [{"from": speaker[r], "value": c} for r, c in d]} for d in DIALOGS]
    ))}]), tokenizer, 0).train
    assert [(s.input_ids, s.labels, s.turns) for s in sharegpt] == [(s.input_ids, s.labels, s.turns)
                                                                     for s in as_messages]

    single = [{"messages": messages(d)} for d in DIALOGS if len(d) == 2]
    expected = build_datasets(DataConfig(train=[{"path": str(write_jsonl(tmp_path / "one.jsonl", single))}]),
                              tokenizer, 0).train
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "hello", "completion": "hi there"}])
    alpaca = write_jsonl(tmp_path / "al.jsonl", [{"instruction": "hello", "input": "", "output": "hi there"}])
    renamed = write_jsonl(tmp_path / "qa.jsonl", [{"question": "hello", "answer": "hi there"}])
    for source in ({"path": str(pc)}, {"path": str(alpaca), "format": "alpaca"},
                   {"path": str(renamed), "format": "prompt_completion",
                    "columns": {"prompt": "question", "completion": "answer"}}):
        got = build_datasets(DataConfig(train=[source]), tokenizer, 0).train
        assert [(s.input_ids, s.labels) for s in got] == [(s.input_ids, s.labels) for s in expected], source

    # Alpaca's input joins the instruction; a renamed messages column reads like "messages".
    with_input = write_jsonl(tmp_path / "al2.jsonl", [{"instruction": "reverse:", "input": "red fox", "output": "x"}])
    record = read_sources(DataConfig(train=[{"path": str(with_input)}]).train, "raise", SkipCounter())[0]
    assert record.messages[0]["content"] == "reverse:\n\nred fox"
    conv = write_jsonl(tmp_path / "conv.jsonl", [{"conversation": messages(DIALOGS[2])}])
    got = build_datasets(DataConfig(train=[{"path": str(conv), "columns": {"messages": "conversation"}}]),
                         tokenizer, 0).train
    assert [s.input_ids for s in got] == [s.input_ids for s in expected]


def test_wrong_column_or_format_names_the_columns_there_are(tmp_path, tokenizer):
    import datasets

    conv = write_jsonl(tmp_path / "conv.jsonl", [{"conversation": messages(DIALOGS[2]), "id": 1}])
    with pytest.raises(ShipyardError, match=r"reads column\(s\) \['convo'\], but the data has \['conversation', 'id'\]"):
        build_datasets(DataConfig(train=[{"path": str(conv), "columns": {"messages": "convo"}}]), tokenizer, 0)
    table = tmp_path / "t.parquet"
    datasets.Dataset.from_list([{"text": "hello", "id": 1}]).to_parquet(str(table))
    with pytest.raises(ShipyardError, match=r"cannot tell the data format from its columns \['id', 'text'\]"):
        build_datasets(DataConfig(train=[{"path": str(table)}]), tokenizer, 0)
    with pytest.raises(ShipyardError, match=r"format 'alpaca' reads column\(s\) \['instruction', 'output'\]"):
        build_datasets(DataConfig(train=[{"path": str(table), "format": "alpaca"}]), tokenizer, 0)
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "robot", "value": "x"}]}])
    with pytest.raises(ShipyardError, match=rf'{sharegpt}:1: conversations\[0\]: unknown speaker "robot"'):
        build_datasets(DataConfig(train=[{"path": str(sharegpt)}]), tokenizer, 0)


# ------------------------------------------------------------------ hub datasets (an offline cache)


def make_hub_dataset(hf_home: Path, repo_id: str, splits: dict[str, list[dict]]) -> None:
    """Put `repo_id` into `hf_home`'s datasets cache as a download leaves it (see tests/fixtures.py)."""
    hub_dataset_into_cache(hf_home, repo_id, splits)


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    rows = [{"conversations": [{"from": "human", "value": f"reverse: w{i} v{i}"}, {"from": "gpt", "value": f"v{i} w{i}"}]}
            for i in range(40)]
    make_hub_dataset(home, "acme/chats", {"train_sft": rows[:32], "test_sft": rows[32:]})
    return home


def _in_subprocess(code: str, hf_home: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "SHIPYARD_TOKEN_CACHE": str(tmp_path / "tok")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_hub_dataset_by_id_with_split_from_the_offline_cache(hub_home, tmp_path):
    code = """
import json
from shipyard.config import DataConfig
from shipyard.data.dataset import build_datasets
from shipyard.models.load import SHIPPED_TOKENIZER
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
data = build_datasets(DataConfig(train=[{"dataset": "acme/chats", "split": "train_sft"}],
                                 validation=[{"dataset": "acme/chats", "split": "test_sft"}]), tok, 0)
print(json.dumps({"train": [s.source for s in data.train], "val": len(data.validation),
                  "first": tok.decode(data.train[0].input_ids)}))
try:
    build_datasets(DataConfig(train=[{"dataset": "acme/chats", "split": "nope"}]), tok, 0)
except Exception as e:
    print(json.dumps({"error": str(e)}))
try:
    build_datasets(DataConfig(train="acme/absent"), tok, 0)
except Exception as e:
    print(json.dumps({"error": str(e)}))
"""
    proc = _in_subprocess(code, hub_home, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert out[0]["train"] == [f"acme/chats[train_sft] row {i}" for i in range(1, 33)]
    assert out[0]["val"] == 8 and "reverse: w0 v0" in out[0]["first"]
    assert 'Unknown split "nope"' in out[1]["error"] and "train_sft" in out[1]["error"]
    assert "acme/absent" in out[2]["error"] and "HF_HUB_OFFLINE" in out[2]["error"]


# ------------------------------------------------------------------ mixtures


def test_mixture_weights_give_their_proportions_and_the_same_rows_for_a_seed(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [{"messages": messages([("user", f"a{i}"), ("assistant", "x")])}
                                           for i in range(3000)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": messages([("user", f"b{i}"), ("assistant", "y")])}
                                           for i in range(500)])
    cfg = DataConfig(train=[{"path": str(a), "weight": 0.7}, {"path": str(b), "weight": 0.3}], cache=False)
    data = build_datasets(cfg, tokenizer, seed=5)
    origins = [s.source.rsplit(":", 1)[0] for s in data.train]
    share = Counter(origins)
    assert len(origins) == 3500
    assert abs(share[str(a)] / 3500 - 0.7) <= 0.01 and abs(share[str(b)] / 3500 - 0.3) <= 0.01
    assert [s["records"] for s in data.sources] == [2450, 1050]  # b: 500 rows twice, then a seeded 50
    again = build_datasets(cfg, tokenizer, seed=5)
    assert [s.source for s in again.train] == [s.source for s in data.train]
    other = build_datasets(cfg, tokenizer, seed=6)
    assert [s.source for s in other.train] != [s.source for s in data.train]

    parts = DataConfig(train=[{"path": str(a), "epochs": 0.1}, {"path": str(b), "num_samples": 20}], cache=False)
    counts = Counter(s.source.rsplit(":", 1)[0] for s in build_datasets(parts, tokenizer, seed=5).train)
    assert counts == {str(a): 300, str(b): 20}


# ------------------------------------------------------------------ the token cache


@pytest.mark.parametrize("recipe_data", [
    {"train": [{"synthetic": "reverse_words", "num_records": 300}], "validation_fraction": 0.1, "max_length": 24},
    {"train": [{"synthetic": "sort_words", "num_records": 200}], "multi_turn": "whole_dialog"},
])
def test_cached_samples_are_the_in_memory_samples_in_order(tokenizer, recipe_data, tmp_path, monkeypatch):
    from shipyard.data import dataset

    monkeypatch.setattr(dataset, "CHUNK_RECORDS", 64)  # several chunks: the parallel run below uses 2 processes
    stop = eos_token_ids(tokenizer)
    cfg = DataConfig(**recipe_data, cache_dir=str(tmp_path / "cache"))
    built = build_datasets(cfg, tokenizer, seed=0, stop_ids=stop)
    assert built.cache.endswith("(built)") and isinstance(built.train, SampleStore)
    reused = build_datasets(cfg, tokenizer, seed=0, stop_ids=stop)
    assert reused.cache.endswith("(reused)")
    parallel = build_datasets(cfg.model_copy(update={"cache": False, "num_proc": 2}), tokenizer, seed=0, stop_ids=stop)
    assert parallel.cache.endswith("(not cached)")
    assert json.loads((Path(parallel.cache.split(" (")[0]) / "meta.json").read_text())["processes"] == 2
    for data in (reused, parallel):
        assert as_tuples(data.train) == as_tuples(built.train)
        assert as_tuples(data.validation) == as_tuples(built.validation)
        assert data.skipped == built.skipped and data.turns == built.turns and data.truncated == built.truncated
        assert [r.messages for r in data.validation_records] == [r.messages for r in built.validation_records]
        assert [r.origin for r in data.train_records] == [r.origin for r in built.train_records]
    if not cfg.validation_fraction:
        assert as_tuples(built.train) == as_tuples(reference_samples(tokenizer, cfg, stop))
    assert built.sources[0]["samples"] == len(built.train)
    assert built.sources[0]["supervised_tokens"] == sum(s.num_targets for s in built.train)


def test_any_keyed_change_rebuilds_and_a_killed_build_is_never_used(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages(d)} for d in DIALOGS])
    cfg = DataConfig(train=[{"path": str(path)}], cache_dir=str(tmp_path / "cache"))
    first = build_datasets(cfg, tokenizer, seed=0)
    assert first.cache.endswith("(built)")
    assert build_datasets(cfg, tokenizer, seed=0).cache == first.cache.replace("(built)", "(reused)")
    changes = [cfg.model_copy(update={"max_length": 12}), cfg.model_copy(update={"multi_turn": "whole_dialog"}),
               cfg.model_copy(update={"chat_template_kwargs": {"x": 1}})]
    for changed in changes:
        assert build_datasets(changed, tokenizer, seed=0).cache.endswith("(built)")
    path.write_text(path.read_text() + json.dumps({"messages": messages(DIALOGS[2])}) + "\n")  # new content
    grown = build_datasets(cfg, tokenizer, seed=0)
    assert grown.cache.endswith("(built)") and len(grown.train) == len(first.train) + 1
    assert build_datasets(cfg, tokenizer, seed=0, stop_ids=[2]).cache.endswith("(built)")

    # A preparation killed before it published: nothing usable is left, the next run builds and cleans up.
    path.write_text(path.read_text() + json.dumps({"messages": messages(DIALOGS[0])}) + "\n")
    code = f"""
from transformers import AutoTokenizer
from shipyard.config import DataConfig
from shipyard.data.dataset import build_datasets
from shipyard.models.load import SHIPPED_TOKENIZER
build_datasets(DataConfig.model_validate_json({cfg.model_dump_json()!r}), AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER), 0)
"""
    for point in ("token_cache_before_meta", "token_cache_before_publish"):
        proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "SHIPYARD_CRASH_AT": point},
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == -9, proc.stderr[-2000:]
        complete = [p for p in (tmp_path / "cache").iterdir() if (p / "meta.json").exists() and p.name[0] != "."]
        assert len(complete) == 6  # the six above; the killed one only left a .partial folder
    after = build_datasets(cfg, tokenizer, seed=0)
    assert after.cache.endswith("(built)") and len(after.train) == len(first.train) + 2
    assert not list((tmp_path / "cache").glob(".*partial*"))


def two_local_ranks(source: dict, cache: Path) -> list[subprocess.CompletedProcess]:
    """build_datasets on local ranks 1 (started first: it waits) and 0 (it builds), sharing one token cache; each
    prints where its samples came from and the samples."""
    code = f"""
import json
from transformers import AutoTokenizer
from shipyard.config import DataConfig
from shipyard.data.dataset import build_datasets
from shipyard.models.load import SHIPPED_TOKENIZER
data = build_datasets(DataConfig(train=[{source!r}]), AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER), 0)
print(json.dumps({{"how": data.cache.rsplit("(", 1)[1], "samples": [[s.input_ids, s.source] for s in data.train]}}))
"""
    env = {**os.environ, "SHIPYARD_TOKEN_CACHE": str(cache)}
    waiting = subprocess.Popen([sys.executable, "-c", code], env={**env, "LOCAL_RANK": "1"}, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    building = subprocess.run([sys.executable, "-c", code], env={**env, "LOCAL_RANK": "0"}, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
    out, err = waiting.communicate(timeout=300)
    return [building, subprocess.CompletedProcess(waiting.args, waiting.returncode, out, err)]


def test_one_rank_tokenizes_the_others_wait_and_read_the_same_samples(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages(DIALOGS[i % 3])} for i in range(600)])
    ranks = two_local_ranks({"path": str(path), "epochs": 1.5}, tmp_path / "cache")
    assert all(p.returncode == 0 for p in ranks), ranks[0].stderr[-2000:] + ranks[1].stderr[-2000:]
    rank0, rank1 = (json.loads(p.stdout.splitlines()[-1]) for p in ranks)
    assert rank0["how"] == "built)" and rank1["how"] in ("built by local rank 0)", "reused)")
    assert rank0["samples"] == rank1["samples"] and len(rank0["samples"]) == 900


def test_a_builders_data_error_reaches_the_waiting_ranks(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages(DIALOGS[0])}, {"messages": "oops"}])
    for proc in two_local_ranks({"path": str(path)}, tmp_path / "cache"):
        assert proc.returncode == 1 and f'{path}:2: "messages" must be a non-empty list' in proc.stderr


def test_held_out_keys_use_every_validation_record(tokenizer):
    cfg = DataConfig(train=[{"synthetic": "reverse_words", "num_records": 30, "seed": 0}],
                     validation=[{"synthetic": "reverse_words", "num_records": 5, "seed": 0}], cache=False)
    data = build_datasets(cfg, tokenizer, seed=0)
    val_keys = {record_key(r) for r in data.validation_records}
    assert len(val_keys) == 5 and data.skipped["duplicate_of_validation"] == 5
    assert np.all([s.source not in {r.origin for r in data.validation_records} for s in data.train])


@pytest.mark.parametrize("recipe, overrides", [
    ("quickstart_vlm", ["data.train={synthetic: shapes, num_records: 120}",
                        "data.validation=[{synthetic: shapes, num_records: 8, seed: 7}]"]),
    ("quickstart_speech", ["data.train={synthetic: spoken_digits, num_records: 96, seed: 0}",
                           "data.validation=[{synthetic: spoken_digits_heldout, num_records: 6, seed: 1}]"]),
])
def test_vision_and_speech_samples_through_the_cache_are_the_in_memory_ones(recipe, overrides, tmp_path):
    from shipyard.config import load_recipe
    from shipyard.data.images import media_encoder
    from shipyard.models.load import base_eos, load_processor, load_tokenizer, resolve_source

    cfg = load_recipe(recipe, [*overrides, f"data.cache_dir={tmp_path}"])
    source = resolve_source(cfg.model.path)
    tok = load_tokenizer(cfg.model, source, cfg.data.chat_template_kwargs)
    stop = eos_token_ids(tok, base_eos(cfg.model, source))
    encoder = media_encoder(load_processor(cfg.model, source, tok), cfg.data)
    expected = []
    for record in read_sources(cfg.data.train, "raise", SkipCounter()):
        for sample in tokenize_record(tok, record, cfg.data.multi_turn, stop, encoder).samples:
            fit = fit_length(sample, cfg.data.max_length, cfg.data.overlength, encoder)
            expected += [] if isinstance(fit, str) else [fit]
    for run in ("built", "reused"):
        data = build_datasets(cfg.data, tok, cfg.seed, stop_ids=stop, encoder=encoder)
        assert data.cache.endswith(f"({run})")
        assert as_tuples(data.train) == as_tuples(expected) and len(expected) > 0
        assert all(s.media for s in data.train) and data.train.num_media() == sum(len(s.media) for s in expected)

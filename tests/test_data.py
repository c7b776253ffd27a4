"""Bad input gets a clear error naming file:line, or a counted skip; nothing is dropped silently."""

import json

import pytest

from shipyard.config import DataConfig
from shipyard.data.dataset import build_datasets
from shipyard.data.loader import BatchPlan, StepBatches, collate
from shipyard.errors import ShipyardError

GOOD = {"messages": [{"role": "user", "content": "reverse: red fox"}, {"role": "assistant", "content": "fox red"}]}
NO_ASSISTANT = {"messages": [{"role": "user", "content": "hello"}]}


def jsonl(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def config(path, **kw):
    return DataConfig(train=[{"path": str(path)}], **kw)


def test_malformed_line_names_file_and_line(tmp_path, tokenizer):
    path = jsonl(tmp_path, [GOOD, GOOD, '{"messages": [oops', GOOD])
    with pytest.raises(ShipyardError) as e:
        build_datasets(config(path), tokenizer, seed=0)
    assert f"{path}:3: not valid JSON" in str(e.value)
    assert "data.on_error=skip" in str(e.value)


def test_wrong_shape_names_the_field(tmp_path, tokenizer):
    path = jsonl(tmp_path, [GOOD, {"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(ShipyardError, match=rf"{path}:2: messages\[0\].role is 'robot'"):
        build_datasets(config(path), tokenizer, seed=0)
    path = jsonl(tmp_path, [{"text": "hi"}], name="b.jsonl")
    with pytest.raises(ShipyardError, match=rf'{path}:1: expected an object with a "messages" list'):
        build_datasets(config(path), tokenizer, seed=0)


def test_on_error_skip_counts_malformed(tmp_path, tokenizer):
    path = jsonl(tmp_path, [GOOD, "not json", GOOD, {"messages": "x"}, "", GOOD])
    data = build_datasets(config(path, on_error="skip"), tokenizer, seed=0)
    assert len(data.train) == 3
    assert data.skipped.report() == {"total": 2, "malformed": 2}


def test_record_without_assistant_is_skipped_and_counted(tmp_path, tokenizer):
    path = jsonl(tmp_path, [GOOD, NO_ASSISTANT, NO_ASSISTANT, GOOD])
    data = build_datasets(config(path), tokenizer, seed=0)
    assert len(data.train) == 2
    assert data.skipped.report() == {"total": 2, "no_assistant_turn": 2}


def test_empty_dataset_is_a_clear_error(tmp_path, tokenizer):
    path = jsonl(tmp_path, [NO_ASSISTANT])
    with pytest.raises(ShipyardError, match=r"no training samples left in .*data.jsonl.*no_assistant_turn': 1"):
        build_datasets(config(path), tokenizer, seed=0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ShipyardError, match="no training samples left"):
        build_datasets(config(empty), tokenizer, seed=0)


def test_missing_file(tmp_path, tokenizer):
    with pytest.raises(ShipyardError, match="data file '.*nope.jsonl' does not exist"):
        build_datasets(config(tmp_path / "nope.jsonl"), tokenizer, seed=0)


def long_record(n_words):
    words = " ".join(["red"] * n_words)
    return {"messages": [{"role": "user", "content": "repeat red"}, {"role": "assistant", "content": words}]}


def test_overlength_truncate_and_drop_are_counted(tmp_path, tokenizer):
    path = jsonl(tmp_path, [GOOD, long_record(40), GOOD])
    data = build_datasets(config(path, max_length=32, overlength="truncate"), tokenizer, seed=0)
    assert len(data.train) == 3 and data.truncated == 1
    assert max(len(s.input_ids) for s in data.train) == 32
    data = build_datasets(config(path, max_length=32, overlength="drop"), tokenizer, seed=0)
    assert len(data.train) == 2 and data.skipped.report() == {"total": 1, "overlength": 1}
    # truncation that leaves no assistant token is a skip, not a silent zero-loss sample
    prompt_too_long = {"messages": [{"role": "user", "content": "red " * 40}, {"role": "assistant", "content": "ok"}]}
    path = jsonl(tmp_path, [GOOD, prompt_too_long], name="b.jsonl")
    data = build_datasets(config(path, max_length=20, overlength="truncate"), tokenizer, seed=0)
    assert data.skipped.report() == {"total": 1, "overlength_no_target_left": 1}


def test_datasets_json_and_validation_fraction(tmp_path, tokenizer):
    path = tmp_path / "chats.json"
    records = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(10)]
    path.write_text(json.dumps(records))
    data = build_datasets(DataConfig(train=[{"path": str(path)}], validation_fraction=0.2), tokenizer, seed=0)
    assert len(data.train) == 8 and len(data.validation) == 2


def test_held_out_records_are_removed_from_train(tokenizer):
    cfg = DataConfig(
        train=[{"synthetic": "reverse_words", "num_records": 2000, "seed": 0}],
        validation=[{"synthetic": "reverse_words", "num_records": 50, "seed": 0}],  # same seed: all overlap
    )
    data = build_datasets(cfg, tokenizer, seed=0)
    assert data.skipped["duplicate_of_validation"] >= 50
    assert len(data.train) + data.skipped["duplicate_of_validation"] == 2000


def unpadded(micro_batches):
    return [
        tuple(ids[mask.bool()].tolist())
        for mb in micro_batches
        for ids, mask in zip(mb["input_ids"], mb["attention_mask"])
    ]


def test_global_batches_do_not_depend_on_world_size(tokenizer):
    cfg = DataConfig(train=[{"synthetic": "reverse_words", "num_records": 50, "seed": 0}])
    samples = build_datasets(cfg, tokenizer, seed=0).train
    one = StepBatches(samples, BatchPlan(8, 4, 2, 0, 1), seed=3, pad_id=0)
    ranks = [StepBatches(samples, BatchPlan(8, 2, 2, r, 2), seed=3, pad_id=0) for r in range(2)]
    for _ in range(9):  # crosses an epoch boundary (50 samples, 8 per step)
        ids_one = sorted(unpadded(one.next_step()))
        ids_two = sorted(row for r in ranks for row in unpadded(r.next_step()))
        assert ids_one == ids_two
    assert one.state_dict() == {"samples_consumed": 72}


def test_collate_pads_right_and_masks(tokenizer):
    from shipyard.data.chat import Sample

    batch = collate([Sample([5, 6, 7], [-100, 6, 7]), Sample([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# ---------------------------------------------------------------- defects a user hit, each reproduced


def test_invalid_utf8_names_the_line_or_is_counted(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": "\xff\xfe"}\n' + json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(ShipyardError, match=rf"{path}:2: not valid UTF-8 \(byte 0xff at column 15\); save the file as UTF-8"):
        build_datasets(config(path), tokenizer, seed=0)
    data = build_datasets(config(path, on_error="skip"), tokenizer, seed=0)
    assert len(data.train) == 2 and data.skipped.report() == {"total": 1, "malformed": 1}


def test_byte_order_mark_is_accepted(tmp_path, tokenizer):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n" + json.dumps(GOOD).encode() + b"\n")
    data = build_datasets(config(path, on_error="skip"), tokenizer, seed=0)
    assert len(data.train) == 2 and data.skipped.report() == {"total": 0}


def test_directory_is_named_as_such(tmp_path, tokenizer):
    with pytest.raises(ShipyardError, match="is a directory; name a .jsonl"):
        build_datasets(config(tmp_path), tokenizer, seed=0)


@pytest.mark.parametrize("suffix", [".json", ".parquet", ".csv"])
def test_tabular_rows_are_one_based_with_the_real_reason(tmp_path, tokenizer, suffix):
    import datasets

    good = {"messages": json.dumps(GOOD["messages"])}
    rows = [good, {"messages": json.dumps([{"role": "robot", "content": "x"}])}, {"messages": '[{"role": oops'}]
    path = tmp_path / f"chats{suffix}"
    table = datasets.Dataset.from_list(rows)
    {".json": table.to_json, ".parquet": table.to_parquet, ".csv": table.to_csv}[suffix](str(path))
    with pytest.raises(ShipyardError, match=rf"{path}:row 2: messages\[0\].role is 'robot'"):
        build_datasets(config(path), tokenizer, seed=0)
    bad_json = config(path, on_error="skip")
    data = build_datasets(bad_json, tokenizer, seed=0)
    assert len(data.train) == 1 and data.skipped.report() == {"total": 2, "malformed": 2}
    rows[1] = good
    table = datasets.Dataset.from_list(rows)
    {".json": table.to_json, ".parquet": table.to_parquet, ".csv": table.to_csv}[suffix](str(path))
    with pytest.raises(ShipyardError, match=rf'{path}:row 3: the "messages" column is text but not valid JSON'):
        build_datasets(config(path), tokenizer, seed=0)


def test_whitespace_only_answers_are_counted_as_empty(tmp_path, tokenizer):
    blank = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " \n\t"}]}
    path = jsonl(tmp_path, [GOOD, blank, blank])
    data = build_datasets(config(path), tokenizer, seed=0)
    assert len(data.train) == 1
    assert data.skipped.report() == {"total": 2, "empty_answer": 2}
    assert data.turns_report() == {"empty_answer": 2, "supervised": 1}


def test_template_errors_are_counted_under_skip(tmp_path, tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% if messages[0].role != 'user' %}{{ raise_exception('first turn must be user') }}{% endif %}" \
        + tok.chat_template
    sys_first = {"messages": [{"role": "system", "content": "s"}, *GOOD["messages"]]}
    path = jsonl(tmp_path, [GOOD, sys_first])
    with pytest.raises(ShipyardError, match=rf"{path}:2: the chat template failed on this record: first turn must be user"):
        build_datasets(config(path), tok, seed=0)
    data = build_datasets(config(path, on_error="skip"), tok, seed=0)
    assert data.skipped.report() == {"total": 1, "template_error": 1}


def test_replacing_train_on_the_command_line_drops_the_recipes_validation(tmp_path, tokenizer):
    from shipyard.config import load_recipe

    path = jsonl(tmp_path, [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
                            for i in range(4)])
    recipe = load_recipe("quickstart", [f"data.train={path}"])
    assert recipe.data.validation == []
    data = build_datasets(recipe.data, tokenizer, seed=0)
    assert len(data.validation) == 0 and data.validation_origin.startswith("none")
    recipe = load_recipe("quickstart", [f"data.train={path}", "data.validation_fraction=0.25"])
    assert build_datasets(recipe.data, tokenizer, seed=0).validation_origin.startswith("1 records carved")
    # giving both keeps both
    assert load_recipe("quickstart", [f"data.train={path}", f"data.validation={path}"]).data.validation[0].path == str(path)

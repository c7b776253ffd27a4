from pathlib import Path

import pytest

from shipyard.config import Recipe, dump_recipe, load_recipe
from shipyard.errors import ShipyardError


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_unknown_key_names_key_and_closest(tmp_path):
    path = write(tmp_path, "data: {train: x.jsonl}\noptim:\n  lrr: 0.1\n")
    with pytest.raises(ShipyardError) as e:
        load_recipe(path)
    assert "unknown key 'optim.lrr'" in str(e.value)
    assert "did you mean 'lr'" in str(e.value)


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ShipyardError, match=r"unknown key 'trian'.*did you mean 'train'"):
        load_recipe(write(tmp_path, "data: {train: x.jsonl}\ntrian: {max_steps: 3}\n"))


def test_override_sets_typed_values_and_unknown_override_fails():
    recipe = load_recipe("quickstart", ["optim.lr=3e-4", "train.max_steps=200", "optim.betas=[0.8, 0.9]"])
    assert recipe.optim.lr == 3e-4 and recipe.train.max_steps == 200 and recipe.optim.betas == (0.8, 0.9)
    assert load_recipe("quickstart", ["train.mixed_precision=no"]).train.mixed_precision == "no"  # YAML: false
    with pytest.raises(ShipyardError, match=r"unknown key 'train.max_step'.*did you mean 'max_steps'"):
        load_recipe("quickstart", ["train.max_step=3"])


def test_bad_value_and_bad_override_syntax():
    with pytest.raises(ShipyardError, match=r"'optim.lr'.*greater than 0"):
        load_recipe("quickstart", ["optim.lr=-1"])
    with pytest.raises(ShipyardError, match="key.path=value"):
        load_recipe("quickstart", ["optim.lr"])


def test_data_source_needs_exactly_one_kind(tmp_path):
    with pytest.raises(ShipyardError, match="exactly one of 'path', 'dataset' or 'synthetic'"):
        load_recipe(write(tmp_path, "data:\n  train: [{num_records: 3}]\n"))
    with pytest.raises(ShipyardError, match="at most one of 'weight', 'num_samples' or 'epochs'"):
        load_recipe(write(tmp_path, "data:\n  train: [{path: a.jsonl, weight: 1, epochs: 2}]\n"))
    hub = load_recipe(write(tmp_path, "data: {train: acme/chats, validation: [{dataset: acme/chats, split: test}]}\n"))
    assert (hub.data.train[0].dataset, hub.data.train[0].split, hub.data.train[0].path) == ("acme/chats", "train", None)
    assert hub.data.validation[0].describe() == "acme/chats[test]"


def test_output_dir_defaults_to_runs_name(tmp_path):
    recipe = load_recipe(write(tmp_path, "name: demo\ndata: {train: x.jsonl}\n"))
    assert recipe.out_dir == Path("runs/demo")
    assert recipe.data.train[0].path == "x.jsonl"


def test_dump_round_trips():
    recipe = load_recipe("quickstart")
    import yaml

    again = Recipe.model_validate(yaml.safe_load(dump_recipe(recipe)))
    assert again == recipe


def test_nothing_is_executed_from_yaml(tmp_path):
    # A python tag is refused by the safe loader instead of being constructed.
    with pytest.raises(ShipyardError, match="not valid YAML"):
        load_recipe(write(tmp_path, "data: !!python/object/apply:os.system ['echo pwned']\n"))


@pytest.mark.parametrize("override", ["train.max_steps=true", "optim.lr=false", "train.micro_batch_size=true"])
def test_booleans_are_not_numbers(override):
    with pytest.raises(ShipyardError, match=rf"'{override.split('=')[0]}': .*expected a number, not the boolean"):
        load_recipe("quickstart", [override])
    assert load_recipe("quickstart", ["parallel.fsdp=true", "data.packing=false"]).parallel.fsdp is True

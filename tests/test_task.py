"""A task defined here, outside shipyard, trains, checkpoints, resumes bitwise and exports through the one loop.

Plain next-token training on raw text (every token supervised, no chat template): the loop knows nothing about
it beyond train/task.py's interface.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shipyard.checkpoint.store import fingerprint
from shipyard.config import load_recipe
from shipyard.data.chat import Sample
from shipyard.models.save import ModelMeta
from shipyard.models.load import SHIPPED_TOKENIZER
from shipyard.models.presets import preset_config
from shipyard.parallel.topology import build_topology
from shipyard.train.loop import train
from shipyard.train.step import LocalRunner
from shipyard.train.task import Setup, Task
from tests.conftest import losses

TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun"


class RawTextTask(Task):
    name = "raw_text"

    def setup(self, recipe, dist_info, say) -> Setup:
        tokenizer = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
        words = TEXT.split()
        texts = [" ".join(words[i:] + words[:i]) for i in range(len(words))]  # every rotation of the sentence
        samples = [Sample(ids, list(ids)) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        model = AutoModelForCausalLM.from_config(preset_config("qwen3-tiny")).to(dist_info.device)
        topo = build_topology(recipe.parallel, dist_info, False)
        meta = ModelMeta(config=model.config, architecture=type(model).__name__, tokenizer=tokenizer,
                         base_name="qwen3-tiny")
        say("raw text: every token supervised")
        return Setup(model=model, runner=LocalRunner(model, recipe.train.loss_chunk_size, _nothing),
                     tokenizer=tokenizer, data=SimpleNamespace(train=samples, validation=[]), meta=meta,
                     fingerprint=fingerprint(model), topo=topo)

    def summary(self) -> dict:
        return {"texts": len(TEXT.split())}


class _nothing:  # no autocast: exact fp32
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def recipe(out, steps=6):
    return load_recipe("quickstart", [f"output_dir={out}", f"train.max_steps={steps}", "train.micro_batch_size=4",
                                      "checkpoint.every_steps=3", "optim.warmup_steps=1"])


def test_a_task_defined_outside_shipyard_trains_resumes_bitwise_and_exports(tmp_path, capsys):
    out = tmp_path / "run"
    result = train(recipe(out), RawTextTask())
    assert "raw text: every token supervised" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "raw_text" and summary["texts"] == 17 and summary["steps"] == 6
    trajectory = losses(out)
    assert len(trajectory) == 6 and trajectory[-1] < trajectory[0]  # it learns the sentence

    # Killed after the step-3 checkpoint: the resumed run's steps 4-6 are the uninterrupted run's, bit for bit.
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    shutil.rmtree(cut / "checkpoints" / "step_6")
    shutil.rmtree(cut / "final")
    (cut / "checkpoints" / "LATEST").write_text("step_3\n")
    resumed = train(recipe(cut), RawTextTask())
    assert resumed.summary["resumed_from_step"] == 3
    assert losses(cut) == trajectory

    # The export is a plain Hugging Face directory with the trained weights.
    exported = AutoModelForCausalLM.from_pretrained(out / "final")
    ids = torch.arange(3, 23).reshape(2, 10)
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, result.model.eval()(ids).logits)

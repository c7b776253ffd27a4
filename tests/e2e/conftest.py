"""The quickstart runs the e2e modules read, and ONE `shipyard verify DIR ...` for all their exports.

Each e2e module proved its exports with its own `shipyard verify` (chat, attention, DFlash, MTP, VLM, speech: seven
vLLM workers, each paying a CLI process, vLLM's import and a first engine). `cli_verified` runs one
`shipyard verify A B C ... --json` for every group the collected tests name (`@pytest.mark.cli_verified("<group>")`,
directories from the session fixture `cli_verify_<group>`), so running one module still trains only its runs: one
vLLM worker serves them all, speculative jobs included. The runs are session fixtures here; each module names them
under its old fixture names. Runs whose process adds nothing to what is checked (no launcher, no log lines on
stderr, no working directory) call `shipyard.cli.main` in this process (`run_main`): a subprocess paid an
interpreter and the torch/transformers imports each time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import CLI_TIMEOUT, REPO, run_cli, run_main
from tests.served import Reports, collect_groups

def pytest_configure(config):
    config.addinivalue_line("markers", "cli_verified(group): reads `cli_verified`, the one `shipyard verify` of "
                                       "tests/e2e/conftest.py's cli_verify_<group> directories")


@pytest.fixture(scope="session")
def cli_verified(request) -> dict[str, dict]:
    """{"<group>/<name>": report} from one `shipyard verify ... --json` over every collected group's directories.

    The command's exit status is 0 exactly when every report is ok, else 1 (several directories: says which fail)."""
    groups, dirs, failed = collect_groups(request, "cli_verified", "cli_verify_")
    if not dirs:
        return Reports({}, failed)
    order = sorted(dirs)
    # A drafter's recorded target is relative to where the DFlash quickstart ran (runs/quickstart/final).
    cwd = request.getfixturevalue("dflash_quickstart")[0].parent.parent if "dflash" in groups and "dflash" not in failed \
        else REPO
    # One command for what were seven (each bounded by CLI_TIMEOUT), one vLLM worker in it.
    proc = run_cli("verify", *(str(dirs[k]) for k in order), "--json", cwd=cwd, timeout=3 * CLI_TIMEOUT)
    lines = proc.stdout.splitlines()
    assert len(lines) == len(order), proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = dict(zip(order, (json.loads(line) for line in lines)))
    assert proc.returncode == (0 if all(r["ok"] for r in reports.values()) else 1), proc.stderr[-3000:]
    print(f"\ncli_verified: {len(order)} directories of {len(groups)} groups ({', '.join(groups)}) in one "
          "`shipyard verify`")
    return Reports(reports, failed)


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


# ------------------------------------------------------------------ test_cli_chat


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory):
    """Chat data on the published Qwen3 template: the preview, what training consumed, the summary."""
    from shipyard.config import load_recipe
    from shipyard.data.loader import StepBatches
    from shipyard.train.loop import train
    from tests.e2e.test_cli_chat import dialogs
    from tests.fixtures import family_tokenizer

    root = tmp_path_factory.mktemp("qwen3_chat")
    family_tokenizer("qwen3").save_pretrained(root / "tokenizer")
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in dialogs()))
    overrides = [f"model.tokenizer={root / 'tokenizer'}", f"data.train={data}", "data.max_length=512",
                 "data.chat_template_kwargs={enable_thinking: false}", "train.micro_batch_size=4",
                 "eval.generate=false", "checkpoint.every_steps=null", "optim.warmup_steps=0", "optim.lr=3e-3"]
    preview = run_cli("data", "preview", *overrides, "--json", "--limit", "100")
    assert preview.returncode == 0, preview.stderr[-3000:]
    samples = [json.loads(line) for line in preview.stdout.splitlines()]
    batches: list = []
    record = StepBatches.next_step

    def recording(self):
        batches.append(record(self))
        return batches[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StepBatches, "next_step", recording)
        result = train(load_recipe("quickstart", [f"output_dir={root / 'run'}", "train.max_steps=40", *overrides]))
    return root, samples, json.loads(preview.stderr.strip().splitlines()[-1]), batches, result.summary


@pytest.fixture(scope="session")
def cli_verify_chat(chat_run, tmp_path_factory) -> dict[str, Path]:
    """The export, and a copy whose template flips the thinking default to on."""
    final = chat_run[0] / "run" / "final"
    template = json.loads((final / "tokenizer_config.json").read_text())["chat_template"]
    flipped = shutil.copytree(final, tmp_path_factory.mktemp("chat_flipped") / "flipped")
    config = json.loads((flipped / "tokenizer_config.json").read_text())
    config["chat_template"] = template.replace("set enable_thinking = false", "set enable_thinking = true")
    (flipped / "tokenizer_config.json").write_text(json.dumps(config))
    return {"final": final, "flipped": flipped}


# ------------------------------------------------------------------ test_cli_attention


@pytest.fixture(scope="session")
def gemma2_runs(tmp_path_factory):
    """Gemma 2 trained with sdpa forced (1 step) and with `auto` (30 steps), and a copy of the latter's export
    with the soft-cap removed: (sdpa run's process, auto run's process, edited directory)."""
    from tests.conftest import tiny_overrides

    root = tmp_path_factory.mktemp("gemma2")
    sdpa = run_cli("train", "quickstart", *tiny_overrides(root / "sdpa", steps=1), "model.path=gemma2-tiny",
                   "model.attn_implementation=sdpa", "eval.generate=false")
    assert sdpa.returncode == 0, sdpa.stderr[-2000:]
    out = root / "gemma2"
    auto = run_cli("train", "quickstart", *tiny_overrides(out, steps=30, records=512), "model.path=gemma2-tiny",
                   "eval.generate=false", "optim.lr=3e-3")
    assert auto.returncode == 0, auto.stderr[-2000:]
    edited = shutil.copytree(out / "final", root / "edited")
    config = json.loads((edited / "config.json").read_text())
    assert config["attn_logit_softcapping"] == 5.0
    config["attn_logit_softcapping"] = None  # what a careless conversion script might do
    (edited / "config.json").write_text(json.dumps(config))
    return sdpa, auto, edited


@pytest.fixture(scope="session")
def cli_verify_attention(gemma2_runs) -> dict[str, Path]:
    return {"edited": gemma2_runs[2]}


# ------------------------------------------------------------------ test_cli_dflash


@pytest.fixture(scope="session")
def dflash_quickstart(tmp_path_factory):
    """A working directory without runs/quickstart/final: the recipe trains its (full, 500-step) target first, as
    on a fresh clone; then 150 drafter steps. The full 600 and their threshold (tau >= 4.5 offline and in vLLM)
    are `make quality` (bench/quality.py)."""
    cwd = tmp_path_factory.mktemp("dflash")
    proc = run_cli("train", str(REPO / "shipyard" / "recipes" / "quickstart_dflash.yaml"), "train.max_steps=150",
                   "train.eval_every=75", "checkpoint.every_steps=75",
                   "data.validation={synthetic: reverse_words, num_records: 60, seed: 1}", cwd=cwd,
                   timeout=2 * CLI_TIMEOUT)  # two trainings in one command (600 s ran out on a loaded machine)
    _ok(proc)
    return cwd / "runs" / "quickstart_dflash", proc.stdout


@pytest.fixture(scope="session")
def cli_verify_dflash(dflash_quickstart) -> dict[str, Path]:
    return {"drafter": dflash_quickstart[0] / "final"}


# ------------------------------------------------------------------ test_cli_eagle3


@pytest.fixture(scope="session")
def eagle3_quickstart(tmp_path_factory, dflash_quickstart):
    """60 EAGLE-3 steps on the DFlash quickstart's target (its absolute path: verify runs from any directory). The
    full recipe and its thresholds are docs/benchmarks.md's."""
    out = tmp_path_factory.mktemp("eagle3") / "quickstart_eagle3"
    target = dflash_quickstart[0].parent / "quickstart" / "final"
    proc = run_main("train", str(REPO / "shipyard" / "recipes" / "quickstart_eagle3.yaml"), f"draft.target={target}",
                    f"output_dir={out}", "train.max_steps=60", "train.eval_every=60", "checkpoint.every_steps=null",
                    "data.validation={synthetic: reverse_words, num_records: 60, seed: 1}")
    _ok(proc)
    return out, proc.stdout


@pytest.fixture(scope="session")
def cli_verify_eagle3(eagle3_quickstart) -> dict[str, Path]:
    return {"drafter": eagle3_quickstart[0] / "final"}


# ------------------------------------------------------------------ test_cli_mtp


@pytest.fixture(scope="session")
def mtp_quickstart(tmp_path_factory):
    """The quickstart's path at 120 steps; the full 500 steps and their thresholds (exact match >= 90%, vLLM
    acceptance at position 0 >= 0.8 and within 0.05 of training's) are `make quality` (bench/quality.py)."""
    out = tmp_path_factory.mktemp("mtp") / "quickstart_mtp"
    proc = run_main("train", "quickstart_mtp", f"output_dir={out}", "train.max_steps=120", "checkpoint.every_steps=60",
                    "data.validation={synthetic: reverse_words, num_records: 40, seed: 1}")
    _ok(proc)
    return out, proc.stdout


@pytest.fixture(scope="session")
def mtp_glm(tmp_path_factory):
    """GLM-4.5 layout: model.layers.{L}.*, the MTP block's experts one by one (vLLM's MTP loader reads them so)."""
    out = tmp_path_factory.mktemp("mtp") / "glm"
    proc = run_main("train", "quickstart_mtp", "model.path=glm4-moe-tiny", f"output_dir={out}", "train.max_steps=60",
                    "checkpoint.every_steps=null", "eval.generate=false",
                    "data.validation={synthetic: reverse_words, num_records: 40, seed: 1}")
    _ok(proc)
    return out


@pytest.fixture(scope="session")
def cli_verify_mtp(mtp_quickstart, mtp_glm) -> dict[str, Path]:
    return {"quickstart": mtp_quickstart[0] / "final", "glm": mtp_glm / "final"}


# ------------------------------------------------------------------ test_cli_vlm


@pytest.fixture(scope="session")
def vlm_quickstart(tmp_path_factory):
    from tests.e2e.test_cli_vlm import SHORT

    out = tmp_path_factory.mktemp("vlm") / "quickstart_vlm"
    proc = run_cli("train", "quickstart_vlm", f"output_dir={out}", *SHORT)
    _ok(proc)
    return out, proc.stdout


@pytest.fixture(scope="session")
def vlm_idefics3(tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm") / "idefics3"
    proc = run_main("train", "quickstart_vlm", f"output_dir={out}", "model.path=idefics3-tiny", "train.max_steps=60",
                    "data.train={synthetic: shapes, num_records: 2000, seed: 0}", "eval.max_prompts=16",
                    "checkpoint.every_steps=null")
    _ok(proc)
    return out


@pytest.fixture(scope="session")
def vlm_drafter(vlm_quickstart, tmp_path_factory):
    """A DFlash drafter for the Qwen3-VL-shaped target: images go through the target. Trained with
    `train.mixed_precision: bf16` (CPU autocast; the text quickstart's drafter is the fp32 one), so the one vLLM
    check of this drafter also proves that a bf16-trained drafter serves losslessly."""
    out, _ = vlm_quickstart
    drafter = tmp_path_factory.mktemp("vlm") / "drafter"
    proc = run_main("train", "quickstart_dflash", f"output_dir={drafter}", f"draft.target={out / 'final'}",
                    "data.train={synthetic: shapes, num_records: 512, seed: 0}",
                    "data.validation={synthetic: shapes, num_records: 24, seed: 1}", "train.max_steps=40",
                    "train.micro_batch_size=16", "train.eval_every=null", "checkpoint.every_steps=null",
                    "train.mixed_precision=bf16")
    _ok(proc)
    return drafter


@pytest.fixture(scope="session")
def cli_verify_vlm(vlm_quickstart, vlm_idefics3, vlm_drafter) -> dict[str, Path]:
    return {"quickstart": vlm_quickstart[0] / "final", "idefics3": vlm_idefics3 / "final",
            "drafter": vlm_drafter / "final"}


# ------------------------------------------------------------------ test_cli_speech


@pytest.fixture(scope="session")
def speech_quickstart(tmp_path_factory):
    """The quickstart's path (synthesis, training with both validation sets, WER, export) at a length that proves
    it; the full 1,200 steps on 6,000 clips and their WER threshold (<= 5%, equal in vLLM) are `make quality`."""
    from tests.e2e.test_cli_speech import SMALL

    out = tmp_path_factory.mktemp("speech") / "quickstart_speech"
    proc = run_main("train", "quickstart_speech", f"output_dir={out}", "train.max_steps=30", SMALL[0],
                    "train.micro_batch_size=8", "optim.warmup_steps=3",
                    "data.validation=[{synthetic: spoken_digits_heldout, num_records: 6, seed: 1}, "
                    "{synthetic: spoken_digits_unseen_voices, num_records: 6, seed: 2}]", "checkpoint.every_steps=15")
    _ok(proc)
    return out, proc.stdout


@pytest.fixture(scope="session")
def cli_verify_speech(speech_quickstart) -> dict[str, Path]:
    return {"final": speech_quickstart[0] / "final"}

"""DFlash drafter training in fp32 and in bf16 autocast (`train.mixed_precision`), side by side (bench/gpu.sh).

Two pairs of `shipyard train quickstart_dflash` runs, fp32 (`no`) then `bf16`, each in a fresh process:

- speed and memory: a drafter for a random target at Qwen3-0.6B's shape (saved once, in bf16 like a published
  base, with the shipped tokenizer) on chat data shaped like public SFT sets (bench/chat_data.py), 512 tokens,
  micro-batch 8, block size 16: the median step time after warm-up, tokens/s, rank 0's peak GPU memory;
- acceptance: a drafter for the trained text quickstart model (bench/gpu.sh trains it first): tau offline
  (training's replay) and, with `shipyard verify`, in vLLM (lossless or not).

Prints a Markdown table and writes bench/results/dflash_precision.json.

    python bench/dflash_precision.py [--shipyard .venv/bin/shipyard] [--target bench/results/quickstart/final]

A dry run of the steps on a CPU (minutes; figures meaningless there):

    python bench/dflash_precision.py --shape qwen3-tiny --steps 3 --target qwen3-tiny --acceptance-steps 3 \
        --skip-verify --out /tmp/dflash_precision
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from chat_data import make  # noqa: E402

MODES = ("no", "bf16")  # train.mixed_precision: fp32, then bf16 autocast (fp32 master weights)
WARMUP_STEPS = 5  # left out of the median step time (allocator, kernels' first calls)


def shape_target(shape: str, out: Path) -> Path:
    """A random model of `shape` (a SHAPES key or a preset of shipyard.bench.workload), saved as a base would be."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shipyard.bench.workload import model_config
    from shipyard.models.load import SHIPPED_TOKENIZER

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(model_config(shape)).to(torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER).save_pretrained(out)
    return out


def train(shipyard: str, out: Path, target: str, mode: str, *overrides: str) -> dict:
    args = [shipyard, "train", "quickstart_dflash", f"output_dir={out}", f"draft.target={target}",
            f'train.mixed_precision="{mode}"', "train.resume=never", "train.eval_every=null",
            "checkpoint.every_steps=null", *overrides]
    print("+", " ".join(args), flush=True)
    subprocess.run(args, cwd=ROOT, check=True)
    return json.loads((out / "summary.json").read_text())


def step_seconds(out: Path) -> float:
    """The median step time after warm-up, from each step's tokens and tokens/s in metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[WARMUP_STEPS:] or rows
    return statistics.median(r["train/tokens"] / r["train/tokens_per_second"] for r in timed)


def verify(shipyard: str, final: Path) -> dict:
    """`shipyard verify --json`'s speculative report (lossless, vLLM's tau, tokens/s), or why there is none."""
    proc = subprocess.run([shipyard, "verify", str(final), "--json"], cwd=ROOT, capture_output=True, text=True)
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": proc.stderr[-2000:]}
    s = report.get("speculative") or {}
    return {"ok": report.get("ok"), "lossless": s.get("lossless"), "prompts": s.get("prompts"),
            "mean_acceptance_length": s.get("mean_acceptance_length"),
            "tokens_per_second": s.get("tokens_per_second"), "error": s.get("error")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shipyard", default=".venv/bin/shipyard")
    p.add_argument("--shape", default="qwen3-0.6b", help="the speed runs' target shape (default: Qwen3-0.6B's)")
    p.add_argument("--steps", type=int, default=40, help="steps of each speed run")
    p.add_argument("--target", default="bench/results/quickstart/final", help="the acceptance runs' trained target")
    p.add_argument("--acceptance-steps", type=int, help="steps of each acceptance run (default: the recipe's)")
    p.add_argument("--skip-verify", action="store_true", help="no vLLM (offline tau only)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dflash_precision")
    a = p.parse_args()

    a.out.mkdir(parents=True, exist_ok=True)
    target = shape_target(a.shape, a.out / f"target_{a.shape}")
    chats = a.out / "chats.jsonl"
    if not chats.is_file():
        make(1000, chats)
    results: dict = {"shape": a.shape, "speed": {}, "acceptance": {}}
    for mode in MODES:
        out = a.out / f"speed_{mode}"
        s = train(a.shipyard, out, str(target), mode, f"data.train={chats}", "data.max_length=512",
                  "draft.block_size=16", "train.micro_batch_size=8", f"train.max_steps={a.steps}",
                  "data.validation={synthetic: reverse_words, num_records: 8, seed: 1}")
        assert s["mixed_precision"] == mode, (mode, s["mixed_precision"])
        results["speed"][mode] = {"step_seconds": step_seconds(out), "tokens_per_second": s["tokens_per_second"],
                                  "peak_gpu_memory_gib": s["peak_gpu_memory_gib"],
                                  "final_train_loss": s["final_train_loss"]}
    for mode in MODES:
        out = a.out / f"acceptance_{mode}"
        steps = [f"train.max_steps={a.acceptance_steps}"] if a.acceptance_steps else []
        s = train(a.shipyard, out, a.target, mode, *steps)
        results["acceptance"][mode] = {"offline_tau": s["eval"].get("mean_acceptance_length"),
                                       "eval_loss": s["eval"].get("loss"), "train_seconds": s["train_seconds"],
                                       "vllm": None if a.skip_verify else verify(a.shipyard, out / "final")}

    (a.out.parent / "dflash_precision.json").write_text(json.dumps(results, indent=2) + "\n")
    fp32, bf16 = results["speed"]["no"], results["speed"]["bf16"]

    def gib(x):
        return f"{x:.2f}" if x is not None else "-"

    def vllm_tau(r):
        v = r["vllm"] or {}
        return f"{v['mean_acceptance_length']:.3f}" if v.get("mean_acceptance_length") else "-"

    def lossless(r):
        v = r["vllm"] or {}
        return "-" if v.get("lossless") is None else ("yes" if v["lossless"] else "NO")

    print(f"\nDFlash drafter, train.mixed_precision no (fp32) vs bf16; speed on a {a.shape} target, {a.steps} steps")
    print("| | step s (median) | tokens/s | peak GPU GiB | tau offline | tau vLLM | lossless |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, name in zip(MODES, ("fp32", "bf16")):
        sp, ac = results["speed"][mode], results["acceptance"][mode]
        print(f"| {name} | {sp['step_seconds']:.3f} | {sp['tokens_per_second']:,.0f} | {gib(sp['peak_gpu_memory_gib'])} "
              f"| {ac['offline_tau']:.3f} | {vllm_tau(ac)} | {lossless(ac)} |")
    ratio = fp32["step_seconds"] / bf16["step_seconds"]
    memory = (f", peak memory x{bf16['peak_gpu_memory_gib'] / fp32['peak_gpu_memory_gib']:.2f}"
              if fp32["peak_gpu_memory_gib"] else "")
    print(f"bf16: steps x{ratio:.2f} as fast{memory}; written to {a.out.parent / 'dflash_precision.json'}")


if __name__ == "__main__":
    main()

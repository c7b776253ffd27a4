"""Peak host memory per rank while loading a base of Qwen3-0.6B's shape: one process, FSDP2, pipeline stages.

    .venv/bin/python bench/load_memory.py                     # 1, 2 and 4 ranks; about 3 minutes on 2 CPU cores
    .venv/bin/python bench/load_memory.py --layouts fsdp2 pp2 # some of them
    .venv/bin/python bench/load_memory.py --untied --layouts pp2  # untied embeddings (Qwen3-4B and larger)
    .venv/bin/python bench/load_memory.py --check             # make quality: FSDP2 and PP=2 ranks <= 60% of one process

The base is a sharded bf16 Hugging Face folder (Qwen3-0.6B's shape, random weights, written once under
runs/load_memory/). Each layout loads it as `shipyard train` does (models/load.py builds it empty, parallel/
shards or splits it, checkpoint/base_weights.py fills each rank's part from the files) and reports each rank's
peak resident memory during loading (VmHWM, reset just before) and the memory it held before loading (torch and
transformers imported). "whole" is the old way for comparison: every rank loads the full model with
`from_pretrained`, then shards it. Every layout also checks that its weights are bitwise the files' tensors cast
to fp32, which is what one process loading the model whole holds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOT = REPO / "runs" / "load_memory"

# name -> (processes, overrides, load whole)
LAYOUTS = {
    "one": (1, [], False),
    "one-whole": (1, [], True),
    "fsdp2": (2, ["parallel.fsdp=true"], False),
    "fsdp2-whole": (2, ["parallel.fsdp=true"], True),
    "pp2": (2, ["parallel.pp=2", "parallel.pp_microbatches=2"], False),
    "fsdp4": (4, ["parallel.fsdp=true"], False),
}
LIMIT = 0.60  # issue 23: each rank's loading peak at most 60% of what one process needs


def qwen3_06b_shape(tied: bool):
    from transformers import Qwen3Config

    return Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=4096,
                       tie_word_embeddings=tied, rope_theta=1_000_000.0)


def make_base(folder: Path, tied: bool) -> None:
    """The sharded bf16 folder, written once (a random init of 0.6B parameters takes a minute on 2 cores)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shipyard.models.load import SHIPPED_TOKENIZER

    if (folder / "model.safetensors.index.json").is_file():
        return
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(qwen3_06b_shape(tied), dtype=torch.bfloat16)
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial, max_shard_size="300MB")
    AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER).save_pretrained(partial)
    partial.rename(folder)


def resident_gib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / (1 << 20)


def worker(base: Path, overrides: list[str], whole: bool, out: Path) -> None:
    """One rank: load as `shipyard train` does, measure, check the weights bitwise, write its figures."""
    import torch
    from torch.distributed.tensor import DTensor

    from shipyard.checkpoint.base_weights import base_weights_for
    from shipyard.config import load_recipe
    from shipyard.models.load import load, load_model
    from shipyard.models.structure import clean_name, tied_aliases
    from shipyard.models.weights import DirectoryWeights
    from shipyard.parallel.dist import init_distributed, own_peak_memory_gib
    from shipyard.parallel.fsdp import use_fsdp
    from shipyard.parallel.topology import build_topology
    from shipyard.train.sft import build_runner

    recipe = load_recipe("quickstart", [f"model.path={base}", f"output_dir={out.parent}", *overrides])
    info = init_distributed("cpu")
    before = resident_gib()
    own_peak_memory_gib(restart=True)
    model, tokenizer, source = load(recipe.model, recipe.seed, empty=not whole)
    model, weights, how = base_weights_for(model, recipe.model, source, recipe.seed)
    topo = build_topology(recipe.parallel, info, use_fsdp(recipe.parallel, info))
    view, _ = build_runner(model, recipe, topo, info, tokenizer.pad_token_id, weights=weights)
    peak = own_peak_memory_gib()

    files, aliases = DirectoryWeights(base), tied_aliases(view)
    unequal, checked = [], 0
    for name, tensor in view.state_dict().items():
        name = clean_name(name)
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if name in aliases or name not in files.shapes:
            continue
        checked += 1
        if not torch.equal(full, files.load_rows(name).to(full.dtype)):
            unequal.append(name)
    out.write_text(json.dumps({"rank": info.rank, "before_gib": before, "peak_gib": peak, "how": how,
                               "tensors_checked": checked, "unequal": unequal}))


def run_layout(name: str, base: Path) -> dict:
    procs, overrides, whole = LAYOUTS[name]
    out = ROOT / "results" / name
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank*.json"):
        old.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
           __file__, "--worker", str(base), str(out), str(int(whole)), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: failed\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    return {"layout": name, "processes": procs, "ranks": ranks}


def table(base: Path, results: list[dict]) -> float:
    """Print the figures of `results` (the first is one process); returns the worst ratio of fsdp2/pp2 to it."""
    one = max(x["peak_gib"] for x in results[0]["ranks"])
    print(f"\n{base.name}: peak host memory per rank while loading, GiB (resident before loading)")
    print("| layout | processes | peak per rank | ratio to one process | bitwise equal to the files | how |")
    print("|---|---:|---|---:|---|---|")
    worst = 0.0
    for r in results:
        peaks = [x["peak_gib"] for x in r["ranks"]]
        ratio = max(peaks) / one
        if any(x["unequal"] for x in r["ranks"]):
            ratio = float("inf")  # wrong weights fail whatever the memory
        if r["layout"] in ("fsdp2", "pp2"):
            worst = max(worst, ratio)
        cells = ", ".join(f"{p:.2f} ({x['before_gib']:.2f})" for p, x in zip(peaks, r["ranks"]))
        verdict = "yes" if ratio != float("inf") else "NO: " + ", ".join(r["ranks"][0]["unequal"][:3])
        print(f"| {r['layout']} | {r['processes']} | {cells} | {ratio:.2f} | {verdict} | {r['ranks'][0]['how']} |")
    return worst


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        base, out, whole, *overrides = argv[1:]
        rank = os.environ.get("RANK", "0")
        worker(Path(base), overrides, whole == "1", Path(out) / f"rank{rank}.json")
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--untied", action="store_true", help="untied embeddings (as Qwen3-4B and larger)")
    parser.add_argument("--check", action="store_true",
                        help=f"`make quality`'s check: FSDP2 on the tied shape and PP=2 on the untied one, each rank "
                             f"at most {LIMIT * 100:.0f}%% of one process (with tied embeddings both the first and the last "
                             "stage hold the embedding, a quarter of this model); exit 1 otherwise")
    args = parser.parse_args(argv)
    plan = ([(False, ["one", "fsdp2"]), (True, ["one", "pp2"])] if args.check else
            [(args.untied, args.layouts if "one" in args.layouts else ["one", *args.layouts])])
    worst, everything = 0.0, {}
    for untied, layouts in plan:
        base = ROOT / ("qwen3-0.6b-shape-untied" if untied else "qwen3-0.6b-shape")
        make_base(base, tied=not untied)
        results = [run_layout(name, base) for name in layouts]
        worst = max(worst, table(base, results))
        everything[base.name] = results
    (ROOT / "results.json").write_text(json.dumps(everything, indent=1))
    if args.check:
        print(f"\nworst ratio of a rank to one process: {worst:.2f} (limit {LIMIT:.2f})")
    return 1 if args.check and worst > LIMIT else 0


if __name__ == "__main__":
    sys.exit(main())

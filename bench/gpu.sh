#!/usr/bin/env bash
# The GPU comparisons of docs/benchmarks.md, one GPU:
#   1. Qwen3-0.6B shape, full fine-tune, seq 4096, micro-batch 4, bf16: shipyard vs HF Trainer
#   2. Llama-3-8B shape, LoRA r=16 on all linear layers, seq 4096: shipyard vs HF Trainer + PEFT
#      (published reference: NeMo Automodel, 12,473 tokens/s on one H100)
#   3. MTP on a tiny nemotron_h (hybrid Mamba) base: does vLLM's GPU build decode it losslessly with the exported
#      head? (Its CPU build does not, for n-gram drafting either: docs/notes/mtp-on-vllm.md.) The verify report,
#      with the n-gram control, goes to bench/results/mtp_nemotron_h.json.
#   4. DFlash drafters (text and vision-language targets) served by vLLM's GPU build: bench/results/dflash_*.json
#   5. DFlash drafter training in fp32 vs bf16 autocast (train.mixed_precision): step time and peak GPU memory with
#      a Qwen3-0.6B-shaped target, tau offline and in vLLM with the text quickstart's: bench/dflash_precision.py,
#      bench/results/dflash_precision.json
# Each result is also written as JSON to bench/results/<preset>.json.
# Usage: bench/gpu.sh [SHIPYARD]     (SHIPYARD: the shipyard executable; default .venv/bin/shipyard)
set -euo pipefail
cd "$(dirname "$0")/.."
shipyard="${1:-.venv/bin/shipyard}"
mkdir -p bench/results
for preset in qwen3-0.6b llama3-8b-lora; do
    "$shipyard" bench --preset "$preset" --save "bench/results/$preset.json"
done
"$shipyard" train quickstart_mtp model.path=nemotron-h-tiny output_dir=bench/results/mtp_nemotron_h train.resume=never
"$shipyard" verify bench/results/mtp_nemotron_h/final --json > bench/results/mtp_nemotron_h.json || true
# 4. DFlash drafters in vLLM's GPU build: the text quickstart's, and one for the vision-language quickstart model.
"$shipyard" train quickstart output_dir=bench/results/quickstart
"$shipyard" train quickstart_dflash output_dir=bench/results/dflash_text draft.target=bench/results/quickstart/final
"$shipyard" verify bench/results/dflash_text/final --json > bench/results/dflash_text.json || true
"$shipyard" train quickstart_vlm output_dir=bench/results/quickstart_vlm
"$shipyard" train quickstart_dflash output_dir=bench/results/dflash_vlm draft.target=bench/results/quickstart_vlm/final \
    "data.train={synthetic: shapes, num_records: 8000, seed: 0}" "data.validation={synthetic: shapes, num_records: 200, seed: 1}"
"$shipyard" verify bench/results/dflash_vlm/final --json > bench/results/dflash_vlm.json || true
# 5. DFlash fp32 -> bf16: the same runs with train.mixed_precision no and bf16 (the target from step 4).
"$(dirname "$(command -v "$shipyard")")/python" bench/dflash_precision.py --shipyard "$shipyard" \
    --target bench/results/quickstart/final

#!/usr/bin/env bash
# The GPU comparisons of docs/benchmarks.md, one GPU:
#   1. Qwen3-0.6B shape, full fine-tune, seq 4096, micro-batch 4, bf16: shipyard vs HF Trainer
#   2. Llama-3-8B shape, LoRA r=16 on all linear layers, seq 4096: shipyard vs HF Trainer + PEFT
#      (published reference: NeMo Automodel, 12,473 tokens/s on one H100)
# Each result is also written as JSON to bench/results/<preset>.json.
# Usage: bench/gpu.sh [SHIPYARD]     (SHIPYARD: the shipyard executable; default .venv/bin/shipyard)
set -euo pipefail
cd "$(dirname "$0")/.."
shipyard="${1:-.venv/bin/shipyard}"
mkdir -p bench/results
for preset in qwen3-0.6b llama3-8b-lora; do
    "$shipyard" bench --preset "$preset" --save "bench/results/$preset.json"
done

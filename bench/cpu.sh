#!/usr/bin/env bash
# shipyard vs HF Trainer on the quickstart model, on this machine's CPU (under a minute).
# Usage: bench/cpu.sh [--steps N] [--json]      (after `make install`)
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/shipyard bench --preset tiny "$@"

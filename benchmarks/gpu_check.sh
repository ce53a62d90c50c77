#!/usr/bin/env bash
# One prepared check of a GPU machine (or, with --smoke, of every stage at toy sizes on a CPU).
# Stages and options: benchmarks/gpu_check.py; it prints one table and exits 1 if a stage failed.
#
#   bash benchmarks/gpu_check.sh                 # GPT-2 sizes, 6 minutes at most (--budget_s 360): the speed and memory rows first
#   bash benchmarks/gpu_check.sh --smoke         # toy sizes, a 2-core CPU, about 3 minutes
#   bash benchmarks/gpu_check.sh --data DIR      # shards prepared elsewhere (no tokenising here)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_check.py "$@"

#!/usr/bin/env bash
# The one-call GPU check: bench/gpu_check.sh [--dry-run] [--budget SECONDS] OUT_DIR
# Runs on a bare GPU machine with its own python3, torch, triton and timm (no installs, no network) from the
# repository root; see bench/gpu_check.py for the steps. --dry-run: the same steps on a CPU, in seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"

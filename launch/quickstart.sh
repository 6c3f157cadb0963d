#!/usr/bin/env bash
# The README's main command: set up (or reuse) .venv, train the default recipe
# (recipes/quickstart.yaml: a tiny Llama-family model learns to reverse strings) on
# 2 pipeline ranks through DeepSpeed's launcher (pp-ext launch: the recipe checked first), then show what it
# learned. CPU (gloo) unless two GPUs are visible. Extra arguments are recipe
# overrides, e.g. `bash launch/quickstart.sh parallel.schedule=zbv train.steps=100`.
# An interrupted run resumes from its last checkpoint (checkpoint.resume: auto).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/env.sh"
cd "$root"
out="${PP_EXT_RUN_DIR:-runs/quickstart}"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
if [ "${gpus:-0}" -lt 2 ]; then
    # two ranks share this machine's cores; one GPU cannot hold two NCCL ranks
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
pp-ext launch --num_gpus 2 launch/train.py --recipe recipes/quickstart.yaml "output_dir=$out" "$@"
pp-ext report "$out"

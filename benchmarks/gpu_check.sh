#!/usr/bin/env bash
# The prepared GPU check: one command on a CUDA machine, no installs (torch, torchvision,
# nvidia-ml-py, psutil, rich and typer are expected there), the repo on PYTHONPATH.
#   bash benchmarks/gpu_check.sh            # writes $OUT (default runs/gpu_check)
# Steps: GPU-marked tests; tune the official 128x128, 30-bit model at --target-mem 20GB
# (memory before/after the search is recorded); seed default vs recommended images/s and
# fp32/bf16/fp16 come from the tuner's own measurements; a 1-GPU torchrun smoke run;
# a JSON summary + table.
# Budget: under 8 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export ARWGAN_CACHE="${ARWGAN_CACHE:-$PWD/.cache}"
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
start=$(date +%s)
step() { echo "== [$(( $(date +%s) - start ))s] $*"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv | tee "$OUT/nvidia-smi.csv"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee "$OUT/torch.txt"

step "GPU-marked tests"
timeout 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests > "$OUT/pytest_gpu.txt" 2>&1
echo "pytest exit $?" | tee -a "$OUT/pytest_gpu.txt"; tail -3 "$OUT/pytest_gpu.txt"

step "tune the official model (128x128, 30 bits, 64 channels) at --target-mem 20GB"
timeout 330 "$PY" -m autotune.cli --target-mem 20GB --device cuda --out "$OUT/tuned.json" \
    --plot "$OUT/trials.png" --compare-steps 20 > "$OUT/tune.json" 2> "$OUT/tune.txt"
echo "autotune exit $?"; tail -45 "$OUT/tune.txt"

step "1-GPU torchrun smoke run (DDP over NCCL, one process)"
timeout 90 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m arwgan.cli --epochs 1 \
    --steps-per-epoch 10 --val-images 64 --device cuda --out "$OUT/ddp" > "$OUT/torchrun.txt" 2>&1
echo "torchrun exit $?" | tee -a "$OUT/torchrun.txt"; tail -3 "$OUT/torchrun.txt"

step "summary"
"$PY" benchmarks/gpu_summary.py "$OUT" | tee "$OUT/summary.md"
step "done"

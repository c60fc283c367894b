#!/usr/bin/env bash
# The prepared GPU check: one command on a CUDA machine, no installs, the repo root as cwd.
#   PYTHONPATH=$PWD bash benchmarks/gpu_check.sh     # files under $OUT, else runs/gpu_check
# It cannot pass vacuously:
#   - it stops at once (exit 1, one line) unless torch can run a kernel on the GPU;
#   - every step runs even when an earlier one failed, and the exit code is non-zero when
#     any step or any check failed;
#   - a skipped GPU test counts as a failure (pytest alone exits 0 when all skip);
#   - what a step needs (pytest, matplotlib for --plot) is checked, not assumed.
# Steps and their time limits (sum 505 s, under 9 minutes on one H100):
#   preflight 25 s | pytest -m gpu 130 s | tune the official model at --target-mem 20GB
#   200 s (workers up to the 16 cores, no oversubscribed count) | arwgan doctor on the
#   tuned configuration 45 s | trial noise (benchmarks/trial_noise.py, printed only, not
#   a check) 45 s | 1-GPU torchrun smoke run 60 s. Then one summary:
#   summary.json + summary.txt (also printed at the end), with every figure
#   docs/results.md needs.
# Files written under $OUT (at most 8): summary.json summary.txt pytest_gpu.txt tune.txt
#   tuned.json trials.png torchrun.txt doctor.json; scratch (junit XML, the smoke run's
#   checkpoint, the doctor's log) goes to a temporary folder.
set -uo pipefail  # no -e: one failing step must not skip the later ones or the summary
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export ARWGAN_CACHE="${ARWGAN_CACHE:-$PWD/.cache}"
OUT="${OUT:-runs/gpu_check}"
PY="${PYTHON:-python3}"

SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
start=$(date +%s)
step() { echo "== [$(( $(date +%s) - start ))s] $*"; }

# -- preflight: CUDA must work, or nothing below means anything --------------------------
if ! reason=$(timeout 25 "$PY" - 2>&1 <<'EOF'
import sys
try:
    import torch
except Exception as exc:  # noqa: BLE001
    sys.exit(f"torch does not import: {exc}")
if not torch.cuda.is_available():
    from arwgan.errors import GpuNotUsable
    from arwgan.step import check_gpu_usable
    try:
        check_gpu_usable()
    except GpuNotUsable as exc:
        sys.exit(str(exc))
    sys.exit(f"CUDA is not usable here (torch {torch.__version__}, built for CUDA "
             f"{torch.version.cuda}): torch.cuda.is_available() is False; nothing was checked")
x = torch.ones(256, 256, device="cuda")
if float((x @ x).sum().item()) != 256.0 ** 3:
    sys.exit("a matmul on the GPU gave a wrong result")
print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda})")
EOF
); then
    echo "gpu_check: FAILED before any step: ${reason##*$'\n'}" >&2
    exit 1
fi
step "preflight: $reason"
mkdir -p "$OUT"
status=0
declare -A rc
missing=""
for module in pytest matplotlib pynvml psutil typer rich; do
    "$PY" -c "import $module" 2>/dev/null || missing="$missing $module"
done
[ -n "$missing" ] && { echo "gpu_check: missing Python modules:$missing"; status=1; }

step "GPU-marked tests (a skip counts as a failure)"
timeout 130 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$SCRATCH/junit.xml" \
    tests > "$OUT/pytest_gpu.txt" 2>&1
rc[pytest]=$?
tail -4 "$OUT/pytest_gpu.txt"

step "tune the official model (128x128, 30 bits, 64 channels) at --target-mem 20GB"
plot=(--plot "$OUT/trials.png")
"$PY" -c "import matplotlib" 2>/dev/null || plot=()
timeout 200 "$PY" -m arwgan.autotune_cli --target-mem 20GB --device cuda --out "$OUT/tuned.json" \
    --max-workers 16 "${plot[@]}" > "$OUT/tune.txt" 2>&1
rc[tune]=$?
tail -30 "$OUT/tune.txt"

step "arwgan doctor on the tuned configuration (30 s of training, report as JSON)"
timeout 45 "$PY" -m arwgan doctor --from-tuned "$OUT/tuned.json" --device cuda --seconds 30 \
    --json > "$OUT/doctor.json" 2> "$SCRATCH/doctor.txt"
rc[doctor]=$?
tail -3 "$SCRATCH/doctor.txt"
[ -s "$OUT/doctor.json" ] || rm -f "$OUT/doctor.json"  # no empty report left behind

step "trial noise on the GPU: 3 rounds of batch 16 and 32 (sets TuneConfig.trial_noise on CUDA)"
timeout 45 "$PY" benchmarks/trial_noise.py --device cuda --model 128 --batches 16,32 --repeats 3 \
    --target-mem 20GB > "$SCRATCH/trial_noise.txt" 2>&1
echo "trial_noise exit $?"
tail -3 "$SCRATCH/trial_noise.txt"

step "1-GPU torchrun smoke run (DDP over NCCL, one process)"
timeout 60 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m arwgan.cli \
    --epochs 1 --steps-per-epoch 10 --val-images 64 --device cuda \
    --out "$SCRATCH/ddp" > "$OUT/torchrun.txt" 2>&1
rc[torchrun]=$?
[ -f "$SCRATCH/ddp/log.csv" ] && cp "$SCRATCH/ddp/log.csv" "$SCRATCH/torchrun_log.csv"
tail -3 "$OUT/torchrun.txt"

step "summary"
"$PY" benchmarks/gpu_summary.py "$OUT" --junit "$SCRATCH/junit.xml" \
    --torchrun-log "$SCRATCH/torchrun_log.csv" --rc "pytest=${rc[pytest]}" \
    --rc "tune=${rc[tune]}" --rc "doctor=${rc[doctor]}" --rc "torchrun=${rc[torchrun]}" \
    --missing "${missing# }" \
    --seconds "$(( $(date +%s) - start ))"
summary_rc=$?
[ "$summary_rc" -ne 0 ] && status=1
for name in pytest tune doctor torchrun; do
    [ "${rc[$name]}" -ne 0 ] && status=1
done
step "done: exit $status"
exit "$status"

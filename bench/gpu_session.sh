#!/usr/bin/env bash
# Issue 6's GPU figures in parts that each fit one 10-minute device command (30 minutes in all).
# Device time is now 15 minutes per task, starts and installs included: a session lent a GPU runs
# bench/gpu_proof.sh first (one call: the headline throughput eager + compiled and time to accuracy,
# under a 9-minute deadline; BENCHMARKS.md, "GPU proof command"), and these parts only with time left.
#
#   bash bench/gpu_session.sh PART [PART ...]
#
# Parts, in the order of what they are worth (rough H100 minutes in brackets):
#   throughput   ours vs ceiling vs lightly, eager, every case                        [~5]
#   compiled     ours vs ceiling under torch.compile (no lightly)                     [~6]
#   profile      torch.profiler over DINO 2x32+6x16 and SwAV 2x32 steps               [~1]
#   ray          Ray Train overhead (1 GPU worker vs plain process)                   [~2]
#   sweep        4 trials x 0.25 GPU at once                                          [~3]
#   tta-swav     time to lightly's SwAV figure (8-minute budget)                      [~9]
#   tta-dino     time to lightly's DINO figure (8-minute budget)                      [~9]
#   loader       every loader row + the ResNet-18/50 ceilings (measured 2026-11-22 before the
#                augmentation's kernel count was halved on 2026-11-23: rerun)                [~3]
#   augment      the augmentation alone, 2x32+4x16 and 2x224+6x96, eager and compiled ops   [~2]
#   report       bench/report.py over the GPU results (exit 1 when a target is missed)
#
# Data: $SSLAB_DATA_ROOT, else .benchdata/ (git-excluded; copy ../shared/data/*.tar.gz there and
# carry it in the call right after the one that installed the device kit), else ../shared/data.
# Results: bench/results/*-cuda*.json, copied to $OUT when it is set (the device tool brings them back).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ $# -eq 0 ]; then
  sed -n '2,23p' "$0"
  exit 2
fi
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_session.sh: no CUDA device here; these parts measure the GPU (CPU smoke: run the bench scripts directly)" >&2
  exit 2
fi
if [ -z "${SSLAB_DATA_ROOT:-}" ] && [ -d .benchdata ]; then export SSLAB_DATA_ROOT=$PWD/.benchdata; fi
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
export SSLAB_HOME=${SSLAB_HOME:-/tmp/sslab-bench}

status=0
run() {
  echo "=== $*"
  local started=$SECONDS
  "$@" 2>&1 | grep -v -i -E "warn|Unable to join threads" || true
  local rc=${PIPESTATUS[0]}
  echo "--- exit $rc after $((SECONDS - started)) s"
  [ "$rc" -eq 0 ] || status=$rc
}

python -m sslab data prepare --dataset cifar10 --quiet || { echo "no CIFAR-10 under ${SSLAB_DATA_ROOT:-the data root}: carry .benchdata/ (see above)" >&2; exit 2; }

for part in "$@"; do
  case "$part" in
    throughput) run python bench/throughput.py --device cuda --lightly ;;
    compiled) run python bench/throughput.py --device cuda --compile ;;
    profile)
      run python bench/profile_step.py --device cuda --method dino --crops 2x32+6x16
      run python bench/profile_step.py --device cuda --method swav --crops 2x32 ;;
    ray) run python bench/ray_overhead.py --device cuda ;;
    sweep) run python bench/sweep_concurrency.py --device cuda ;;
    tta-swav) run python bench/time_to_accuracy.py --method swav --device cuda ;;
    tta-dino) run python bench/time_to_accuracy.py --method dino --device cuda ;;
    loader) run python bench/loader.py --device cuda ;;
    augment)
      run python bench/profile_augment.py --device cuda --crops 2x32+4x16 --method swav --batch-size 512 --canvas 32
      run python bench/profile_augment.py --device cuda --crops 2x224+6x96 --method dino --batch-size 128 --canvas 256
      run python bench/profile_augment.py --device cuda --crops 2x32+4x16 --method swav --batch-size 512 --canvas 32 --compile
      run python bench/profile_augment.py --device cuda --crops 2x224+6x96 --method dino --batch-size 128 --canvas 256 --compile ;;
    report) run python bench/report.py --device cuda --out bench/results/report-cuda.md ;;
    *) echo "gpu_session.sh: unknown part '$part' (throughput compiled profile ray sweep tta-swav tta-dino loader augment report)" >&2
       exit 2 ;;
  esac
done

if [ -n "${OUT:-}" ]; then
  cp bench/results/*cuda* "$OUT"/ 2>/dev/null || true
fi
exit $status

#!/usr/bin/env bash
# One GPU proof command (issue 19): the headline figures on a cold H100/H200 in one device call,
# in priority order, under a hard deadline (default 540 s = 9 minutes from the start, installs included).
#
#   bash bench/gpu_proof.sh --pack                  # HERE (CPU machine), once: builds .proofkit/ (see below)
#   bash bench/gpu_proof.sh [--budget SECONDS]      # ON THE GPU machine: device run, carry [".proofkit"],
#                                                   #   timeout_s 600
#   bash bench/gpu_proof.sh --smoke [--results DIR] # the same code on a CPU, tiny sizes, under 3 minutes (CI)
#
# Parts, each written as soon as it is measured (to --results, default bench/results, and copied to $OUT
# at once when $OUT is set):
#   a  throughput-eager     ours vs the ceiling vs lightly 1.6.0, eager: SwAV 2x32+4x16, DINO 2x32+6x16,
#                           SupCon 2x32 (lightly has no SupCon baseline)   -> throughput-<dev>-proof.json
#   b  throughput-compiled  the same cases, ours vs the ceiling under torch.compile (lightly is measured
#                           once, eager, in a)                              -> throughput-<dev>-compiled-proof.json
#   c  tta-swav             time to lightly's SwAV kNN figure for as long as is left; stops at an epoch end
#                           before the deadline and keeps its curve         -> tta-swav-<dev>-proof.json
# and gpu-proof-summary-<dev>.json/.md (rewritten after every step: each part's status, seconds and figures;
# 'skipped (no time left)' for what could not fit) plus gpu-proof-<dev>.log. Every part runs under a time
# limit computed from what remains, so the script never passes its deadline.
#
# Setup (counted in the budget): the kit (.proofkit/, or ../shared/device's .devicekit/) is installed when
# ffcv is not importable; data from $SSLAB_DATA_ROOT, else .proofkit/data, else .benchdata, else ../shared/data;
# CIFAR-10 is prepared once; lightly is measured only when lightly 1.6.0 imports ('skipped' otherwise).
# Why .proofkit: the full device kit (~50 MiB) and CIFAR-10 (18.5 MiB) do not travel together under the
# 64 MiB per call; --pack keeps the kit's ffcv build, its libraries and lightly, drops Ray/MLflow/Optuna
# (the proof imports none of them), and adds cifar10-jpg.tar.gz: ~35 MiB in all.
# Exit status: 0 when all three parts are done, 1 when any was not, 2 on a usage or setup error.
set -uo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$0")/.."
T0=$(date +%s)

usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1' "$SELF"; }
die() { echo "gpu_proof.sh: $*" >&2; exit 2; }

BUDGET="" SMOKE=0 RESULTS="" PACK=0 INSTALL_KIT="" TTA_METHOD=swav
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --budget) [ $# -ge 2 ] || die "--budget needs SECONDS"; BUDGET=$2; shift ;;
    --budget=*) BUDGET=${1#*=} ;;
    --results) [ $# -ge 2 ] || die "--results needs DIR"; RESULTS=$2; shift ;;
    --results=*) RESULTS=${1#*=} ;;
    --tta-method) [ $# -ge 2 ] || die "--tta-method needs swav or dino"; TTA_METHOD=$2; shift ;;
    --pack) PACK=1 ;;
    --install-kit) [ $# -ge 2 ] || die "--install-kit needs DIR"; INSTALL_KIT=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (--smoke, --budget SECONDS, --results DIR, --tta-method swav|dino, --pack; --help)" ;;
  esac
  shift
done
case "$TTA_METHOD" in swav|dino) ;; *) die "--tta-method is swav or dino, got '$TTA_METHOD'" ;; esac
PY=${SSLAB_PYTHON:-}
if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi

# ------------------------------------------------------------------ --install-kit DIR (on the GPU machine)
# What ../shared/device/install_kit.sh does, for a kit with or without Ray: site packages into /tmp/site,
# the Debian libraries ffcv links against into /tmp/sys, ffcv built from source; writes /tmp/kit_env.sh.
if [ -n "$INSTALL_KIT" ]; then
  set -e
  K=$(cd "$INSTALL_KIT" && pwd)
  S=/tmp/sys; rm -rf /tmp/site; mkdir -p $S /tmp/site /tmp/pc
  xz -dc "$K/site.tar.xz" | tar -C /tmp/site -xf -
  for f in "$K"/debs/*.deb; do dpkg -x "$f" $S; done
  L=$S/usr/lib/x86_64-linux-gnu
  M=$S/usr/include/opencv4/opencv2/opencv_modules.hpp
  grep -v "define HAVE_OPENCV_" $M > $M.new; printf "#define HAVE_OPENCV_CORE\n#define HAVE_OPENCV_IMGPROC\n" >> $M.new; mv $M.new $M
  printf "Name: opencv4\nDescription: kit\nVersion: 4.6.0\nLibs: -L$L -lopencv_imgproc -lopencv_core\nCflags: -I$S/usr/include/opencv4 -I$S/usr/include/x86_64-linux-gnu/opencv4\n" > /tmp/pc/opencv4.pc
  printf "Name: libturbojpeg\nDescription: kit\nVersion: 2.1.5\nLibs: -L$L -lturbojpeg\nCflags: -I$S/usr/include\n" > /tmp/pc/libturbojpeg.pc
  PKG_CONFIG_PATH=/tmp/pc LD_LIBRARY_PATH=$L:${LD_LIBRARY_PATH:-} \
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site "$K"/src/ffcv-*.tar.gz 2>&1 \
    | grep -iE 'error' || true
  echo "export PYTHONPATH=/tmp/site:\${PYTHONPATH:-} LD_LIBRARY_PATH=$L:\${LD_LIBRARY_PATH:-}" > /tmp/kit_env.sh
  PYTHONPATH=/tmp/site LD_LIBRARY_PATH=$L "$PY" -c "import ffcv; print('kit: ffcv ok')"
  exit 0
fi

# ------------------------------------------------------------------ --pack (here, on the CPU machine)
if [ "$PACK" = 1 ]; then
  FROM=${KIT_FROM:-.devicekit} DST=${PROOFKIT:-.proofkit}
  if [ ! -f "$FROM/site.tar.xz" ]; then
    [ -f ../shared/device/build_kit.sh ] || die "no $FROM/site.tar.xz and no ../shared/device/build_kit.sh to build it"
    KIT="$FROM" bash ../shared/device/build_kit.sh || die "../shared/device/build_kit.sh failed: see its output above"
  fi
  ARCHIVE=${SSLAB_DATA_ROOT:-../shared/data}/cifar10-jpg.tar.gz
  [ -f "$ARCHIVE" ] || die "no $ARCHIVE: set SSLAB_DATA_ROOT to the folder holding cifar10-jpg.tar.gz"
  if [[ "$DST" != /* ]]; then  # inside the checkout: ignored by git, so it travels only when carried
    X=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$X")"
    grep -qx "/${DST#./}/" "$X" 2>/dev/null || echo "/${DST#./}/" >> "$X"
  fi
  rm -rf "$DST"; mkdir -p "$DST/debs" "$DST/src" "$DST/data"
  cp "$FROM"/debs/*.deb "$DST/debs/" && cp "$FROM"/src/ffcv-*.tar.gz "$DST/src/" && cp "$ARCHIVE" "$DST/data/" || die "copying into $DST failed"
  T=$(mktemp -d)
  drop=()
  for name in bin ray mlflow sqlalchemy cryptography databricks opentelemetry optuna alembic greenlet tensorboardX \
              fastapi starlette uvicorn google git gitdb smmap mako colorlog; do
    drop+=(--exclude="./$name" --exclude="./${name}-*" --exclude="./${name}_*")
  done
  drop+=(--exclude="./*mlflow_skinny*" --exclude="./*databricks_sdk*" --exclude="./*google_auth*" --exclude="./*gitpython*"
         --exclude="./*tensorboardx*" --exclude="./*opentelemetry*")
  xz -dc "$FROM/site.tar.xz" | tar -C "$T" -xf - "${drop[@]}" || die "unpacking $FROM/site.tar.xz failed"
  tar -C "$T" -cf - . | xz -T0 -6 > "$DST/site.tar.xz"
  rm -rf "$T"
  echo "packed $DST: $(du -sh "$DST" | cut -f1) (kit without Ray/MLflow/Optuna + CIFAR-10)"
  echo "device run: command 'bash bench/gpu_proof.sh', carry [\"${DST#./}\"], timeout_s 600"
  exit 0
fi

# ------------------------------------------------------------------ the proof
if [ "$SMOKE" = 1 ]; then
  DEV=cpu; BUDGET=${BUDGET:-170}; RESERVE=6; KILL_AFTER=3
  MIN_A=10 MIN_B=10 MIN_C=10
else
  DEV=cuda; BUDGET=${BUDGET:-540}; RESERVE=10; KILL_AFTER=5
  MIN_A=60 MIN_B=90 MIN_C=45
fi
[[ "$BUDGET" =~ ^[0-9]+$ ]] && [ "$BUDGET" -ge 1 ] || die "--budget takes whole seconds >= 1, got '$BUDGET'"
DEADLINE=$((T0 + BUDGET))
RESULTS=${RESULTS:-bench/results}
mkdir -p "$RESULTS" || die "cannot create the results folder $RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
LOG=$RESULTS/gpu-proof-$DEV.log
STATE=$(mktemp -d)
trap 'rm -rf "$STATE"' EXIT
: > "$LOG"
: > "$STATE/steps.tsv"
export SSLAB_HOME=${SSLAB_HOME:-/tmp/sslab-bench} RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} PYTHONUNBUFFERED=1
echo "gpu_proof.sh: $DEV, budget ${BUDGET} s (deadline $(date -d "@$DEADLINE" +%H:%M:%S 2>/dev/null || echo "+$BUDGET s")), results in $RESULTS"

left() { echo $((DEADLINE - $(date +%s))); }
# record KIND NAME STATUS SECONDS LIMIT JSON: one line of the summary (setup steps and parts)
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$STATE/steps.tsv"; }

summarize() {  # gpu-proof-summary-<dev>.json/.md from the steps so far and the parts' JSON files
  "$PY" - "$STATE/steps.tsv" "$RESULTS" "$DEV" "$BUDGET" "$T0" "$SMOKE" "$1" <<'PYEOF'
import json, math, os, sys, time
steps_path, results, dev, budget, t0, smoke, final = sys.argv[1:8]
planned = [("a", "throughput-eager"), ("b", "throughput-compiled"), ("c", "tta")]
setup, parts = [], {}
for line in open(steps_path):
    kind, name, status, seconds, limit, js = line.rstrip("\n").split("\t")
    entry = {"name": name, "status": status, "seconds": float(seconds) if seconds else None}
    if kind == "setup":
        setup.append(entry)
        continue
    entry.update(part=kind, limit_s=float(limit) if limit else None, json=js or None)
    path = os.path.join(results, js) if js else None
    if path and os.path.isfile(path):
        data = json.load(open(path))
        if name.startswith("throughput"):
            entry["figures"] = [{k: r.get(k) for k in ("method", "crops", "ceiling_img_s", "ours_img_s", "ratio",
                                                        "lightly_img_s", "ours_vs_lightly")} for r in data["rows"]]
            entry["cases"] = f"{data['facts'].get('cases_done', len(data['rows']))} of " \
                             f"{data['facts'].get('cases_planned', len(data['rows']))}"
        else:
            f = data["facts"]
            entry["figures"] = {"method": f["method"], "target": f["target"], "best_knn_top1": f["best"],
                                "reached_at_s": f["reached_at_s"], "knn_points": len(data["curve"]),
                                "last_point": data["curve"][-1] if data["curve"] else None,
                                "stopped": f.get("stopped"), "setup_s": f.get("setup_s")}
    parts[kind] = entry
wall = round(time.time() - float(t0), 1)
summary = {"command": "bash bench/gpu_proof.sh" + (" --smoke" if smoke == "1" else ""), "device": dev,
           "smoke": smoke == "1", "budget_s": float(budget), "started": time.strftime("%Y-%m-%d %H:%M:%S",
           time.localtime(float(t0))), "finished": final == "1", "wall_s": wall,
           "deadline_met": wall <= float(budget), "setup": setup,
           "parts": [parts.get(key, {"part": key, "name": name, "status": "pending"}) for key, name in planned]}
base = os.path.join(results, f"gpu-proof-summary-{dev}")
tmp = base + ".json.tmp"
with open(tmp, "w") as out:
    json.dump(summary, out, indent=1)
os.replace(tmp, base + ".json")

def num(v, fmt="{:,.0f}"):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)

lines = [f"# GPU proof ({dev}{', smoke' if smoke == '1' else ''}): {summary['started']}, budget {float(budget):.0f} s, "
         f"wall {wall:.0f} s{'' if final == '1' else ' (still running)'}", "",
         "| step | status | seconds |", "|---|---|---|"]
lines += [f"| setup: {s['name']} | {s['status']} | {num(s['seconds'], '{:.0f}')} |" for s in setup]
lines += [f"| {p['part']}: {p['name']} | {p['status']} | {num(p.get('seconds'), '{:.0f}')} |" for p in summary["parts"]]
for p in summary["parts"]:
    figs = p.get("figures")
    if not figs:
        continue
    lines += ["", f"## {p['part']}: {p['name']} ({p['json']})", ""]
    if isinstance(figs, list):
        lines += ["| method | crops | ceiling img/s | ours img/s | ours / ceiling | lightly img/s | ours / lightly |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['crops']} | {num(r['ceiling_img_s'])} | {num(r['ours_img_s'])} | "
                  f"{num(r['ratio'], '{:.1%}')} | {num(r['lightly_img_s'])} | {num(r['ours_vs_lightly'], '{:.1f}x')} |"
                  for r in figs]
    else:
        lines.append(f"{figs['method']}: best kNN top-1 {num(figs['best_knn_top1'], '{:.1%}')} over "
                     f"{figs['knn_points']} points (target {figs['target']:.1%}, reached at "
                     f"{num(figs['reached_at_s'], '{:.0f} s')}); stopped: {figs['stopped']}")
with open(base + ".md.tmp", "w") as out:
    out.write("\n".join(lines) + "\n")
os.replace(base + ".md.tmp", base + ".md")
PYEOF
  if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    cp "$RESULTS/gpu-proof-summary-$DEV.json" "$RESULTS/gpu-proof-summary-$DEV.md" "$LOG" "$OUT"/ 2>/dev/null || true
  fi
}

# run_step NAME LIMIT CMD...: CMD under `timeout` (SIGTERM at LIMIT s, SIGKILL KILL_AFTER s later), its output
# in the log and, without warnings, on stdout; sets RC and SECS
run_step() {
  local name=$1 limit=$2; shift 2
  local started; started=$(date +%s)
  echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
  timeout -k "$KILL_AFTER" "$limit" "$@" > "$STATE/step.log" 2>&1
  RC=$?
  SECS=$(($(date +%s) - started))
  cat "$STATE/step.log" >> "$LOG"
  grep -v -i -E "warn|Unable to join threads|^\s*$" "$STATE/step.log" | tail -n 25
  echo "--- $name: exit $RC after ${SECS} s" | tee -a "$LOG"
}
timed_out() { [ "$1" -eq 124 ] || [ "$1" -eq 137 ]; }

# ---- setup 1: the kit (only when ffcv is missing, i.e. on the bare GPU machine)
ok_ffcv() { "$PY" -c "import ffcv" >/dev/null 2>&1; }
kit_status="present"
if [ "$SMOKE" = 0 ] && ! ok_ffcv; then
  if [ -f /tmp/kit_env.sh ] && source /tmp/kit_env.sh && ok_ffcv; then
    kit_status="present (installed earlier on this machine)"
  else
    KITDIR=""
    for k in .proofkit .devicekit; do [ -f "$k/site.tar.xz" ] && { KITDIR=$k; break; }; done
    [ -n "$KITDIR" ] || { record setup kit "failed (no .proofkit/ or .devicekit/: run 'bash bench/gpu_proof.sh --pack' here and carry .proofkit)" "" "" ""; summarize 1; die "ffcv is missing and no kit was carried: run 'bash bench/gpu_proof.sh --pack' on the CPU machine, then carry [\".proofkit\"]"; }
    run_step "install $KITDIR" $(( $(left) - RESERVE )) bash "$SELF" --install-kit "$KITDIR"
    if [ "$RC" -eq 0 ] && source /tmp/kit_env.sh && ok_ffcv; then
      kit_status="installed from $KITDIR in ${SECS} s"
    else
      record setup kit "failed (exit $RC installing $KITDIR; see gpu-proof-$DEV.log)" "$SECS" "" ""; summarize 1
      die "installing the kit from $KITDIR failed (exit $RC): see $LOG"
    fi
  fi
fi
record setup kit "$kit_status" "${SECS:-0}" "" ""
if [ "$SMOKE" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  record setup cuda "failed (no CUDA device: use --smoke on a CPU)" "" "" ""; summarize 1
  die "no CUDA device here: the proof measures a GPU (on a CPU: bash bench/gpu_proof.sh --smoke)"
fi

# ---- setup 2: data
if [ -z "${SSLAB_DATA_ROOT:-}" ]; then
  for d in .proofkit/data .benchdata; do
    [ -f "$d/cifar10-jpg.tar.gz" ] && { export SSLAB_DATA_ROOT=$PWD/$d; break; }
  done
fi
SECS=0
run_step "prepare CIFAR-10" $(( $(left) - RESERVE )) "$PY" -m sslab data prepare --dataset cifar10 --quiet
if [ "$RC" -ne 0 ]; then
  why="exit $RC"; timed_out "$RC" && why="timed out"
  record setup data "failed ($why; data root ${SSLAB_DATA_ROOT:-../shared/data}: carry .proofkit, which holds CIFAR-10)" "$SECS" "" ""
  for part in "a throughput-eager" "b throughput-compiled" "c tta-$TTA_METHOD"; do
    record ${part% *} ${part#* } "skipped (no data: CIFAR-10 could not be prepared)" "" "" ""
  done
  summarize 1
  die "CIFAR-10 could not be prepared ($why): see $LOG"
fi
record setup data "prepared from ${SSLAB_DATA_ROOT:-the default data root} in ${SECS} s" "$SECS" "" ""

# ---- setup 3: lightly 1.6.0 (a benchmark baseline, not a project dependency)
LIGHTLY_FLAG=()
lightly_version=$("$PY" -c "import lightly; print(lightly.__version__)" 2>/dev/null | tail -n 1)
if [ "$lightly_version" = "1.6.0" ]; then
  LIGHTLY_FLAG=(--lightly); record setup lightly "lightly 1.6.0 (measured in part a)" "" "" ""
elif [ -n "$lightly_version" ]; then
  record setup lightly "skipped (lightly $lightly_version installed, not 1.6.0)" "" "" ""
else
  record setup lightly "skipped (lightly not installed)" "" "" ""
fi
summarize 0

# ---- the parts, in priority order
CASES=swav:2x32+4x16,dino:2x32+6x16,supcon:2x32
if [ "$SMOKE" = 1 ]; then
  SIZES=(--batch 8 --window 1 --windows 2 --backbone resnet_mini --loader-workers 1
         --set knn.max_train=64 --set knn.max_test=32 --set knn.batch_size=64)
  # dynamo traces the backbones (no C++ kernels on 2 CPU cores); the compiled augmentation is left out here
  # (tests/test_augment.py covers it) to keep the smoke under 3 minutes on a shared 2-core machine
  COMPILE=(--compile --compile-backend eager --set data.compile_augment=false)
  TTA_SIZES=(--set model.backbone=resnet_mini --set data.batch_size=32 --set data.train_subset=256
             --set knn.max_train=256 --set knn.max_test=128 --set knn.batch_size=128 --knn-every 1 --budget-s 1)
else
  SIZES=() COMPILE=(--compile) TTA_SIZES=()
fi

part() {  # part KEY NAME MIN_SECONDS JSON CMD...
  local key=$1 name=$2 min=$3 js=$4; shift 4
  local limit=$(( $(left) - RESERVE ))
  if [ "$limit" -lt "$min" ]; then
    echo "=== $key: $name skipped: ${limit} s left before the reserve, it needs at least ${min} s" | tee -a "$LOG"
    record "$key" "$name" "skipped (no time left)" "" "$limit" ""
    summarize 0
    return
  fi
  rm -f "$RESULTS/$js"
  if [ "$name" = "tta-$TTA_METHOD" ]; then set -- "$@" --deadline-at $(( $(date +%s) + limit - 3 )); fi
  run_step "$key: $name" "$limit" "$@"
  local status
  if timed_out "$RC"; then
    status="timed out after ${limit} s"
    [ -f "$RESULTS/$js" ] && status+=" (partial JSON kept)"
  elif [ "$RC" -ne 0 ]; then
    status="failed (exit $RC; see gpu-proof-$DEV.log)"
  elif [ ! -f "$RESULTS/$js" ]; then
    status="failed (no JSON written)"
  else
    status="done"; DONE=$((DONE + 1))
  fi
  [ -f "$RESULTS/$js" ] || js=""
  record "$key" "$name" "$status" "$SECS" "$limit" "$js"
  if [ -n "$js" ] && [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then cp "$RESULTS/$js" "$OUT"/ 2>/dev/null || true; fi
  summarize 0
}

DONE=0
part a throughput-eager "$MIN_A" "throughput-$DEV-proof.json" \
  "$PY" bench/throughput.py --device "$DEV" --cases "$CASES" "${LIGHTLY_FLAG[@]}" "${SIZES[@]}" \
  --out "$RESULTS/throughput-$DEV-proof.json"
part b throughput-compiled "$MIN_B" "throughput-$DEV-compiled-proof.json" \
  "$PY" bench/throughput.py --device "$DEV" --cases "$CASES" "${COMPILE[@]}" "${SIZES[@]}" \
  --out "$RESULTS/throughput-$DEV-compiled-proof.json"
part c "tta-$TTA_METHOD" "$MIN_C" "tta-$TTA_METHOD-$DEV-proof.json" \
  "$PY" bench/time_to_accuracy.py --method "$TTA_METHOD" --device "$DEV" "${TTA_SIZES[@]}" \
  --out "$RESULTS/tta-$TTA_METHOD-$DEV-proof.json"

summarize 1
echo
cat "$RESULTS/gpu-proof-summary-$DEV.md"
echo "wall $(( $(date +%s) - T0 )) s of a ${BUDGET} s budget; summary: $RESULTS/gpu-proof-summary-$DEV.json"
[ "$DONE" -eq 3 ]

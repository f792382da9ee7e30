#!/usr/bin/env bash
# Evaluation images/s on a GPU vs the same machine's CPU cores (issue 30), in one run of under 8 minutes.
#
#   bash scripts/gpu_check.sh [--device cuda|cpu] [--images N] [--cpu-images N] [--sam vit_h|micro]
#                             [--out DIR] [--wheels DIR] [--override KEY=VALUE ...]
#
# It runs evaluation's Ray-free core (alignsam_ray/eval_shard.py through scripts/eval_core_bench.py):
# the paper's protocol (every method, the T sweep, T = 15) with a random-weights policy and SRM, on a
# ViT-H-sized store in the official format (SAM's prompt encoder + mask decoder, random weights; random
# fp16 256x64x64 embeddings; made here, no download), first --images N images on the GPU (batch from its
# free memory), then --cpu-images N on the CPU (all cores); the per-image metrics of those N images are
# compared between the two runs. Writes DIR/gpu_check.json and prints a table.
# Needs python3 with torch, numpy, pyarrow; missing small packages (segment-anything, pysodmetrics and
# its cv2/scikit-image/scikit-learn, scipy, pyyaml, pillow) are pip-installed, from --wheels DIR (no
# index) when given. No Ray, no project install (PYTHONPATH=the repository).
# --device cpu: the same steps with both runs on the CPU (a dry run that checks the script; tiny sizes).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda IMAGES="" CPU_IMAGES="" SAM=vit_h OUT=gpu_check_out WHEELS="" OVERRIDE=()
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --images) IMAGES=$2; shift 2 ;;
        --cpu-images) CPU_IMAGES=$2; shift 2 ;;
        --sam) SAM=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --wheels) WHEELS=$2; shift 2 ;;
        --override) shift; while [ $# -gt 0 ] && [[ "$1" != --* ]]; do OVERRIDE+=("$1"); shift; done ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ "$DEVICE" = cpu ]; then IMAGES=${IMAGES:-2}; CPU_IMAGES=${CPU_IMAGES:-2}; else IMAGES=${IMAGES:-256}; CPU_IMAGES=${CPU_IMAGES:-8}; fi
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
T0=$(date +%s)

# small wheels only, each when its module is missing
MISSING=()
for pair in segment_anything:segment-anything==1.0 py_sod_metrics:pysodmetrics scipy:scipy yaml:pyyaml PIL:pillow \
            pyarrow:pyarrow; do
    "$PY" -c "import ${pair%%:*}" 2>/dev/null || MISSING+=("${pair#*:}")
done
if [ ${#MISSING[@]} -gt 0 ]; then
    echo "[gpu_check] installing ${MISSING[*]}"
    if [ -n "$WHEELS" ]; then "$PY" -m pip install -q --no-index --find-links "$WHEELS" "${MISSING[@]}"
    else "$PY" -m pip install -q "${MISSING[@]}"; fi
fi
"$PY" -c "import torch; print('[gpu_check] torch', torch.__version__, '| cuda:', torch.cuda.is_available(), '| cpu threads:', torch.get_num_threads())"
if [ "$DEVICE" = cuda ]; then "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: torch sees no CUDA GPU (use --device cpu for a dry run)')"; fi

STORE="$OUT/store_${SAM}_$IMAGES"
"$PY" scripts/eval_core_bench.py make-store --out "$STORE" --images "$IMAGES" --sam "$SAM" --shard-size 16
OV=(); [ ${#OVERRIDE[@]} -gt 0 ] && OV=(--override "${OVERRIDE[@]}")
echo "[gpu_check] $IMAGES images on $DEVICE"
"$PY" scripts/eval_core_bench.py run --store "$STORE" --device "$DEVICE" --out "$OUT/device.json" --records "$OUT/device.pkl" "${OV[@]}"
echo "[gpu_check] $CPU_IMAGES images on the CPU (all cores)"
"$PY" scripts/eval_core_bench.py run --store "$STORE" --device cpu --stop "$CPU_IMAGES" --out "$OUT/cpu.json" --records "$OUT/cpu.pkl" "${OV[@]}"

"$PY" - "$OUT" "$SAM" "$(( $(date +%s) - T0 ))" <<'EOF'
import json, os, pickle, sys
out, sam, wall = sys.argv[1], sys.argv[2], int(sys.argv[3])
dev, cpu = (json.load(open(os.path.join(out, f))) for f in ("device.json", "cpu.json"))
ratio = dev["images_per_s"] / cpu["images_per_s"]
# the same images on both: per-image metrics of the device run vs the CPU's (the reference)
rd, rc = (pickle.load(open(os.path.join(out, f), "rb")) for f in ("device.pkl", "cpu.pkl"))
n = len(rc["ids"])
diffs = [abs(a[k] - b[k]) for row in rc["rows"] for a, b in zip(rd["rows"][row][:n], rc["rows"][row])
         for k in ("iou", "fbeta", "emeasure", "mae")]
same = sum(d == 0 for d in diffs) / len(diffs)
agree = {"images": n, "values": len(diffs), "identical_fraction": same, "max_abs_diff": max(diffs)}
print(f"\n## evaluation images/s, {sam} store, the paper's protocol (random weights)")
print(f"{'where':>10} | {'images':>7} | {'batch':>5} | {'seconds':>8} | {'images/s':>9} | {'peak RSS MB':>11}")
for name, r in (("device", dev), ("cpu", cpu)):
    print(f"{r['device']:>10} | {r['images']:>7} | {r['batch']:>5} | {r['seconds']:>8.1f} | {r['images_per_s']:>9.3f} | "
          f"{r['peak_rss_mb']:>11.0f}")
print(f"{dev['device']} / cpu ({cpu['threads']} threads): {ratio:.1f}x (goal >= 20x on a GPU); whole check {wall} s"
      + (f"; GPU: {dev['gpu']}" if dev.get("gpu") else ""))
print(f"the first {n} images on both: {same:.1%} of {len(diffs)} per-image metric values identical, "
      f"max |difference| {agree['max_abs_diff']:.2e}")
json.dump({"sam": sam, "device": dev, "cpu": cpu, "ratio": ratio, "agreement": agree, "wall_s": wall},
          open(os.path.join(out, "gpu_check.json"), "w"), indent=2)
print(f"wrote {os.path.join(out, 'gpu_check.json')}")
EOF

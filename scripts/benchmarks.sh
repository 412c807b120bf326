#!/usr/bin/env bash
# The README's figures, end to end, on the reference data ($VEIL_DATA, default ../shared/data).
# Long: about an hour and a half on two CPU cores. Each step writes under runs/ and can be run
# alone. One torch thread per process: faster on a shared 2-core machine (see scripts/test.sh).
set -euo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cd "$(dirname "$0")/.."
DATA="${VEIL_DATA:-$(cd .. && pwd)/shared/data}"
VEIL=.venv/bin/veil
FB=(--model faceboxes --weights "$DATA/faceboxes/FaceBoxesProd.pth" --geometry 1024x1024)

# 1. Noise profiles for FaceBoxes: the default alphas, on 200 WIDER FACE images, no labels.
$VEIL calibrate "${FB[@]}" --images "$DATA/widerface/WIDER_val/images" --max-images 200 \
    --out runs/bank-faceboxes
# 2. FDDB accuracy, clean and every alpha, in one pass (2 noise draws per noisy run).
$VEIL eval fddb "${FB[@]}" --dataset "$DATA/fddb" --bank runs/bank-faceboxes --all-alphas \
    --draws 2 --json runs/fddb-faceboxes.json
# 3. Privacy: attacks trained on WIDER FACE images, scored on held-out FDDB faces.
$VEIL privacy "${FB[@]}" --bank runs/bank-faceboxes \
    --train-images "$DATA/widerface/WIDER_val/images" --eval-fddb "$DATA/fddb" \
    --max-train 200 --max-eval-per-fold 4 --epochs 12 --rmle-images 2 --rmle-steps 150 \
    --accuracy runs/fddb-faceboxes.json --out runs/privacy-faceboxes
# 4. Trusted-zone cost and pipeline throughput on the 1080p clip.
# (RetinaFace's table: calibrate with --model retinaface --geometry 640x640 --max-images 100
#  --epochs 4 --out runs/bank-retinaface, then step 2 with those flags and --draws 1.)
$VEIL bench --json runs/bench-faceboxes.json

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

# 1. Noise profiles for FaceBoxes (split after its Inception blocks), each with its own tuned
#    tail: the default alphas, on 300 WIDER FACE images, no labels (about 14 minutes).
$VEIL calibrate "${FB[@]}" --images "$DATA/widerface/WIDER_val/images" --max-images 300 \
    --epochs 8 --task-weight 5 --initial-sigma 1.0 --out runs/bank-faceboxes
# 2. FDDB accuracy, clean and every alpha (each with its tail), in one pass.
$VEIL eval fddb "${FB[@]}" --dataset "$DATA/fddb" --bank runs/bank-faceboxes --all-alphas \
    --draws 1 --json runs/fddb-faceboxes.json
# 3. Privacy: decoder, white-box rMLE (20 images) and feature-linkage attacks trained on WIDER
#    FACE images, scored by identity on held-out FDDB faces (gallery with distractors).
$VEIL privacy "${FB[@]}" --bank runs/bank-faceboxes --max-train 200 --max-eval-per-fold 4 \
    --distractors-per-fold 6 --epochs 8 --image-size 256 --rmle-images 20 --rmle-steps 60 \
    --deployed-alpha 0.9 --out runs/privacy-faceboxes
$VEIL privacy "${FB[@]}" --bank runs/bank-faceboxes --accuracy runs/fddb-faceboxes.json \
    --attach-accuracy-only --out runs/privacy-faceboxes
# 3b. RetinaFace (the default detector, split after MobileNet stage 2): the default alphas with
#     tuned tails on 600 images (about 45 minutes on one core), FDDB clean and every alpha, the
#     whole original network (retinaface-stage1, clean) for reference, then the same report on
#     8 victim images per fold (reconstructions at 320x320).
RF=(--model retinaface --geometry 640x640)
$VEIL calibrate "${RF[@]}" --images "$DATA/widerface/WIDER_val/images" --max-images 600 \
    --epochs 8 --task-weight 5 --initial-sigma 1.0 --out runs/bank-retinaface
$VEIL eval fddb "${RF[@]}" --dataset "$DATA/fddb" --bank runs/bank-retinaface --all-alphas \
    --draws 1 --json runs/fddb-retinaface.json
$VEIL eval fddb --model retinaface-stage1 --geometry 640x640 --dataset "$DATA/fddb" \
    --json runs/fddb-retinaface-original.json
$VEIL privacy "${RF[@]}" --bank runs/bank-retinaface --max-train 200 --max-eval-per-fold 8 \
    --distractors-per-fold 6 --epochs 8 --image-size 320 --rmle-images 20 --rmle-steps 60 \
    --deployed-alpha 0.8 --out runs/privacy-retinaface
$VEIL privacy "${RF[@]}" --bank runs/bank-retinaface --accuracy runs/fddb-retinaface.json \
    --attach-accuracy-only --out runs/privacy-retinaface
# 3c. FDDB AP through the int8 payload against float16, the same noise (about 12 minutes).
.venv/bin/python scripts/wire_ap.py --bank runs/bank-retinaface --alphas 0.8 0.9 \
    --json runs/wire-ap-retinaface.json
# 4. Trusted-zone cost and pipeline throughput on the 1080p clip.
$VEIL bench --json runs/bench-faceboxes.json

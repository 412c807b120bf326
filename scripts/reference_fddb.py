"""FDDB mean AP of the ORIGINAL FaceBoxes.PyTorch formulation, at veil's scaling.

Runs ``tests/reference/faceboxes_original.py`` (a faithful port of the upstream network and its
``test.py`` pipeline: cv2 resize by a factor, priors for the resized image, decode, NMS 0.3)
with each image resized by the same factor veil's letterbox uses for 1024x1024, and scores it
with the same evaluator. Compare with the clean row of ``veil eval fddb``.

    .venv/bin/python scripts/reference_fddb.py [--max-images-per-fold N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.reference.faceboxes_original import detect_original, load_original
from veil.data import data_root
from veil.detections import Detections
from veil.detectors.base import Frame, InputGeometry, letterbox_scale
from veil.eval.fddb import evaluate_fddb, load_fddb


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--geometry", default="1024x1024")
    parser.add_argument("--max-images-per-fold", type=int)
    parser.add_argument("--json")
    args = parser.parse_args()
    root = data_root()
    assert root is not None
    net = load_original(root / "faceboxes" / "FaceBoxesProd.pth")
    geometry = InputGeometry.parse(args.geometry)

    @torch.no_grad()
    def detect(frames: list[Frame]) -> list[Detections]:
        out = []
        for frame in frames:
            h, w = frame.shape[:2]
            dets = detect_original(net, frame, letterbox_scale(w, h, geometry))
            out.append(Detections(dets[:, :4], dets[:, 4]) if len(dets) else Detections.empty())
        return out

    dataset = load_fddb(root / "fddb", max_images_per_fold=args.max_images_per_fold)
    print(f"original FaceBoxes.PyTorch formulation, resized as veil letterboxes into {geometry}")
    result = evaluate_fddb(detect, dataset, batch_size=8)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return 0 if np.isfinite(result.mean_ap) else 1


if __name__ == "__main__":
    sys.exit(main())

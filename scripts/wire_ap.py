"""FDDB AP lost to the wire's payload encoding: float16 against int8, the same noise draws.

Clean, then each alpha through a float16 and an int8 wire, in one pass over FDDB (one head per
batch; the noise is seeded, so both wires see the same noisy activations)::

    python scripts/wire_ap.py --bank runs/bank-retinaface-ref --alphas 0.8 0.9
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from veil.data import data_root
from veil.detectors import load_detector
from veil.detectors.base import InputGeometry
from veil.eval.fddb import evaluate_fddb_many, load_fddb
from veil.inference import HeadCache, make_detect_fn
from veil.profiles import ProfileBank


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="retinaface")
    p.add_argument("--geometry", default="640x640")
    p.add_argument("--bank", required=True)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.8])
    p.add_argument("--max-images-per-fold", type=int, default=None)
    p.add_argument("--json", default="runs/wire-ap.json")
    args = p.parse_args()
    detector = load_detector(args.model)
    geometry = InputGeometry.parse(args.geometry)
    bank = ProfileBank(Path(args.bank))
    cache = HeadCache()
    runs: dict[str, Any] = {"clean": (make_detect_fn(detector, geometry, head_cache=cache), 1)}
    for alpha in args.alphas:
        profile = bank.get(alpha, detector.name, detector.weights_id, geometry)
        for wire in ("float16", "int8"):
            detect = make_detect_fn(detector, geometry, profile, seed=7, head_cache=cache,
                                    wire=wire)  # fmt: skip
            runs[f"alpha {alpha:.2f} {wire}"] = (detect, 1)
    root = data_root()
    assert root is not None
    dataset = load_fddb(root / "fddb", max_images_per_fold=args.max_images_per_fold)
    results = {k: v.to_json()["mean_ap"] for k, v in evaluate_fddb_many(runs, dataset).items()}
    for alpha in args.alphas:
        f16, i8 = (results[f"alpha {alpha:.2f} {w}"] for w in ("float16", "int8"))
        results[f"alpha {alpha:.2f} int8 loss"] = f16 - i8
        print(f"alpha {alpha:.2f}: float16 {f16:.4f}, int8 {i8:.4f}, lost {f16 - i8:+.4f} "
              "(goal <= 0.005)")  # fmt: skip
    print(f"clean {results['clean']:.4f}; {len(dataset.images)} images")
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

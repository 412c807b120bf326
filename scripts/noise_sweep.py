"""Sweep calibration settings: accuracy kept on an FDDB subset and the leakage bound, per alpha.

Heads are run once and cached under runs/sweep-cache/ (calibration images and FDDB images),
so each setting costs only tail training and tail evaluation. Prints one line per (setting,
alpha) and appends it as JSON to runs/sweep.jsonl. Example::

    python scripts/noise_sweep.py --model faceboxes --tune-tail 1 --leakage channel \
        --alphas 0.8 0.9 0.95 --task-weight 30 --initial-sigma 1.0
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from veil.calibrate import (
    CalibrationConfig,
    CalibrationSet,
    channel_leakage,
    list_images,
    prepare,
    train_profile,
)
from veil.data import data_root, reference_weights
from veil.detections import Detections
from veil.detectors import load_detector
from veil.detectors.base import InputGeometry, Letterbox, SplitDetector
from veil.eval import read_image
from veil.eval.fddb import load_fddb
from veil.eval.metrics import average_precision
from veil.profiles import NoiseProfile, ProfileBank, ProfileMeta, profile_from_layer

CACHE = Path("runs/sweep-cache")


def calibration_set(
    detector: SplitDetector, geometry: InputGeometry, images: int, whole_teacher: bool
) -> CalibrationSet:
    """The calibration images' head outputs (with ``whole_teacher``, the whole network's too,
    as `veil calibrate` distils from it)."""
    ref = "-ref" if whole_teacher else ""
    path = CACHE / f"calib-{detector.name}-{geometry}-{images}{ref}.pt"
    if path.is_file():
        data: CalibrationSet = torch.load(path, weights_only=False)
        return data
    root = data_root()
    assert root is not None  # data_root raises when the data is absent
    folder = root / "widerface" / "WIDER_val" / "images"
    reference = detector.reference() if whole_teacher else None
    data = prepare(
        detector, list_images(folder, images), geometry, teacher=False, reference=reference
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return data


def fddb_set(
    detector: SplitDetector, geometry: InputGeometry, per_fold: int
) -> tuple[torch.Tensor, list[Letterbox], list[npt.NDArray[np.float64]]]:
    path = CACHE / f"fddb-{detector.name}-{geometry}-{per_fold}.pt"
    if path.is_file():
        cached: tuple[torch.Tensor, list[Letterbox], list[npt.NDArray[np.float64]]] = torch.load(
            path, weights_only=False
        )
        return cached
    root = data_root()
    assert root is not None  # data_root raises when the data is absent
    images = [im for fold in load_fddb(root, range(1, 11), per_fold).folds for im in fold.images]
    acts: list[torch.Tensor] = []
    lbs: list[Letterbox] = []
    with torch.no_grad():
        for start in range(0, len(images), 8):
            chunk = images[start : start + 8]
            x, boxes = detector.preprocess([read_image(im.path) for im in chunk], geometry)
            acts.append(detector.head(x))
            lbs += boxes
    result = (torch.cat(acts), lbs, [im.boxes for im in images])
    torch.save(result, path)
    return result


@torch.no_grad()
def fddb_ap(
    detector: SplitDetector,
    geometry: InputGeometry,
    fddb: tuple[torch.Tensor, list[Letterbox], list[npt.NDArray[np.float64]]],
    profile: NoiseProfile | None,
    seed: int = 1,
) -> float:
    acts, lbs, gts = fddb
    tail = detector if profile is None else profile.detector_for(detector)
    layer = None if profile is None else profile.layer()
    gen = torch.Generator().manual_seed(seed)
    dets: list[Detections] = []
    for start in range(0, acts.shape[0], 16):
        a = acts[start : start + 16]
        if layer is not None:
            a = layer(a, gen)
        raw = tail.tail(a)
        dets += detector.decode(raw, lbs[start : start + 16], geometry.height, geometry.width)
    return average_precision(dets, gts)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="faceboxes")
    p.add_argument("--geometry", default="1024x1024")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--fddb-per-fold", type=int, default=20)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--task-weight", type=float, default=30.0)
    p.add_argument("--initial-sigma", type=float, default=0.25)
    p.add_argument("--sigma-max", type=float, default=10.0)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--tail-lr", type=float, default=1e-4)
    p.add_argument("--tune-tail", type=int, default=1)
    p.add_argument("--leakage", default="channel")
    p.add_argument("--whole-teacher", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="")
    p.add_argument("--save-bank", default="")
    return p.parse_args()


def config_of(args: argparse.Namespace, geometry: InputGeometry) -> CalibrationConfig:
    return CalibrationConfig(
        alphas=tuple(args.alphas),
        geometry=geometry,
        epochs=args.epochs,
        task_weight=args.task_weight,
        initial_sigma_ratio=args.initial_sigma,
        sigma_max_ratio=args.sigma_max,
        lr=args.lr,
        tail_lr=args.tail_lr,
        tune_tail=bool(args.tune_tail),
        leakage=args.leakage,
        reference_teacher=bool(args.whole_teacher),
        seed=args.seed,
    )


@dataclass
class Sweep:
    """One setting's run: the detector, its data and the APs every alpha is scored against."""

    args: argparse.Namespace
    detector: SplitDetector
    geometry: InputGeometry
    data: CalibrationSet
    fddb: tuple[torch.Tensor, list[Letterbox], list[npt.NDArray[np.float64]]]
    whole: SplitDetector | None
    clean: float  # the split's clean AP on the FDDB subset
    original: float  # the whole network's

    def row(self, alpha: float) -> dict[str, object]:
        """Train ``alpha``'s profile and score it (AP with its tail and the frozen one)."""
        args, data, detector = self.args, self.data, self.detector
        std = float(data.activations.std())
        meta = ProfileMeta(
            detector.name,
            detector.weights_id,
            str(self.geometry),
            tuple(data.activations.shape[1:]),  # type: ignore[arg-type]
            alpha,
            0.0,
            args.sigma_max * std,
            training={"initial_sigma": args.initial_sigma * std},
        )
        t0 = time.perf_counter()
        reference = self.whole if args.whole_teacher else None
        config = config_of(args, self.geometry)
        profile = train_profile(
            detector, data, alpha, config, meta, progress=False, reference=reference
        )
        seconds = time.perf_counter() - t0
        ap = fddb_ap(detector, self.geometry, self.fddb, profile)
        frozen_ap = fddb_ap(detector, self.geometry, self.fddb, replace(profile, tail=None))
        sigma = profile.sigma()
        var = data.activations.float().var(dim=(0, 2, 3))
        if args.save_bank:
            ProfileBank(args.save_bank).save(
                profile_from_layer(profile.layer(), profile.meta, profile.tail)
            )
        return {
            "tag": args.tag,
            "model": args.model,
            "alpha": alpha,
            "ap": round(ap, 4),
            "kept": round(ap / self.clean, 4),
            "kept_whole": round(ap / self.original, 4),
            "frozen_tail_kept": round(frozen_ap / self.clean, 4),
            "sigma_ratio": round(float(sigma.mean()) / std, 3),
            "leak_nats": round(float(channel_leakage(sigma, var)), 4),
            "seconds": round(seconds, 1),
            "config": vars(args),
        }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    detector = load_detector(args.model, reference_weights(args.model))
    geometry = InputGeometry.parse(args.geometry)
    fddb = fddb_set(detector, geometry, args.fddb_per_fold)
    clean = fddb_ap(detector, geometry, fddb, None)
    whole = detector.reference()
    original = (
        clean
        if whole is None
        else fddb_ap(whole, geometry, fddb_set(whole, geometry, args.fddb_per_fold), None)
    )
    data = calibration_set(detector, geometry, args.images, bool(args.whole_teacher))
    sweep = Sweep(args, detector, geometry, data, fddb, whole, clean, original)
    print(
        f"{args.model} clean AP {clean:.4f} (whole network {original:.4f}) on "
        f"{fddb[0].shape[0]} FDDB images",
        flush=True,
    )
    for alpha in args.alphas:
        row = sweep.row(alpha)
        print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
        with open("runs/sweep.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

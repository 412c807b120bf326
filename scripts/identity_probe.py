"""Quick identity probe for calibration sweeps: the adaptive decoder against each profile.

Not the privacy report (``veil privacy`` runs every attack with intervals and floors): this
trains only the inversion decoder per setting and scores rank-1 re-identification of FDDB
faces with dlib, to compare calibration settings cheaply. Example::

    python scripts/identity_probe.py --model faceboxes --bank runs/sweep-bank --epochs 8
    python scripts/identity_probe.py --model retinaface-stage1 --geometry 640x640 --image-size 320

Without ``--bank`` only the clean activation is attacked (comparing split points).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import torch

from veil.calibrate import list_images
from veil.data import data_root, reference_weights
from veil.detectors import load_detector
from veil.detectors.base import Frame, InputGeometry, SplitDetector
from veil.eval import read_image
from veil.eval.fddb import FddbImage, load_fddb
from veil.privacy.attacks import (
    AttackSet,
    NoiseModel,
    prepare_attack_set,
    rmle_attack,
    train_decoder,
)
from veil.privacy.identity import FaceRecognizer, identification
from veil.profiles import ProfileBank


def _arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="faceboxes")
    p.add_argument("--geometry", default="1024x1024")
    p.add_argument("--bank", help="profile bank to attack (default: the clean activation only)")
    p.add_argument("--train-images", type=int, default=200)
    p.add_argument("--eval-per-fold", type=int, default=6)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--clean", type=int, default=1)
    p.add_argument("--attack", default="decoder", choices=["decoder", "rmle"])
    p.add_argument("--rmle-steps", type=int, default=100)
    return p.parse_args()


def _reconstruct(
    args: argparse.Namespace,
    detector: SplitDetector,
    geometry: InputGeometry,
    train: AttackSet,
    evals: AttackSet,
    noise: NoiseModel,
) -> tuple[torch.Tensor, float]:
    """The attack's reconstructions of the eval images under ``noise``, and its seconds."""
    observed = noise.observe(evals.activations, torch.Generator().manual_seed(1))
    if args.attack == "decoder":
        decoder = train_decoder(train, noise, epochs=args.epochs, progress=False)
        return decoder.reconstruct(observed), decoder.seconds
    result = rmle_attack(
        detector,
        observed,
        noise,
        geometry,
        evals.target_size,
        float(train.activations.std()),
        steps=args.rmle_steps,
        progress=False,
    )
    return result.images, result.seconds


def _probes(
    recon: torch.Tensor,
    originals: list[Frame],
    fddb: list[FddbImage],
    evals: AttackSet,
    recogniser: FaceRecognizer,
) -> npt.NDArray[np.float32]:
    """dlib embeddings of the faces in the reconstructions, upscaled to their frames."""
    probes = []
    for i, (frame, im) in enumerate(zip(originals, fddb, strict=True)):
        w, h = evals.content[i]
        small = (recon[i, :, :h, :w].permute(1, 2, 0).numpy() * 255).round()
        pic = cv2.resize(
            small.astype(np.uint8), (frame.shape[1], frame.shape[0]), interpolation=cv2.INTER_CUBIC
        )
        probes.append(recogniser.embed(np.asarray(pic, np.uint8), im.boxes.astype(np.float32)))
    return np.concatenate(probes)


def main() -> None:
    args = _arguments()
    torch.set_num_threads(1)
    root = data_root()
    assert root is not None  # data_root raises when the data is absent
    detector = load_detector(args.model, reference_weights(args.model))
    geometry = InputGeometry.parse(args.geometry)
    wider = list_images(root / "widerface" / "WIDER_val" / "images")
    train_paths = wider[::-1][: args.train_images]  # from the end: calibration takes the start
    train = prepare_attack_set(detector, train_paths, geometry, args.image_size, progress=False)
    fddb = [
        im for fold in load_fddb(root, range(1, 11), args.eval_per_fold).folds for im in fold.images
    ]
    evals = prepare_attack_set(
        detector, [im.path for im in fddb], geometry, args.image_size, progress=False
    )
    recogniser = FaceRecognizer.load()
    originals = [read_image(im.path) for im in fddb]
    gallery = np.concatenate(
        [
            recogniser.embed(f, im.boxes.astype(np.float32))
            for f, im in zip(originals, fddb, strict=True)
        ]
    )
    shape = tuple(int(v) for v in train.activations.shape[1:])
    settings = [(NoiseModel.clean(shape), "clean")] if args.clean else []  # type: ignore[arg-type]
    settings += [
        (NoiseModel.from_profile(pr), f"alpha {pr.alpha:.2f} {pr.profile_id[:8]}")
        for pr in (ProfileBank(args.bank).profiles() if args.bank else [])
    ]
    for noise, label in settings:
        recon, seconds = _reconstruct(args, detector, geometry, train, evals, noise)
        probes = _probes(recon, originals, fddb, evals, recogniser)
        scores = identification(probes, gallery, list(range(len(gallery))))
        row = {
            "bank": args.bank,
            "setting": label,
            "rank1": str(scores.rank1),
            "same_person": str(scores.same_person),
            "false_match": str(scores.false_match),
            "chance": round(scores.chance, 4),
            "attack": args.attack,
            "model": args.model,
            "seconds": round(seconds, 1),
        }
        print(json.dumps(row), flush=True)
        with Path("runs/identity_probe.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

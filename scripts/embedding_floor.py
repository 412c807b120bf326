"""The linkage attack's floor: every face guessed as the mean embedding of the attacker's faces.

``veil privacy``'s boxes-only floor pastes a mean face *image* into each box; a linkage model that
has learnt nothing predicts the mean *embedding*, which lies closer to every face. This scores
that guess on the same attacker images, eval faces and gallery as the FDDB report::

    python scripts/embedding_floor.py --model retinaface --geometry 640x640
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from veil.calibrate import list_images
from veil.data import data_root
from veil.detectors import load_detector
from veil.detectors.base import InputGeometry
from veil.eval.fddb import load_fddb
from veil.privacy.evaluation import score_embeddings
from veil.privacy.identity import FaceRecognizer
from veil.privacy.report import ReportOptions, _prepare


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="retinaface")
    p.add_argument("--geometry", default="640x640")
    p.add_argument("--max-train", type=int, default=200)
    p.add_argument("--max-eval-per-fold", type=int, default=4)
    p.add_argument("--distractors-per-fold", type=int, default=6)
    p.add_argument("--image-size", type=int, default=320)
    args = p.parse_args()
    torch.set_num_threads(1)
    root = data_root()
    assert root is not None  # data_root raises when the data is absent
    fddb = load_fddb(
        root / "fddb", max_images_per_fold=args.max_eval_per_fold + args.distractors_per_fold
    )
    victims = [im for f in fddb.folds for im in f.images[: args.max_eval_per_fold]]
    others = [im for f in fddb.folds for im in f.images[args.max_eval_per_fold :]]
    attacker, ctx = _prepare(
        load_detector(args.model),
        InputGeometry.parse(args.geometry),
        (list_images(root / "widerface" / "WIDER_val" / "images", args.max_train), None),
        ([im.path for im in victims], [im.boxes.astype(np.float32) for im in victims]),
        ([im.path for im in others], [im.boxes.astype(np.float32) for im in others]),
        FaceRecognizer.load(),
        ReportOptions(image_size=args.image_size),
        False,
    )
    mean = np.concatenate(attacker.embeddings).mean(axis=0, keepdims=True)
    faces = len(ctx.gallery.rows(range(len(ctx.evals))))
    scored = score_embeddings(ctx, np.repeat(mean, faces, axis=0), range(len(ctx.evals)), "mean", 0)
    identity = scored.scores.identity
    assert identity is not None  # embeddings are always scored for identity
    summary = {
        "rank1": str(identity.rank1),
        "same_person": str(identity.same_person),
        "false_match": str(identity.false_match),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

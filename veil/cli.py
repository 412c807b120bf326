"""``veil`` command line. Each subcommand imports only what it needs, so ``veil --help`` and
the lightweight roles start fast."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from veil.errors import VeilError


def _detector(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from veil.detectors import load_detector

    weights = Path(args.weights) if getattr(args, "weights", None) else None
    return load_detector(args.model, weights, getattr(args, "device", "cpu"))


def _geometry(args: argparse.Namespace, detector):  # type: ignore[no-untyped-def]
    from veil.detectors.base import InputGeometry

    return InputGeometry.parse(args.geometry) if args.geometry else detector.default_geometry


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="retinaface", help="faceboxes | retinaface (default)")
    p.add_argument("--weights", help="checkpoint path (FaceBoxes needs one)")
    p.add_argument("--geometry", help="model input WxH; frames are letterboxed into it")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from veil.calibrate import CalibrationConfig, calibrate, list_images, video_frames
    from veil.errors import ConfigError

    detector = _detector(args)
    geometry = _geometry(args, detector)
    boxes = None
    images: list = []  # type: ignore[type-arg]
    if args.images:
        images = list(list_images(Path(args.images), args.max_images))
        source = f"images:{args.images}"
    elif args.video:
        images = list(video_frames(Path(args.video), every=args.every, limit=args.max_images))
        source = f"video:{args.video}"
    else:
        raise ConfigError("calibrate needs --images DIR or --video FILE (your own footage)")
    if args.task == "multibox":
        if not args.labels:
            raise ConfigError("--task multibox needs --labels (WIDER FACE style box file)")
        from veil.eval.widerface import load_widerface_boxes

        paths, boxes = load_widerface_boxes(Path(args.labels), Path(args.images), args.max_images)
        images = list(paths)
    config = CalibrationConfig(
        alphas=tuple(args.alphas),
        geometry=geometry,
        task=args.task,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        sigma_max_ratio=args.sigma_max,
    )
    started = time.perf_counter()
    print(
        f"calibrating {detector.name} at {geometry} on {len(images)} images from {source}; "
        f"alphas {list(config.alphas)}; task loss {config.task}",
        flush=True,
    )
    calibrate(detector, images, Path(args.out), config, boxes=boxes, source=source)
    print(f"took {time.perf_counter() - started:.1f} s")
    return 0


def _detect_fn_for(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from veil.inference import make_detect_fn
    from veil.profiles import ProfileBank

    detector = _detector(args)
    geometry = _geometry(args, detector)
    profile = None
    if args.profile:
        profile = ProfileBank(Path(args.profile).parent).load_path(Path(args.profile))
    elif args.alpha is not None:
        profile = ProfileBank(Path(args.bank)).get(
            args.alpha, detector.name, detector.weights_id, geometry
        )
    if profile is not None:
        geometry = (
            _geometry(args, detector)
            if args.geometry
            else type(geometry).parse(profile.meta.geometry)
        )
    return detector, geometry, profile, make_detect_fn(detector, geometry, profile, seed=args.seed)


def cmd_eval_fddb(args: argparse.Namespace) -> int:
    from veil.eval.fddb import evaluate_fddb, load_fddb

    detector, geometry, profile, detect = _detect_fn_for(args)
    dataset = load_fddb(Path(args.dataset), max_images_per_fold=args.max_images_per_fold)
    repeats = args.draws if profile is not None else 1
    print(
        f"FDDB: {detector.name} at {geometry}; "
        + (
            f"noise profile {profile.profile_id} (alpha {profile.alpha}), {repeats} noise draws"
            if profile
            else "clean (no noise)"
        ),
        flush=True,
    )
    result = evaluate_fddb(detect, dataset, batch_size=args.batch_size, repeats=repeats)
    record = {
        "benchmark": "fddb",
        "model": detector.name,
        "weights_id": detector.weights_id,
        "geometry": str(geometry),
        "alpha": profile.alpha if profile else 0.0,
        "profile_id": profile.profile_id if profile else "none",
        "result": result.to_json(),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"results: {args.json}")
    return 0


def cmd_eval_widerface(args: argparse.Namespace) -> int:
    from veil.eval.widerface import evaluate_widerface

    detector, geometry, profile, detect = _detect_fn_for(args)
    result = evaluate_widerface(
        detect, Path(args.dataset), batch_size=args.batch_size, max_images=args.max_images
    )
    if args.json:
        record = {
            "benchmark": "widerface",
            "model": detector.name,
            "geometry": str(geometry),
            "alpha": profile.alpha if profile else 0.0,
            "profile_id": profile.profile_id if profile else "none",
            "result": result.to_json(),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"results: {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="veil", description="Confidential face detection on video: split model + noise."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    from veil.calibrate import DEFAULT_ALPHAS

    p = sub.add_parser("calibrate", help="learn noise profiles (one per alpha), detector frozen")
    _add_model_args(p)
    p.add_argument("--images", help="folder of calibration images (your cameras' stills)")
    p.add_argument("--video", help="a video file of your footage (every --every-th frame)")
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--labels", help="WIDER FACE style ground truth, for --task multibox")
    p.add_argument("--task", default="distill", choices=["distill", "multibox"])
    p.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS))
    p.add_argument("--max-images", type=int, default=300)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--sigma-max", type=float, default=10.0, help="upper noise bound, x act. std")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="profile bank folder")
    p.set_defaults(func=cmd_calibrate)

    ev = sub.add_parser("eval", help="accuracy benchmarks").add_subparsers(
        dest="benchmark", required=True
    )
    for name, func in (("fddb", cmd_eval_fddb), ("widerface", cmd_eval_widerface)):
        e = ev.add_parser(name, help=f"{name.upper()} average precision")
        _add_model_args(e)
        e.add_argument("--dataset", required=True, help="benchmark folder")
        e.add_argument("--alpha", type=float, help="use the bank's profile for this alpha")
        e.add_argument("--bank", default="runs/bank", help="profile bank folder (with --alpha)")
        e.add_argument("--profile", help="a profile .safetensors file")
        e.add_argument("--noisy", action="store_true", help="(implied by --alpha/--profile)")
        e.add_argument("--draws", type=int, default=3, help="noise draws averaged (noisy runs)")
        e.add_argument("--seed", type=int, default=None, help="fix the noise (reproducibility)")
        e.add_argument("--batch-size", type=int, default=8)
        e.add_argument("--json", help="write machine-readable results here")
        if name == "fddb":
            e.add_argument("--max-images-per-fold", type=int)
        else:
            e.add_argument("--max-images", type=int)
        e.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except VeilError as exc:
        print(f"veil: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("veil: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

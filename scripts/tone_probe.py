"""Which part of a reconstruction carries identity: its tone (colour and brightness) or its
structure? A diagnostic for issue 7, not part of the report.

Runs ``veil privacy`` with the given arguments and, before the report is written, rescores
each reconstruction (the decoder's per setting, the two boxes-only floors) after changing only
the tone inside every face box:

* ``as is``: the report's own figures, as a check;
* ``own tone``: each channel's mean and spread set to the original face's (an oracle);
* ``flat tone`` and ``gray``: the report's own retouches (``veil.privacy.retouch``).

Prints, per reconstruction and variant, the same-person share (dlib's 0.6 of the own
original) and rank-1, and the face-by-face comparison with the boxes-only decoder as is.
Example (the alpha 0.95 bank of README's RetinaFace section)::

    python scripts/tone_probe.py --model retinaface --geometry 640x640 --bank runs/bank-rf95 \\
        --max-train 200 --max-eval-per-fold 16 --distractors-per-fold 12 --epochs 8 \\
        --image-size 320 --rmle-images 0 --linkage-epochs 0 --out runs/tone-rf95
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import veil.privacy.report as report_module
from veil.cli import main
from veil.detectors import load_detector
from veil.privacy.evaluation import EvalContext, score_pixels
from veil.privacy.identity import FaceRecognizer, IdentityScores, paired_verifications
from veil.privacy.retouch import face_tone, flat_tone, gray, retone

_original_write = report_module._write


def _own_tone(recon: Tensor, ctx: EvalContext) -> Tensor:
    """The oracle: each face's tone set to its original's (what no attacker has)."""

    def original(i: int, window: tuple[int, int, int, int]) -> tuple[Tensor, Tensor]:
        x1, y1, x2, y2 = window
        return face_tone(ctx.evals.unit_targets(i)[:, y1:y2, x1:x2])

    return retone(recon, ctx.boxes, original)


def _variants(recon: Tensor, ctx: EvalContext) -> dict[str, Tensor]:
    return {
        "as is": recon,
        "own tone": _own_tone(recon, ctx),
        "flat tone": flat_tone(recon, ctx.boxes),
        "gray": gray(recon, ctx.boxes),
    }


def _line(key: str, identity: IdentityScores, base: IdentityScores) -> dict[str, Any]:
    name, variant = key.split(" / ")
    pairs = paired_verifications(identity, base)
    row = {
        "reconstruction": name,
        "variant": variant,
        "same_person": identity.same_person.hits,
        "faces": identity.same_person.n,
        "rank1": identity.rank1.hits,
        "false_match": None if identity.false_match is None else identity.false_match.mean,
        "vs_boxes_decoder": None
        if pairs is None
        else {"only_this": pairs.only_first, "only_floor": pairs.only_second, "p": pairs.p_value},
    }
    print(json.dumps(row), flush=True)
    return row


def _probe(ctx: EvalContext, sets: dict[str, Tensor], out: Path) -> None:
    everything = range(len(ctx.evals))
    scored: dict[str, IdentityScores] = {}
    for name, recon in sets.items():
        for variant, images in _variants(recon, ctx).items():
            identity = score_pixels(ctx, images, everything, name, 0.0).scores.identity
            assert identity is not None
            scored[f"{name} / {variant}"] = identity
    base = scored["boxes-decoder / as is"]
    rows = [_line(key, identity, base) for key, identity in scored.items()]
    floors = [k for k in scored if k.startswith("boxes") and "own tone" not in k]
    for wire in (k for k in scored if k.startswith("decoder") and "own tone" not in k):
        for floor in floors:
            pairs = paired_verifications(scored[wire], scored[floor])
            assert pairs is not None
            row = {
                "wire": wire,
                "floor": floor,
                "only_wire": pairs.only_first,
                "only_floor": pairs.only_second,
                "p": round(pairs.p_value, 4),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    (out / "tone_probe.json").write_text(json.dumps(rows, indent=2) + "\n")


def _write(
    report: Any,
    out: Path,
    ctx: EvalContext,
    references: Any,
    done: Sequence[Any],
    floors: dict[str, Tensor],
    started: float,
) -> None:
    _original_write(report, out, ctx, references, done, floors, started)
    sets = dict(floors)
    for setting in done:
        sets[f"decoder {setting.noise.label}"] = setting.images["decoder"]
    kept = {"sets": sets, "evals": ctx.evals, "boxes": ctx.boxes, "gallery": ctx.gallery}
    torch.save({**kept, "frame_boxes": ctx.frame_boxes, "model": report.model}, out / "probe.pt")
    _probe(ctx, sets, out)


def _from_dump(path: Path) -> None:
    """Rescore a run's saved reconstructions (``--dump OUT/probe.pt``) without attacking again."""
    saved = torch.load(path, weights_only=False)
    ctx = EvalContext(
        saved["evals"],
        saved["boxes"],
        saved["frame_boxes"],
        saved["gallery"],
        FaceRecognizer.load(),
        load_detector(saved["model"]),
    )
    _probe(ctx, saved["sets"], path.parent)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--dump"]:
        _from_dump(Path(sys.argv[2]))
        sys.exit(0)
    report_module._write = _write  # type: ignore[assignment]
    sys.exit(main(["privacy", *sys.argv[1:]]))

"""The privacy report: who an attacker can still recognise from what each profile sends.

For the undefended baseline (clean activations) and every profile of a bank, three attacks
run against held-out eval images they never trained on (:mod:`veil.privacy.attacks`,
:mod:`veil.privacy.linkage`): the adaptive inversion decoder, the white-box rMLE
optimisation (on ``rmle_images`` of them, batched) and the feature-linkage attack, which
predicts each face's dlib embedding straight from the noisy activation. Each is scored by
IDENTITY (rank-1 re-identification against a gallery of at least ``min_gallery`` original
faces, and the share of faces within dlib's same-person distance of their own original) and
by pixels (SSIM of face crops and of the whole frame), every figure with its N and 95%
interval (:mod:`veil.privacy.scores`). A setting's headline is its strongest attack.

References printed beside every table: the originals at the attack's resolution (the
ceiling), chance (1 / gallery size), and two attackers who have only the output boxes: the
mean of their own training faces pasted into each box on their mean image, and a decoder
trained to draw the image from the boxes alone (:mod:`veil.privacy.boxes_decoder`). The
better of the two per figure is what the output boxes alone give.
Accuracy (VOC AP of each profile, with its own tail, on the eval images) is measured here
unless given.

``eval_gt_boxes=None`` is footage mode: the clean detector's boxes (score >= ``face_score``)
stand in for ground truth, and the gallery holds the footage's own identities (faces
clustered at dlib's same-person distance), since a video shows the same people many times.

Outputs in ``out_dir``: ``report.json``, ``report.md``, ``report.html`` (self-contained),
``tradeoff.png`` and ``grid.png``; each profile's ``meta.leakage`` is updated in the bank.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from veil.detectors.base import Frame, InputGeometry, SplitDetector
from veil.errors import ConfigError, DatasetError, ProfileError
from veil.privacy.attacks import (
    AttackSet,
    NoiseModel,
    pixel_digest,
    prepare_attack_set,
    rmle_attack,
    train_decoder,
)
from veil.privacy.boxes_decoder import boxes_decoder_reconstructions, train_boxes_decoder
from veil.privacy.evaluation import (
    MIN_IDENTITY_FACE,
    Embeddings,
    EvalContext,
    Gallery,
    GalleryMode,
    Scored,
    boxes_only_reconstructions,
    build_gallery,
    identity_faces,
    measure_accuracy,
    score_embeddings,
    score_pixels,
)
from veil.privacy.identity import EMBEDDING_DIM, FaceRecognizer
from veil.privacy.metrics import BoxArray
from veil.privacy.render import GridColumn, grid, html_page, markdown, tradeoff_plot
from veil.privacy.retouch import RETOUCHES, retouched
from veil.privacy.scores import (
    BOXES_ONLY,
    DRAWN_FLOORS,
    AttackScores,
    attack_title,
    best_pixels,
    mean_to_json,
    rate_to_json,
    strongest,
)
from veil.privacy.verdict import paired_with_floors, surest_excess, verdict
from veil.profiles import NoiseProfile, ProfileBank

Log = Callable[[str], None]


@dataclass(frozen=True)
class ReportOptions:
    epochs: int = 30  # decoder training
    image_size: int = 256  # longer side of the reconstructions
    batch_size: int = 8
    decoder_width: int = 64
    rmle_images: int = 20
    rmle_steps: int = 60
    linkage_epochs: int = 30
    grid_images: int = 4
    redetect_score: float = 0.5
    redetect_iou: float = 0.5
    face_score: float = 0.5  # clean detections standing in for faces (attacker, footage)
    min_face: int = MIN_IDENTITY_FACE
    min_gallery: int = 100
    seed: int = 0


@dataclass(frozen=True)
class ReportRow:
    label: str
    alpha: float | None  # None for the clean baseline
    profile_id: str | None
    sigma_ratio: float  # mean noise sigma in units of the clean activations' std
    mean_ap: float | None
    ap_kept: float | None  # mean AP / clean AP
    attacks: dict[str, AttackScores]  # "decoder", "rmle", "linkage", and "decoder+tone"...
    strongest: str | None  # the attack with the highest rank-1 (ties: same-person share)
    deployed: bool = False

    @property
    def headline(self) -> AttackScores | None:
        return None if self.strongest is None else self.attacks[self.strongest]

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "alpha": self.alpha,
            "profile_id": self.profile_id,
            "sigma_ratio": self.sigma_ratio,
            "mean_ap": self.mean_ap,
            "ap_kept": self.ap_kept,
            "attacks": {k: v.to_json() for k, v in self.attacks.items()},
            "strongest": self.strongest,
            "deployed": self.deployed,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReportRow:
        attacks = {k: AttackScores.from_json(v) for k, v in data["attacks"].items()}
        return cls(**{**data, "attacks": attacks})


@dataclass
class PrivacyReport:
    model: str
    weights_id: str
    geometry: str
    image_size: str  # "WxH" of the reconstructions
    data_source: str  # what the eval faces are: "fddb:<dir>" or "footage:<path>"
    train_images: int
    eval_images: int
    rmle_images: int
    faces: int  # eval faces scored for identity
    gallery: dict[str, Any]  # size, mode, distractors, chance
    references: dict[str, AttackScores]  # "originals", BOXES_ONLY
    rows: list[ReportRow]
    accuracy_source: str  # "given", "eval images" (measured here) or "none"
    deployed_alpha: float | None
    settings: dict[str, Any]
    verdict: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)

    @property
    def chance(self) -> float:
        return float(self.gallery["chance"])

    def to_json(self) -> dict[str, Any]:
        return {
            **{k: getattr(self, k) for k in _PLAIN_FIELDS},
            "references": {k: v.to_json() for k, v in self.references.items()},
            "rows": [r.to_json() for r in self.rows],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PrivacyReport:
        return cls(
            **{k: data[k] for k in _PLAIN_FIELDS},
            references={k: AttackScores.from_json(v) for k, v in data["references"].items()},
            rows=[ReportRow.from_json(r) for r in data["rows"]],
        )


_PLAIN_FIELDS = (
    "model",
    "weights_id",
    "geometry",
    "image_size",
    "data_source",
    "train_images",
    "eval_images",
    "rmle_images",
    "faces",
    "gallery",
    "accuracy_source",
    "deployed_alpha",
    "settings",
    "verdict",
    "seconds",
    "files",
)


def _load_bank(bank_dir: Path, detector: SplitDetector) -> list[NoiseProfile]:
    profiles = ProfileBank(bank_dir).profiles()
    if not profiles:
        raise ProfileError(f"no noise profiles in {bank_dir}")
    geometries = {p.meta.geometry for p in profiles}
    if len(geometries) != 1:
        raise ProfileError(
            f"profiles in {bank_dir} mix input geometries {sorted(geometries)}: a privacy "
            "report compares one geometry; split the bank"
        )
    geometry = InputGeometry.parse(profiles[0].meta.geometry)
    shape = detector.activation_shape(geometry)
    for profile in profiles:
        profile.check_fits(detector.name, detector.weights_id, geometry, shape)
    return profiles


@dataclass
class _Attacker:
    """The attacker's own material: images, their face boxes and those faces' embeddings."""

    data: AttackSet
    faces: list[BoxArray]  # frame pixels, the identity faces
    embeddings: list[Embeddings]  # per image [K, 128]
    boxes: list[BoxArray]  # frame pixels, every face the clean detector found

    def target_boxes(self) -> list[BoxArray]:
        """Every face's box in the attack targets' pixels."""
        return [b * s for b, s in zip(self.boxes, self.data.target_scales, strict=True)]

    def input_boxes(self) -> list[Tensor]:
        return [
            torch.from_numpy(np.asarray(b, np.float32) * s)
            for b, s in zip(self.faces, self.data.input_scales, strict=True)
        ]


def _embedded_set(
    detector: SplitDetector,
    images: Sequence[Path | Frame],
    boxes: Sequence[BoxArray] | None,
    geometry: InputGeometry,
    recognizer: FaceRecognizer,
    options: ReportOptions,
    progress: bool,
    desc: str,
) -> tuple[AttackSet, list[BoxArray], list[BoxArray], list[Embeddings]]:
    """An attack set with, per image: every face (``boxes``, or the clean detector's when
    None; frame px), the identity faces among them (at least ``min_face`` px, frame px) and
    those faces' embeddings in the full-resolution frame."""
    every: list[BoxArray] = []
    faces: list[BoxArray] = []
    embeddings: list[Embeddings] = []

    def visit(i: int, frame: Frame, found: BoxArray | None) -> None:
        given = found if boxes is None else boxes[i]
        every.append(np.asarray(given, np.float32).reshape(-1, 4))
        faces.append(identity_faces(every[-1], frame.shape[:2], options.min_face))
        embeddings.append(recognizer.embed(frame, faces[-1]))

    data = prepare_attack_set(
        detector,
        images,
        geometry,
        options.image_size,
        options.batch_size,
        progress,
        desc,
        face_score=options.face_score if boxes is None else None,
        visit=visit,
    )
    return data, every, faces, embeddings


def _distractors(
    images: Sequence[Path | Frame],
    boxes: Sequence[BoxArray],
    recognizer: FaceRecognizer,
    options: ReportOptions,
    forbidden: set[str],
) -> Embeddings:
    """Embeddings of further held-out faces for the gallery (no probe of their own)."""
    from veil.eval import read_image

    if len(images) != len(boxes):
        raise DatasetError(f"{len(images)} distractor images but {len(boxes)} box sets")
    rows: list[Embeddings] = [np.zeros((0, EMBEDDING_DIM), np.float32)]
    for image, b in zip(images, boxes, strict=True):
        frame = read_image(image) if isinstance(image, Path) else np.asarray(image, np.uint8)
        if pixel_digest(frame) in forbidden:
            raise DatasetError("a distractor image is also an attacker's or an eval image")
        rows.append(recognizer.embed(frame, identity_faces(b, frame.shape[:2], options.min_face)))
    return np.concatenate(rows)


def _spread(count: int, total: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (the rMLE images)."""
    if count <= 0 or total <= 0:
        return []
    if count >= total:
        return list(range(total))
    return sorted({round(float(v)) for v in np.linspace(0, total - 1, count)})


@dataclass
class _Setting:
    noise: NoiseModel
    profile: NoiseProfile | None
    row: ReportRow
    scored: dict[str, Scored]  # per attack, with reconstructions for the grid
    images: dict[str, Tensor]
    indices: dict[str, list[int]]  # per pixel attack, the eval images it attacked


def _attack_setting(
    noise: NoiseModel,
    profile: NoiseProfile | None,
    detector: SplitDetector,
    attacker: _Attacker,
    ctx: EvalContext,
    rmle_index: list[int],
    options: ReportOptions,
    progress: bool,
) -> _Setting:
    evals, train = ctx.evals, attacker.data
    # The eval observation is a fixed draw so that the report is reproducible.
    observed = noise.observe(evals.activations, torch.Generator().manual_seed(options.seed + 1))
    trained = train_decoder(
        train,
        noise,
        epochs=options.epochs,
        batch_size=options.batch_size,
        width=options.decoder_width,
        seed=options.seed,
        progress=progress,
    )
    images = {"decoder": trained.reconstruct(observed)}
    everything = range(len(evals))
    decoded = score_pixels(ctx, images["decoder"], everything, "decoder", trained.seconds)
    scored = {"decoder": decoded}
    scored |= _retouches(ctx, "decoder", images["decoder"], everything, decoded)
    if rmle_index:
        result = rmle_attack(
            detector,
            observed[rmle_index],
            noise,
            evals.geometry,
            evals.target_size,
            float(train.activations.std()),
            steps=options.rmle_steps,
            progress=progress,
        )
        images["rmle"] = result.images
        scored["rmle"] = score_pixels(ctx, result.images, rmle_index, "rmle", result.seconds)
        scored |= _retouches(ctx, "rmle", result.images, rmle_index, scored["rmle"])
    linkage = _linkage(noise, attacker, ctx, observed, options, progress)
    if linkage is not None:
        scored["linkage"] = linkage
    row = _row(noise, profile, {k: v.scores for k, v in scored.items()}, train)
    indices = {"decoder": list(range(len(evals))), "rmle": rmle_index}
    return _Setting(noise, profile, row, scored, images, indices)


def _linkage(
    noise: NoiseModel,
    attacker: _Attacker,
    ctx: EvalContext,
    observed: Tensor,
    options: ReportOptions,
    progress: bool,
) -> Scored | None:
    from veil.privacy.linkage import train_linkage

    targets = np.concatenate([np.zeros((0, EMBEDDING_DIM), np.float32), *attacker.embeddings])
    if len(targets) == 0 or options.linkage_epochs < 1:
        return None
    # Input pixels per activation cell (RetinaFace's `stride` is its coarsest level, not this).
    stride = ctx.evals.geometry.width // int(ctx.evals.activations.shape[3])
    trained = train_linkage(
        attacker.data.activations,
        attacker.input_boxes(),
        targets,
        noise,
        stride,
        epochs=options.linkage_epochs,
        seed=options.seed,
        progress=progress,
    )
    boxes = [
        torch.from_numpy(np.asarray(b, np.float32) * s)
        for b, s in zip(ctx.gallery.faces, ctx.evals.input_scales, strict=True)
    ]
    predicted = trained.predict(observed, boxes, stride)
    return score_embeddings(ctx, predicted, range(len(ctx.evals)), "linkage", trained.seconds)


def _row(
    noise: NoiseModel,
    profile: NoiseProfile | None,
    attacks: dict[str, AttackScores],
    train: AttackSet,
) -> ReportRow:
    return ReportRow(
        label=noise.label,
        alpha=None if profile is None else profile.alpha,
        profile_id=None if profile is None else profile.profile_id,
        sigma_ratio=float(noise.sigma.mean()) / float(train.activations.std()),
        mean_ap=None,
        ap_kept=None,
        attacks=attacks,
        strongest=strongest(attacks),
    )


def _with_accuracy(
    rows: list[ReportRow],
    accuracy: dict[float, float],
    clean_ap: float | None,
    deployed_alpha: float | None,
) -> list[ReportRow]:
    # Alphas are kept to two decimals (see veil.profiles); match the benchmark's keys likewise.
    by_alpha = {round(float(a), 2): ap for a, ap in accuracy.items()}
    deployed = None if deployed_alpha is None else round(float(deployed_alpha), 2)
    out = []
    for row in rows:
        ap = clean_ap if row.alpha is None else by_alpha.get(round(row.alpha, 2))
        kept = ap / clean_ap if ap is not None and clean_ap else None
        is_deployed = row.alpha is not None and round(row.alpha, 2) == deployed
        out.append(replace(row, mean_ap=ap, ap_kept=kept, deployed=is_deployed))
    return out


def privacy_report(
    detector: SplitDetector,
    bank_dir: Path | str,
    train_images: Sequence[Path | Frame],
    eval_images: Sequence[Path | Frame],
    eval_gt_boxes: Sequence[BoxArray] | None,
    accuracy: dict[float, float] | None,
    clean_ap: float | None,
    out_dir: Path | str,
    *,
    progress: bool = True,
    train_source: str = "",
    eval_source: str = "",
    data_source: str = "",
    train_boxes: Sequence[BoxArray] | None = None,
    distractor_images: Sequence[Path | Frame] = (),
    distractor_boxes: Sequence[BoxArray] = (),
    deployed_alpha: float | None = None,
    record_leakage: bool = True,
    recognizer: FaceRecognizer | None = None,
    log: Log = print,
    **settings: Any,
) -> PrivacyReport:
    """Attack every profile of ``bank_dir`` (and the clean activation) and write the report.

    ``train_images`` (the attacker's own pictures; its faces are ``train_boxes`` or the clean
    detector's) and ``eval_images`` (the victims', with ``eval_gt_boxes``: per image ``[K, 4]``
    xyxy face boxes in its pixels, or None for footage mode) must not overlap. Distractor
    images and boxes add original faces to the gallery. ``accuracy`` maps alpha -> mean AP and
    ``clean_ap`` is the noise-free AP; when ``accuracy`` is None both are measured on the eval
    images. ``settings`` are :class:`ReportOptions` fields (``epochs``, ``image_size``, ...).
    """
    started = time.perf_counter()
    options = _options(settings, len(eval_images), eval_gt_boxes)
    profiles = _load_bank(Path(bank_dir), detector)
    geometry = InputGeometry.parse(profiles[0].meta.geometry)
    detector.eval()
    recognizer = recognizer or FaceRecognizer.load()
    attacker, ctx = _prepare(
        detector,
        geometry,
        (train_images, train_boxes),
        (eval_images, eval_gt_boxes),
        (distractor_images, distractor_boxes),
        recognizer,
        options,
        progress,
    )
    log(_data_summary(attacker, ctx, options))
    references, floors = _references(ctx, attacker, options, progress)
    done = _run_settings(detector, profiles, attacker, ctx, options, progress, log)
    accuracy_source = "given" if accuracy is not None else "eval images"
    if accuracy is None:
        clean_ap, accuracy = measure_accuracy(
            detector, geometry, profiles, eval_images, ctx.frame_boxes, options.seed
        )
    report = _assemble(detector, geometry, attacker, ctx, references, options)
    report.rows = _with_accuracy([s.row for s in done], accuracy, clean_ap, deployed_alpha)
    report.accuracy_source = accuracy_source
    report.deployed_alpha = deployed_alpha
    report.data_source = data_source or eval_source
    report.settings = _settings_json(options, bank_dir, train_source, eval_source)
    _write(report, Path(out_dir), ctx, references, done, floors, started)
    if record_leakage:
        record_profile_leakage(Path(bank_dir), report, profiles)
    log(f"privacy report written to {out_dir} in {report.seconds:.0f} s")
    return report


def _options(
    settings: dict[str, Any], eval_count: int, eval_gt_boxes: Sequence[BoxArray] | None
) -> ReportOptions:
    """The report's options, checked with the eval set's size."""
    options = ReportOptions(**settings)
    if eval_gt_boxes is not None and len(eval_gt_boxes) != eval_count:
        raise DatasetError(
            f"{eval_count} eval images but {len(eval_gt_boxes)} ground-truth box sets"
        )
    if options.rmle_images < 0 or options.grid_images < 0:
        raise ConfigError("rmle_images and grid_images must be >= 0")
    return options


def _assemble(
    detector: SplitDetector,
    geometry: InputGeometry,
    attacker: _Attacker,
    ctx: EvalContext,
    references: dict[str, Scored],
    options: ReportOptions,
) -> PrivacyReport:
    """The report's description of the data; rows, accuracy and settings are set after."""
    height, width = ctx.evals.target_size
    return PrivacyReport(
        model=detector.name,
        weights_id=detector.weights_id,
        geometry=str(geometry),
        image_size=f"{width}x{height}",
        data_source="",
        train_images=len(attacker.data),
        eval_images=len(ctx.evals),
        rmle_images=len(_spread(options.rmle_images, len(ctx.evals))),
        faces=ctx.gallery.num_faces,
        gallery=_gallery_json(ctx.gallery),
        references={k: v.scores for k, v in references.items()},
        rows=[],
        accuracy_source="none",
        deployed_alpha=None,
        settings={},
    )


def _data_summary(attacker: _Attacker, ctx: EvalContext, options: ReportOptions) -> str:
    text = (
        f"{len(attacker.data)} attacker images ({sum(len(f) for f in attacker.faces)} faces), "
        f"{len(ctx.evals)} eval images ({ctx.gallery.num_faces} identity faces), gallery of "
        f"{ctx.gallery.size} ({ctx.gallery.mode})"
    )
    if ctx.gallery.mode == "instances" and ctx.gallery.size < options.min_gallery:
        text += f"; warning: fewer than {options.min_gallery} gallery faces, chance is high"
    return text


def _run_settings(
    detector: SplitDetector,
    profiles: Sequence[NoiseProfile],
    attacker: _Attacker,
    ctx: EvalContext,
    options: ReportOptions,
    progress: bool,
    log: Log,
) -> list[_Setting]:
    """Every attack against the clean activation, then against each profile."""
    shape = attacker.data.activations.shape[1:]
    settings: list[tuple[NoiseModel, NoiseProfile | None]] = [
        (NoiseModel.clean((int(shape[0]), int(shape[1]), int(shape[2]))), None)
    ]
    settings += [(NoiseModel.from_profile(p), p) for p in profiles]
    rmle_index = _spread(options.rmle_images, len(ctx.evals))
    done: list[_Setting] = []
    for noise, profile in settings:
        done.append(
            _attack_setting(noise, profile, detector, attacker, ctx, rmle_index, options, progress)
        )
        log(_row_summary(done[-1].row))
    return done


def _prepare(
    detector: SplitDetector,
    geometry: InputGeometry,
    train: tuple[Sequence[Path | Frame], Sequence[BoxArray] | None],
    victims: tuple[Sequence[Path | Frame], Sequence[BoxArray] | None],
    distractors: tuple[Sequence[Path | Frame], Sequence[BoxArray]],
    recognizer: FaceRecognizer,
    options: ReportOptions,
    progress: bool,
) -> tuple[_Attacker, EvalContext]:
    """The attacker's material, the eval set and the gallery (checked to be disjoint)."""
    if train[1] is not None and len(train[1]) != len(train[0]):
        raise DatasetError(f"{len(train[0])} attacker images but {len(train[1])} box sets")
    own = _embedded_set(detector, *train, geometry, recognizer, options, progress, "attacker")
    attacker = _Attacker(own[0], own[2], own[3], own[1])
    evals, every, faces, originals = _embedded_set(
        detector, *victims, geometry, recognizer, options, progress, "eval images"
    )
    shared = set(attacker.data.digests) & set(evals.digests)
    if shared:
        raise DatasetError(
            f"{len(shared)} eval image(s) also appear among the attacker's training images: "
            "the attack must be scored on images it never saw"
        )
    if sum(len(b) for b in every) == 0:
        raise DatasetError("the eval images have no faces")
    forbidden = set(attacker.data.digests) | set(evals.digests)
    extra = _distractors(*distractors, recognizer, options, forbidden)
    mode: GalleryMode = "instances" if victims[1] is not None else "identities"
    gallery = build_gallery(originals, faces, extra, mode)
    boxes = [b * s for b, s in zip(every, evals.target_scales, strict=True)]
    ctx = EvalContext(
        evals,
        boxes,
        every,
        gallery,
        recognizer,
        detector,
        options.redetect_score,
        options.redetect_iou,
    )
    return attacker, ctx


def _references(
    ctx: EvalContext, attacker: _Attacker, options: ReportOptions, progress: bool
) -> tuple[dict[str, Scored], dict[str, Tensor]]:
    """The ceiling (the attack's targets themselves) and the two boxes-only floors (the mean
    face pasted into each box, and a decoder drawing faces from the boxes), with the floors'
    guesses."""
    everything = range(len(ctx.evals))
    guesses = boxes_only_reconstructions(attacker.data, attacker.faces, ctx)
    trained = train_boxes_decoder(
        attacker.data,
        attacker.target_boxes(),
        epochs=options.epochs,
        batch_size=options.batch_size,
        width=options.decoder_width,
        seed=options.seed,
        progress=progress,
    )
    drawn = {
        "boxes-only": guesses,
        "boxes-decoder": boxes_decoder_reconstructions(trained, ctx.boxes, ctx.evals),
    }
    scored = {
        "originals": score_pixels(ctx, ctx.evals.unit_targets(), everything, "originals", 0.0),
        "boxes-only": score_pixels(ctx, guesses, everything, "boxes-only", 0.0),
        "boxes-decoder": score_pixels(
            ctx, drawn["boxes-decoder"], everything, "boxes-decoder", trained.seconds
        ),
    }
    for name in DRAWN_FLOORS:
        scored |= _retouches(ctx, name, drawn[name], everything, scored[name])
    return scored, drawn


def _retouches(
    ctx: EvalContext, attack: str, images: Tensor, indices: Sequence[int], drawn: Scored
) -> dict[str, Scored]:
    """``attack``'s pictures (one per index) scored again after each retouch (see
    :mod:`veil.privacy.retouch`), under names such as ``decoder+tone``."""
    boxes = [ctx.boxes[i] for i in indices]
    out = {}
    for retouch, apply in RETOUCHES.items():
        name = retouched(attack, retouch)
        out[name] = score_pixels(ctx, apply(images, boxes), indices, name, drawn.scores.seconds)
    return out


def _gallery_json(gallery: Gallery) -> dict[str, Any]:
    return {
        "size": gallery.size,
        "mode": gallery.mode,
        "distractors": gallery.distractors,
        "chance": 1.0 / gallery.size if gallery.size else float("nan"),
    }


def _settings_json(
    options: ReportOptions, bank_dir: Path | str, train_source: str, eval_source: str
) -> dict[str, Any]:
    return {
        **options.__dict__,
        "train_source": train_source,
        "eval_source": eval_source,
        "bank": str(bank_dir),
    }


def _row_summary(row: ReportRow) -> str:
    parts = [f"{row.label}:"]
    for name, s in row.attacks.items():
        rank1 = "n/a" if s.identity is None else f"{s.identity.rank1.value:.3f}"
        face = "" if s.ssim_face is None else f", face SSIM {s.ssim_face.mean:.3f}"
        parts.append(f"{name} rank-1 {rank1}{face};")
    parts.append(f"strongest {row.strongest}")
    return " ".join(parts)


# --- writing ---------------------------------------------------------------------------------

_FILES = ("report.json", "report.md", "report.html", "tradeoff.png", "grid.png")


def _grid_rows(
    references: dict[str, Scored],
    done: Sequence[_Setting],
    ctx: EvalContext,
    floors: dict[str, Tensor],
) -> dict[str, list[GridColumn]]:
    everything = list(range(len(ctx.evals)))
    rows: dict[str, list[GridColumn]] = {}
    for attack, floor in (("decoder", "boxes-decoder"), ("rmle", "boxes-only")):
        if not all(attack in s.images for s in done):
            continue
        columns = [GridColumn(floor, floors[floor], everything, references[floor])]
        for s in done:
            columns.append(
                GridColumn(
                    f"{attack_title(attack)} {s.noise.label.replace('alpha ', 'a')}",
                    s.images[attack],
                    s.indices[attack],
                    s.scored[attack],
                )
            )
        rows[attack] = columns
    return rows


def _render(report: PrivacyReport, out: Path) -> None:
    report.verdict = verdict(report)
    tradeoff_plot(report, out / "tradeoff.png")
    report.files = {name: str(out / name) for name in _FILES}
    (out / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    (out / "report.html").write_text(html_page(report, out / "tradeoff.png", out / "grid.png"))


def _write(
    report: PrivacyReport,
    out: Path,
    ctx: EvalContext,
    references: dict[str, Scored],
    done: Sequence[_Setting],
    floors: dict[str, Tensor],
    started: float,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = _grid_rows(references, done, ctx, floors)
    # Images every attack ran on first (rMLE attacks only some), then the others.
    attacked = done[0].indices["rmle"] if done else []
    order = attacked + [i for i in range(len(ctx.evals)) if i not in attacked]
    chosen = order[: report.settings["grid_images"]]
    cv2.imwrite(str(out / "grid.png"), grid(ctx.evals, ctx.boxes, rows, chosen))
    report.seconds = round(time.perf_counter() - started, 1)
    _render(report, out)


def _floor_json(report: PrivacyReport, name: str) -> dict[str, Any] | None:
    floor = report.references.get(name)
    if floor is None or floor.identity is None:
        return None
    return {
        "rank1": rate_to_json(floor.identity.rank1),
        "same_person": rate_to_json(floor.identity.same_person),
    }


def _excess_json(report: PrivacyReport, row: ReportRow) -> dict[str, Any] | None:
    """The pixel attack surest to verify more faces than the boxes give, face by face."""
    excess = surest_excess(paired_with_floors(row, report))
    if excess is None:
        return None
    attack, p_value, pairs = excess
    return {
        "attack": attack,
        "p_value": p_value,
        "pairs": [{"floor": floor} | p.to_json() for floor, p in pairs],
    }


def leakage_record(report: PrivacyReport, row: ReportRow) -> dict[str, Any]:
    """What a profile's ``meta.leakage`` keeps of the report (its strongest attack)."""
    head = row.headline
    face = best_pixels(row.attacks)
    ident = None if head is None else head.identity
    return {
        "strongest_attack": row.strongest,
        "rank1": None if ident is None else rate_to_json(ident.rank1),
        "same_person": None if ident is None else rate_to_json(ident.same_person),
        "false_match": None
        if ident is None or ident.false_match is None
        else mean_to_json(ident.false_match),
        "face_ssim": None
        if face is None or face.ssim_face is None
        else {"attack": face.attack, **mean_to_json(face.ssim_face)},
        "chance": report.chance,
        **{key.replace("-", "_"): _floor_json(report, key) for key in BOXES_ONLY},
        "beyond_boxes_only": _excess_json(report, row),
        "faces": None if ident is None else ident.rank1.n,
        "gallery_size": report.gallery["size"],
        "data_source": report.data_source,
        "image_size": report.image_size,
        "report": report.files.get("report.json", ""),
        "date": datetime.now(UTC).date().isoformat(),
    }


def record_profile_leakage(
    bank_dir: Path, report: PrivacyReport, profiles: Sequence[NoiseProfile]
) -> None:
    """Write each profile's measured leakage into its description (``meta.leakage``)."""
    bank = ProfileBank(bank_dir)
    by_id = {r.profile_id: r for r in report.rows if r.profile_id}
    for profile in profiles:
        row = by_id.get(profile.profile_id)
        if row is not None:
            bank.update_meta(profile, leakage=leakage_record(report, row))


def load_report(out_dir: Path | str) -> PrivacyReport:
    """A written report back from its ``report.json``."""
    return PrivacyReport.from_json(json.loads((Path(out_dir) / "report.json").read_text()))


def attach_accuracy(
    out_dir: Path | str, accuracy: dict[float, float], clean_ap: float | None
) -> PrivacyReport:
    """Replace a written report's accuracy with the benchmark's figures and render it again
    (the grid is kept)."""
    out = Path(out_dir)
    report = load_report(out)
    report.rows = _with_accuracy(report.rows, accuracy, clean_ap, report.deployed_alpha)
    report.accuracy_source = "given"
    _render(report, out)
    return report

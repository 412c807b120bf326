"""Scoring reconstructions and predicted embeddings against the victims' original faces.

Pixels are compared at the attack's resolution (SSIM and PSNR of the whole frame inside the
letterbox and of each face crop). Identity is scored at the ORIGINAL resolution: a
reconstruction is upscaled to its frame's size and dlib embeds the same face boxes there; the
probe is then looked up in a gallery of the originals' embeddings
(:func:`veil.privacy.identity.identification`). Also here: the boxes-only attacker's guesses,
the gallery (face instances, or identities clustered from footage), and the accuracy of each
profile on the eval images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from veil.detections import Detections
from veil.detectors.base import Frame, InputGeometry, SplitDetector
from veil.eval import read_image
from veil.eval.metrics import average_precision
from veil.inference import HeadCache, make_detect_fn
from veil.privacy.attacks import AttackSet
from veil.privacy.identity import (
    EMBEDDING_DIM,
    SAME_PERSON_DISTANCE,
    FaceRecognizer,
    IdentityScores,
    Rate,
    boxes_only_images,
    identification,
    mean_ci,
    mean_face_chip,
)
from veil.privacy.metrics import BoxArray, face_psnr, face_ssim, matched_faces, psnr, ssim
from veil.privacy.scores import AttackScores
from veil.profiles import NoiseProfile

Embeddings = npt.NDArray[np.float32]
GalleryMode = Literal["instances", "identities"]

# Faces whose shorter side is below this many frame pixels are left out of the identity
# figures: dlib's landmarks need a face of some size (its chips are 150 px).
MIN_IDENTITY_FACE = 20


def to_bgr_uint8(image: Tensor) -> Frame:
    """``[3, H, W]`` BGR in [0, 1] -> ``H x W x 3`` uint8."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return np.ascontiguousarray(array)


def identity_faces(boxes: BoxArray | None, frame_size: Sequence[int], min_side: int) -> BoxArray:
    """The boxes clipped to the frame (``frame_size`` starts with its height and width),
    keeping those whose shorter side is at least ``min_side`` px (None: no boxes)."""
    if boxes is None:
        return np.zeros((0, 4), np.float32)
    height, width = int(frame_size[0]), int(frame_size[1])
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    b[:, 0::2] = b[:, 0::2].clip(0, width)
    b[:, 1::2] = b[:, 1::2].clip(0, height)
    keep = np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) >= min_side
    return b[keep]


def cluster_identities(
    embeddings: Embeddings, threshold: float = SAME_PERSON_DISTANCE
) -> list[int]:
    """Greedy identity labels: a face joins the first identity whose mean embedding lies
    within ``threshold``, else starts a new one (footage has no identity labels)."""
    centres: list[npt.NDArray[np.float64]] = []
    counts: list[int] = []
    labels: list[int] = []
    for e in np.asarray(embeddings, dtype=np.float64):
        distances = [float(np.linalg.norm(e - c)) for c in centres]
        if distances and min(distances) < threshold:
            k = int(np.argmin(distances))
            centres[k] = (centres[k] * counts[k] + e) / (counts[k] + 1)
            counts[k] += 1
        else:
            k = len(centres)
            centres.append(e)
            counts.append(1)
        labels.append(k)
    return labels


@dataclass(frozen=True)
class Gallery:
    """The originals the probes are looked up in."""

    embeddings: Embeddings  # [G, 128]
    truth: list[list[int]]  # per eval image, the gallery row of each of its identity faces
    faces: list[BoxArray]  # per eval image, its identity faces in frame pixels
    mode: GalleryMode
    distractors: int  # rows from distractor faces (no probe of their own)

    @property
    def size(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def num_faces(self) -> int:
        return sum(len(t) for t in self.truth)

    def rows(self, indices: Sequence[int]) -> list[int]:
        return [row for i in indices for row in self.truth[i]]


def build_gallery(
    per_image: Sequence[Embeddings],
    faces: Sequence[BoxArray],
    distractors: Embeddings,
    mode: GalleryMode,
) -> Gallery:
    """Instances: one row per original eval face, then the distractors (chance 1/N). Identities
    (footage): one row per identity clustered from the eval faces, its mean embedding."""
    flat = np.concatenate([np.zeros((0, EMBEDDING_DIM), np.float32), *per_image])
    sizes = [len(e) for e in per_image]
    if mode == "instances":
        rows = list(range(len(flat)))
        table = np.concatenate([flat, distractors.reshape(-1, EMBEDDING_DIM)]).astype(np.float32)
        extra = len(distractors)
    else:
        rows = cluster_identities(flat)
        labels = np.asarray(rows)
        means = [flat[labels == k].mean(0) for k in range(max(rows, default=-1) + 1)]
        table = np.stack(means) if means else np.zeros((0, EMBEDDING_DIM), np.float32)
        extra = 0
    truth: list[list[int]] = []
    offset = 0
    for n in sizes:
        truth.append(rows[offset : offset + n])
        offset += n
    return Gallery(table.reshape(-1, EMBEDDING_DIM), truth, list(faces), mode, extra)


@dataclass
class EvalContext:
    """Everything a score needs about the victims' images."""

    evals: AttackSet
    boxes: list[BoxArray]  # per eval image, every face in target pixels (SSIM, re-detection)
    frame_boxes: list[BoxArray]  # the same faces in frame pixels (accuracy)
    gallery: Gallery
    recognizer: FaceRecognizer
    detector: SplitDetector
    redetect_score: float = 0.5
    redetect_iou: float = 0.5


@dataclass
class Scored:
    scores: AttackScores
    detections: list[Detections] = field(default_factory=list)  # per image, target pixels
    distances: list[list[float]] = field(default_factory=list)  # per image, probe to own


def _identity(
    ctx: EvalContext, probes: Embeddings, indices: Sequence[int]
) -> tuple[IdentityScores | None, list[list[float]]]:
    rows = ctx.gallery.rows(indices)
    if not rows or ctx.gallery.size == 0:
        return None, [[] for _ in indices]
    scores = identification(probes, ctx.gallery.embeddings, rows)
    own = np.linalg.norm(probes - ctx.gallery.embeddings[rows], axis=1)
    per_image: list[list[float]] = []
    offset = 0
    for i in indices:
        n = len(ctx.gallery.truth[i])
        per_image.append([float(v) for v in own[offset : offset + n]])
        offset += n
    return scores, per_image


def _embed_upscaled(ctx: EvalContext, rebuilt: Frame, i: int) -> Embeddings:
    faces = ctx.gallery.faces[i]
    if not len(faces):
        return np.zeros((0, EMBEDDING_DIM), np.float32)
    height, width = ctx.evals.frame_sizes[i]
    up = cv2.resize(rebuilt, (width, height), interpolation=cv2.INTER_LINEAR)
    return ctx.recognizer.embed(up, faces)


def score_pixels(
    ctx: EvalContext, recon: Tensor, indices: Sequence[int], attack: str, seconds: float
) -> Scored:
    """Score reconstructions (one per index, at the attack resolution) against the eval set."""
    frame_ssim: list[float] = []
    frame_psnr: list[float] = []
    crops_ssim: list[float] = []
    crops_psnr: list[float] = []
    detections: list[Detections] = []
    probes: list[Embeddings] = []
    found = total = 0
    for k, i in enumerate(indices):
        width, height = ctx.evals.content[i]
        original = to_bgr_uint8(ctx.evals.unit_targets(i))[:height, :width]
        rebuilt = to_bgr_uint8(recon[k])[:height, :width]
        frame_ssim.append(ssim(original, rebuilt))
        frame_psnr.append(psnr(original, rebuilt))
        crops_ssim += face_ssim(original, rebuilt, ctx.boxes[i])
        crops_psnr += face_psnr(original, rebuilt, ctx.boxes[i])
        (dets,) = ctx.detector.detect(
            [rebuilt], ctx.evals.geometry, score_threshold=ctx.redetect_score
        )
        detections.append(dets.above(ctx.redetect_score))
        found += matched_faces(detections[-1], ctx.boxes[i], ctx.redetect_iou)
        total += len(ctx.boxes[i])
        probes.append(_embed_upscaled(ctx, rebuilt, i))
    identity, distances = _identity(ctx, np.concatenate(probes), indices)
    scores = AttackScores(
        attack=attack,
        images=len(indices),
        faces=len(ctx.gallery.rows(indices)),
        identity=identity,
        ssim=mean_ci(frame_ssim),
        ssim_face=mean_ci(crops_ssim) if crops_ssim else None,
        psnr=float(np.mean(frame_psnr)),
        psnr_face=float(np.mean(crops_psnr)) if crops_psnr else None,
        redetection=Rate(found, total),
        seconds=seconds,
    )
    return Scored(scores, detections, distances)


def score_embeddings(
    ctx: EvalContext, predicted: Embeddings, indices: Sequence[int], attack: str, seconds: float
) -> Scored:
    """Score predicted embeddings (one per identity face of ``indices``, in order)."""
    identity, distances = _identity(ctx, predicted, indices)
    scores = AttackScores(
        attack=attack,
        images=len(indices),
        faces=len(ctx.gallery.rows(indices)),
        identity=identity,
        ssim=None,
        ssim_face=None,
        psnr=None,
        psnr_face=None,
        redetection=None,
        seconds=seconds,
    )
    return Scored(scores, [], distances)


def boxes_only_reconstructions(
    train: AttackSet, train_faces: Sequence[BoxArray], ctx: EvalContext
) -> Tensor:
    """The boxes-only attacker's guess of every eval image, at the attack resolution: the mean
    of its own training faces pasted into each eval face box on its mean training image."""
    mean = train.unit_targets().mean(0)
    background = to_bgr_uint8(mean)
    crops = [to_bgr_uint8(train.unit_targets(i))[:h, :w] for i, (w, h) in enumerate(train.content)]
    boxes = [np.asarray(b) * s for b, s in zip(train_faces, train.target_scales, strict=True)]
    chip = mean_face_chip(crops, boxes) if sum(len(b) for b in boxes) else None
    out = mean.unsqueeze(0).repeat(len(ctx.evals), 1, 1, 1)
    if chip is None:
        return out
    for i, (w, h) in enumerate(ctx.evals.content):
        (guess,) = boxes_only_images(chip, [ctx.boxes[i]], [(h, w)], background[:h, :w])
        out[i, :, :h, :w] = torch.from_numpy(guess).permute(2, 0, 1).float() / 255.0
    return out


def _frames(images: Sequence[Path | Frame], batch_size: int) -> list[list[Frame]]:
    batches: list[list[Frame]] = []
    for start in range(0, len(images), batch_size):
        batches.append(
            [
                read_image(p) if isinstance(p, Path) else np.asarray(p, np.uint8)
                for p in images[start : start + batch_size]
            ]
        )
    return batches


def measure_accuracy(
    detector: SplitDetector,
    geometry: InputGeometry,
    profiles: Sequence[NoiseProfile],
    images: Sequence[Path | Frame],
    gt_boxes: Sequence[BoxArray],
    seed: int = 0,
    batch_size: int = 8,
) -> tuple[float, dict[float, float]]:
    """VOC AP at IoU 0.5 (veil.eval.metrics) of the clean detector and of each profile with its
    own tail, on these images: one fixed noise draw per image; boxes clipped to the frame."""
    cache = HeadCache()
    detect = {0.0: make_detect_fn(detector, geometry, head_cache=cache)}
    for p in profiles:
        detect[p.alpha] = make_detect_fn(detector, geometry, p, seed=seed, head_cache=cache)
    found: dict[float, list[Detections]] = {a: [] for a in detect}
    truth: list[BoxArray] = []
    done = 0
    for frames in _frames(images, batch_size):
        for frame, boxes in zip(frames, gt_boxes[done : done + len(frames)], strict=True):
            truth.append(identity_faces(boxes, frame.shape[:2], 0))
        done += len(frames)
        for alpha, fn in detect.items():
            found[alpha] += fn(frames)
    aps = {a: average_precision(found[a], truth) for a in detect}
    clean = aps.pop(0.0)
    return clean, {a: v for a, v in aps.items() if not math.isnan(v)}

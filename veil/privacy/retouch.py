"""What any attacker can do to its pictures afterwards, without the wire: retouches.

dlib's same-person share of a blurry reconstruction moves with how its faces are toned. On
RetinaFace's 292 report faces (2026-12-04, ``scripts/tone_probe.py``), the boxes-only decoder
verified 27 faces as drawn and 35 with its faces' tone flattened, the mean face 26 pasted in
colour and 35 in gray. A floor that skips such a step understates what the boxes give, and an
attack that skips it understates what the wire gives, so the report scores every picture
attack, the boxes-only ones included, also retouched (``decoder+tone``, ``boxes-only+gray``,
...). A retouch uses nothing but the attacker's own pictures and the output boxes.

* ``tone``: inside each face box (grown by :data:`GROW` on every side), each channel's mean
  and spread are set to their average over every face of the same set of pictures;
* ``gray``: the luminance (ITU-R BT.601) copied into all three channels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from veil.privacy.metrics import BoxArray

GROW = 0.15  # of a box's side, on each side: the margin dlib's aligned chip takes in
_SPREAD_FLOOR = 1e-3
# BGR weights of BT.601 luma.
_LUMA_BGR = (0.114, 0.587, 0.299)

Window = tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels


def face_windows(boxes: BoxArray, height: int, width: int) -> list[Window]:
    """The grown face boxes inside an image of ``height`` x ``width``, at least 2 px a side."""
    out = []
    for x1, y1, x2, y2 in np.asarray(boxes, np.float64).reshape(-1, 4):
        gx, gy = GROW * (x2 - x1), GROW * (y2 - y1)
        a, b = max(0, int(x1 - gx)), max(0, int(y1 - gy))
        c, d = min(width, int(np.ceil(x2 + gx))), min(height, int(np.ceil(y2 + gy)))
        if c - a >= 2 and d - b >= 2:
            out.append((a, b, c, d))
    return out


def face_tone(patch: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and spread of a ``[3, h, w]`` patch, as ``[3, 1, 1]``."""
    flat = patch.reshape(patch.shape[0], -1)
    return flat.mean(1).view(-1, 1, 1), flat.std(1).clamp_min(_SPREAD_FLOOR).view(-1, 1, 1)


def _size(images: Tensor, boxes: Sequence[BoxArray]) -> tuple[int, int]:
    """(height, width) of ``images``, checked to have one box set each."""
    if len(boxes) != len(images):
        raise ValueError(f"retouch: {len(images)} images but {len(boxes)} box sets")
    return int(images.shape[2]), int(images.shape[3])


ToneOf = Callable[[int, Window], tuple[Tensor, Tensor]]  # (image, window) -> mean, spread


def retone(images: Tensor, boxes: Sequence[BoxArray], tone_of: ToneOf) -> Tensor:
    """``images`` (``[N, 3, H, W]`` in [0, 1]) with each face window's per-channel mean and
    spread replaced by ``tone_of(image index, window)``; ``boxes`` holds each image's faces in
    its pixels. Every window is read from ``images``, so overlapping faces do not compound."""
    height, width = _size(images, boxes)
    out = images.clone()
    for i, image_boxes in enumerate(boxes):
        for window in face_windows(image_boxes, height, width):
            x1, y1, x2, y2 = window
            patch = images[i, :, y1:y2, x1:x2]
            own_mean, own_spread = face_tone(patch)
            mean, spread = tone_of(i, window)
            out[i, :, y1:y2, x1:x2] = ((patch - own_mean) / own_spread * spread + mean).clamp(0, 1)
    return out


def flat_tone(images: Tensor, boxes: Sequence[BoxArray]) -> Tensor:
    """``images`` with every face's tone set to the set's average face tone (see
    :func:`retone`)."""
    height, width = _size(images, boxes)
    tones = [
        face_tone(images[i, :, y1:y2, x1:x2])
        for i, image_boxes in enumerate(boxes)
        for x1, y1, x2, y2 in face_windows(image_boxes, height, width)
    ]
    if not tones:
        return images.clone()
    mean = torch.stack([m for m, _ in tones]).mean(0)
    spread = torch.stack([s for _, s in tones]).mean(0)
    return retone(images, boxes, lambda i, window: (mean, spread))


def gray(images: Tensor, boxes: Sequence[BoxArray]) -> Tensor:
    """``images`` (``[N, 3, H, W]`` BGR) as gray pictures; ``boxes`` are not needed."""
    del boxes
    weights = torch.tensor(_LUMA_BGR, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True).expand(-1, 3, -1, -1).contiguous()


RETOUCHES: dict[str, Callable[[Tensor, Sequence[BoxArray]], Tensor]] = {
    "tone": flat_tone,
    "gray": gray,
}


def retouched(attack: str, retouch: str) -> str:
    """The name a retouched attack is scored under, e.g. ``decoder+tone``."""
    return f"{attack}+{retouch}"


def split_name(name: str) -> tuple[str, str]:
    """``decoder+tone`` -> ``("decoder", "tone")``; ``decoder`` -> ``("decoder", "")``."""
    attack, _, retouch = name.partition("+")
    return attack, retouch

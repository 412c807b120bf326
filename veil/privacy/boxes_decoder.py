"""The boxes-only decoder: the strongest floor of what the output boxes alone give.

The outside receives every face's box anyway. The mean-face attacker
(:func:`veil.privacy.evaluation.boxes_only_reconstructions`) pastes one blurred average into
each box; this one learns to draw a face from the boxes, as sharp as the wire's decoder can:
the same :class:`~veil.privacy.attacks.InversionDecoder`, trained the same way on the same
attacker images, but its input is the boxes rasterised on the activation's grid instead of
the activation. Whatever the wire's decoder achieves beyond it comes from the wire.

Per grid cell the map holds (``BOX_CHANNELS``): whether the cell lies in the frame's content
(the letterbox is known from the frame size), whether it overlaps a box, where in that box it
lies (``u``, ``v`` in [0, 1]) and the box's width and height over the target's. Where boxes
overlap, the smaller one is drawn on top.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from veil.privacy.attacks import AttackSet, NoiseModel, TrainedDecoder, train_decoder
from veil.privacy.metrics import BoxArray

BOX_CHANNELS = 6


def _axis(cells: int, extent: int) -> tuple[Tensor, Tensor]:
    """Each cell's (start, end) along one axis, in target pixels."""
    step = extent / cells
    start = torch.arange(cells, dtype=torch.float32) * step
    return start, start + step


def box_maps(
    boxes: Sequence[BoxArray],
    content: Sequence[tuple[int, int]],
    target_hw: tuple[int, int],
    grid_hw: tuple[int, int],
) -> Tensor:
    """``[N, BOX_CHANNELS, gh, gw]``: each image's boxes (target pixels, x0 y0 x1 y1) and
    content size ((width, height) in target pixels) on a ``grid_hw`` grid."""
    if len(boxes) != len(content):
        raise ValueError(f"{len(boxes)} box sets for {len(content)} images")
    (th, tw), (gh, gw) = target_hw, grid_hw
    y0s, y1s = _axis(gh, th)
    x0s, x1s = _axis(gw, tw)
    yc, xc = (y0s + y1s) / 2, (x0s + x1s) / 2
    out = torch.zeros(len(boxes), BOX_CHANNELS, gh, gw)
    for i, (found, (width, height)) in enumerate(zip(boxes, content, strict=True)):
        out[i, 0] = ((yc[:, None] < height) & (xc[None, :] < width)).float()
        rows = np.asarray(found, np.float32).reshape(-1, 4)
        areas = (rows[:, 2] - rows[:, 0]) * (rows[:, 3] - rows[:, 1])
        for x0, y0, x1, y1 in rows[np.argsort(-areas)]:
            w, h = max(float(x1 - x0), 1e-3), max(float(y1 - y0), 1e-3)
            cover = ((y1s > y0) & (y0s < y1))[:, None] & ((x1s > x0) & (x0s < x1))[None, :]
            u = ((xc - x0) / w).clamp(0, 1)[None, :].expand(gh, gw)
            v = ((yc - y0) / h).clamp(0, 1)[:, None].expand(gh, gw)
            for channel, value in ((1, 1.0), (2, u), (3, v), (4, w / tw), (5, h / th)):
                plane = out[i, channel]
                plane[cover] = value if isinstance(value, float) else value[cover]
    return out


def train_boxes_decoder(
    train: AttackSet,
    train_boxes: Sequence[BoxArray],
    *,
    epochs: int,
    batch_size: int,
    width: int,
    seed: int,
    progress: bool,
) -> TrainedDecoder:
    """The decoder trained from the attacker's images' boxes (target pixels) alone."""
    grid = (int(train.activations.shape[2]), int(train.activations.shape[3]))
    maps = box_maps(train_boxes, train.content, train.target_size, grid)
    none = torch.zeros(maps.shape[1:])
    return train_decoder(
        replace(train, activations=maps),
        NoiseModel(none, none, "boxes only"),
        epochs=epochs,
        batch_size=batch_size,
        width=width,
        seed=seed,
        progress=progress,
    )


def boxes_decoder_reconstructions(
    trained: TrainedDecoder,
    boxes: Sequence[BoxArray],
    evals: AttackSet,
) -> Tensor:
    """The trained boxes-only decoder's guess of every eval image from its boxes alone."""
    grid = (int(evals.activations.shape[2]), int(evals.activations.shape[3]))
    return trained.reconstruct(box_maps(boxes, evals.content, evals.target_size, grid))

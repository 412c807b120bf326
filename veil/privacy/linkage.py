"""The feature-linkage attack: predict a face's identity embedding straight from the wire.

Rebuilding pixels is one way to identify a face; an attacker who only wants to *link* a face
to a gallery of known people need not draw anything. This attack trains a small network to
map the (noisy) activation under each output box to the dlib descriptor of that face
(:mod:`veil.privacy.identity`), on the attacker's own images; the predicted descriptors are
then scored as probes against a gallery of the true faces' descriptors
(:func:`veil.privacy.identity.identification`), exactly like reconstructions.

What the attacker has, as in :mod:`veil.privacy.attacks`: the transmitted activation, the
output boxes (the outside receives them anyway) and the noise distribution (``mu``,
``sigma``). Training is *adaptive*: every step draws fresh noise from the defended profile,
and the network sees the attacker's posterior-mean view of the activation
(:class:`~veil.privacy.attacks.AttackerView`), pooled under each box (:func:`roi_features`).

Boxes are in INPUT pixels of the detector's geometry (a frame-pixel box times its
``Letterbox.scale``), not in frame pixels.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from veil.errors import ConfigError
from veil.privacy.attacks import AttackerView, NoiseModel, fit_one_cycle
from veil.privacy.identity import DLIB_EMBEDDING_NORM, EMBEDDING_DIM

BOX_GROWTH = 1.1  # boxes are widened and heightened by 10% around their centre before pooling
_SAMPLES_PER_BIN = 2  # bilinear samples per output bin and axis, averaged (as ROIAlign does)


def _flatten_boxes(boxes_per_image: Sequence[Tensor], count: int) -> tuple[Tensor, Tensor]:
    """(image index [M], boxes [M, 4]) of all boxes, image by image; checks their shapes."""
    if len(boxes_per_image) != count:
        raise ConfigError(f"{len(boxes_per_image)} box tensors for {count} activations")
    owners: list[Tensor] = []
    rows: list[Tensor] = []
    for n, boxes in enumerate(boxes_per_image):
        b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        if not bool(torch.isfinite(b).all()):
            raise ConfigError(f"boxes of image {n} are not finite")
        owners.append(torch.full((len(b),), n, dtype=torch.long))
        rows.append(b)
    if not rows:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 4)
    return torch.cat(owners), torch.cat(rows)


def _sample_points(boxes: Tensor, out: int) -> tuple[Tensor, Tensor]:
    """x and y ``[K, out*s]`` of each box's bilinear samples, in input pixels (box grown 10%)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).clamp_min(1.0) * BOX_GROWTH / 2
    steps = out * _SAMPLES_PER_BIN
    t = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps * 2 - 1  # bin sample offsets
    return centre[:, 0:1] + half[:, 0:1] * t, centre[:, 1:2] + half[:, 1:2] * t


def _grids(boxes: Tensor, stride: int, out: int, windows: Tensor) -> Tensor:
    """Sampling grids ``[K, out*s, out*s, 2]`` in grid_sample's normalised coordinates.

    ``windows`` ``[K or 1, 4]`` holds (y0, y1, x0, x1): the activation cells of the map each
    box is sampled from. With ``align_corners=False`` activation cell ``j`` (input pixels
    ``[j*stride, (j+1)*stride)``) has its centre at normalised ``2 (j - x0 + 0.5) / w - 1``
    (``w = x1 - x0``), so an input pixel ``x`` maps to ``2 (x / stride - x0) / w - 1``.
    """
    xs, ys = _sample_points(boxes, out)
    win = windows.to(torch.float32)
    gx = 2 * (xs / stride - win[:, 2:3]) / (win[:, 3:4] - win[:, 2:3]) - 1
    gy = 2 * (ys / stride - win[:, 0:1]) / (win[:, 1:2] - win[:, 0:1]) - 1
    k, steps = xs.shape
    return torch.stack(
        [gx[:, None, :].expand(k, steps, steps), gy[:, :, None].expand(k, steps, steps)], dim=-1
    )


def _cells(boxes: Tensor, stride: int, size: tuple[int, int], out: int) -> Tensor:
    """``[K, 4]`` (y0, y1, x0, x1) per box: the window of activation cells its samples read.

    A sample at cell coordinate ``c = x / stride - 0.5`` reads cells ``floor(c)`` and
    ``floor(c) + 1``; clipped to the activation, the window is never empty. Pooling the window
    gives exactly what pooling the whole activation gives.
    """
    xs, ys = _sample_points(boxes, out)
    spans: list[Tensor] = []
    for points, limit in ((ys, size[0]), (xs, size[1])):
        cells = torch.floor(points / stride - 0.5)
        spans.append(cells.min(1).values.clamp(0, limit - 1))
        spans.append((cells.max(1).values + 1).clamp(0, limit - 1) + 1)
    return torch.stack(spans, 1).long()


def _pool(maps: Tensor, owners: Tensor, boxes: Tensor, stride: int, out: int) -> Tensor:
    """ROIAlign of ``maps`` [N, C, h, w] under ``boxes`` (of images ``owners``) -> [M, C, o, o]."""
    c, h, w = (int(v) for v in maps.shape[1:])
    pooled = maps.new_zeros(len(boxes), c, out, out)
    for n in torch.unique(owners).tolist():
        rows = torch.nonzero(owners == n).flatten()
        grid = _grids(boxes[rows], stride, out, torch.tensor([[0, h, 0, w]])).to(maps.device)
        k, steps = grid.shape[0], grid.shape[1]
        # All of one image's boxes in a single call: the grids are stacked along the height.
        sampled = F.grid_sample(
            maps[n : n + 1], grid.reshape(1, k * steps, steps, 2), align_corners=False
        )  # [1, C, k*steps, steps]; outside the activation reads 0 (unknown)
        sampled = sampled.reshape(c, k, steps, steps).permute(1, 0, 2, 3)
        pooled[rows.to(maps.device)] = F.avg_pool2d(sampled, _SAMPLES_PER_BIN)
    return pooled


def _observed_rois(
    clean: Tensor,
    owners: Tensor,
    boxes: Tensor,
    view: AttackerView,
    stride: int,
    generator: torch.Generator,
    out: int = 4,
) -> Tensor:
    """The attacker's pooled view ``[M, 2C, out, out]`` of fresh noisy observations of faces.

    Noise is drawn only over the cells each face's pooling reads (its window, with the
    matching slice of ``mu`` and ``sigma``), not over the whole activation: at 32x32 cells that
    is the difference between minutes and seconds per training run. Each face gets its own
    draw, so two faces of one image do not share noise where their windows overlap; each
    face's own input has exactly the distribution it would have had.
    """
    size = (int(clean.shape[2]), int(clean.shape[3]))
    windows = _cells(boxes, stride, size, out)
    grids = _grids(boxes, stride, out, windows)
    images: list[int] = owners.tolist()
    rows: list[Tensor] = []
    for k, (y0, y1, x0, x1) in enumerate(windows.tolist()):
        cut = (slice(None), slice(y0, y1), slice(x0, x1))
        noise = NoiseModel(view.noise.mu[cut], view.noise.sigma[cut], view.noise.label)
        local = AttackerView(view.mean[cut], view.spread[cut], view.reliability[cut], noise)
        observed = noise.observe(clean[images[k], :, y0:y1, x0:x1][None], generator)
        sampled = F.grid_sample(local.features(observed), grids[k : k + 1], align_corners=False)
        rows.append(F.avg_pool2d(sampled, _SAMPLES_PER_BIN))
    return torch.cat(rows)


def roi_features(
    activations: Tensor, boxes_per_image: Sequence[Tensor], stride: int, out: int = 4
) -> Tensor:
    """``[sum K, C, out, out]``: each map pooled under each of its image's boxes, in order.

    ``boxes_per_image[n]`` is a ``[K, 4]`` xyxy tensor in input pixels of image ``n``; each
    box is grown by 10% around its centre and split into ``out`` x ``out`` bins, each the
    mean of 2 x 2 bilinear samples (ROIAlign, without torchvision). Where a box leaves the
    map the samples read zero.
    """
    if activations.dim() != 4:
        raise ConfigError(f"expected [N, C, h, w] activations, got {tuple(activations.shape)}")
    if stride < 1 or out < 1:
        raise ConfigError(f"stride and out must be at least 1, got {stride}, {out}")
    owners, boxes = _flatten_boxes(boxes_per_image, int(activations.shape[0]))
    return _pool(activations, owners, boxes, stride, out)


class EmbeddingPredictor(nn.Module):
    """ROI features ``[M, in_channels, 4, 4]`` -> embeddings ``[M, 128]`` of norm ``norm``.

    A 1x1 mixing conv, a 3x3 conv, then a two-layer MLP; the output is L2-normalised and
    scaled to ``norm``, the typical length of a dlib descriptor (1.41 +- 0.06 on FDDB faces,
    :data:`~veil.privacy.identity.DLIB_EMBEDDING_NORM`), so only its direction is learned.
    """

    def __init__(
        self, in_channels: int, pooled: int = 4, width: int = 128, norm: float = DLIB_EMBEDDING_NORM
    ) -> None:
        super().__init__()
        self.norm = float(norm)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(width * pooled * pooled, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, EMBEDDING_DIM),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.norm * F.normalize(self.net(features), dim=1)


@dataclass
class TrainedLinkage:
    """A trained embedding predictor with the attacker's view of the noise it was trained for."""

    model: EmbeddingPredictor
    view: AttackerView
    seconds: float
    losses: list[float]  # mean squared euclidean distance to the target, per epoch
    pooled: int = 4

    @torch.no_grad()
    def predict(
        self,
        observed: Tensor,
        boxes_per_image: Sequence[Tensor],
        stride: int,
        batch_size: int = 32,
    ) -> npt.NDArray[np.float32]:
        """Observed (noisy) activations and their boxes -> predicted embeddings ``[M, 128]``."""
        owners, boxes = _flatten_boxes(boxes_per_image, int(observed.shape[0]))
        self.model.eval()
        parts: list[Tensor] = [torch.zeros(0, EMBEDDING_DIM)]
        for start in range(0, int(observed.shape[0]), batch_size):
            chunk = (owners >= start) & (owners < start + batch_size)
            if not bool(chunk.any()):
                continue
            features = self.view.features(observed[start : start + batch_size])
            rois = _pool(features, owners[chunk] - start, boxes[chunk], stride, self.pooled)
            parts.append(self.model(rois).cpu())
        return torch.cat(parts).numpy().astype(np.float32)


def _targets(embeddings: npt.ArrayLike, count: int) -> Tensor:
    target = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
    if target.dim() != 2 or target.shape[1] != EMBEDDING_DIM:
        raise ConfigError(f"expected [M, {EMBEDDING_DIM}] embeddings, got {tuple(target.shape)}")
    if len(target) != count:
        raise ConfigError(f"{len(target)} embeddings for {count} boxes: one per box, in order")
    if count == 0:
        raise ConfigError("linkage training needs at least one face box")
    return target


def train_linkage(
    clean_activations: Tensor,
    boxes_per_image: Sequence[Tensor],
    embeddings: npt.ArrayLike,
    noise: NoiseModel,
    stride: int,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> TrainedLinkage:
    """Train an :class:`EmbeddingPredictor` against ``noise`` (a fresh draw every step).

    ``embeddings[i]`` is the dlib descriptor of the ``i``-th box, boxes taken image by image
    in order. Each step takes ``batch_size`` faces, draws fresh noise on the activation cells
    under each (see :func:`_observed_rois`), and minimises the squared euclidean distance of
    the prediction to the descriptor. The output norm is fixed to the training descriptors'
    mean norm. About 1.5 s per epoch of 1000 faces on a 128x32x32 activation, one CPU core.
    """
    if epochs < 1 or batch_size < 1:
        raise ConfigError(
            f"linkage needs epochs >= 1 and batch_size >= 1, got {epochs}, {batch_size}"
        )
    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    owners, boxes = _flatten_boxes(boxes_per_image, int(clean_activations.shape[0]))
    target = _targets(embeddings, len(boxes))
    view = AttackerView.build(clean_activations, noise)
    model = EmbeddingPredictor(
        2 * int(clean_activations.shape[1]), norm=float(target.norm(dim=1).mean())
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)

    def batch_loss(faces: Tensor) -> Tensor:
        rois = _observed_rois(
            clean_activations, owners[faces], boxes[faces], view, stride, generator
        )
        loss: Tensor = ((model(rois) - target[faces]) ** 2).sum(1).mean()
        return loss

    losses = fit_one_cycle(
        model,
        optimizer,
        batch_loss,
        len(boxes),
        batch_size,
        epochs,
        lr,
        generator,
        tqdm_args={"desc": f"linkage ({noise.label})", "disable": not progress},
    )
    return TrainedLinkage(model, view, time.perf_counter() - started, losses)

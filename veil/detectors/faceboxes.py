"""FaceBoxes (Zhang et al. 2017), ported from FaceBoxes.PyTorch, split at one of two points.

* ``faceboxes`` (the default): head = the "rapidly digested convolutional layers" (conv1,
  pool, conv2, pool) *and* the three Inception blocks; tail = conv3/conv4 and the multibox
  heads. The deeper cut keeps the wire shape (``[N, 128, H/32, W/32]``) and leaves less of the
  picture in what crosses the wire.
* ``faceboxes-stem``: head = the stem alone; tail = the Inception blocks onward (veil's first
  cut, kept to measure against).

Module and parameter names follow the original so that its published checkpoints load
unchanged.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping, Sequence
from math import ceil
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from veil.detectors.base import InputGeometry, SplitDetector, file_sha256
from veil.detectors.boxes import decode_ssd
from veil.errors import CheckpointError

# Anchor layout of the original data/config.py: one list of anchor sizes per detection level.
_MIN_SIZES: tuple[tuple[int, ...], ...] = ((32, 64, 128), (256,), (512,))
_STEPS: tuple[int, ...] = (32, 64, 128)
# The small anchors are tiled densely within a cell (4x4 for 32, 2x2 for 64) so that small
# faces get as many anchors as large ones ("anchor densification" in the paper).
_DENSITY: dict[int, int] = {32: 4, 64: 2}


class _ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm; ``crelu`` concatenates ``[x, -x]`` before the ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        crelu: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-5)
        self.crelu = crelu

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        if self.crelu:
            x = torch.cat([x, -x], dim=1)
        return F.relu(x)


class _Inception(nn.Module):
    """128 -> 4 x 32 channels: 1x1, pool+1x1, 1x1+3x3, 1x1+3x3+3x3."""

    def __init__(self) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(128, 32, 1)
        self.branch1x1_2 = _ConvBN(128, 32, 1)
        self.branch3x3_reduce = _ConvBN(128, 24, 1)
        self.branch3x3 = _ConvBN(24, 32, 3, padding=1)
        self.branch3x3_reduce_2 = _ConvBN(128, 24, 1)
        self.branch3x3_2 = _ConvBN(24, 32, 3, padding=1)
        self.branch3x3_3 = _ConvBN(32, 32, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch1x1_2(pooled),
                self.branch3x3(self.branch3x3_reduce(x)),
                self.branch3x3_3(self.branch3x3_2(self.branch3x3_reduce_2(x))),
            ],
            dim=1,
        )


def anchors_per_cell(min_sizes: Sequence[int]) -> int:
    return sum(_DENSITY.get(size, 1) ** 2 for size in min_sizes)


def faceboxes_priors(input_height: int, input_width: int, device: torch.device) -> Tensor:
    """The original PriorBox, vectorised: ``[P, 4]`` (cx, cy, w, h) normalised, not clipped.

    Order per level: rows, then columns, then anchor sizes, then the dense offsets (y outer).
    Computed in float64 and rounded once, as the original builds them in Python floats.
    """
    levels: list[Tensor] = []
    for step, sizes in zip(_STEPS, _MIN_SIZES, strict=True):
        rows, cols = ceil(input_height / step), ceil(input_width / step)
        # Per-cell templates (x offset, y offset, size), in cells, in the original order.
        templates: list[tuple[float, float, float]] = []
        for size in sizes:
            density = _DENSITY.get(size, 1)
            offsets = [k / density for k in range(density)] if density > 1 else [0.5]
            templates += [(ox, oy, float(size)) for oy in offsets for ox in offsets]
        t = torch.tensor(templates, dtype=torch.float64)
        i = torch.arange(rows, dtype=torch.float64).view(rows, 1, 1)
        j = torch.arange(cols, dtype=torch.float64).view(1, cols, 1)
        cx = (j + t[:, 0]) * step / input_width
        cy = (i + t[:, 1]) * step / input_height
        shape = (rows, cols, len(templates))
        w = (t[:, 2] / input_width).expand(shape)
        h = (t[:, 2] / input_height).expand(shape)
        levels.append(torch.stack([cx.expand(shape), cy.expand(shape), w, h], -1).reshape(-1, 4))
    return torch.cat(levels).to(device=device, dtype=torch.float32)


SPLITS: dict[str, tuple[str, ...]] = {
    "faceboxes": ("conv1", "conv2", "inception1", "inception2", "inception3"),
    "faceboxes-stem": ("conv1", "conv2"),
}


class FaceBoxes(SplitDetector):
    """FaceBoxes split after its Inception blocks, or after its stem (stride 32, 128 channels)."""

    stride = 32
    activation_channels = 128
    mean_bgr = (104.0, 117.0, 123.0)
    std_bgr = (1.0, 1.0, 1.0)
    default_geometry = InputGeometry(1024, 1024)
    variances = (0.1, 0.2)

    def __init__(self, split: str = "faceboxes") -> None:
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"unknown FaceBoxes split {split!r}; known: {', '.join(SPLITS)}")
        self.name = split
        self.head_modules = SPLITS[split]
        self._deep = "inception3" in self.head_modules
        self.weights_id = "untrained"
        self.conv1 = _ConvBN(3, 24, 7, stride=4, padding=3, crelu=True)
        self.conv2 = _ConvBN(48, 64, 5, stride=2, padding=2, crelu=True)
        self.inception1 = _Inception()
        self.inception2 = _Inception()
        self.inception3 = _Inception()
        self.conv3_1 = _ConvBN(128, 128, 1)
        self.conv3_2 = _ConvBN(128, 256, 3, stride=2, padding=1)
        self.conv4_1 = _ConvBN(256, 128, 1)
        self.conv4_2 = _ConvBN(128, 256, 3, stride=2, padding=1)
        level_channels = (128, 256, 256)
        anchors = [anchors_per_cell(sizes) for sizes in _MIN_SIZES]
        self.loc = nn.Sequential(
            *(
                nn.Conv2d(c, a * 4, 3, padding=1)
                for c, a in zip(level_channels, anchors, strict=True)
            )
        )
        self.conf = nn.Sequential(
            *(
                nn.Conv2d(c, a * 2, 3, padding=1)
                for c, a in zip(level_channels, anchors, strict=True)
            )
        )

    def head(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)
        x = F.max_pool2d(self.conv2(x), kernel_size=3, stride=2, padding=1)
        return self._inceptions(x) if self._deep else x

    def _inceptions(self, x: Tensor) -> Tensor:
        out: Tensor = self.inception3(self.inception2(self.inception1(x)))
        return out

    def tail(self, activation: Tensor) -> tuple[Tensor, ...]:
        x = activation if self._deep else self._inceptions(activation)
        sources = [x]
        x = self.conv3_2(self.conv3_1(x))
        sources.append(x)
        x = self.conv4_2(self.conv4_1(x))
        sources.append(x)
        n = activation.shape[0]
        loc: list[Tensor] = []
        conf: list[Tensor] = []
        for source, loc_layer, conf_layer in zip(sources, self.loc, self.conf, strict=True):
            loc.append(loc_layer(source).permute(0, 2, 3, 1).reshape(n, -1, 4))
            conf.append(conf_layer(source).permute(0, 2, 3, 1).reshape(n, -1, 2))
        return torch.cat(loc, dim=1), torch.cat(conf, dim=1)

    def priors(self, input_height: int, input_width: int, device: torch.device) -> Tensor:
        return faceboxes_priors(input_height, input_width, device)

    def decode_raw(
        self, raw: Sequence[Tensor], input_height: int, input_width: int
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        loc, conf = raw[0], raw[1]
        priors = self.priors(input_height, input_width, loc.device)
        if loc.shape[1] != priors.shape[0]:
            raise ValueError(
                f"faceboxes: {loc.shape[1]} predictions but {priors.shape[0]} priors for a "
                f"{input_width}x{input_height} input (sides must be multiples of {self.stride})"
            )
        scale = torch.tensor(
            [input_width, input_height, input_width, input_height], device=loc.device
        )
        boxes = decode_ssd(loc, priors, self.variances) * scale
        return boxes, conf.softmax(dim=-1)[..., 1], None

    @classmethod
    def from_checkpoint(
        cls, path: Path, device: str | torch.device = "cpu", split: str = "faceboxes"
    ) -> FaceBoxes:
        """Load a FaceBoxes.PyTorch checkpoint; frozen, in eval mode, on ``device``."""
        path = Path(path)
        model = cls(split)
        load_state_dict_strictly(model, read_torch_state_dict(path), path)
        model.weights_id = file_sha256(path)
        return freeze(model).to(device)


DetectorT = TypeVar("DetectorT", bound=SplitDetector)


def freeze(model: DetectorT) -> DetectorT:
    """veil never trains a detector: eval mode (BatchNorm uses running stats), no gradients."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def read_torch_state_dict(path: Path) -> dict[str, Tensor]:
    """A checkpoint's tensors, whether saved bare, under ``state_dict`` or by DataParallel."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    except (
        EOFError,
        RuntimeError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        ValueError,
        OSError,
    ) as exc:
        raise CheckpointError(
            f"checkpoint {path} ({path.stat().st_size} bytes) is truncated or not a torch "
            f"checkpoint: {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in loaded.items()
    ):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(loaded).__name__}, not a state dict of tensors"
        )
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def load_state_dict_strictly(model: nn.Module, state: Mapping[str, Tensor], source: Path) -> None:
    """Load every tensor or raise one error listing every missing, unexpected or misshapen key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or misshapen:
        problems = []
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", misshapen),
        ):
            if keys:
                shown = ", ".join(keys[:12]) + (
                    f", ... ({len(keys)} in all)" if len(keys) > 12 else ""
                )
                problems.append(f"{label}: {shown}")
        raise CheckpointError(
            f"checkpoint {source} does not fit {type(model).__name__}: " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)

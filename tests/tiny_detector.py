"""A tiny, randomly initialised SplitDetector for fast tests of model-agnostic code."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from veil.detectors.base import InputGeometry, SplitDetector
from veil.detectors.boxes import decode_ssd
from veil.noise import NoiseLayer
from veil.profiles import NoiseProfile, ProfileMeta, profile_from_layer


class TinyDetector(SplitDetector):
    name = "tiny"
    head_modules = ("body",)
    weights_id = "0" * 64
    stride = 8
    activation_channels = 8
    mean_bgr = (104.0, 117.0, 123.0)
    default_geometry = InputGeometry(64, 48)

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, 4, 1), nn.ReLU()
        )
        self.heads = nn.Conv2d(8, 6, 3, padding=1)
        self.eval().requires_grad_(False)

    def head(self, x: Tensor) -> Tensor:
        out: Tensor = self.body(x / 64.0)
        return out

    def tail(self, activation: Tensor) -> tuple[Tensor, ...]:
        out = self.heads(activation).permute(0, 2, 3, 1).flatten(1, 2)
        return out[..., :4].contiguous(), out[..., 4:].contiguous()

    def priors(self, input_height: int, input_width: int, device: torch.device) -> Tensor:
        fh, fw = -(-input_height // 8), -(-input_width // 8)
        ys, xs = torch.meshgrid(torch.arange(fh), torch.arange(fw), indexing="ij")
        cx = (xs.flatten() + 0.5) * 8 / input_width
        cy = (ys.flatten() + 0.5) * 8 / input_height
        w = torch.full_like(cx, 16 / input_width)
        h = torch.full_like(cy, 16 / input_height)
        return torch.stack([cx, cy, w, h], 1).to(device)

    def decode_raw(
        self, raw: Sequence[Tensor], input_height: int, input_width: int
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        priors = self.priors(input_height, input_width, raw[0].device)
        scale = torch.tensor([input_width, input_height] * 2, device=raw[0].device)
        boxes = decode_ssd(raw[0], priors, (0.1, 0.2)) * scale
        return boxes, torch.softmax(raw[1], -1)[..., 1], None


def constant_profile(det: SplitDetector, alpha: float, sigma: float, mu: float) -> NoiseProfile:
    """A profile of ``det`` at its default geometry with the same ``sigma`` and ``mu`` in every
    element (bounds 0 and 10)."""
    shape = det.activation_shape(det.default_geometry)
    layer = NoiseLayer(shape, 0.0, 10.0, initial_sigma=sigma)
    with torch.no_grad():
        layer.mu.fill_(mu)
    meta = ProfileMeta(det.name, det.weights_id, str(det.default_geometry), shape, alpha, 0, 10)
    return profile_from_layer(layer, meta)

"""The split-detector contract: preprocess -> head -> (noise) -> tail -> decode.

``head`` runs inside the trusted zone; its output (the *activation*) is the only thing that,
after the noise layer, crosses the wire; ``tail`` and ``decode`` run outside.

Geometry: every frame is letterboxed into a fixed input geometry (the model's input size for a
stream or a noise profile): scaled to fit while keeping its aspect ratio, placed top-left, and
padded with the model's mean colour (zero after normalisation). A fixed geometry gives a fixed
activation shape, which a per-element noise profile needs; :class:`Letterbox` maps boxes back
to frame pixels.
"""

from __future__ import annotations

import copy
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from veil.detections import Detections
from veil.errors import ConfigError

Frame = npt.NDArray[np.uint8]  # H x W x 3, BGR, as OpenCV and PyAV (format="bgr24") give them


@dataclass(frozen=True)
class InputGeometry:
    """The model input size, in pixels. Both sides must be multiples of the model's stride."""

    width: int
    height: int

    @classmethod
    def parse(cls, text: str) -> InputGeometry:
        """``"1024x1024"`` -> InputGeometry(1024, 1024)."""
        try:
            w, h = (int(v) for v in text.lower().split("x"))
        except ValueError as exc:
            raise ConfigError(f"input geometry {text!r} is not WIDTHxHEIGHT") from exc
        if w <= 0 or h <= 0:
            raise ConfigError(f"input geometry {text!r} must be positive")
        return cls(w, h)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class Letterbox:
    """How one frame was placed into the input: ``input = frame * scale`` at the top-left."""

    scale: float
    frame_width: int
    frame_height: int

    def to_frame(self, xyxy: Tensor) -> Tensor:
        """Input-pixel boxes to frame-pixel boxes, clipped to the frame."""
        out = xyxy / self.scale
        out[:, 0::2] = out[:, 0::2].clamp(0, self.frame_width)
        out[:, 1::2] = out[:, 1::2].clamp(0, self.frame_height)
        return out


def letterbox_scale(frame_width: int, frame_height: int, geometry: InputGeometry) -> float:
    return min(geometry.width / frame_width, geometry.height / frame_height)


def resize_interpolation(width: int, height: int, new_width: int, new_height: int) -> int:
    """OpenCV's interpolation for the letterbox's uint8 resize: bilinear, except where the
    frame shrinks by one odd integer factor in both directions (1080p into 640x640: 3). There
    every bilinear sample falls exactly on a source pixel (``k * x + (k - 1) / 2``), so
    nearest-exact gives the same bytes in half the time (measured at 1080p -> 640x360: 0.31
    against 0.63 ms)."""
    k, rest = divmod(width, new_width)
    exact = rest == 0 and k % 2 == 1 and k > 1 and height == k * new_height
    return cv2.INTER_NEAREST_EXACT if exact else cv2.INTER_LINEAR


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _host_pixels(frame: Frame | Tensor, index: int) -> Frame:
    """A frame as a host ``H x W x 3`` uint8 array (a view where it already is one)."""
    pixels = frame.cpu().numpy() if isinstance(frame, Tensor) else np.asarray(frame)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(
            f"frame {index}: expected an HxWx3 uint8 BGR image, got shape "
            f"{tuple(pixels.shape)} dtype {pixels.dtype}"
        )
    return np.ascontiguousarray(pixels)


def _input_buffer(
    out: Tensor | None, n: int, geometry: InputGeometry, device: torch.device
) -> Tensor:
    """The first ``n`` inputs of ``out`` where it fits (float32, contiguous, on ``device``,
    large enough), else a new uninitialised input."""
    shape = (3, geometry.height, geometry.width)
    fits = (
        out is not None
        and out.dtype == torch.float32
        and out.device == device
        and out.is_contiguous()
        and tuple(out.shape[1:]) == shape
        and out.shape[0] >= n
    )
    if fits:
        assert out is not None  # for mypy
        return out[:n]
    return torch.empty((n, *shape), dtype=torch.float32, device=device)


class SplitDetector(nn.Module, ABC):
    """A single-shot face detector cut in two at one activation tensor.

    Subclasses set ``name``, ``weights_id`` (sha256 of the weights they loaded), ``stride``
    (total stride of the activation), ``mean_bgr`` and ``std_bgr`` (input normalisation), and
    implement :meth:`head`, :meth:`tail` and :meth:`decode_raw`.
    """

    name: str
    # State-dict prefixes of the modules the head runs; every other parameter is the tail's.
    head_modules: tuple[str, ...]
    weights_id: str
    stride: int
    activation_channels: int
    mean_bgr: tuple[float, float, float]
    std_bgr: tuple[float, float, float] = (1.0, 1.0, 1.0)
    default_geometry: InputGeometry

    @abstractmethod
    def head(self, x: Tensor) -> Tensor:
        """Normalised input ``[N, 3, H, W]`` -> activation ``[N, C, H/s, W/s]``."""

    @abstractmethod
    def tail(self, activation: Tensor) -> tuple[Tensor, ...]:
        """Activation -> raw outputs (``loc [N, P, 4]``, ``conf [N, P, 2]`` logits, ...)."""

    @abstractmethod
    def priors(self, input_height: int, input_width: int, device: torch.device) -> Tensor:
        """Anchor boxes ``[P, 4]`` (cx, cy, w, h), normalised to the input size."""

    @abstractmethod
    def decode_raw(
        self, raw: Sequence[Tensor], input_height: int, input_width: int
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Raw outputs -> (boxes ``[N, P, 4]`` xyxy in input pixels, face scores ``[N, P]``,
        landmarks ``[N, P, 5, 2]`` in input pixels or None)."""

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.tail(self.head(x))

    def reference(self) -> SplitDetector | None:
        """The whole network this split was cut from, when the cut changed it (same weights,
        a shallower head, the same outputs and priors); None when this split is the network.

        Calibration distils a profile's tail from the reference's clean outputs, so that a
        cut that costs accuracy gets it back in the tail it trains.
        """
        return None

    def is_tail_key(self, key: str) -> bool:
        return not any(key == m or key.startswith(m + ".") for m in self.head_modules)

    def tail_state(self) -> dict[str, Tensor]:
        """The tail's parameters and buffers (what a noise profile's fine-tuned tail replaces)."""
        return {k: v for k, v in self.state_dict().items() if self.is_tail_key(k)}

    def tail_parameters(self) -> list[nn.Parameter]:
        return [p for k, p in self.named_parameters() if self.is_tail_key(k)]

    def with_tail(self, state: dict[str, Tensor]) -> SplitDetector:
        """A frozen copy of this detector whose tail has ``state`` (a :meth:`tail_state`)."""
        expected = self.tail_state()
        if set(state) != set(expected):
            missing = sorted(set(expected) - set(state))[:5]
            extra = sorted(set(state) - set(expected))[:5]
            raise ConfigError(
                f"{self.name}: tail weights do not fit (missing {missing}, unexpected {extra})"
            )
        clone = copy.deepcopy(self)
        clone.load_state_dict(state, strict=False)
        clone.eval().requires_grad_(False)
        return clone

    def activation_shape(self, geometry: InputGeometry) -> tuple[int, int, int]:
        """``(C, H, W)`` of the activation for an input of this geometry."""
        with torch.no_grad():
            probe = torch.zeros(1, 3, geometry.height, geometry.width, device=self.device)
            return tuple(self.head(probe).shape[1:])  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def check_geometry(self, geometry: InputGeometry) -> None:
        if geometry.width % self.stride or geometry.height % self.stride:
            raise ConfigError(
                f"{self.name}: input geometry {geometry} must be a multiple of its stride "
                f"{self.stride} on both sides"
            )

    def preprocess(
        self,
        frames: Sequence[Frame | Tensor],
        geometry: InputGeometry,
        out: Tensor | None = None,
        padded: list[tuple[int, int] | None] | None = None,
    ) -> tuple[Tensor, list[Letterbox]]:
        """Letterbox BGR uint8 frames into ``geometry`` and normalise, on the model's device.

        Frames may differ in size. Each is resized as uint8 on the host (bilinear, or
        :func:`resize_interpolation`'s shortcut where that gives the same bytes; a frame that
        already fits, such as 1080p into 1920x1088, is not resized) and normalised into the
        input, whose padding alone is zeroed: on a CPU plane by plane
        (:meth:`_normalise_planes`), on a GPU copied as uint8 and normalised there in one
        fused multiply-add. ``out`` (a float32 ``[M, 3, H, W]`` buffer on the device,
        ``M >= len(frames)``, e.g. the previous call's result) is reused instead of a new input;
        the batch returned is then a view of it. ``padded``, kept by the owner of ``out`` beside
        it, records per input the frame size whose padding is already zero there, so that a
        stream's next frame of the same size does not zero it again (0.1 ms at 640x640 for a
        16:9 frame); it is reset when ``out`` is not reused.
        """
        self.check_geometry(geometry)
        batch = _input_buffer(out, len(frames), geometry, self.device)
        padded = [] if padded is None else padded
        if out is None or batch.data_ptr() != out.data_ptr():
            padded.clear()
        padded.extend([None] * (len(frames) - len(padded)))
        # A GPU's normalisation tensors (building them cost 0.1 ms a call; a CPU needs none).
        normalisation = None if batch.device.type == "cpu" else self._normalisation(batch.device)
        boxes: list[Letterbox] = []
        for i, frame in enumerate(frames):
            pixels = _host_pixels(frame, i)
            h, w = pixels.shape[:2]
            scale_factor = letterbox_scale(w, h, geometry)
            new_w = min(geometry.width, max(1, round(w * scale_factor)))
            new_h = min(geometry.height, max(1, round(h * scale_factor)))
            if (new_h, new_w) != (h, w):
                interpolation = resize_interpolation(w, h, new_w, new_h)
                resized = cv2.resize(pixels, (new_w, new_h), interpolation=interpolation)
                pixels = np.asarray(resized, dtype=np.uint8)
            dst = batch[i]
            if normalisation is None:
                self._normalise_planes(pixels, dst[:, :new_h, :new_w].numpy())
            else:
                shift, scale = normalisation
                src = torch.from_numpy(pixels).pin_memory().to(batch.device, non_blocking=True)
                torch.addcmul(shift, src.permute(2, 0, 1), scale, out=dst[:, :new_h, :new_w])
            if padded[i] != (new_h, new_w):
                dst[:, new_h:].zero_()
                dst[:, :new_h, new_w:].zero_()
                padded[i] = (new_h, new_w)
            boxes.append(Letterbox(scale_factor, w, h))
        return batch, boxes

    def _normalise_planes(self, pixels: Frame, out: npt.NDArray[np.float32]) -> None:
        """``(pixels - mean) / std`` into ``out`` (``[3, h, w]``), one contiguous plane at a
        time: the channels split by OpenCV, each subtracted into its float plane (measured at
        1920x1080: 3.0 ms against 13.9 ms for one multiply-add over the interleaved pixels)."""
        for c, plane in enumerate(cv2.split(pixels)):
            np.subtract(
                plane, np.float32(self.mean_bgr[c]), out=out[c], dtype=np.float32, casting="unsafe"
            )
            if self.std_bgr[c] != 1.0:
                np.multiply(out[c], np.float32(1.0 / self.std_bgr[c]), out=out[c])

    def _normalisation(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(-mean / std, 1 / std)`` as ``[3, 1, 1]`` on ``device``: ``x * scale + shift``
        normalises. Made once per device: a copy from pageable host memory on every call would
        also make the host wait for the lane's stream."""
        cache: dict[torch.device, tuple[Tensor, Tensor]] = self.__dict__.setdefault(
            "_normalisation_by_device", {}
        )
        if device not in cache:
            std = torch.tensor(self.std_bgr, dtype=torch.float64)
            mean = torch.tensor(self.mean_bgr, dtype=torch.float64)
            shift = (-mean / std).to(device, torch.float32).view(3, 1, 1)
            cache[device] = shift, (1.0 / std).to(device, torch.float32).view(3, 1, 1)
        return cache[device]

    def decode(
        self,
        raw: Sequence[Tensor],
        letterboxes: Sequence[Letterbox],
        input_height: int,
        input_width: int,
        score_threshold: float = 0.05,
        nms_iou: float = 0.3,
        top_k: int = 5000,
        keep_top_k: int = 750,
    ) -> list[Detections]:
        """Raw tail outputs -> one :class:`Detections` per frame, in frame pixels."""
        from veil.detectors.boxes import nms

        boxes, scores, landmarks = self.decode_raw(raw, input_height, input_width)
        out: list[Detections] = []
        for i, lb in enumerate(letterboxes):
            s = scores[i]
            idx = torch.nonzero(s > score_threshold).flatten()
            idx = idx[torch.argsort(s[idx], descending=True, stable=True)][:top_k]
            b, sc = boxes[i][idx], s[idx]
            keep = nms(b, sc, nms_iou)[:keep_top_k]
            lm = None
            if landmarks is not None:
                lm_t = landmarks[i][idx][keep] / lb.scale
                lm = lm_t.detach().cpu().numpy()
            out.append(
                Detections(
                    lb.to_frame(b[keep].clone()).detach().cpu().numpy(),
                    sc[keep].detach().cpu().numpy(),
                    lm,
                )
            )
        return out

    @torch.no_grad()
    def detect(
        self,
        frames: Sequence[Frame],
        geometry: InputGeometry | None = None,
        score_threshold: float = 0.05,
    ) -> list[Detections]:
        """The unsplit, noise-free path: frames in, detections out (the reference)."""
        geometry = geometry or self.default_geometry
        x, boxes = self.preprocess(frames, geometry)
        return self.decode(self.forward(x), boxes, x.shape[2], x.shape[3], score_threshold)

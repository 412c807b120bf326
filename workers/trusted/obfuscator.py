"""Head + noise for batches of frames from many streams: the only code that turns pixels
into what may leave the trusted zone.

Each frame gets its own stream's noise profile inside a mixed batch: the profiles' ``mu`` and
``sigma`` are stacked once on the device and indexed per frame. On a GPU the batch is split
over several CUDA streams ("lanes"); each lane copies its (letterboxed, uint8) frames from
pinned host memory with non-blocking copies, so that one lane's copies overlap another's
compute. On the CPU the same
code runs with lanes that are plain contexts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from stream.frames import Frame as StreamFrame
from stream.wire import Envelope, EnvelopeFields, Provenance, ProvenanceFields
from veil.detectors.base import Frame, InputGeometry, Letterbox, SplitDetector
from veil.detectors.head_runtime import build_head
from veil.errors import ConfigError, ProfileError
from veil.noise import noise_source
from veil.profiles import NoiseProfile, ProfileBank, check_alpha

CLEAN_PROFILE_ID = "none"


@dataclass(frozen=True)
class ObfuscatedFrame(EnvelopeFields, ProvenanceFields):
    """One frame's noisy activation and what the outside needs to decode its boxes."""

    envelope: Envelope  # the frame's, unchanged
    provenance: Provenance  # detector, weights, the profile applied and its alpha
    activation: npt.NDArray[np.float32]  # (C, H, W), noise already added
    letterbox: Letterbox


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r} requested but CUDA is not available here")
    return device


class ProfileTable:
    """The profiles a worker may apply, stacked on the device for per-frame indexing.

    Row 0 is the clean profile (alpha 0, no noise), kept for benchmarks and debugging only:
    ``veil`` refuses alpha 0 for streams unless explicitly allowed.
    """

    def __init__(
        self,
        detector: SplitDetector,
        geometry: InputGeometry,
        profiles: Sequence[NoiseProfile],
        device: torch.device,
    ) -> None:
        shape = detector.activation_shape(geometry)
        for p in profiles:
            p.check_fits(detector.name, detector.weights_id, geometry, shape)
        self.profiles = sorted(profiles, key=lambda p: p.alpha)
        self.by_alpha = {p.alpha: i + 1 for i, p in enumerate(self.profiles)}
        zeros = torch.zeros(shape)
        self.mu = torch.stack([zeros, *(p.mu for p in self.profiles)]).to(device)
        self.sigma = torch.stack([zeros, *(p.sigma() for p in self.profiles)]).to(device)

    @classmethod
    def from_bank(
        cls,
        detector: SplitDetector,
        geometry: InputGeometry,
        bank: ProfileBank,
        device: torch.device,
    ) -> ProfileTable:
        profiles = [
            p
            for p in bank.profiles()
            if p.meta.model == detector.name and p.meta.geometry == str(geometry)
        ]
        return cls(detector, geometry, profiles, device)

    @property
    def alphas(self) -> list[float]:
        return [p.alpha for p in self.profiles]

    def row(self, alpha: float) -> int:
        alpha = check_alpha(alpha)
        if alpha == 0.0:
            return 0
        if alpha not in self.by_alpha:
            raise ProfileError(
                f"no calibrated profile for alpha {alpha}; available alphas: "
                f"{self.alphas or 'none'} (run `veil calibrate` to add one)"
            )
        return self.by_alpha[alpha]

    def profile_id(self, row: int) -> str:
        return CLEAN_PROFILE_ID if row == 0 else self.profiles[row - 1].profile_id

    def alpha(self, row: int) -> float:
        return 0.0 if row == 0 else self.profiles[row - 1].alpha


class Obfuscator:
    """Synchronous batch step (run it in a worker thread): frames -> noisy activations.

    The head runs through ``head_runtime`` (:mod:`veil.detectors.head_runtime`: torch or
    onnxruntime, ``auto`` picks the faster one for the device) with ``threads`` intra-op
    threads, set again at the start of every :meth:`run` in the thread that runs it (torch's
    OpenMP thread count is per thread), so that this role keeps its share of the host's cores
    beside others in the same process. Each lane letterboxes into an input it reuses.
    ``precision`` (``model.precision``) is the head's and the noise's arithmetic: ``float16``
    (torch only; the GPU's setting) casts the input where the head turns it channels_last
    and keeps the profiles' ``mu`` and ``sigma`` in half precision beside it.
    """

    def __init__(
        self,
        detector: SplitDetector,
        geometry: InputGeometry,
        table: ProfileTable,
        device: torch.device,
        lanes: int = 2,
        *,
        head_runtime: str = "auto",
        threads: int | None = None,
        precision: str = "float32",
    ) -> None:
        detector.check_geometry(geometry)
        self.detector = detector.to(device).eval().requires_grad_(False)
        self.geometry = geometry
        self.device = device
        self.threads = threads or torch.get_num_threads()
        self.head = build_head(
            self.detector, geometry, device, head_runtime, self.threads, precision
        )
        self.noise = noise_source(device)  # never a fixed seed in serving
        self.cuda = device.type == "cuda"
        self.streams = (
            [torch.cuda.Stream(device) for _ in range(lanes)]  # type: ignore[no-untyped-call]
            if self.cuda
            else []
        )
        self.lanes = max(1, lanes)
        self._inputs: dict[int, Tensor] = {}  # per lane, the letterboxed input it reuses
        self._padded: dict[int, list[tuple[int, int] | None]] = {}  # per lane, see preprocess
        self._eps: dict[int, Tensor] = {}  # per lane, the buffer its noise is drawn into
        self.last_timing: dict[str, float] = {}
        self._provenance: list[Provenance] = []
        self.use_table(table)

    def use_table(self, table: ProfileTable) -> None:
        """Serve ``table`` (a reloaded bank) from the next batch. One provenance per row, made
        once: every activation of that row carries it."""
        self.table = table
        self._mu, self._sigma = table.mu.to(self.head.dtype), table.sigma.to(self.head.dtype)
        self._provenance = [
            Provenance(
                self.detector.name, self.detector.weights_id, table.profile_id(r), table.alpha(r)
            )
            for r in range(len(table.profiles) + 1)
        ]

    def set_threads(self, threads: int) -> None:
        """This role's intra-op threads (the head's runtime and torch's, from the next run)."""
        if threads < 1:
            raise ConfigError(f"threads must be at least 1, got {threads}")
        self.threads = threads
        self.head.set_threads(threads)

    @contextlib.contextmanager
    def _lane(self, i: int) -> Iterator[None]:
        if self.cuda:
            with torch.cuda.stream(self.streams[i % len(self.streams)]):
                yield
        else:
            yield

    def letterbox(self, pixels: Sequence[Frame], lane: int = 0) -> tuple[Tensor, list[Letterbox]]:
        """The lane's input, refilled with ``pixels`` letterboxed and normalised."""
        buffer = self._inputs.get(lane)
        padded = self._padded.setdefault(lane, [])
        x, letterboxes = self.detector.preprocess(pixels, self.geometry, buffer, padded)
        if buffer is None or len(buffer) < len(x):
            self._inputs[lane] = x  # the first or a larger batch: the next ones reuse it
        return x, letterboxes

    def add_noise(self, a: Tensor, rows: Sequence[int], lane: int = 0) -> Tensor:
        """Each frame's own profile (``rows[i]``, a row of the table), in place on ``a`` (the
        head's fresh output): ``a + mu[row] + sigma[row] * eps``. Fresh ``eps``
        (:func:`veil.noise.noise_source`; on a CPU an AES-CTR keystream, 1.7x faster than
        torch's ``normal_`` here) is drawn into the lane's own buffer, kept at the largest
        batch as the letterboxed input is (a new tensor each time cost 0.14 of 0.99 ms at
        128x40x40 on a CPU: its pages). A batch of one profile (the common case: one stream)
        broadcasts its row instead of copying it per frame (measured: the noise 30% cheaper);
        the rows stay a Python list until frames of several profiles need a device index."""
        buffer = self._eps.get(lane)
        if (
            buffer is None
            or len(buffer) < len(a)
            or buffer.shape[1:] != a.shape[1:]
            or (buffer.dtype, buffer.device) != (a.dtype, a.device)
        ):
            buffer = self._eps[lane] = torch.empty_like(a)
        eps = self.noise.fill_(buffer[: len(a)])
        first = rows[0]
        if all(row == first for row in rows):
            mu, sigma = self._mu[first], self._sigma[first]
        else:
            index = torch.tensor(rows).to(self.device, non_blocking=True)
            mu, sigma = self._mu[index], self._sigma[index]
        return a.add_(mu).addcmul_(sigma, eps)

    @torch.no_grad()
    def head_and_noise(
        self, pixels: Sequence[Frame], rows: Sequence[int], noise: bool = True, lane: int = 0
    ) -> tuple[Tensor, list[Letterbox]]:
        """Device-side step on one lane: letterbox, head, per-frame noise."""
        x, letterboxes = self.letterbox(pixels, lane)
        a = self.head(x)
        return (self.add_noise(a, rows, lane) if noise else a), letterboxes

    def warm_up(self, max_batch: int) -> float:
        """Run blank frames through every lane at one frame and at ``max_batch`` so that the
        first real ones do not pay for opening the head's session and first touching its
        buffers (measured: a new batch size's first call 30-50% slower); seconds taken."""
        started = time.perf_counter()
        torch.set_num_threads(self.threads)
        blank = np.zeros((self.geometry.height, self.geometry.width, 3), np.uint8)
        full = max(1, max_batch)
        rows = [0] * full
        for lane in range(self.lanes if self.cuda else 1):
            for n in sorted({1, full}):
                with self._lane(lane):
                    self.head_and_noise([blank] * n, rows[:n], lane=lane)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def run(self, frames: Sequence[StreamFrame], alphas: Sequence[float]) -> list[ObfuscatedFrame]:
        """Obfuscate a mixed batch; ``alphas[i]`` is frame i's stream alpha."""
        if len(frames) != len(alphas):
            raise ValueError("one alpha per frame is needed")
        if not frames:
            return []
        started = time.perf_counter()
        torch.set_num_threads(self.threads)
        rows = [self.table.row(a) for a in alphas]
        outputs: list[tuple[Tensor, list[Letterbox], range]] = []
        for lane, idx in enumerate(_chunks(len(frames), self.lanes if self.cuda else 1)):
            with self._lane(lane):
                pixels = [frames[i].pixels for i in idx]
                act, lbs = self.head_and_noise(pixels, [rows[i] for i in idx], lane=lane)
                outputs.append((act.to("cpu", non_blocking=self.cuda), lbs, idx))
        if self.cuda:
            torch.cuda.synchronize(self.device)
        results: list[ObfuscatedFrame] = []
        for host, lbs, idx in outputs:  # the chunks are consecutive: results stay in order
            arr = host.float().numpy()
            for j, i in enumerate(idx):
                provenance = self._provenance[rows[i]]
                results.append(ObfuscatedFrame(frames[i].envelope, provenance, arr[j], lbs[j]))
        self.last_timing = {"batch": len(frames), "seconds": time.perf_counter() - started}
        return results


def _chunks(n: int, lanes: int) -> list[range]:
    """``range(n)`` cut into at most ``lanes`` consecutive parts whose sizes differ by at most
    one, the larger first (as ``numpy.array_split``, which cost 0.1 ms a call on the edge)."""
    lanes = max(1, min(lanes, n))
    size, extra = divmod(n, lanes)
    bounds = [i * size + min(i, extra) for i in range(lanes + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(lanes)]

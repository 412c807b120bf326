"""Calibration against an attacker: the noise (and its tail) trained to defeat an inversion
decoder that learns beside it (adversarial representation learning).

Each calibration step first trains the decoder one step on a fresh noisy draw (it knows
``mu`` and ``sigma``, as the report's attacker does, and sees the same posterior-mean input),
then adds to the calibration loss how much better than the no-information guess it
reconstructs the images::

    advantage = mean_n relu(1 - L1(decoder(z_n), x_n) / L1(prior, x_n))

with ``prior`` the mean calibration image: 0 once the decoder does no better than a guess
made without the wire, so the noise is not pushed past what an attacker can use. The term
is weighted like the leakage bound, ``alpha * adversary_weight``. Targets are the
letterboxed calibration images at four times the activation's grid (160x160 for
RetinaFace's 40x40 at 640x640), kept as float16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from veil.detectors.base import SplitDetector
from veil.privacy.attacks import AttackerView, InversionDecoder, NoiseModel, input_pixels

UPSAMPLINGS = 2  # targets at 4x the activation's grid


@dataclass
class Adversary:
    """The decoder being trained against the noise, with its targets and prior."""

    decoder: InversionDecoder
    optimizer: torch.optim.Optimizer
    mean: Tensor  # (C, h, w): the attacker's prior of the clean activation
    spread: Tensor  # (C, h, w), floored
    targets: Tensor  # [N, 3, 4h, 4w] in [0, 1], float16
    prior: Tensor  # [3, 4h, 4w]: the mean target, the guess without the wire

    @classmethod
    def build(
        cls,
        activations: Tensor,
        targets: Tensor,
        width: int = 64,
        lr: float = 1e-3,
        seed: int = 0,
    ) -> Adversary:
        """The decoder initialised from ``seed`` alone (a resumed run rebuilds the same one)."""
        channels = int(activations.shape[1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            decoder = InversionDecoder(2 * channels, UPSAMPLINGS, width).train()
        mean, spread = AttackerView.prior(activations.float())
        optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
        return cls(decoder, optimizer, mean, spread, targets, targets.float().mean(0))

    def _features(self, observed: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
        """The report's decoder input (:class:`AttackerView`) under the current noise."""
        noise = NoiseModel(mu, sigma, "calibration")
        return AttackerView.with_prior(self.mean, self.spread, noise).features(observed)

    def _errors(self, observed: Tensor, mu: Tensor, sigma: Tensor, idx: Tensor) -> Tensor:
        """Per image, the decoder's L1 error over the prior's."""
        target = self.targets[idx].float()
        rebuilt: Tensor = self.decoder(self._features(observed, mu, sigma))
        error = (rebuilt - target).abs().mean(dim=(1, 2, 3))
        prior = (self.prior - target).abs().mean(dim=(1, 2, 3)).clamp_min(1e-6)
        return error / prior

    def learn(self, observed: Tensor, mu: Tensor, sigma: Tensor, idx: Tensor) -> float:
        """One decoder step on a detached draw; its loss (relative L1). The decoder stays in
        training mode throughout (batch statistics in both passes)."""
        loss = self._errors(observed.detach(), mu.detach(), sigma.detach(), idx).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        return float(loss.detach())

    def advantage(self, observed: Tensor, mu: Tensor, sigma: Tensor, idx: Tensor) -> Tensor:
        """How much better than the prior the decoder reconstructs (differentiable in the
        noise); the decoder's own weights are not updated by it."""
        for parameter in self.decoder.parameters():
            parameter.requires_grad_(False)
        try:
            return F.relu(1.0 - self._errors(observed, mu, sigma, idx)).mean()
        finally:
            for parameter in self.decoder.parameters():
                parameter.requires_grad_(True)

    def state_dict(self) -> dict[str, Any]:
        return {"decoder": self.decoder.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decoder.load_state_dict(state["decoder"])
        self.optimizer.load_state_dict(state["optimizer"])


def letterboxed_targets(detector: SplitDetector, inputs: Tensor, grid: tuple[int, int]) -> Tensor:
    """``detector``'s normalised inputs ``[N, 3, H, W]`` back in [0, 1] at 4x ``grid`` (h, w),
    area-averaged as the report's attack targets are, float16."""
    size = (grid[0] * 2**UPSAMPLINGS, grid[1] * 2**UPSAMPLINGS)
    return (input_pixels(detector, inputs, size) / 255.0).half()

"""The learned noise layer: what makes an activation safe(r) to send out of the trusted zone.

Per activation element ``i`` the layer holds a learned mean ``mu_i`` and a learned scale
parameter ``rho_i``; the scale is squashed into ``[s_min, s_max]`` (Cloak / Stained Glass)::

    sigma = s_min + (s_max - s_min) * (1 + tanh(rho)) / 2
    out   = a + mu + sigma * eps,        eps ~ N(0, 1), fresh for every frame

The attacker is assumed to know ``mu`` and ``sigma`` (they are not secret); privacy comes only
from ``eps``, which is why serving draws it from a generator seeded by the operating system's
entropy and never from a fixed seed.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn


def entropy_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from ``os.urandom``: two workers never share a noise stream."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return gen


class NoiseLayer(nn.Module):
    """Per-element learned Gaussian noise for activations of shape ``(C, H, W)``."""

    s_min: Tensor
    s_max: Tensor

    def __init__(
        self,
        shape: tuple[int, int, int],
        s_min: float,
        s_max: float,
        initial_sigma: float | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= s_min < s_max:
            raise ValueError(f"noise bounds must satisfy 0 <= s_min < s_max, got {s_min}, {s_max}")
        self.shape = tuple(shape)
        self.register_buffer("s_min", torch.tensor(float(s_min)))
        self.register_buffer("s_max", torch.tensor(float(s_max)))
        self.mu = nn.Parameter(torch.zeros(shape))
        start = s_min + 0.5 * (s_max - s_min) if initial_sigma is None else initial_sigma
        # Invert the squashing so that training starts at sigma == start everywhere.
        frac = (start - s_min) / (s_max - s_min)
        frac = min(max(frac, 1e-4), 1 - 1e-4)
        self.rho = nn.Parameter(torch.full(shape, float(torch.atanh(torch.tensor(2 * frac - 1)))))

    def sigma(self) -> Tensor:
        s_min, s_max = self.s_min, self.s_max
        return s_min + (s_max - s_min) * (1 + torch.tanh(self.rho)) / 2

    def forward(self, activation: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if tuple(activation.shape[1:]) != self.shape:
            raise ValueError(
                f"noise layer expects activations of shape (N, {', '.join(map(str, self.shape))}),"
                f" got {tuple(activation.shape)}"
            )
        eps = torch.randn(
            activation.shape, generator=generator, device=activation.device, dtype=activation.dtype
        )
        return activation + self.mu + self.sigma() * eps

    def strength_loss(self) -> Tensor:
        """``-log mean sigma``: lower when the noise is stronger."""
        return -torch.log(self.sigma().mean())

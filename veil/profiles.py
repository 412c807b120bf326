"""Noise profiles: the learned noise for one (model, weights, input geometry, alpha).

On disk a profile is two files side by side in a *bank* folder::

    faceboxes-1024x1024-a0.80.safetensors   tensors ``mu`` and ``rho`` (C, H, W), float32, and
                                            the profile's fine-tuned tail as ``tail/<key>``
    faceboxes-1024x1024-a0.80.json          :class:`ProfileMeta`: provenance, loss summary,
                                            measured accuracy and leakage

A profile's tail (optional; calibrated profiles carry one) is the detector's tail fine-tuned to
read activations under that profile's noise. It is not secret: the outside runs it.

A profile only fits the model, weights and geometry it was trained for: the activation shape
depends on all three, and the noise was learned against that model's tail. Frames of any size
are served by letterboxing them into the profile's geometry (see ``veil.detectors.base``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from veil.detectors.base import InputGeometry, SplitDetector
from veil.errors import ProfileError
from veil.noise import NoiseLayer

ALPHA_DECIMALS = 2


def alpha_tag(alpha: float) -> str:
    return f"a{alpha:.{ALPHA_DECIMALS}f}"


def check_alpha(alpha: float) -> float:
    if not isinstance(alpha, (int, float)) or math.isnan(alpha) or not 0.0 <= alpha <= 1.0:
        raise ProfileError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return round(float(alpha), ALPHA_DECIMALS)


@dataclass(frozen=True)
class ProfileMeta:
    model: str
    weights_id: str
    geometry: str  # "WxH"
    activation_shape: tuple[int, int, int]
    alpha: float
    s_min: float
    s_max: float
    profile_id: str = ""  # content hash of the tensors, set when saved
    task_loss: str = "distill"
    trained_on: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)  # seed, epochs, lr, loss curve
    accuracy: dict[str, Any] = field(default_factory=dict)  # filled by the benchmark
    leakage: dict[str, Any] = field(default_factory=dict)  # filled by the privacy report
    veil_version: str = "0.1.0"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["activation_shape"] = list(self.activation_shape)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], source: Path) -> ProfileMeta:
        try:
            data = dict(data)
            data["activation_shape"] = tuple(int(v) for v in data["activation_shape"])
            return cls(**data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"{source}: not a veil profile description ({exc})") from exc


TAIL_PREFIX = "tail/"


@dataclass(frozen=True)
class NoiseProfile:
    meta: ProfileMeta
    mu: torch.Tensor
    rho: torch.Tensor
    tail: dict[str, torch.Tensor] | None = None  # fine-tuned tail state, or the frozen tail

    def detector_for(self, detector: SplitDetector) -> SplitDetector:
        """``detector`` with this profile's tail (``detector`` itself if it has none)."""
        return detector if self.tail is None else detector.with_tail(self.tail)

    @property
    def profile_id(self) -> str:
        return self.meta.profile_id

    @property
    def alpha(self) -> float:
        return self.meta.alpha

    def layer(self, device: torch.device | str = "cpu") -> NoiseLayer:
        layer = NoiseLayer(self.meta.activation_shape, self.meta.s_min, self.meta.s_max)
        with torch.no_grad():
            layer.mu.copy_(self.mu)
            layer.rho.copy_(self.rho)
        layer.requires_grad_(False)
        return layer.to(device).eval()

    def sigma(self) -> torch.Tensor:
        return self.layer().sigma().detach()

    def check_fits(
        self,
        model: str,
        weights_id: str,
        geometry: InputGeometry,
        activation_shape: tuple[int, ...] | None = None,
    ) -> None:
        """Raise a ProfileError naming every mismatch with the serving model (with
        ``activation_shape``, also its head's output: a split moved under the same name)."""
        problems = []
        if self.meta.model != model:
            problems.append(f"model {self.meta.model!r} (serving {model!r})")
        if self.meta.weights_id != weights_id:
            problems.append(
                f"weights {self.meta.weights_id[:12]} (serving {weights_id[:12]}): the noise "
                "was learned against other weights"
            )
        if self.meta.geometry != str(geometry):
            problems.append(f"geometry {self.meta.geometry} (serving {geometry})")
        if activation_shape is not None and self.meta.activation_shape != tuple(activation_shape):
            problems.append(
                f"activation {self.meta.activation_shape} (the head now gives "
                f"{tuple(activation_shape)}): calibrated for another split; calibrate again"
            )
        if problems:
            raise ProfileError(
                f"noise profile {self.profile_id} (alpha {self.alpha}) does not fit: "
                + "; ".join(problems)
            )


def content_id(
    mu: torch.Tensor, rho: torch.Tensor, tail: dict[str, torch.Tensor] | None = None
) -> str:
    digest = hashlib.sha256()
    for t in (mu, rho):
        digest.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    for key in sorted(tail or {}):
        digest.update(key.encode())
        digest.update((tail or {})[key].detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:16]


def profile_from_layer(
    layer: NoiseLayer, meta: ProfileMeta, tail: dict[str, torch.Tensor] | None = None
) -> NoiseProfile:
    mu, rho = layer.mu.detach().cpu().clone(), layer.rho.detach().cpu().clone()
    tail = None if tail is None else {k: v.detach().cpu().clone() for k, v in tail.items()}
    return NoiseProfile(replace(meta, profile_id=content_id(mu, rho, tail)), mu, rho, tail)


class ProfileBank:
    """A folder of profiles for one model, weights and geometry, keyed by alpha."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def stem(self, meta: ProfileMeta) -> str:
        return f"{meta.model}-{meta.geometry}-{alpha_tag(meta.alpha)}"

    def save(self, profile: NoiseProfile) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        stem = self.stem(profile.meta)
        tensors = self.root / f"{stem}.safetensors"
        meta_path = self.root / f"{stem}.json"
        # Write to temporary names and rename, so a crash never leaves half a profile.
        tmp_t, tmp_m = tensors.with_suffix(".safetensors.tmp"), meta_path.with_suffix(".json.tmp")
        tail = {TAIL_PREFIX + k: v.contiguous() for k, v in (profile.tail or {}).items()}
        save_file(
            {"mu": profile.mu.contiguous(), "rho": profile.rho.contiguous()} | tail,
            str(tmp_t),
            metadata={"profile_id": profile.profile_id, "alpha": str(profile.alpha)},
        )
        tmp_m.write_text(json.dumps(profile.meta.to_json(), indent=2) + "\n")
        tmp_t.replace(tensors)
        tmp_m.replace(meta_path)
        return tensors

    def update_meta(self, profile: NoiseProfile, **changes: Any) -> NoiseProfile:
        updated = NoiseProfile(
            replace(profile.meta, **changes), profile.mu, profile.rho, profile.tail
        )
        meta_path = self.root / f"{self.stem(updated.meta)}.json"
        meta_path.write_text(json.dumps(updated.meta.to_json(), indent=2) + "\n")
        return updated

    def load_path(self, tensors_path: Path) -> NoiseProfile:
        meta_path = tensors_path.with_suffix(".json")
        if not tensors_path.is_file():
            raise ProfileError(f"no profile tensors at {tensors_path}")
        if not meta_path.is_file():
            raise ProfileError(f"profile {tensors_path} has no description {meta_path.name}")
        try:
            meta = ProfileMeta.from_json(json.loads(meta_path.read_text()), meta_path)
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{meta_path}: invalid JSON ({exc})") from exc
        try:
            tensors = load_file(str(tensors_path))
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise ProfileError(f"{tensors_path}: unreadable or corrupt ({exc})") from exc
        for name in ("mu", "rho"):
            if name not in tensors:
                raise ProfileError(f"{tensors_path}: missing tensor {name!r}")
            if tuple(tensors[name].shape) != meta.activation_shape:
                raise ProfileError(
                    f"{tensors_path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                    f"description says {meta.activation_shape}"
                )
        tail = {
            k.removeprefix(TAIL_PREFIX): v for k, v in tensors.items() if k.startswith(TAIL_PREFIX)
        } or None
        if content_id(tensors["mu"], tensors["rho"], tail) != meta.profile_id:
            raise ProfileError(f"{tensors_path}: tensors do not match profile id {meta.profile_id}")
        return NoiseProfile(meta, tensors["mu"], tensors["rho"], tail)

    def profiles(self) -> list[NoiseProfile]:
        if not self.root.is_dir():
            return []
        return sorted(
            (self.load_path(p) for p in self.root.glob("*.safetensors")), key=lambda p: p.alpha
        )

    def alphas(self, model: str | None = None, geometry: str | None = None) -> list[float]:
        return [
            p.alpha
            for p in self.profiles()
            if (model is None or p.meta.model == model)
            and (geometry is None or p.meta.geometry == geometry)
        ]

    def get(
        self,
        alpha: float,
        model: str | None = None,
        weights_id: str | None = None,
        geometry: InputGeometry | str | None = None,
    ) -> NoiseProfile:
        """The profile for exactly this alpha, checked against the serving model.

        ``model``, ``weights_id`` and ``geometry`` narrow the choice and are checked when
        given; without them the bank must hold one profile of that alpha (else a ProfileError
        lists what it holds). ``veil.api.Bank.profile`` passes all three.
        """
        alpha = check_alpha(alpha)
        wanted = None if geometry is None else str(geometry)
        candidates = [
            p
            for p in self.profiles()
            if p.alpha == alpha
            and (model is None or p.meta.model == model)
            and (wanted is None or p.meta.geometry == wanted)
        ]
        if not candidates:
            available = self.alphas(model, wanted)
            serving = f" ({model or 'any model'}, {wanted or 'any geometry'})"
            raise ProfileError(
                f"no calibrated profile for alpha {alpha}{serving} in {self.root}; "
                f"available alphas: {available or 'none'}"
            )
        if len(candidates) > 1:
            held = ", ".join(sorted(f"{p.meta.model} {p.meta.geometry}" for p in candidates))
            raise ProfileError(
                f"{self.root} holds {len(candidates)} profiles for alpha {alpha} ({held}): "
                "pass model= and geometry= to choose"
            )
        profile = candidates[0]
        meta = profile.meta
        profile.check_fits(
            model or meta.model,
            weights_id or meta.weights_id,
            InputGeometry.parse(wanted or meta.geometry),
        )
        return profile

"""What one attack leaks against one noise setting, and which attack leaks the most.

Every figure carries its sample size and a 95% interval: rates (rank-1 re-identification,
same-person share, face re-detection) as :class:`~veil.privacy.identity.Rate` (Wilson),
means (SSIM of face crops and whole frames, distances) as
:class:`~veil.privacy.identity.MeanCI`. This module also reads them back from a report's
JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from veil.privacy.identity import IdentityScores, MeanCI, Rate
from veil.privacy.retouch import RETOUCHES, retouched, split_name

# The attacks a report runs, in the order its tables list them (and ties are broken).
ATTACK_NAMES = {
    "decoder": "decoder",
    "rmle": "rMLE",
    "linkage": "feature linkage",
    "boxes-only": "boxes-only mean face",
    "boxes-decoder": "boxes-only decoder",
}
RETOUCH_NAMES = {"tone": "tone flattened", "gray": "in gray"}
# The boxes-only attackers a report draws, and the references that know only the output boxes,
# as drawn and retouched: their best figure is what the boxes give.
DRAWN_FLOORS = ("boxes-only", "boxes-decoder")
BOXES_ONLY = tuple(
    name for floor in DRAWN_FLOORS for name in (floor, *(retouched(floor, r) for r in RETOUCHES))
)


def finite(value: float) -> float | str:
    """JSON has no inf/nan: write them as strings (``float()`` reads them back)."""
    return value if math.isfinite(value) else str(value)


def _number(value: Any) -> float:
    return float(value)  # also reads the strings finite() wrote


def rate_from_json(data: Mapping[str, Any]) -> Rate:
    return Rate(int(data["hits"]), int(data["n"]))


def mean_from_json(data: Mapping[str, Any]) -> MeanCI:
    return MeanCI(
        _number(data["mean"]), _number(data["low"]), _number(data["high"]), int(data["n"])
    )


def mean_to_json(value: MeanCI) -> dict[str, Any]:
    return {k: finite(v) if isinstance(v, float) else v for k, v in value.to_json().items()}


def rate_to_json(value: Rate) -> dict[str, Any]:
    return {k: finite(v) if isinstance(v, float) else v for k, v in value.to_json().items()}


def identity_to_json(value: IdentityScores) -> dict[str, Any]:
    data = value.to_json()
    data["rank1"] = rate_to_json(value.rank1)
    data["same_person"] = rate_to_json(value.same_person)
    data["distances"] = mean_to_json(value.distances)
    if value.false_match is not None:
        data["false_match"] = mean_to_json(value.false_match)
    return data


def identity_from_json(data: Mapping[str, Any]) -> IdentityScores:
    return IdentityScores(
        rate_from_json(data["rank1"]),
        rate_from_json(data["same_person"]),
        int(data["gallery_size"]),
        float(data["chance"]),
        mean_from_json(data["distances"]),
        None if data.get("false_match") is None else mean_from_json(data["false_match"]),
        tuple(int(r) for r in data.get("own_rows", ())),
        tuple(float(d) for d in data.get("own_distances", ())),
    )


@dataclass(frozen=True)
class AttackScores:
    """Leakage of one attack (or reference) against one noise setting.

    ``identity`` is None where no face could be scored; the pixel figures are None for the
    feature-linkage attack, which predicts embeddings and draws no pixels. Re-detection (the
    share of faces the clean detector finds again in a reconstruction) is kept as a column
    but is not a privacy figure: a drawn blob is found as a face without being anyone.
    """

    attack: str  # "decoder", "rmle", "linkage", "originals", "boxes-only", "boxes-decoder"
    images: int
    faces: int  # faces scored for identity
    identity: IdentityScores | None
    ssim: MeanCI | None  # whole frame (inside the letterbox), one value per image
    ssim_face: MeanCI | None  # one value per ground-truth face crop
    psnr: float | None  # mean dB over images (inf for identical images)
    psnr_face: float | None
    redetection: Rate | None
    seconds: float  # the attack's cost: training, or optimisation of these images

    @property
    def rank1(self) -> float:
        """Rank-1 rate, NaN when nothing was scored."""
        return math.nan if self.identity is None else self.identity.rank1.value

    @property
    def same_person(self) -> float:
        return math.nan if self.identity is None else self.identity.same_person.value

    def to_json(self) -> dict[str, Any]:
        def optional(value: Any, write: Any) -> Any:
            return None if value is None else write(value)

        return {
            "attack": self.attack,
            "images": self.images,
            "faces": self.faces,
            "identity": optional(self.identity, identity_to_json),
            "ssim": optional(self.ssim, mean_to_json),
            "ssim_face": optional(self.ssim_face, mean_to_json),
            "psnr": optional(self.psnr, finite),
            "psnr_face": optional(self.psnr_face, finite),
            "redetection": optional(self.redetection, rate_to_json),
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AttackScores:
        def optional(key: str, read: Any) -> Any:
            return None if data.get(key) is None else read(data[key])

        return cls(
            attack=str(data["attack"]),
            images=int(data["images"]),
            faces=int(data["faces"]),
            identity=optional("identity", identity_from_json),
            ssim=optional("ssim", mean_from_json),
            ssim_face=optional("ssim_face", mean_from_json),
            psnr=optional("psnr", _number),
            psnr_face=optional("psnr_face", _number),
            redetection=optional("redetection", rate_from_json),
            seconds=float(data["seconds"]),
        )


def _key(scores: AttackScores) -> tuple[float, float]:
    rank1, same = scores.rank1, scores.same_person
    return (-1.0 if math.isnan(rank1) else rank1, -1.0 if math.isnan(same) else same)


def strongest(attacks: Mapping[str, AttackScores]) -> str | None:
    """The attack with the highest rank-1 rate, ties broken by the same-person share, then
    by the order of ``attacks``; None when no attack scored any face."""
    best: str | None = None
    for name, scores in attacks.items():
        if scores.identity is None or scores.identity.rank1.n == 0:
            continue
        if best is None or _key(scores) > _key(attacks[best]):
            best = name
    return best


def attack_title(name: str) -> str:
    """``decoder`` -> ``decoder``, ``boxes-only+gray`` -> ``boxes-only mean face, in gray``."""
    attack, retouch = split_name(name)
    title = ATTACK_NAMES.get(attack, attack)
    return f"{title}, {RETOUCH_NAMES.get(retouch, retouch)}" if retouch else title


def best_pixels(attacks: Mapping[str, AttackScores]) -> AttackScores | None:
    """The pixel attack with the highest mean face SSIM (the linkage attack draws none)."""
    drawn = [s for s in attacks.values() if s.ssim_face is not None and s.ssim_face.n]
    return max(drawn, key=lambda s: s.ssim_face.mean if s.ssim_face else -1.0, default=None)


def boxes_only_floor(references: Mapping[str, AttackScores]) -> tuple[float, float]:
    """(rank-1, same-person share) that the output boxes alone give: per figure, the best of
    the boxes-only attackers in ``references`` (NaN where none scored a face)."""
    floors = [references[k] for k in BOXES_ONLY if k in references]
    rank1 = [s.rank1 for s in floors if not math.isnan(s.rank1)]
    same = [s.same_person for s in floors if not math.isnan(s.same_person)]
    return max(rank1, default=math.nan), max(same, default=math.nan)

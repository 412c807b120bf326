"""The report's verdict: one plain sentence per setting, generated from its numbers.

Example: ``alpha 0.90 (deployed): the strongest attack (rMLE) re-identified 3.1% of 64 faces
[1.2, 7.0] (chance 1.0%, boxes-only 0.0%); 9.4% [4.4, 19.0] lie within dlib's same-person
distance of their original (boxes-only 3.1%; the attack's faces lie as close to 2.0% of other
people's faces); accuracy kept 0.97. Identity leaks: the interval lies above both floors.``

A setting leaks identity when the lower end of its strongest attack's rank-1 interval lies
above both floors (chance and the better of the two boxes-only attackers, the mean face pasted
into each box and a decoder that draws faces from the boxes); otherwise no leak beyond what
the output boxes give is measurable at that sample size. Beside it, each attack that draws
pictures is compared face by face with each boxes-only attacker on the same faces (exact
McNemar): how many faces each verified alone, and the p value; the sentence names the attack
whose excess is surest.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from veil.privacy.identity import MeanCI, PairedVerifications, Rate, paired_verifications
from veil.privacy.scores import BOXES_ONLY, AttackScores, attack_title, boxes_only_floor

if TYPE_CHECKING:
    from veil.privacy.report import PrivacyReport, ReportRow


def pct(value: float) -> str:
    """A share as a percentage with one decimal (``n/a`` for NaN)."""
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}"


def _rate(rate: Rate) -> str:
    faces = "face" if rate.n == 1 else "faces"
    return f"{pct(rate.value)}% of {rate.n} {faces} [{pct(rate.low)}, {pct(rate.high)}]"


def _small_gallery(report: PrivacyReport) -> str:
    size = int(report.gallery["size"])
    if size >= int(report.settings.get("min_gallery", 100)):
        return ""
    kind = "identities" if report.gallery["mode"] == "identities" else "faces"
    return (
        f" The gallery holds only {size} {kind}, so rank-1 says little here; read the "
        "same-person share against its boxes-only floor."
    )


def _floors(report: PrivacyReport) -> tuple[float, float, float]:
    """(chance, boxes-only rank-1, boxes-only same-person share): the best boxes-only
    attacker per figure."""
    rank1, same = boxes_only_floor(report.references)
    return report.chance, rank1, same


def leaks(head: AttackScores, chance: float, boxes_only: float) -> bool:
    """Whether the rank-1 interval's lower end lies above both floors."""
    if head.identity is None:
        return False
    floors = [v for v in (chance, boxes_only) if not math.isnan(v)]
    return head.identity.rank1.low > max(floors, default=0.0)


def _false_match(value: MeanCI | None) -> str:
    if value is None or value.n == 0:
        return ""
    return f"; the attack's faces lie as close to {pct(value.mean)}% of other people's faces"


Paired = list[tuple[str, str, PairedVerifications]]  # (attack, boxes-only attacker, faces)


def paired_with_floors(row: ReportRow, report: PrivacyReport) -> Paired:
    """(attack, boxes-only attacker, their verifications face by face) for every attack of
    the row that draws pictures, against every boxes-only attacker of the report."""
    floors = [(k, report.references[k]) for k in BOXES_ONLY if k in report.references]
    pairs = []
    for attack in row.attacks.values():
        if attack.ssim_face is None or attack.identity is None:
            continue
        for name, floor in floors:
            if floor.identity is None:
                continue
            paired = paired_verifications(attack.identity, floor.identity)
            if paired is not None and paired.faces:
                pairs.append((attack.attack, name, paired))
    return pairs


def surest_excess(
    pairs: Paired,
) -> tuple[str, float, list[tuple[str, PairedVerifications]]] | None:
    """Of ``pairs`` (``paired_with_floors``), the pixel attack whose excess over the boxes-only
    attackers is surest: (attack, its largest p over the boxes-only attackers, its comparison
    with each); None without any."""
    worst: dict[str, float] = {}
    for attack, _, p in pairs:
        worst[attack] = max(worst.get(attack, 0.0), p.p_value)
    if not worst:
        return None
    surest = min(worst, key=lambda name: worst[name])
    return surest, worst[surest], [(f, p) for a, f, p in pairs if a == surest]


def _paired_text(pairs: Paired) -> str:
    excess = surest_excess(pairs)
    if excess is None:
        return ""
    attack, _, chosen = excess
    parts = [
        f"{p.only_first} faces the {attack_title(floor)} did not and missed {p.only_second} "
        f"it verified (p = {p.p_value:.3f}, {p.faces} faces)"
        for floor, p in chosen
    ]
    return (
        f" Face by face (exact McNemar), the {attack_title(attack)} verified "
        + "; ".join(parts)
        + "."
    )


def _setting_name(row: ReportRow) -> str:
    name = "no noise (clean)" if row.alpha is None else f"alpha {row.alpha:.2f}"
    return name + (" (deployed)" if row.deployed else "")


def verdict_line(row: ReportRow, report: PrivacyReport, pairs: Paired) -> str:
    """The setting's sentence; ``pairs`` is its ``paired_with_floors``."""
    chance, floor_rank1, floor_same = _floors(report)
    head = row.headline
    name = _setting_name(row)
    accuracy = (
        "accuracy not measured" if row.ap_kept is None else f"accuracy kept {row.ap_kept:.2f}"
    )
    if head is None or head.identity is None:
        return f"{name}: no face could be scored for identity; {accuracy}."
    ident = head.identity
    text = (
        f"{name}: the strongest attack ({attack_title(head.attack)}) re-identified "
        f"{_rate(ident.rank1)} (chance {pct(chance)}%, boxes-only {pct(floor_rank1)}%); "
        f"{pct(ident.same_person.value)}% [{pct(ident.same_person.low)}, "
        f"{pct(ident.same_person.high)}] lie within dlib's same-person distance of their "
        f"original (boxes-only {pct(floor_same)}%{_false_match(ident.false_match)}); "
        f"{accuracy}. "
    )
    if leaks(head, chance, floor_rank1):
        text += "Identity leaks: the interval lies above both floors."
    else:
        text += (
            "No identity leak beyond what the boxes give is measurable at this sample size: "
            "the interval reaches the floors."
        )
    return text + _paired_text(pairs) + _small_gallery(report)


def verdict(report: PrivacyReport) -> list[dict[str, Any]]:
    """Per setting: the sentence and the numbers it was made from (for report.json)."""
    chance, floor_rank1, _ = _floors(report)
    entries = []
    for row in report.rows:
        head = row.headline
        pairs = paired_with_floors(row, report)
        entries.append(
            {
                "label": row.label,
                "alpha": row.alpha,
                "deployed": row.deployed,
                "strongest": row.strongest,
                "leaks": head is not None and leaks(head, chance, floor_rank1),
                "paired_with_floors": [
                    {"attack": attack, "floor": floor} | p.to_json() for attack, floor, p in pairs
                ],
                "text": verdict_line(row, report, pairs),
            }
        )
    return entries


def deployment_note(report: PrivacyReport) -> str:
    """Which alpha is deployed, or that none was named / it has no profile here."""
    if report.deployed_alpha is None:
        return "No deployed alpha was named (veil privacy --deployed-alpha A marks one)."
    if not any(r.deployed for r in report.rows):
        return (
            f"The deployed alpha {report.deployed_alpha:.2f} has no profile in this bank: "
            "its leakage is not measured here."
        )
    return f"Deployed: alpha {report.deployed_alpha:.2f} (marked below)."

"""The report's pages and figures: report.md, report.html, grid.png and tradeoff.png."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from torch import Tensor

from veil.detections import Detections
from veil.detectors.base import Frame
from veil.privacy.attacks import AttackSet
from veil.privacy.evaluation import Scored, to_bgr_uint8
from veil.privacy.identity import SAME_PERSON_DISTANCE, MeanCI, Rate, paired_verifications
from veil.privacy.metrics import BoxArray
from veil.privacy.retouch import split_name
from veil.privacy.scores import (
    BOXES_ONLY,
    AttackScores,
    attack_title,
    best_pixels,
    boxes_only_floor,
)
from veil.privacy.verdict import deployment_note, pct

if TYPE_CHECKING:
    from veil.privacy.report import PrivacyReport

MIN_TILE = 160  # tiles are upscaled to at least this many pixels wide
_GREEN = (0, 200, 0)
_WHITE = (255, 255, 255)


# --- the grid --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridColumn:
    """One column of a grid row: reconstructions of some eval images, scored."""

    caption: str
    images: Tensor  # [n, 3, H, W] in [0, 1]
    indices: list[int]  # eval index of each image
    scored: Scored


def _tile(image: Frame, detections: Detections | None, caption: str, scale: int) -> Frame:
    tile = cv2.resize(
        image, (image.shape[1] * scale, image.shape[0] * scale), interpolation=cv2.INTER_NEAREST
    )
    if detections is not None:
        for x1, y1, x2, y2 in detections.xyxy * scale:
            p1, p2 = (round(float(x1)), round(float(y1))), (round(float(x2)), round(float(y2)))
            cv2.rectangle(tile, p1, p2, _GREEN, 1)
    band = np.zeros((18, tile.shape[1], 3), np.uint8)
    cv2.putText(band, caption, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, _WHITE, 1, cv2.LINE_AA)
    return np.vstack([band, tile])


def _column_tile(column: GridColumn, i: int, scale: int, blank: Frame) -> Frame:
    if i not in column.indices:
        return _tile(blank, None, column.caption + " (not run)", scale)
    k = column.indices.index(i)
    distances = column.scored.distances[k] if k < len(column.scored.distances) else []
    note = f" d={distances[0]:.2f}" if distances else ""
    dets = column.scored.detections[k] if k < len(column.scored.detections) else None
    return _tile(to_bgr_uint8(column.images[k]), dets, column.caption + note, scale)


def grid(
    evals: AttackSet,
    boxes: Sequence[BoxArray],
    rows: dict[str, list[GridColumn]],
    indices: Sequence[int],
) -> Frame:
    """Per eval image and per pixel attack, a row: the original, then each column's
    reconstruction; ``d`` is the dlib distance of the first face to its original (under
    0.6: the same person to dlib). White: the faces; green: the clean detector's boxes."""
    height, width = evals.target_size
    scale = max(1, math.ceil(MIN_TILE / width))
    blank = np.full((height, width, 3), 32, np.uint8)
    lines: list[Frame] = []
    for i in indices:
        original = to_bgr_uint8(evals.unit_targets(i))
        for x1, y1, x2, y2 in boxes[i]:
            p1, p2 = (round(float(x1)), round(float(y1))), (round(float(x2)), round(float(y2)))
            cv2.rectangle(original, p1, p2, _WHITE, 1)
        for attack, columns in rows.items():
            tiles = [_tile(original, None, f"original ({attack_title(attack)} row)", scale)]
            tiles += [_column_tile(c, i, scale, blank) for c in columns]
            lines.append(np.hstack(tiles))
    if not lines:
        return np.zeros((16, 16, 3), np.uint8)
    separator = np.full((3, lines[0].shape[1], 3), 64, np.uint8)
    stacked: list[Frame] = []
    for line in lines:
        stacked += [line, separator]
    return np.vstack(stacked[:-1])


# --- the trade-off plot ----------------------------------------------------------------------


def _best_rank1(attacks: Mapping[str, AttackScores], name: str) -> float:
    """The best rank-1 of attack ``name`` and its retouches (NaN where none ran)."""
    values = [s.rank1 for k, s in attacks.items() if split_name(k)[0] == name]
    return max((v for v in values if not math.isnan(v)), default=math.nan)


def tradeoff_plot(report: PrivacyReport, path: Path) -> None:
    """Left: rank-1 of each attack per setting with the floors; right: AP kept vs rank-1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = list(range(len(report.rows)))
    labels = ["clean" if r.alpha is None else f"{r.alpha:.2f}" for r in report.rows]
    # One line per attack, at its best rank-1 as drawn or retouched.
    names = sorted({split_name(a)[0] for r in report.rows for a in r.attacks})
    for name in names:
        ys = [_best_rank1(r.attacks, name) for r in report.rows]
        left.plot(xs, ys, "o-", label=attack_title(name))
    left.axhline(report.chance, color="grey", ls=":", label="chance")
    floor, _ = boxes_only_floor(report.references)
    if not math.isnan(floor):
        left.axhline(floor, color="black", ls="--", lw=1, label="boxes-only")
    left.set_xticks(xs, labels, fontsize=7)
    left.set_xlabel("setting (alpha)")
    left.set_ylabel("rank-1 re-identification")
    left.set_title("Identity leakage per setting")
    left.legend(fontsize=7)
    with_ap = [r for r in report.rows if r.ap_kept is not None and r.headline is not None]
    if with_ap:
        px = [r.headline.rank1 for r in with_ap if r.headline]
        py = [r.ap_kept for r in with_ap]
        right.plot(px, py, "o-")
        for r, x, y in zip(with_ap, px, py, strict=True):
            right.annotate("clean" if r.alpha is None else f"{r.alpha:.2f}", (x, y), fontsize=7)
        right.axvline(report.chance, color="grey", ls=":", label="chance")
        right.set_xlabel("rank-1 of the strongest attack (leakage)")
        right.set_ylabel("AP kept (share of clean AP)")
        right.set_title("Accuracy kept vs identity leakage")
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- tables ----------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f}"


def rate_cell(rate: Rate | None) -> str:
    if rate is None or rate.n == 0:
        return "n/a"
    return f"{pct(rate.value)}% [{pct(rate.low)}, {pct(rate.high)}] ({rate.hits}/{rate.n})"


def mean_cell(value: MeanCI | None) -> str:
    if value is None or value.n == 0:
        return "n/a"
    return f"{value.mean:.3f} [{value.low:.3f}, {value.high:.3f}]"


def share_cell(value: MeanCI | None) -> str:
    """A mean share as percentages with its interval."""
    if value is None or value.n == 0:
        return "n/a"
    return f"{pct(value.mean)}% [{pct(max(0.0, value.low))}, {pct(min(1.0, value.high))}]"


HEADLINE = [
    "setting",
    "mean AP",
    "AP kept",
    "sigma/std",
    "strongest attack",
    "rank-1 [95% CI] (hits/N)",
    "same person [95% CI]",
    "others within 0.6 (false match)",
    "face SSIM, best pixel attack [95% CI]",
    "frame SSIM, same attack [95% CI]",
]
DETAIL = [
    "setting",
    "attack",
    "images",
    "faces",
    "rank-1 [95% CI] (hits/N)",
    "same person [95% CI]",
    "others within 0.6 (false match)",
    "of its same-person faces, the boxes-only attacker's too",
    "distance to own original",
    "face SSIM [95% CI] (N)",
    "frame SSIM [95% CI] (N)",
    "PSNR",
    "PSNR face",
    "re-detection (not a privacy figure)",
    "seconds",
]


def _identity_cells(s: AttackScores) -> list[str]:
    ident = s.identity
    return [
        rate_cell(None if ident is None else ident.rank1),
        rate_cell(None if ident is None else ident.same_person),
        share_cell(None if ident is None else ident.false_match),
    ]


def headline_rows(report: PrivacyReport) -> list[list[str]]:
    rows = []
    for r in report.rows:
        head = r.headline
        label = r.label + (" (deployed)" if r.deployed else "")
        cells = [label, _fmt(r.mean_ap), _fmt(r.ap_kept), _fmt(r.sigma_ratio, 2)]
        if head is None:
            rows.append(cells + ["none"] + ["n/a"] * 5)
            continue
        head_cells = [attack_title(head.attack), *_identity_cells(head)]
        rows.append([*cells, *head_cells, *_pixel_cells(best_pixels(r.attacks))])
    for label, s in _reference_rows(report):
        pixels = [mean_cell(s.ssim_face), mean_cell(s.ssim)]
        rows.append([label, "", "", "", "", *_identity_cells(s), *pixels])
    return rows


def _pixel_cells(s: AttackScores | None) -> list[str]:
    if s is None:
        return ["n/a", "n/a"]
    return [f"{mean_cell(s.ssim_face)} ({attack_title(s.attack)})", mean_cell(s.ssim)]


def _reference_rows(report: PrivacyReport) -> list[tuple[str, AttackScores]]:
    titles = {
        "originals": "originals at attack resolution (ceiling)",
        "boxes-only": "boxes-only attacker (floor)",
        "boxes-decoder": "boxes-only decoder (floor)",
    }
    return [(titles.get(k, f"{attack_title(k)} (floor)"), v) for k, v in report.references.items()]


def _shared_cell(s: AttackScores, floor: AttackScores | None) -> str:
    if s.identity is None or floor is None or floor.identity is None:
        return "n/a"
    paired = paired_verifications(s.identity, floor.identity)
    return "n/a" if paired is None else f"{paired.both} of {s.identity.same_person.hits}"


def _detail_cells(label: str, s: AttackScores, floor: AttackScores | None) -> list[str]:
    distance = None if s.identity is None else s.identity.distances
    return [
        label,
        attack_title(s.attack),
        str(s.images),
        str(s.faces),
        *_identity_cells(s),
        _shared_cell(s, floor),
        mean_cell(distance),
        mean_cell(s.ssim_face) + ("" if s.ssim_face is None else f" ({s.ssim_face.n})"),
        mean_cell(s.ssim) + ("" if s.ssim is None else f" ({s.ssim.n})"),
        _fmt(s.psnr, 2),
        _fmt(s.psnr_face, 2),
        rate_cell(s.redetection),
        _fmt(s.seconds, 1),
    ]


def detail_rows(report: PrivacyReport) -> list[list[str]]:
    floor = report.references.get("boxes-only")
    rows = [_detail_cells(r.label, s, floor) for r in report.rows for s in r.attacks.values()]
    rows += [_detail_cells(label, s, floor) for label, s in _reference_rows(report)]
    return rows


def floors_line(report: PrivacyReport) -> str:
    text = (
        f"Floors: chance 1/{report.gallery['size']} = {pct(report.chance)}% "
        f"(gallery of {report.gallery['size']} original faces, {report.gallery['mode']})"
    )
    for name in BOXES_ONLY:
        floor = report.references.get(name)
        if floor is not None and floor.identity is not None:
            text += (
                f"; {attack_title(name)} rank-1 {rate_cell(floor.identity.rank1)}, same "
                f"person {rate_cell(floor.identity.same_person)}, other people's faces within "
                f"{SAME_PERSON_DISTANCE} of its faces {share_cell(floor.identity.false_match)}"
            )
    return text + "."


def setup_lines(report: PrivacyReport) -> list[str]:
    s = report.settings
    rmle = [r.attacks["rmle"] for r in report.rows if "rmle" in r.attacks]
    rmle_cost = [a.seconds / max(1, a.images) for a in rmle]
    lines = [
        deployment_note(report),
        f"Model {report.model} (weights {report.weights_id[:12]}), input geometry "
        f"{report.geometry}; reconstructions at {report.image_size}.",
        f"Data: {report.data_source}. Attacker's images: {report.train_images} "
        f"({s['train_source']}); eval images: {report.eval_images} ({s['eval_source']}), "
        f"disjoint; {report.faces} eval faces of at least {s['min_face']} px scored for "
        f"identity against a gallery of {report.gallery['size']} originals "
        f"({report.gallery['mode']}, {report.gallery['distractors']} distractors).",
        f"Identity: dlib ResNet embeddings; probes from reconstructions upscaled to the "
        f"original frame with the same boxes; same person = distance < {SAME_PERSON_DISTANCE} "
        "to the face's own original; false match = the share of the other gallery faces that "
        "close to it (a probe that looks like everyone scores high on both).",
        f"Attacks: decoder ({s['epochs']} epochs, width {s['decoder_width']}, fresh noise every "
        f"step); rMLE on {report.rmle_images} eval images ({s['rmle_steps']} Adam steps, batched"
        + (f", {np.mean(rmle_cost):.1f} s per image" if rmle_cost else "")
        + f"); feature linkage ({s['linkage_epochs']} epochs, predicts the embedding).",
        f"Accuracy: {report.accuracy_source}; AP kept = AP / clean AP. Intervals: Wilson 95% "
        "for rates, mean +- 1.96 standard errors for SSIM. Report built in "
        f"{report.seconds:.0f} s.",
    ]
    return lines


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown(report: PrivacyReport) -> str:
    lines = ["# veil privacy report", "", "## Verdict", ""]
    lines += [f"- {v['text']}" for v in report.verdict]
    lines += ["", *(f"- {line}" for line in setup_lines(report)), ""]
    lines += ["## Strongest attack per setting", ""]
    lines += _md_table(HEADLINE, headline_rows(report))
    lines += ["", floors_line(report), "", "## Every attack", ""]
    lines += _md_table(DETAIL, detail_rows(report))
    lines += [
        "",
        floors_line(report),
        "",
        "Higher = more leaked. `sigma/std` = mean noise scale in units of the clean "
        "activation's standard deviation. Re-detection is whether the clean detector finds a "
        "face in the reconstruction, not whether it is anyone.",
        "",
        "![tradeoff](tradeoff.png)",
        "",
        "![reconstructions](grid.png)",
        "",
    ]
    return "\n".join(lines)


def _embedded_png(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_page(report: PrivacyReport, tradeoff: Path, grid_png: Path) -> str:
    verdict = "".join(
        ('<li class="deployed">' if v["deployed"] else "<li>") + html.escape(v["text"]) + "</li>"
        for v in report.verdict
    )
    setup = "".join(f"<li>{html.escape(line)}</li>" for line in setup_lines(report))
    floors = html.escape(floors_line(report))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>veil privacy report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border: 1px solid #bbb; padding: 3px 6px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
li.deployed {{ font-weight: bold; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>veil privacy report</h1>
<h2>Verdict</h2>
<ul>{verdict}</ul>
<ul>{setup}</ul>
<h2>Strongest attack per setting</h2>
{_html_table(HEADLINE, headline_rows(report))}
<p>{floors}</p>
<h2>Every attack</h2>
{_html_table(DETAIL, detail_rows(report))}
<p>{floors}</p>
<h2>Accuracy kept vs leakage</h2>
{_embedded_png(tradeoff, "trade-off plot")}
<h2>Originals beside reconstructions (d: dlib distance to the original; white: faces)</h2>
{_embedded_png(grid_png, "reconstruction grid")}
</body></html>
"""

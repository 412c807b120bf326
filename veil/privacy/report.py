"""The privacy report: how much of a frame each noise profile lets an attacker rebuild.

For the undefended baseline (clean activations) and for every profile of a bank, the two
attacks of :mod:`veil.privacy.attacks` reconstruct held-out images from what would cross the
wire; the reconstructions are scored against the originals (SSIM and PSNR over the whole
frame and over the face crops, and the share of faces the clean detector still finds in
them) and set against the accuracy each profile keeps. Two reference rows frame the numbers:
the attacker's guess with no observation at all (the mean training image: leakage at or below
it means nothing leaked), and the originals at the attack's resolution (the best any
reconstruction can do).

Outputs in ``out_dir``: ``report.json``, ``report.md``, ``tradeoff.png``, ``grid.png`` and a
self-contained ``report.html``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from veil.detections import Detections
from veil.detectors.base import Frame, InputGeometry, SplitDetector
from veil.errors import ConfigError, DatasetError, ProfileError
from veil.privacy.attacks import (
    AttackSet,
    NoiseModel,
    mean_image,
    prepare_attack_set,
    rmle_attack,
    train_decoder,
)
from veil.privacy.metrics import BoxArray, face_psnr, face_ssim, matched_faces, psnr, ssim
from veil.profiles import NoiseProfile, ProfileBank


@dataclass(frozen=True)
class AttackScores:
    """Leakage of one attack against one noise setting, over the images it attacked."""

    ssim: float
    ssim_face: float
    psnr: float
    psnr_face: float
    redetection: float  # share of ground-truth faces the clean detector finds again
    images: int
    faces: int
    seconds: float  # the attack's cost: decoder training, or optimisation of these images


@dataclass(frozen=True)
class ReportRow:
    label: str
    alpha: float | None  # None for the clean baseline
    profile_id: str | None
    sigma_ratio: float  # mean noise sigma in units of the clean activations' std
    mean_ap: float | None
    ap_kept: float | None  # mean AP / clean AP
    decoder: AttackScores
    rmle: AttackScores | None


@dataclass
class PrivacyReport:
    model: str
    weights_id: str
    geometry: str
    image_size: str  # "WxH" of the reconstructions
    train_images: int
    eval_images: int
    rmle_images: int
    settings: dict[str, Any]
    no_information: AttackScores  # the mean training image
    originals: AttackScores  # the eval images themselves, at the attack resolution
    rows: list[ReportRow]
    seconds: float
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = _finite(asdict(self))
        return data


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: write them as strings, as Python's json would not refuse to."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


@dataclass
class _Scored:
    scores: AttackScores
    detections: list[Detections]  # per attacked image, in target pixels


def _to_bgr_uint8(image: Tensor) -> Frame:
    """``[3, H, W]`` BGR in [0, 1] -> ``H x W x 3`` uint8."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return np.ascontiguousarray(array)


def _score(
    reconstructions: Tensor,
    indices: Sequence[int],
    eval_set: AttackSet,
    boxes: Sequence[BoxArray],
    detector: SplitDetector,
    seconds: float,
    score_threshold: float,
    iou: float,
) -> _Scored:
    """Compare reconstructions (one per index) with the eval targets inside the frame area."""
    whole_ssim: list[float] = []
    whole_psnr: list[float] = []
    faces_ssim: list[float] = []
    faces_psnr: list[float] = []
    detections: list[Detections] = []
    found = total = 0
    for k, i in enumerate(indices):
        width, height = eval_set.content[i]
        original = _to_bgr_uint8(eval_set.unit_targets(i))[:height, :width]
        rebuilt = _to_bgr_uint8(reconstructions[k])[:height, :width]
        whole_ssim.append(ssim(original, rebuilt))
        whole_psnr.append(psnr(original, rebuilt))
        faces_ssim += face_ssim(original, rebuilt, boxes[i])
        faces_psnr += face_psnr(original, rebuilt, boxes[i])
        (found_here,) = detector.detect(
            [rebuilt], eval_set.geometry, score_threshold=score_threshold
        )
        found_here = found_here.above(score_threshold)
        detections.append(found_here)
        found += matched_faces(found_here, boxes[i], iou)
        total += len(boxes[i])
    scores = AttackScores(
        ssim=float(np.mean(whole_ssim)),
        ssim_face=float(np.mean(faces_ssim)) if faces_ssim else math.nan,
        psnr=float(np.mean(whole_psnr)),
        psnr_face=float(np.mean(faces_psnr)) if faces_psnr else math.nan,
        redetection=found / total if total else math.nan,
        images=len(indices),
        faces=len(faces_ssim),
        seconds=round(seconds, 1),
    )
    return _Scored(scores, detections)


def _load_bank(bank_dir: Path, detector: SplitDetector) -> list[NoiseProfile]:
    profiles = ProfileBank(bank_dir).profiles()
    if not profiles:
        raise ProfileError(f"no noise profiles in {bank_dir}")
    geometries = {p.meta.geometry for p in profiles}
    if len(geometries) != 1:
        raise ProfileError(
            f"profiles in {bank_dir} mix input geometries {sorted(geometries)}: a privacy "
            "report compares one geometry; split the bank"
        )
    geometry = InputGeometry.parse(profiles[0].meta.geometry)
    for profile in profiles:
        profile.check_fits(detector.name, detector.weights_id, geometry)
    return profiles


def privacy_report(
    detector: SplitDetector,
    bank_dir: Path | str,
    train_images: Sequence[Path | Frame],
    eval_images: Sequence[Path | Frame],
    eval_gt_boxes: Sequence[BoxArray],
    accuracy: dict[float, float] | None,
    clean_ap: float | None,
    out_dir: Path | str,
    *,
    epochs: int,
    image_size: int,
    progress: bool = True,
    batch_size: int = 8,
    decoder_width: int = 64,
    rmle_images: int = 4,
    rmle_steps: int = 200,
    grid_images: int = 4,
    redetect_score: float = 0.5,
    redetect_iou: float = 0.5,
    seed: int = 0,
    train_source: str = "",
    eval_source: str = "",
    log: Callable[[str], None] = print,
) -> PrivacyReport:
    """Attack every profile of ``bank_dir`` (and the clean activation) and write the report.

    ``train_images`` (the attacker's own pictures) and ``eval_images`` (the victims', with
    ``eval_gt_boxes``: per image, ``[K, 4]`` xyxy face boxes in its pixels) must not overlap.
    ``accuracy`` maps alpha -> mean AP of that profile and ``clean_ap`` is the noise-free
    AP, both from the accuracy benchmark; either may be None. ``image_size``: longer side of
    the reconstructions (the activation's size times a power of two). The rMLE attack, which
    costs one optimisation per image, runs on the first ``rmle_images`` eval images
    (0 to skip it).
    """
    started = time.perf_counter()
    out = Path(out_dir)
    if len(eval_gt_boxes) != len(eval_images):
        raise DatasetError(
            f"{len(eval_images)} eval images but {len(eval_gt_boxes)} ground-truth box sets"
        )
    if rmle_images < 0 or grid_images < 0:
        raise ConfigError("rmle_images and grid_images must be >= 0")
    profiles = _load_bank(Path(bank_dir), detector)
    geometry = InputGeometry.parse(profiles[0].meta.geometry)
    detector.eval()

    train = prepare_attack_set(
        detector, train_images, geometry, image_size, batch_size, progress, "attacker images"
    )
    evals = prepare_attack_set(
        detector, eval_images, geometry, image_size, batch_size, progress, "eval images"
    )
    shared = set(train.digests) & set(evals.digests)
    if shared:
        raise DatasetError(
            f"{len(shared)} eval image(s) also appear among the attacker's training images: "
            "the attack must be scored on images it never saw"
        )
    boxes = [
        np.asarray(b, dtype=np.float32).reshape(-1, 4) * scale
        for b, scale in zip(eval_gt_boxes, evals.target_scales, strict=True)
    ]
    if sum(len(b) for b in boxes) == 0:
        raise DatasetError("the eval images have no ground-truth faces")
    # Alphas are kept to two decimals (see veil.profiles); match the benchmark's keys likewise.
    ap_by_alpha = {round(float(a), 2): ap for a, ap in (accuracy or {}).items()}
    all_eval = list(range(len(evals)))
    rmle_index = all_eval[:rmle_images]
    activation_scale = float(train.activations.std())

    def score(recon: Tensor, indices: Sequence[int], seconds: float) -> _Scored:
        return _score(recon, indices, evals, boxes, detector, seconds, redetect_score, redetect_iou)

    no_information = score(mean_image(train).expand(len(evals), -1, -1, -1), all_eval, 0.0)
    originals = score(evals.unit_targets(), all_eval, 0.0)
    log(
        f"references: mean image SSIM {no_information.scores.ssim:.3f}, originals re-detection "
        f"{originals.scores.redetection:.2f}"
    )

    act_c, act_h, act_w = (int(v) for v in train.activations.shape[1:])
    settings: list[tuple[NoiseModel, NoiseProfile | None]] = [
        (NoiseModel.clean((act_c, act_h, act_w)), None)
    ]
    settings += [(NoiseModel.from_profile(p), p) for p in profiles]
    rows: list[ReportRow] = []
    gallery: list[tuple[str, Tensor, list[Detections], Tensor | None, list[Detections]]] = []
    for noise, profile in settings:
        # The eval observation is a fixed draw so that the report is reproducible.
        observed = noise.observe(evals.activations, torch.Generator().manual_seed(seed + 1))
        trained = train_decoder(
            train,
            noise,
            epochs=epochs,
            batch_size=batch_size,
            width=decoder_width,
            seed=seed,
            progress=progress,
        )
        decoded = trained.reconstruct(observed)
        decoder_scores = score(decoded, all_eval, trained.seconds)
        rmle_scores: _Scored | None = None
        rmle_recon: Tensor | None = None
        if rmle_index:
            result = rmle_attack(
                detector,
                observed[rmle_index],
                noise,
                geometry,
                evals.target_size,
                activation_scale,
                steps=rmle_steps,
                progress=progress,
            )
            rmle_recon = result.images
            rmle_scores = score(result.images, rmle_index, result.seconds)
        alpha = None if profile is None else profile.alpha
        mean_ap = clean_ap if alpha is None else ap_by_alpha.get(alpha)
        row = ReportRow(
            label=noise.label,
            alpha=alpha,
            profile_id=None if profile is None else profile.profile_id,
            sigma_ratio=float(noise.sigma.mean()) / activation_scale,
            mean_ap=mean_ap,
            ap_kept=mean_ap / clean_ap if mean_ap is not None and clean_ap else None,
            decoder=decoder_scores.scores,
            rmle=None if rmle_scores is None else rmle_scores.scores,
        )
        rows.append(row)
        log(_row_summary(row))
        gallery.append(
            (
                noise.label,
                decoded,
                decoder_scores.detections,
                rmle_recon,
                [] if rmle_scores is None else rmle_scores.detections,
            )
        )

    height, width = evals.target_size
    report = PrivacyReport(
        model=detector.name,
        weights_id=detector.weights_id,
        geometry=str(geometry),
        image_size=f"{width}x{height}",
        train_images=len(train),
        eval_images=len(evals),
        rmle_images=len(rmle_index),
        settings={
            "epochs": epochs,
            "batch_size": batch_size,
            "decoder_width": decoder_width,
            "rmle_steps": rmle_steps,
            "redetect_score": redetect_score,
            "redetect_iou": redetect_iou,
            "seed": seed,
            "train_source": train_source,
            "eval_source": eval_source,
            "bank": str(bank_dir),
        },
        no_information=no_information.scores,
        originals=originals.scores,
        rows=rows,
        seconds=0.0,
    )
    out.mkdir(parents=True, exist_ok=True)
    grid = _grid(evals, boxes, originals.detections, gallery, min(grid_images, len(evals)))
    cv2.imwrite(str(out / "grid.png"), grid)
    _tradeoff_plot(report, out / "tradeoff.png")
    report.seconds = round(time.perf_counter() - started, 1)
    report.files = {
        name: str(out / name)
        for name in ("report.json", "report.md", "report.html", "tradeoff.png", "grid.png")
    }
    (out / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    (out / "report.md").write_text(_markdown(report))
    (out / "report.html").write_text(_html(report, out / "tradeoff.png", out / "grid.png"))
    log(f"privacy report written to {out} in {report.seconds:.0f} s")
    return report


def load_report(out_dir: Path | str) -> PrivacyReport:
    """A written report back from its ``report.json``."""
    data = json.loads((Path(out_dir) / "report.json").read_text())

    def scores(d: dict[str, Any] | None) -> AttackScores | None:
        if d is None:
            return None
        # _finite wrote inf/nan as strings ("inf"); float() reads them back.
        fields: dict[str, Any] = {k: float(v) if isinstance(v, str) else v for k, v in d.items()}
        return AttackScores(**fields)

    rows = [
        ReportRow(**{**r, "decoder": scores(r["decoder"]), "rmle": scores(r["rmle"])})
        for r in data.pop("rows")
    ]
    no_info = scores(data.pop("no_information"))
    originals = scores(data.pop("originals"))
    assert no_info is not None and originals is not None
    return PrivacyReport(**data, no_information=no_info, originals=originals, rows=rows)


def attach_accuracy(
    out_dir: Path | str, accuracy: dict[float, float], clean_ap: float | None
) -> PrivacyReport:
    """Add the accuracy benchmark's figures to a written report and render it again.

    The attacks do not depend on them, so a report can be made while the benchmark runs.
    """
    out = Path(out_dir)
    report = load_report(out)
    ap_by_alpha = {round(float(a), 2): ap for a, ap in accuracy.items()}
    rows = []
    for row in report.rows:
        ap = clean_ap if row.alpha is None else ap_by_alpha.get(round(row.alpha, 2))
        kept = ap / clean_ap if ap is not None and clean_ap else None
        rows.append(replace(row, mean_ap=ap, ap_kept=kept))
    report.rows = rows
    _tradeoff_plot(report, out / "tradeoff.png")
    (out / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    (out / "report.md").write_text(_markdown(report))
    (out / "report.html").write_text(_html(report, out / "tradeoff.png", out / "grid.png"))
    return report


def _row_summary(row: ReportRow) -> str:
    text = (
        f"{row.label}: decoder SSIM {row.decoder.ssim:.3f} (faces {row.decoder.ssim_face:.3f}), "
        f"re-detection {row.decoder.redetection:.2f}"
    )
    if row.rmle is not None:
        text += f"; rMLE SSIM {row.rmle.ssim:.3f}, re-detection {row.rmle.redetection:.2f}"
    return text


# --- figures ---------------------------------------------------------------------------------

_GREEN = (0, 200, 0)
_WHITE = (255, 255, 255)


def _tile(image: Frame, detections: Detections | None, caption: str) -> Frame:
    tile = image.copy()
    if detections is not None:
        for (x1, y1, x2, y2), conf in zip(detections.xyxy, detections.confidence, strict=True):
            p1, p2 = (round(float(x1)), round(float(y1))), (round(float(x2)), round(float(y2)))
            cv2.rectangle(tile, p1, p2, _GREEN, 1)
            cv2.putText(
                tile,
                f"{conf:.2f}",
                (p1[0], max(8, p1[1] - 2)),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.3,
                _GREEN,
                1,
                cv2.LINE_AA,
            )
    band = np.zeros((14, tile.shape[1], 3), np.uint8)
    cv2.putText(band, caption, (2, 10), cv2.FONT_HERSHEY_SIMPLEX, 0.35, _WHITE, 1, cv2.LINE_AA)
    return np.vstack([band, tile])


def _short(label: str) -> str:
    """``"alpha 0.40"`` -> ``"a0.40"``: captions must fit tiles as small as 64 pixels."""
    return label.replace("alpha ", "a")


def _grid(
    evals: AttackSet,
    boxes: Sequence[BoxArray],
    original_detections: list[Detections],
    gallery: Sequence[tuple[str, Tensor, list[Detections], Tensor | None, list[Detections]]],
    count: int,
) -> Frame:
    """Rows: per image, decoder reconstructions, then (if attacked) rMLE ones; columns: the
    original, then clean and each alpha. Green boxes: what the clean detector finds."""
    rows: list[Frame] = []
    for i in range(count):
        original = _to_bgr_uint8(evals.unit_targets(i))
        for x1, y1, x2, y2 in boxes[i]:
            cv2.rectangle(
                original,
                (round(float(x1)), round(float(y1))),
                (round(float(x2)), round(float(y2))),
                _WHITE,
                1,
            )
        first = _tile(original, original_detections[i], "original")
        decoder_row = [first] + [
            _tile(_to_bgr_uint8(recon[i]), dets[i], f"dec {_short(label)}")
            for label, recon, dets, _, _ in gallery
        ]
        rows.append(np.hstack(decoder_row))
        if all(r is not None and i < r.shape[0] for _, _, _, r, _ in gallery):
            rmle_row = [first] + [
                _tile(_to_bgr_uint8(r[i]), dets[i], f"rMLE {_short(label)}")
                for label, _, _, r, dets in gallery
                if r is not None
            ]
            rows.append(np.hstack(rmle_row))
    if not rows:
        return np.zeros((16, 16, 3), np.uint8)
    separator = np.full((3, rows[0].shape[1], 3), 64, np.uint8)
    stacked: list[Frame] = []
    for row in rows:
        stacked += [row, separator]
    return np.vstack(stacked[:-1])


def _tradeoff_plot(report: PrivacyReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noisy = [r for r in report.rows if r.alpha is not None]
    clean = next(r for r in report.rows if r.alpha is None)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    alphas = [r.alpha for r in noisy]
    left.plot(alphas, [r.decoder.ssim_face for r in noisy], "o-", label="decoder, faces")
    left.plot(alphas, [r.decoder.ssim for r in noisy], "o--", label="decoder, whole frame")
    if all(r.rmle is not None for r in noisy):
        left.plot(alphas, [r.rmle.ssim_face for r in noisy if r.rmle], "s-", label="rMLE, faces")
    left.axhline(clean.decoder.ssim_face, color="C3", lw=1, label="decoder, no noise (faces)")
    left.axhline(report.no_information.ssim_face, color="grey", ls=":", label="mean image (faces)")
    left.set_xlabel("alpha (privacy weight)")
    left.set_ylabel("SSIM to the original")
    left.set_title("Leakage per profile")
    left.legend(fontsize=7)
    with_ap = [r for r in report.rows if r.ap_kept is not None]
    if with_ap:
        xs = [r.decoder.ssim_face for r in with_ap]
        ys = [r.ap_kept for r in with_ap]
        right.plot(xs, ys, "o-")
        for r, x, y in zip(with_ap, xs, ys, strict=True):
            right.annotate("clean" if r.alpha is None else f"{r.alpha:.2f}", (x, y), fontsize=7)
        right.axvline(report.no_information.ssim_face, color="grey", ls=":", label="mean image")
        right.set_xlabel("face SSIM of the decoder's reconstruction (leakage)")
        right.set_ylabel("mean AP kept (share of clean AP)")
        right.set_title("Accuracy kept vs leakage")
        right.legend(fontsize=7)
    else:
        right.plot(alphas, [r.decoder.redetection for r in noisy], "o-", label="decoder")
        right.axhline(report.originals.redetection, color="grey", ls=":", label="originals")
        right.set_xlabel("alpha (privacy weight)")
        right.set_ylabel("faces re-detected in reconstructions")
        right.set_title("Face re-detection (no accuracy figures given)")
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- tables ----------------------------------------------------------------------------------

_HEADER = [
    "setting",
    "mean AP",
    "AP kept",
    "sigma/std",
    "dec SSIM",
    "dec SSIM face",
    "dec PSNR",
    "dec PSNR face",
    "dec re-det",
    "rMLE SSIM",
    "rMLE SSIM face",
    "rMLE PSNR",
    "rMLE PSNR face",
    "rMLE re-det",
]


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _attack_cells(scores: AttackScores | None) -> list[str]:
    if scores is None:
        return ["n/a"] * 5
    return [
        _fmt(scores.ssim),
        _fmt(scores.ssim_face),
        _fmt(scores.psnr, 2),
        _fmt(scores.psnr_face, 2),
        _fmt(scores.redetection, 2),
    ]


def _table_rows(report: PrivacyReport) -> list[list[str]]:
    rows = []
    for r in report.rows:
        rows.append(
            [
                r.label,
                _fmt(r.mean_ap),
                _fmt(r.ap_kept),
                _fmt(r.sigma_ratio, 2),
                *_attack_cells(r.decoder),
                *_attack_cells(r.rmle),
            ]
        )
    for label, scores in (
        ("mean image (no information)", report.no_information),
        ("originals at attack resolution", report.originals),
    ):
        rows.append([label, "", "", ""] + _attack_cells(scores) + [""] * 5)
    return rows


def _counted(count: int, source: str) -> str:
    return f"{count} ({source})" if source else str(count)


def _setup_lines(report: PrivacyReport) -> list[str]:
    s = report.settings
    rmle_cost = [r.rmle.seconds / max(1, r.rmle.images) for r in report.rows if r.rmle]
    decoder_cost = [r.decoder.seconds for r in report.rows]
    lines = [
        f"Model {report.model} (weights {report.weights_id[:12]}), input geometry "
        f"{report.geometry}; reconstructions at {report.image_size}.",
        f"Attacker's training images: {_counted(report.train_images, s['train_source'])}; "
        f"eval images: {_counted(report.eval_images, s['eval_source'])} (disjoint). "
        "rMLE on the first "
        f"{report.rmle_images} eval images.",
        f"Decoder: {s['epochs']} epochs, width {s['decoder_width']}, batch {s['batch_size']}, "
        f"fresh noise from the profile every step; "
        f"{np.mean(decoder_cost):.0f} s of training per setting on average.",
    ]
    if rmle_cost:
        lines.append(
            f"rMLE: {s['rmle_steps']} Adam steps with a TV prior, "
            f"{np.mean(rmle_cost):.1f} s per image on average."
        )
    lines.append(
        f"Re-detection: share of ground-truth faces the clean detector finds at score >= "
        f"{s['redetect_score']} and IoU >= {s['redetect_iou']}. Whole-frame metrics exclude "
        "the letterbox padding. Report built in "
        f"{report.seconds:.0f} s."
    )
    return lines


def _markdown(report: PrivacyReport) -> str:
    lines = ["# veil privacy report", ""]
    lines += [f"- {line}" for line in _setup_lines(report)]
    lines += ["", "| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in _table_rows(report)]
    lines += [
        "",
        "Higher SSIM / PSNR / re-detection = more leaked. `sigma/std` = mean noise scale in "
        "units of the clean activation's standard deviation.",
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


def _html(report: PrivacyReport, tradeoff: Path, grid: Path) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in _HEADER)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
        for row in _table_rows(report)
    )
    setup = "".join(f"<li>{html.escape(line)}</li>" for line in _setup_lines(report))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>veil privacy report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border: 1px solid #bbb; padding: 3px 6px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>veil privacy report</h1>
<ul>{setup}</ul>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<p>Higher SSIM / PSNR / re-detection = more leaked.</p>
<h2>Accuracy kept vs leakage</h2>
{_embedded_png(tradeoff, "trade-off plot")}
<h2>Reconstructions (green: clean detector's detections; white: ground truth)</h2>
{_embedded_png(grid, "reconstruction grid")}
</body></html>
"""

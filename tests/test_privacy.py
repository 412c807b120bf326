from __future__ import annotations

import base64
import itertools
import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from tests.tiny_detector import TinyDetector
from veil.calibrate import CalibrationConfig, calibrate, list_images
from veil.data import data_root
from veil.detections import Detections
from veil.detectors.base import Frame, InputGeometry, SplitDetector
from veil.errors import ConfigError, DatasetError, ProfileError
from veil.privacy import (
    AttackSet,
    NoiseModel,
    face_crops,
    face_psnr,
    face_ssim,
    mean_image,
    prepare_attack_set,
    privacy_report,
    psnr,
    redetection_rate,
    rmle_attack,
    ssim,
    train_decoder,
)
from veil.privacy.metrics import BoxArray


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """On a busy shared CPU, two OpenMP threads spin against each other and made these
    attacks 10-30x slower than one; restore the setting for the other test modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def smooth_image(seed: int = 0, size: tuple[int, int] = (48, 64)) -> Frame:
    """A natural-ish uint8 BGR image: gradients, blobs and edges, not white noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    ys, xs = np.mgrid[0:h, 0:w] / max(h, w)
    image = np.stack(
        [128 + 100 * np.sin(3 * xs + c) * np.cos(2 * ys - c) for c in range(3)], axis=-1
    )
    for _ in range(4):
        x, y = rng.integers(0, w - 10), rng.integers(0, h - 10)
        image[y : y + 10, x : x + 12] = rng.integers(0, 256, 3)
    return np.asarray(np.clip(image, 0, 255), dtype=np.uint8)


# --- metrics ---------------------------------------------------------------------------------


def test_ssim_of_an_image_with_itself_is_exactly_one() -> None:
    image = smooth_image()
    assert ssim(image, image) == 1.0
    assert ssim(image[..., 0], image[..., 0].copy()) == 1.0
    as_float = image.astype(np.float32) / 255
    assert ssim(as_float, as_float) == 1.0


def test_ssim_falls_as_noise_grows() -> None:
    image = smooth_image(1)
    rng = np.random.default_rng(0)
    scores = []
    for level in (2, 8, 20, 50):
        noisy = np.clip(image + rng.normal(0, level, image.shape), 0, 255).astype(np.uint8)
        scores.append(ssim(image, noisy))
    assert all(a > b for a, b in itertools.pairwise(scores)), scores
    assert scores[0] > 0.9 and scores[-1] < 0.5


def test_ssim_matches_the_reference_implementation() -> None:
    rng = np.random.default_rng(2)
    a = smooth_image(2, (40, 52))
    b = np.clip(a + rng.normal(0, 25, a.shape), 0, 255).astype(np.uint8)
    reference = structural_similarity(  # type: ignore[no-untyped-call]
        a,
        b,
        channel_axis=2,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
    )
    assert ssim(a, b) == pytest.approx(reference, abs=1e-12)


def test_psnr_of_a_known_error() -> None:
    a = np.full((16, 16, 3), 0.5)
    assert psnr(a, a + 0.1) == pytest.approx(20.0)  # MSE 0.01
    u = np.full((16, 16), 100, np.uint8)
    assert psnr(u, u + 5) == pytest.approx(20 * math.log10(255 / 5))
    assert psnr(u, u) == math.inf


def test_bad_images_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="differ in shape"):
        ssim(np.zeros((20, 20)), np.zeros((20, 21)))
    with pytest.raises(ConfigError, match=r"must lie in \[0, 1\]"):
        psnr(np.full((4, 4), 3.0), np.zeros((4, 4)))
    with pytest.raises(ConfigError, match="uint8 or floating"):
        ssim(np.zeros((20, 20), np.int32), np.zeros((20, 20), np.int32))
    with pytest.raises(ConfigError, match="at least 11x11"):
        ssim(np.zeros((8, 30)), np.zeros((8, 30)))


def test_face_crops_are_clipped_grown_and_scored_per_face() -> None:
    crops = face_crops((48, 64, 3), np.array([[10, 5, 30, 40], [60, 44, 63, 47], [70, 0, 90, 9]]))
    # The second face (3x3, in the corner) grows to the SSIM window and stays inside; the
    # third lies outside the image.
    assert crops == [(10, 5, 30, 40), (53, 37, 64, 48)]
    a = smooth_image(3)
    b = a.copy()
    b[5:40, 10:30] = 255 - b[5:40, 10:30]  # spoil the first face only
    values = face_ssim(a, b, np.array([[10, 5, 30, 40], [40, 10, 60, 30]]))
    assert values[0] < 0.5 and values[1] == 1.0
    assert face_psnr(a, b, np.array([[40, 10, 60, 30]])) == [math.inf]


class BrightSquareFinder:
    """Stand-in detector: every bright blob is a face, its mean brightness the confidence."""

    def detect(
        self,
        frames: Sequence[Frame],
        geometry: InputGeometry | None = None,
        score_threshold: float = 0.05,
    ) -> list[Detections]:
        out = []
        for frame in frames:
            gray = frame.max(axis=2)
            count, labels, stats, _ = cv2.connectedComponentsWithStats((gray > 40).astype(np.uint8))
            boxes, scores = [], []
            for k in range(1, count):
                x, y, w, h = stats[k, :4]
                boxes.append([x, y, x + w, y + h])
                scores.append(float(gray[labels == k].mean()) / 255)
            out.append(Detections(np.array(boxes).reshape(-1, 4), np.array(scores)))
        return out


def test_redetection_rate_counts_faces_found_with_enough_overlap_and_score() -> None:
    gt = [
        np.array([[10, 10, 30, 30], [40, 10, 60, 30]], np.float32),
        np.array([[10, 40, 30, 60], [40, 40, 60, 60]], np.float32),
    ]
    first = np.zeros((80, 80, 3), np.uint8)
    first[10:30, 10:30] = 250  # found
    first[10:30, 40:60] = 100  # faint: confidence 0.39 < 0.5
    second = np.zeros((80, 80, 3), np.uint8)
    second[40:60, 10:30] = 200  # found
    second[50:70, 50:70] = 255  # confident but IoU 1/7 with the face at (40, 40)
    finder = BrightSquareFinder()
    assert redetection_rate(finder, [first, second], gt) == pytest.approx(2 / 4)
    assert redetection_rate(finder, [first, second], gt, score=0.3) == pytest.approx(3 / 4)
    assert redetection_rate(finder, [first, second], gt, iou=0.1) == pytest.approx(3 / 4)
    with pytest.raises(DatasetError, match="no ground-truth faces"):
        redetection_rate(finder, [first], [np.zeros((0, 4), np.float32)])
    with pytest.raises(ConfigError, match="2 images but 1 box sets"):
        redetection_rate(finder, [first, second], gt[:1])


# --- attacks on real images ------------------------------------------------------------------


def _content_ssim(recon: torch.Tensor, data: AttackSet, indices: Sequence[int]) -> list[float]:
    scores = []
    for k, i in enumerate(indices):
        w, h = data.content[i]
        original = data.unit_targets(i).permute(1, 2, 0)[:h, :w].double().numpy()
        rebuilt = recon[k].permute(1, 2, 0)[:h, :w].double().numpy()
        scores.append(ssim(original, rebuilt))
    return scores


@pytest.fixture(scope="module")
def faceboxes_sets() -> tuple[SplitDetector, AttackSet, AttackSet]:
    root = data_root(required=False)
    weights = None if root is None else root / "faceboxes" / "FaceBoxesProd.pth"
    if root is None or weights is None or not weights.is_file():
        pytest.skip("reference data (VEIL_DATA, default ../shared/data) not found")
    from veil.detectors import FaceBoxes
    from veil.eval.fddb import load_fddb

    detector = FaceBoxes.from_checkpoint(weights)
    geometry = InputGeometry(256, 256)  # activation 128x8x8; reconstructions at 64x64
    wider = list_images(root / "widerface" / "WIDER_val" / "images")
    train = prepare_attack_set(
        detector, wider[:: len(wider) // 24][:24], geometry, 64, progress=False
    )
    fddb = load_fddb(root, folds=[1], max_images_per_fold=8).images
    evals = prepare_attack_set(detector, [im.path for im in fddb], geometry, 64, progress=False)
    assert not set(train.digests) & set(evals.digests)
    return detector, train, evals


@pytest.mark.data
def test_clean_decoder_beats_the_mean_image_on_held_out_faces(
    faceboxes_sets: tuple[SplitDetector, AttackSet, AttackSet],
) -> None:
    _, train, evals = faceboxes_sets
    assert tuple(train.activations.shape[1:]) == (128, 8, 8) and evals.target_size == (64, 64)
    noise = NoiseModel.clean((128, 8, 8))
    trained = train_decoder(train, noise, epochs=30, seed=0, progress=False)
    assert trained.losses[-1] < 0.8 * trained.losses[0]
    indices = range(len(evals))
    decoded = np.mean(_content_ssim(trained.reconstruct(evals.activations), evals, indices))
    guess = mean_image(train).expand(len(evals), -1, -1, -1)
    baseline = np.mean(_content_ssim(guess, evals, indices))
    assert decoded > baseline + 0.05, (decoded, baseline)


@pytest.mark.data
def test_rmle_matches_the_activation_and_beats_the_mean_image(
    faceboxes_sets: tuple[SplitDetector, AttackSet, AttackSet],
) -> None:
    detector, train, evals = faceboxes_sets
    indices = [0, 1, 2, 3]
    noise = NoiseModel.clean((128, 8, 8))
    result = rmle_attack(
        detector,
        evals.activations[indices],
        noise,
        evals.geometry,
        evals.target_size,
        float(train.activations.std()),
        steps=60,
        lr=0.2,
        progress=False,
    )
    assert result.data_loss[-1] < 0.25 * result.data_loss[0]
    attacked = _content_ssim(result.images, evals, indices)
    guess = mean_image(train).expand(len(indices), -1, -1, -1)
    baseline = _content_ssim(guess, evals, indices)
    assert np.mean(attacked) > np.mean(baseline) + 0.05, (attacked, baseline)
    assert all(a > b for a, b in zip(attacked, baseline, strict=True))


def test_noise_model_draws_fresh_noise_with_the_profile_moments() -> None:
    noise = NoiseModel(torch.full((2, 3, 3), 0.5), torch.full((2, 3, 3), 2.0), "test")
    clean = torch.zeros(4000, 2, 3, 3)
    seen = noise.observe(clean, torch.Generator().manual_seed(0))
    assert float(seen.mean()) == pytest.approx(0.5, abs=0.02)
    assert float(seen.std()) == pytest.approx(2.0, rel=0.02)
    with pytest.raises(ConfigError, match="does not fit"):
        noise.observe(torch.zeros(1, 2, 3, 4))


# --- the report ------------------------------------------------------------------------------


def synthetic_scenes(count: int, seed: int) -> tuple[list[Frame], list[BoxArray]]:
    frames, boxes = [], []
    for i in range(count):
        frame = smooth_image(seed * 100 + i, (60 + 4 * i, 80))
        x, y = 10 + 3 * i, 12
        frame[y : y + 24, x : x + 20] = (60, 120, 200)
        frames.append(frame)
        boxes.append(np.array([[x, y, x + 20, y + 24]], np.float32))
    return frames, boxes


def test_report_on_a_tiny_bank_writes_every_file(tmp_path: Path) -> None:
    detector = TinyDetector()
    bank = tmp_path / "bank"
    calibration, _ = synthetic_scenes(8, seed=1)
    calibrate(
        detector,
        calibration,
        bank,
        CalibrationConfig(alphas=(0.2, 0.9), epochs=1, batch_size=4),
        progress=False,
        log=lambda _: None,
    )
    train, _ = synthetic_scenes(12, seed=2)
    evals, boxes = synthetic_scenes(4, seed=3)
    out = tmp_path / "report"
    report = privacy_report(
        detector,
        bank,
        train,
        evals,
        boxes,
        {0.2: 0.5, 0.9: 0.3},
        0.6,
        out,
        epochs=2,
        image_size=64,
        progress=False,
        rmle_images=2,
        rmle_steps=10,
        grid_images=2,
        log=lambda _: None,
    )
    assert [r.alpha for r in report.rows] == [None, 0.2, 0.9]
    assert [r.ap_kept for r in report.rows] == pytest.approx([1.0, 0.5 / 0.6, 0.3 / 0.6])
    assert report.rows[0].sigma_ratio == 0.0 and report.rows[2].sigma_ratio > 0.0
    assert report.image_size == "64x48" and report.rmle_images == 2
    assert report.originals.ssim == 1.0  # the originals compared with themselves
    for row in report.rows:
        assert 0 <= row.decoder.redetection <= 1 and -1 <= row.decoder.ssim <= 1
        assert row.rmle is not None and row.rmle.images == 2

    data = json.loads((out / "report.json").read_text())
    assert [r["alpha"] for r in data["rows"]] == [None, 0.2, 0.9]
    assert data["rows"][1]["decoder"]["ssim"] == pytest.approx(report.rows[1].decoder.ssim)
    markdown = (out / "report.md").read_text()
    assert "| alpha 0.90 | 0.300 | 0.500 |" in markdown
    grid = cv2.imread(str(out / "grid.png"))
    assert grid is not None and grid.shape[1] == 4 * 64  # original + clean + two alphas
    assert grid.shape[0] == 2 * 2 * (48 + 14) + 3 * 3  # two images, decoder and rMLE rows
    page = (out / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == 2
    assert base64.b64decode(embedded[0]) == (out / "tradeoff.png").read_bytes()
    assert base64.b64decode(embedded[1]) == (out / "grid.png").read_bytes()
    assert 'src="http' not in page and "alpha 0.20" in page


def test_report_refuses_overlapping_images_and_an_empty_bank(tmp_path: Path) -> None:
    detector = TinyDetector()

    def report(bank: Path, train: Any, evals: Any, boxes: Any, image_size: int = 64) -> Any:
        return privacy_report(
            detector,
            bank,
            train,
            evals,
            boxes,
            None,
            None,
            tmp_path / "out",
            epochs=1,
            image_size=image_size,
            progress=False,
            log=lambda _: None,
        )

    with pytest.raises(ProfileError, match="no noise profiles"):
        report(tmp_path / "none", [], [], [])
    bank = tmp_path / "bank"
    frames, boxes = synthetic_scenes(4, seed=4)
    calibrate(
        detector,
        frames,
        bank,
        CalibrationConfig(alphas=(0.5,), epochs=1),
        progress=False,
        log=lambda _: None,
    )
    with pytest.raises(DatasetError, match="appear among the attacker's training images"):
        report(bank, frames, frames[:2], boxes[:2])
    with pytest.raises(ConfigError, match="image_size 100"):
        report(bank, frames[2:], frames[:2], boxes[:2], image_size=100)

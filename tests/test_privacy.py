from __future__ import annotations

import base64
import itertools
import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    AttackScores,
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
    strongest,
    train_decoder,
)
from veil.privacy.boxes_decoder import (
    BOX_CHANNELS,
    box_maps,
    boxes_decoder_reconstructions,
    train_boxes_decoder,
)
from veil.privacy.identity import IdentityScores, MeanCI, Rate
from veil.privacy.metrics import BoxArray
from veil.privacy.report import PrivacyReport, attach_accuracy, load_report
from veil.privacy.scores import BOXES_ONLY
from veil.privacy.verdict import paired_with_floors, surest_excess

if TYPE_CHECKING:
    from veil.profiles import NoiseProfile
    from workers.trusted.obfuscator import ProfileTable


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


def test_flat_tone_gives_every_face_the_average_tone_and_leaves_the_rest() -> None:
    from veil.privacy.retouch import flat_tone, gray

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 40, 60, generator=gen)
    images[0, :, 5:25, 5:25] *= 0.3  # a dark face
    images[1, :, 10:30, 30:50] = 0.6 + 0.4 * images[1, :, 10:30, 30:50]  # a bright one
    boxes = [np.array([[7.0, 7.0, 23.0, 23.0]]), np.array([[32.0, 12.0, 48.0, 28.0]])]
    out = flat_tone(images, boxes)
    # Each box grown by 15% of its 16 px side (2.4 px), outwards to whole pixels.
    windows = [(0, slice(4, 26)), (1, slice(9, 31))]
    xs = [slice(4, 26), slice(29, 51)]
    tones = []
    for (i, ys), x in zip(windows, xs, strict=True):
        patch = out[i, :, ys, x].reshape(3, -1)
        tones.append((patch.mean(1), patch.std(1)))
        mask = torch.ones(40, 60, dtype=torch.bool)
        mask[ys, x] = False
        assert torch.equal(out[i][:, mask], images[i][:, mask])  # outside the face: untouched
    assert torch.allclose(tones[0][0], tones[1][0], atol=0.02)
    assert torch.allclose(tones[0][1], tones[1][1], atol=0.02)
    before = [images[0, :, 5:25, 5:25].mean(), images[1, :, 10:30, 30:50].mean()]
    assert before[1] - before[0] > 0.4  # they differed
    luma = gray(images, boxes)
    assert torch.equal(luma[:, 0], luma[:, 2])
    expected = 0.114 * images[:, 0] + 0.587 * images[:, 1] + 0.299 * images[:, 2]
    assert torch.allclose(luma[:, 1], expected, atol=1e-6)
    with pytest.raises(ValueError, match="2 images but 1 box sets"):
        flat_tone(images, boxes[:1])


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

    # The stem split (after conv2): at 256x256 the Inception split leaves too little of a
    # picture for 24 training images to decode.
    detector = FaceBoxes.from_checkpoint(weights, split="faceboxes-stem")
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


def test_box_maps_mark_the_cells_each_box_covers_and_where_in_it_they_lie() -> None:
    big_and_small = np.array([[0, 0, 40, 40], [10, 10, 20, 20]], np.float32)
    maps = box_maps(
        [big_and_small, np.zeros((0, 4), np.float32)], [(60, 40), (80, 80)], (80, 80), (8, 8)
    )
    assert maps.shape == (2, BOX_CHANNELS, 8, 8)  # 10-pixel cells
    content, cover, u, v, width, height = maps[0]
    assert content[:4, :6].eq(1).all() and content[4:].eq(0).all() and content[:, 6:].eq(0).all()
    assert cover[:4, :4].eq(1).all() and cover.sum() == 16
    # the smaller box is drawn on top of the larger one
    assert (float(u[1, 1]), float(v[1, 1]), float(width[1, 1])) == (0.5, 0.5, 10 / 80)
    assert (float(u[0, 3]), float(v[0, 3]), float(height[0, 3])) == (35 / 40, 5 / 40, 0.5)
    assert maps[1, 0].eq(1).all() and maps[1, 1:].eq(0).all()
    with pytest.raises(ValueError, match="2 box sets for 1 images"):
        box_maps([big_and_small, big_and_small], [(60, 40)], (80, 80), (8, 8))


def test_the_boxes_only_decoder_draws_what_lies_in_the_boxes_from_the_boxes_alone() -> None:
    detector, geometry = TinyDetector(), InputGeometry(64, 48)
    frames, boxes = synthetic_scenes(12, seed=2)
    held_out, held_out_boxes = synthetic_scenes(4, seed=7)
    train = prepare_attack_set(detector, frames, geometry, 64, progress=False)
    evals = prepare_attack_set(detector, held_out, geometry, 64, progress=False)
    scaled = [b * s for b, s in zip(boxes, train.target_scales, strict=True)]
    trained = train_boxes_decoder(
        train, scaled, epochs=40, batch_size=4, width=32, seed=0, progress=False
    )
    targets = [b * s for b, s in zip(held_out_boxes, evals.target_scales, strict=True)]
    drawn = boxes_decoder_reconstructions(trained, targets, evals)
    assert drawn.shape == evals.targets.shape

    def box_error(images: torch.Tensor) -> float:
        errors = []
        for i, (x0, y0, x1, y1) in enumerate(np.concatenate(targets).round().astype(int)):
            truth = evals.unit_targets(i)[:, y0:y1, x0:x1]
            errors.append(float((images[i, :, y0:y1, x0:x1] - truth).abs().mean()))
        return float(np.mean(errors))

    mean = mean_image(train).expand(len(evals), -1, -1, -1)
    assert box_error(drawn) < 0.5 * box_error(mean), (box_error(drawn), box_error(mean))


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


@pytest.mark.data
def test_batched_rmle_gives_each_image_what_it_gets_alone(
    faceboxes_sets: tuple[SplitDetector, AttackSet, AttackSet],
) -> None:
    """The batch loss is a sum of per-image losses: batching (and chunking) must not dilute
    any image's step, so image 0 comes out as it does when attacked on its own."""
    detector, train, evals = faceboxes_sets
    noise = NoiseModel.clean((128, 8, 8))
    scale = float(train.activations.std())

    def attack(indices: list[int], chunk: int) -> Any:
        return rmle_attack(
            detector,
            evals.activations[indices],
            noise,
            evals.geometry,
            evals.target_size,
            scale,
            steps=15,
            chunk=chunk,
            progress=False,
        )

    alone = attack([0], 1)
    batched = attack([0, 1, 2], 2)
    assert batched.image_data_loss.shape == (15, 3)
    assert bool((batched.image_data_loss[-1] < 0.8 * batched.image_data_loss[0]).all())
    assert float((batched.images[0] - alone.images[0]).abs().max()) < 1e-3
    assert batched.image_data_loss[:, 0].tolist() == pytest.approx(
        alone.image_data_loss[:, 0].tolist(), rel=1e-3
    )


def _scores(attack: str, rank1: int, same: int, n: int = 50) -> AttackScores:
    identity = IdentityScores(Rate(rank1, n), Rate(same, n), 120, 1 / 120, MeanCI(0.7, 0.6, 0.8, n))
    return AttackScores(attack, 10, n, identity, None, None, None, None, None, 0.0)


def test_strongest_attack_is_the_highest_rank1_then_the_same_person_share() -> None:
    decoder, rmle, linkage = (
        _scores("decoder", 3, 9),
        _scores("rmle", 5, 2),
        _scores("linkage", 1, 30),
    )
    assert strongest({"decoder": decoder, "rmle": rmle, "linkage": linkage}) == "rmle"
    tied = _scores("linkage", 5, 4)
    assert strongest({"decoder": decoder, "rmle": rmle, "linkage": tied}) == "linkage"
    assert strongest({"decoder": decoder, "rmle": _scores("rmle", 3, 9)}) == "decoder"
    nothing = AttackScores("rmle", 0, 0, None, None, None, None, None, None, 0.0)
    assert strongest({"rmle": nothing}) is None
    assert strongest({"rmle": nothing, "decoder": decoder}) == "decoder"
    # A rate over fewer faces still counts by its value (rMLE attacks fewer images).
    assert strongest({"decoder": decoder, "rmle": _scores("rmle", 2, 0, n=20)}) == "rmle"


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


def _recognizer() -> Any:
    from veil.privacy.identity import FaceRecognizer

    try:
        return FaceRecognizer.load()
    except ConfigError as exc:
        pytest.skip(str(exc))


def _tiny_bank(path: Path) -> Path:
    calibration, _ = synthetic_scenes(8, seed=1)
    calibrate(
        TinyDetector(),
        calibration,
        path,
        CalibrationConfig(alphas=(0.2, 0.9), epochs=1, batch_size=4),
        progress=False,
        log=lambda _: None,
    )
    return path


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[PrivacyReport, Path, Path]:
    recognizer = _recognizer()
    root = tmp_path_factory.mktemp("tiny-report")
    bank = _tiny_bank(root / "bank")
    train, train_boxes = synthetic_scenes(12, seed=2)
    evals, boxes = synthetic_scenes(4, seed=3)
    distractors, distractor_boxes = synthetic_scenes(3, seed=5)
    report = privacy_report(
        TinyDetector(),
        bank,
        train,
        evals,
        boxes,
        None,  # accuracy measured on the eval images
        None,
        root / "report",
        epochs=2,
        image_size=64,
        progress=False,
        rmle_images=2,
        rmle_steps=5,
        linkage_epochs=2,
        grid_images=2,
        min_face=10,
        train_boxes=train_boxes,
        distractor_images=distractors,
        distractor_boxes=distractor_boxes,
        deployed_alpha=0.9,
        data_source="synthetic",
        recognizer=recognizer,
        log=lambda _: None,
    )
    return report, root / "report", bank


def test_report_on_a_tiny_bank_writes_every_file_with_identity_and_floors(
    tiny_report: tuple[PrivacyReport, Path, Path],
) -> None:
    report, out, _ = tiny_report
    assert [r.alpha for r in report.rows] == [None, 0.2, 0.9]
    assert [r.deployed for r in report.rows] == [False, False, True]
    assert report.accuracy_source == "eval images"
    assert report.rows[0].ap_kept == 1.0 and all(r.mean_ap is not None for r in report.rows)
    assert report.rows[0].sigma_ratio == 0.0 and report.rows[2].sigma_ratio > 0.0
    assert report.image_size == "64x48" and report.rmle_images == 2
    assert report.gallery == {"size": 7, "mode": "instances", "distractors": 3, "chance": 1 / 7}
    for row in report.rows:
        assert set(row.attacks) == {"linkage", *_PIXEL_ATTACKS}
        assert row.strongest == strongest(row.attacks)
        decoder, rmle, linkage = row.attacks["decoder"], row.attacks["rmle"], row.attacks["linkage"]
        assert decoder.faces == 4 and rmle.faces == 2 and rmle.images == 2
        # Retouched pictures are scored on the same faces as the attack's own.
        assert {row.attacks[f"decoder+{r}"].faces for r in ("tone", "gray")} == {4}
        assert {row.attacks[f"rmle+{r}"].images for r in ("tone", "gray")} == {2}
        assert decoder.identity is not None and decoder.identity.rank1.n == 4
        assert decoder.ssim is not None and decoder.ssim.n == 4 and -1 <= decoder.ssim.mean <= 1
        assert linkage.identity is not None and linkage.ssim is None and linkage.redetection is None
    originals = report.references["originals"]
    assert originals.ssim is not None and originals.ssim.mean == 1.0
    assert report.references["boxes-only"].identity is not None
    drawn = report.references["boxes-decoder"]
    assert drawn.identity is not None and drawn.identity.rank1.n == 4 and drawn.seconds > 0
    assert set(report.references) == {"originals", *BOXES_ONLY}
    assert all(report.references[k].faces == 4 for k in BOXES_ONLY)

    data = json.loads((out / "report.json").read_text())
    assert set(data) >= {"verdict", "rows", "references", "gallery", "faces", "data_source"}
    assert data["rows"][1]["attacks"]["decoder"]["identity"]["rank1"]["n"] == 4
    assert load_report(out).to_json() == data  # round trip
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# veil privacy report\n\n## Verdict\n\n- no noise (clean):")
    for text in (
        "rank-1 [95% CI]",
        "same person",
        "Floors: chance 1/7 = 14.3%",
        "boxes-only attacker (floor)",
        "boxes-only decoder (floor)",
        "boxes-only decoder, tone flattened (floor)",
        "boxes-only mean face, in gray (floor)",
        "; boxes-only decoder rank-1",
        "originals at attack resolution (ceiling)",
        "re-detection (not a privacy figure)",
        "alpha 0.90 (deployed)",
    ):
        assert text in markdown, text
    assert markdown.count("Floors: chance") == 2  # beside both tables
    grid = cv2.imread(str(out / "grid.png"))
    assert grid is not None and grid.shape[1] == 5 * 192  # original, boxes-only, 3 settings
    assert grid.shape[0] == 2 * 2 * (18 + 144) + 3 * 3  # two images, decoder and rMLE rows
    page = (out / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == 2
    assert base64.b64decode(embedded[1]) == (out / "grid.png").read_bytes()
    assert 'src="http' not in page and '<li class="deployed">alpha 0.90 (deployed)' in page


_VERDICT = re.compile(
    r"^(?P<setting>no noise \(clean\)|alpha (?P<alpha>[0-9.]+))(?P<deployed> \(deployed\))?: "
    r"the strongest attack \((?P<attack>[^)]+)\) re-identified (?P<rank1>[0-9.]+)% of "
    r"(?P<n>\d+) faces? \[(?P<low>[0-9.]+), (?P<high>[0-9.]+)\] \(chance (?P<chance>[0-9.]+)%, "
    r"boxes-only (?P<floor>[0-9.]+)%\); (?P<same>[0-9.]+)% .*\(boxes-only [0-9.]+%; the "
    r"attack's faces lie as close to (?P<false>[0-9.]+)% of other people's faces\); "
    r"accuracy kept (?P<kept>[0-9.]+)\. "
    r"(?P<leak>Identity leaks|No identity leak)"
)


def test_the_verdict_says_what_report_json_says(
    tiny_report: tuple[PrivacyReport, Path, Path],
) -> None:
    _, out, _ = tiny_report
    data = json.loads((out / "report.json").read_text())
    floor = {  # the better of the two boxes-only attackers
        "value": max(data["references"][k]["identity"]["rank1"]["value"] for k in BOXES_ONLY)
    }
    assert len(data["verdict"]) == len(data["rows"])
    for entry, row in zip(data["verdict"], data["rows"], strict=True):
        match = _VERDICT.match(entry["text"])
        assert match, entry["text"]
        head = row["attacks"][row["strongest"]]["identity"]
        best = max(a["identity"]["rank1"]["value"] for a in row["attacks"].values())
        assert head["rank1"]["value"] == best
        assert match["attack"] == _title(row["strongest"])
        assert (match["alpha"] is None) == (row["alpha"] is None)
        if row["alpha"] is not None:
            assert float(match["alpha"]) == pytest.approx(row["alpha"])
        assert bool(match["deployed"]) == row["deployed"]
        assert int(match["n"]) == head["rank1"]["n"]
        for key, value in (
            ("rank1", head["rank1"]["value"]),
            ("low", head["rank1"]["low"]),
            ("high", head["rank1"]["high"]),
            ("chance", data["gallery"]["chance"]),
            ("floor", floor["value"]),
            ("same", head["same_person"]["value"]),
            ("false", head["false_match"]["mean"]),
        ):
            assert float(match[key]) == pytest.approx(100 * value, abs=0.05), key
        assert float(match["kept"]) == pytest.approx(row["ap_kept"], abs=0.005)
        leaks = head["rank1"]["low"] > max(data["gallery"]["chance"], floor["value"])
        assert (match["leak"] == "Identity leaks") == leaks == entry["leaks"]
        _check_paired(entry, row, data["references"])


_PIXEL_ATTACKS = [f"{a}{r}" for a in ("decoder", "rmle") for r in ("", "+tone", "+gray")]


def _title(attack: str) -> str:
    name, _, retouch = attack.partition("+")
    title = {"decoder": "decoder", "rmle": "rMLE", "linkage": "feature linkage"}[name]
    return title + {"": "", "tone": ", tone flattened", "gray": ", in gray"}[retouch]


def _verified(identity: dict[str, Any]) -> dict[int, bool]:
    return {
        r: d < 0.6 for r, d in zip(identity["own_rows"], identity["own_distances"], strict=True)
    }


def _check_paired(entry: dict[str, Any], row: dict[str, Any], refs: dict[str, Any]) -> None:
    """Every pixel attack against every boxes-only attacker, face by face (the tiny report's
    gallery holds each face once, so its row names it); the text quotes the surest one."""
    paired = entry["paired_with_floors"]
    assert {(p["attack"], p["floor"]) for p in paired} == {
        (a, f) for a in _PIXEL_ATTACKS for f in BOXES_ONLY
    }
    for p in paired:
        mine = _verified(row["attacks"][p["attack"]]["identity"])
        theirs = _verified(refs[p["floor"]]["identity"])
        assert p["faces"] == len(mine) and mine.keys() <= theirs.keys()
        assert p["both"] == sum(v and theirs[r] for r, v in mine.items())
        assert p["only_first"] == sum(v and not theirs[r] for r, v in mine.items())
        assert p["only_second"] == sum(theirs[r] and not v for r, v in mine.items())
        assert 0.0 < p["p_value"] <= 1.0
    surest = min(
        _PIXEL_ATTACKS,
        key=lambda a: max(p["p_value"] for p in paired if p["attack"] == a),
    )
    quoted = [p for p in paired if p["attack"] == surest]
    said = (
        f"Face by face (exact McNemar), the {_title(surest)} verified "
        f"{quoted[0]['only_first']} faces"
    )
    assert said in entry["text"]
    assert f"(p = {quoted[1]['p_value']:.3f}, {quoted[1]['faces']} faces)." in entry["text"]


def test_the_report_records_leakage_in_every_profile_and_takes_given_accuracy(
    tiny_report: tuple[PrivacyReport, Path, Path], tmp_path: Path
) -> None:
    from veil.profiles import ProfileBank

    report, out, bank = tiny_report
    for profile in ProfileBank(bank).profiles():
        leakage = profile.meta.leakage
        row = next(r for r in report.rows if r.alpha == profile.alpha)
        assert leakage["strongest_attack"] == row.strongest
        assert row.headline is not None and row.headline.identity is not None
        assert leakage["rank1"]["hits"] == row.headline.identity.rank1.hits
        assert {"same_person", "face_ssim", "chance", "boxes_only", "faces", "date"} <= set(leakage)
        drawn = report.references["boxes-decoder"].identity
        assert drawn is not None and leakage["boxes_decoder"]["rank1"]["hits"] == drawn.rank1.hits
        excess = surest_excess(paired_with_floors(row, report))
        assert excess is not None and leakage["beyond_boxes_only"]["attack"] == excess[0]
        assert leakage["beyond_boxes_only"]["p_value"] == max(p.p_value for _, p in excess[2])
        assert [p["floor"] for p in leakage["beyond_boxes_only"]["pairs"]] == list(BOXES_ONLY)
        assert leakage["data_source"] == "synthetic" and leakage["gallery_size"] == 7
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("report.json", "grid.png"):
        (copy / name).write_bytes((out / name).read_bytes())
    again = attach_accuracy(copy, {0.2: 0.5, 0.9: 0.3}, 0.6)
    assert [r.ap_kept for r in again.rows] == pytest.approx([1.0, 0.5 / 0.6, 0.3 / 0.6])
    assert again.accuracy_source == "given"
    assert "accuracy kept 0.50" in (copy / "report.md").read_text()


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
    _recognizer()
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


# --- footage ---------------------------------------------------------------------------------


def test_footage_is_sampled_evenly_and_split_by_time_with_a_gap(tmp_path: Path) -> None:
    from veil.privacy.footage import sample_footage, split_by_time

    for i in range(5):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), smooth_image(i))
    assert sample_footage(tmp_path, 3) == [(0.0, tmp_path / "f0.png"), (2.0, tmp_path / "f2.png"),
                                           (4.0, tmp_path / "f4.png")]  # fmt: skip

    samples: list[tuple[float, Any]] = [(float(t), smooth_image(t)) for t in range(10)]
    split = split_by_time(samples, "cam", train_share=0.6, gap=1)
    assert split.train_times == [0, 1, 2, 3, 4, 5] and split.eval_times == [7, 8, 9]
    with pytest.raises(DatasetError, match="none to score"):
        split_by_time(samples[:2], "cam", train_share=0.6, gap=1)


@pytest.mark.data
def test_privacy_on_the_operators_own_footage(tmp_path: Path) -> None:
    """``veil privacy --footage``: the clean detector's boxes stand in for faces, the gallery
    is the footage's own identities, and every profile records its leakage."""
    from veil.calibrate import video_frames
    from veil.cli import main
    from veil.detectors import load_detector
    from veil.profiles import ProfileBank
    from workers.trusted.obfuscator import ProfileTable

    root = data_root(required=False)
    video = None if root is None else root / "videos" / "single_face.mp4"
    if video is None or not video.is_file():
        pytest.skip("reference data (VEIL_DATA, default ../shared/data) not found")
    _recognizer()
    detector = load_detector("retinaface")
    geometry = InputGeometry(320, 320)
    bank = tmp_path / "bank"
    calibrate(
        detector,
        video_frames(video, every=12, limit=6),
        bank,
        CalibrationConfig(alphas=(0.5,), geometry=geometry, epochs=1, batch_size=6),
        source=f"video:{video}",
        progress=False,
        log=lambda _: None,
    )
    out = tmp_path / "report"
    code = main(
        ["privacy", "--model", "retinaface", "--geometry", "320x320", "--bank", str(bank),
         "--footage", str(video), "--footage-frames", "10", "--epochs", "1", "--image-size",
         "80", "--rmle-images", "1", "--rmle-steps", "2", "--linkage-epochs", "1",
         "--deployed-alpha", "0.5", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    data = json.loads((out / "report.json").read_text())
    assert data["data_source"] == f"footage:{video}"
    assert data["train_images"] == 6 and data["eval_images"] == 3  # 10 samples, 1 dropped
    assert data["gallery"]["mode"] == "identities" and data["faces"] >= 1
    assert data["gallery"]["size"] == 1  # one person in this clip
    assert data["rows"][1]["deployed"] and data["accuracy_source"] == "eval images"
    assert {"report.md", "report.html", "grid.png"} <= {p.name for p in out.iterdir()}
    (profile,) = ProfileBank(bank).profiles()
    assert profile.meta.leakage["data_source"] == f"footage:{video}"

    table = ProfileTable.from_bank(detector, geometry, ProfileBank(bank), torch.device("cpu"))
    _check_profile_notes(table, video, profile)


def _check_profile_notes(table: ProfileTable, video: Path, profile: NoiseProfile) -> None:
    """The edge's per-stream note: the profile's measured leakage, and whether it was
    calibrated on that stream's footage."""
    from veil.config import StreamConfig
    from workers.trusted.edge import profile_notes

    same, other = profile_notes(
        [
            StreamConfig("cam", str(video), alpha=0.5),
            StreamConfig("lobby", "rtsp://x/1", alpha=0.5),
        ],
        table,
    )
    assert "measured leakage: the strongest attack" in same["message"]
    floors = [profile.meta.leakage[k]["rank1"]["value"] for k in ("boxes_only", "boxes_decoder")]
    excess = profile.meta.leakage["beyond_boxes_only"]
    beyond = f"face by face: p = {excess['p_value']:.3f} ({excess['attack']}))"
    said = f", boxes-only {100 * max(floors):.1f}%; same person beyond the boxes, {beyond}"
    assert said in same["message"]
    assert not same["other_footage"] and "NOTE" not in same["message"]
    assert other["other_footage"] and "calibrated on other footage" in other["message"]


def test_edge_says_when_a_profile_has_no_measured_leakage(tmp_path: Path) -> None:
    from veil.config import StreamConfig
    from veil.profiles import ProfileBank
    from workers.trusted.edge import profile_notes
    from workers.trusted.obfuscator import ProfileTable

    detector = TinyDetector()
    bank = ProfileBank(_tiny_bank(tmp_path / "bank"))
    table = ProfileTable.from_bank(detector, detector.default_geometry, bank, torch.device("cpu"))
    clean, noisy = profile_notes(
        [StreamConfig("a", "cam.mp4", alpha=0.0), StreamConfig("b", "cam.mp4", alpha=0.9)], table
    )
    assert "no noise" in clean["message"]
    assert noisy["alpha"] == 0.9 and noisy["profile_id"] == bank.profiles()[1].profile_id
    assert "leakage not measured: run veil privacy" in noisy["message"]
    assert noisy["other_footage"]  # calibrated on in-memory frames, not on cam.mp4

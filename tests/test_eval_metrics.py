from __future__ import annotations

import time

import numpy as np
import pytest

from veil.detections import Detections
from veil.errors import ConfigError, DatasetError
from veil.eval.metrics import (
    ScoredDetections,
    average_precision,
    box_iou,
    match_detections,
    score_images,
    tpr_at_fp,
    voc_ap,
)


def dets(boxes: list[list[float]], scores: list[float]) -> Detections:
    return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32))


FACE_A = [10.0, 10.0, 50.0, 60.0]
FACE_B = [100.0, 20.0, 140.0, 70.0]
FACE_C = [30.0, 200.0, 90.0, 280.0]
NOWHERE = [300.0, 300.0, 340.0, 340.0]


def test_box_iou_by_hand() -> None:
    iou = box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30]])
    # half overlap: 50 / (100 + 100 - 50)
    np.testing.assert_allclose(iou, [[50 / 150, 1.0, 0.0]])


def test_voc_ap_of_a_known_curve() -> None:
    # Four faces; ranks: TP, TP, FP, TP (one face never found).
    recall = [0.25, 0.5, 0.5, 0.75]
    precision = [1.0, 1.0, 2 / 3, 0.75]
    # Envelope: 1 up to recall 0.5, then 0.75 up to 0.75, then nothing.
    assert voc_ap(recall, precision) == pytest.approx(0.25 + 0.25 + 0.25 * 0.75)


def test_voc_ap_interpolates_precision_from_higher_recall() -> None:
    # A dip at low recall is lifted to the better precision found later.
    assert voc_ap([0.5, 1.0], [0.5, 1.0]) == pytest.approx(1.0)
    assert voc_ap([], []) == 0.0
    with pytest.raises(ConfigError, match="recall"):
        voc_ap([0.1, 0.2], [1.0])


def test_perfect_detector_has_ap_one() -> None:
    gts = [np.array([FACE_A, FACE_B]), np.array([FACE_C])]
    found = [dets([FACE_A, FACE_B], [0.9, 0.8]), dets([FACE_C], [0.7])]
    assert average_precision(found, gts) == pytest.approx(1.0)
    assert tpr_at_fp(found, gts, max_fp=0) == pytest.approx(1.0)


def test_pooled_ap_of_a_known_ranking() -> None:
    gts = [np.array([FACE_A, FACE_B]), np.array([FACE_C])]
    # Pooled ranking: A (TP) 0.9, nowhere (FP) 0.8, C (TP) 0.7, nowhere (FP) 0.6; B missed.
    found = [dets([FACE_A, NOWHERE], [0.9, 0.6]), dets([NOWHERE, FACE_C], [0.8, 0.7])]
    # recall 1/3, 1/3, 2/3, 2/3; precision 1, 1/2, 2/3, 1/2 -> AP = 1/3 * 1 + 1/3 * 2/3
    assert average_precision(found, gts) == pytest.approx(1 / 3 + 2 / 9)


def test_duplicate_detection_is_a_false_positive() -> None:
    shifted_a = [12.0, 12.0, 52.0, 62.0]
    matching = match_detections([shifted_a, FACE_A], [0.5, 0.9], [FACE_A])
    # The higher-scoring detection takes the face even though it comes second.
    assert matching.true_positive.tolist() == [False, True]
    assert matching.false_positive.tolist() == [True, False]
    assert matching.gt_index.tolist() == [-1, 0]
    found = [dets([FACE_A, shifted_a], [0.9, 0.5])]
    # One face, two detections: recall 1 at precision 1, then the duplicate only adds an FP.
    scored = score_images(found, [np.array([FACE_A])])
    assert scored.true_positive.tolist() == [True, False]
    assert scored.average_precision() == pytest.approx(1.0)


def test_matching_is_one_to_one_and_takes_the_best_free_face() -> None:
    left = [0.0, 0.0, 10.0, 10.0]
    right = [6.0, 0.0, 16.0, 10.0]
    between = [3.0, 0.0, 13.0, 10.0]  # IoU 7/13 with both faces
    matching = match_detections([left, between], [0.9, 0.8], [left, right])
    assert matching.true_positive.tolist() == [True, True]
    assert matching.gt_index.tolist() == [0, 1]


def test_iou_must_exceed_the_threshold() -> None:
    face = [0.0, 0.0, 10.0, 10.0]
    exactly_half = match_detections([[0.0, 0.0, 10.0, 5.0]], [0.9], [face])
    assert exactly_half.true_positive.tolist() == [False]
    above = match_detections([[0.0, 0.0, 10.0, 6.0]], [0.9], [face])
    assert above.true_positive.tolist() == [True]


def test_detections_on_ignored_faces_are_neither_right_nor_wrong() -> None:
    matching = match_detections(
        [FACE_A, FACE_B, FACE_B, NOWHERE], [0.9, 0.8, 0.7, 0.6], [FACE_A, FACE_B], ignore=[0, 1]
    )
    assert matching.true_positive.tolist() == [True, False, False, False]
    assert matching.ignored.tolist() == [False, True, True, False]
    assert matching.false_positive.tolist() == [False, False, False, True]
    scored = ScoredDetections.from_matching([0.9, 0.8, 0.7, 0.6], matching, num_gt=1)
    assert scored.scores.tolist() == pytest.approx([0.9, 0.6])


def test_tpr_at_fp_on_a_constructed_ranking() -> None:
    gts = [np.array([FACE_A, FACE_B]), np.array([FACE_C, NOWHERE])]
    far = [[500.0, 500.0, 520.0, 520.0], [600.0, 600.0, 620.0, 620.0]]
    # Ranking: A TP 0.9, FP 0.8, C TP 0.7, FP 0.6, B TP 0.5 (4 faces, NOWHERE never found).
    found = [dets([FACE_A, far[0], FACE_B], [0.9, 0.8, 0.5]), dets([FACE_C, far[1]], [0.7, 0.6])]
    assert tpr_at_fp(found, gts, max_fp=0) == pytest.approx(1 / 4)
    assert tpr_at_fp(found, gts, max_fp=1) == pytest.approx(2 / 4)
    assert tpr_at_fp(found, gts, max_fp=2) == pytest.approx(3 / 4)
    assert tpr_at_fp(found, gts, max_fp=1000) == pytest.approx(3 / 4)


def test_tpr_at_fp_keeps_tied_scores_together() -> None:
    gts = [np.array([FACE_A, FACE_B])]
    # FACE_B and a false positive share score 0.8: no threshold separates them.
    found = [dets([FACE_A, FACE_B, NOWHERE], [0.9, 0.8, 0.8])]
    assert tpr_at_fp(found, gts, max_fp=0) == pytest.approx(1 / 2)
    assert tpr_at_fp(found, gts, max_fp=1) == pytest.approx(1.0)


def test_no_faces_is_an_error_not_a_number() -> None:
    with pytest.raises(DatasetError, match="no ground-truth faces"):
        average_precision([dets([FACE_A], [0.9])], [np.zeros((0, 4))])
    with pytest.raises(ConfigError, match="max_fp"):
        tpr_at_fp([dets([FACE_A], [0.9])], [np.array([FACE_A])], max_fp=-1)


def test_scale_of_a_full_benchmark_is_fast() -> None:
    # FDDB-sized: ~2800 images, ~5000 faces, ~100k detections.
    rng = np.random.default_rng(1)
    per_image_dets, per_image_gts = [], []
    found_total = 0
    for _ in range(2800):
        n_faces = int(rng.integers(1, 4))
        xy = rng.uniform(0, 400, (n_faces, 2))
        faces = np.concatenate([xy, xy + rng.uniform(20, 80, (n_faces, 2))], axis=1)
        clutter_xy = rng.uniform(0, 400, (34, 2))
        clutter = np.concatenate([clutter_xy, clutter_xy + 10], axis=1)
        boxes = np.concatenate([faces + 1.0, clutter])
        scores = np.concatenate([rng.uniform(0.5, 1.0, n_faces), rng.uniform(0.0, 0.5, 34)])
        per_image_dets.append(Detections(boxes.astype(np.float32), scores.astype(np.float32)))
        per_image_gts.append(faces)
        found_total += n_faces
    started = time.perf_counter()
    scored = score_images(per_image_dets, per_image_gts)
    ap = scored.average_precision()
    tpr = scored.tpr_at_fp(1000)
    elapsed = time.perf_counter() - started
    assert len(scored.scores) >= 100_000
    assert scored.num_gt == found_total
    # Every face is found (shifted by one pixel) and outranks all the clutter.
    assert int(scored.true_positive.sum()) == found_total
    assert ap == pytest.approx(1.0)
    assert tpr == pytest.approx(1.0)
    assert scored.tpr_at_fp(0) == pytest.approx(1.0)
    assert elapsed < 15.0, f"scoring took {elapsed:.1f} s"

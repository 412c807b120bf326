from __future__ import annotations

import hashlib
import io
import math
import re
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from veil.data import data_root
from veil.detections import Detections
from veil.detectors.base import Frame
from veil.errors import ConfigError, DatasetError
from veil.eval import DetectFn, read_image
from veil.eval.fddb import FddbDataset, ellipse_to_box, evaluate_fddb, load_fddb

DATA = data_root(required=False)


def fddb_dir() -> Path:
    if DATA is None or not (DATA / "fddb" / "FDDB-folds").is_dir():
        pytest.skip("reference data not found: set VEIL_DATA to the folder holding fddb/")
    return DATA / "fddb"


# --- ellipse_to_box --------------------------------------------------------------------------


def test_ellipse_box_unrotated_and_upright() -> None:
    assert ellipse_to_box(30, 20, 0.0, 100, 50) == pytest.approx((70, 30, 130, 70))
    # Major axis vertical (as for most FDDB faces): the box is taller than wide.
    assert ellipse_to_box(30, 20, math.pi / 2, 100, 50) == pytest.approx((80, 20, 120, 80))
    assert ellipse_to_box(30, 20, -math.pi / 2, 100, 50) == pytest.approx((80, 20, 120, 80))


@pytest.mark.parametrize("angle", [0.3, 1.265839, -1.476417, 2.5])
def test_ellipse_box_is_tight_around_sampled_points(angle: float) -> None:
    a, b, cx, cy = 123.5833, 85.5495, 269.6934, 161.7812
    t = np.linspace(0, 2 * np.pi, 200_001)
    xs = cx + a * np.cos(t) * np.cos(angle) - b * np.sin(t) * np.sin(angle)
    ys = cy + a * np.cos(t) * np.sin(angle) + b * np.sin(t) * np.cos(angle)
    x1, y1, x2, y2 = ellipse_to_box(a, b, angle, cx, cy)
    # Every point inside, and the extremes touch the box (to sampling precision).
    assert xs.min() >= x1 - 1e-9 and xs.max() <= x2 + 1e-9
    assert ys.min() >= y1 - 1e-9 and ys.max() <= y2 + 1e-9
    np.testing.assert_allclose(
        [xs.min(), ys.min(), xs.max(), ys.max()], [x1, y1, x2, y2], atol=1e-4
    )


# --- loading: a synthetic dataset ------------------------------------------------------------


def write_fold(root: Path, fold: int, text: str) -> Path:
    folds = root / "FDDB-folds"
    folds.mkdir(parents=True, exist_ok=True)
    path = folds / f"FDDB-fold-{fold:02d}-ellipseList.txt"
    path.write_text(text)
    return path


def write_image(root: Path, name: str, height: int = 120, width: int = 160) -> None:
    path = root / "originalPics" / f"{name}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(len(name)).integers(0, 256, (height, width, 3), np.uint8)
    assert cv2.imwrite(str(path), pixels)


GOOD_FOLD = (
    "2002/07/19/big/img_1\n"
    "1\n"
    "30.0 20.0 1.5707963 80.0 60.0  1\n"
    "2002/07/19/big/img_2\n"
    "2\n"
    "20.0 15.0 0.0 40.0 40.0  1\n"
    "25.0 18.0 0.0 110.0 70.0  1\n"
    "2002/07/19/big/img_3\n"
    "1\n"
    "10.0 8.0 0.0 30.0 30.0  1\n"
)


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        (GOOD_FOLD.replace("20.0 15.0 0.0 40.0 40.0  1", "20.0 15.0 0.0 40.0"), 6, "6 numbers"),
        (GOOD_FOLD.replace("25.0 18.0 0.0", "25.0 abc 0.0"), 7, "6 numbers"),
        (GOOD_FOLD.replace("\n2\n", "\ntwo\n"), 5, "face count"),
        (GOOD_FOLD.replace("10.0 8.0", "-10.0 8.0"), 10, "radii"),
        (GOOD_FOLD + "2002/07/19/big/img_4\n3\n1 1 0 5 5 1\n", 14, "6 numbers"),
    ],
)
def test_malformed_ellipse_file_names_file_and_line(
    tmp_path: Path, text: str, line: int, problem: str
) -> None:
    path = write_fold(tmp_path, 1, text)
    with pytest.raises(DatasetError, match=problem) as info:
        load_fddb(tmp_path, folds=[1])
    assert f"{path}:{line}:" in str(info.value)


def test_missing_fold_file_and_bad_arguments(tmp_path: Path) -> None:
    write_fold(tmp_path, 1, GOOD_FOLD)
    with pytest.raises(DatasetError, match=re.escape("FDDB-fold-02-ellipseList.txt")):
        load_fddb(tmp_path, folds=[1, 2])
    with pytest.raises(ConfigError, match="1 to 10"):
        load_fddb(tmp_path, folds=[11])
    with pytest.raises(ConfigError, match="twice"):
        load_fddb(tmp_path, folds=[1, 1])
    with pytest.raises(DatasetError, match="FDDB-folds"):
        load_fddb(tmp_path / "elsewhere")


def test_image_list_must_agree_with_ellipses(tmp_path: Path) -> None:
    write_fold(tmp_path, 1, GOOD_FOLD)
    (tmp_path / "FDDB-folds" / "FDDB-fold-01.txt").write_text("2002/07/19/big/img_1\n")
    with pytest.raises(DatasetError, match=re.escape("FDDB-fold-01.txt")):
        load_fddb(tmp_path, folds=[1])


class GroundTruthDetector:
    """Returns each image's ground-truth boxes, shifted a little, clipped to the frame, with
    descending scores; recognises images by their pixels. On the calls numbered in
    ``first_face_only_calls`` it finds only the first face of each image."""

    def __init__(self, dataset: FddbDataset, first_face_only_calls: set[int] | None = None) -> None:
        self.boxes: dict[str, npt.NDArray[np.float64]] = {}
        for im in dataset.images:
            self.boxes[self.key(read_image(im.path))] = im.boxes
        self.first_face_only_calls = first_face_only_calls or set()
        self.calls = 0

    @staticmethod
    def key(frame: Frame) -> str:
        return hashlib.sha1(frame.tobytes()).hexdigest() + str(frame.shape)

    def __call__(self, frames: list[Frame]) -> list[Detections]:
        partial = self.calls in self.first_face_only_calls
        self.calls += 1
        out = []
        for frame in frames:
            boxes = self.boxes[self.key(frame)].copy()
            if partial:
                boxes = boxes[:1]
            w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            boxes += np.stack([0.04 * w, -0.03 * h, 0.02 * w, 0.05 * h], axis=1)
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, frame.shape[1])
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, frame.shape[0])
            scores = np.linspace(0.95, 0.6, len(boxes))
            out.append(Detections(boxes.astype(np.float32), scores.astype(np.float32)))
        return out


def test_missing_images_are_counted_reported_and_skipped(tmp_path: Path) -> None:
    write_fold(tmp_path, 1, GOOD_FOLD)
    write_image(tmp_path, "2002/07/19/big/img_1")
    write_image(tmp_path, "2002/07/19/big/img_3", 90, 70)
    dataset = load_fddb(tmp_path, folds=[1])
    fold = dataset.folds[0]
    assert [im.name for im in fold.images] == ["2002/07/19/big/img_1", "2002/07/19/big/img_3"]
    assert fold.missing == ("2002/07/19/big/img_2",)
    assert (fold.num_missing_faces, fold.num_annotated, dataset.num_faces) == (2, 3, 2)
    np.testing.assert_allclose(fold.images[0].boxes, [[60, 30, 100, 90]], atol=1e-5)

    out = io.StringIO()
    result = evaluate_fddb(GroundTruthDetector(dataset), dataset, progress=False, out=out)
    assert out.getvalue().splitlines() == [
        "FDDB-fold-1 Val AP: 1.0000",
        "FDDB Dataset Average AP: 1.0000",
        "mAP: 1.0000",
        "FDDB TPR@1000FP: 1.0000",
        "FDDB images: 2 evaluated (2 faces); 1 of 3 annotated images missing from "
        "originalPics/ and skipped (2 faces)",
    ]
    assert result.missing_images == ("2002/07/19/big/img_2",)
    json = result.to_json()
    assert json["num_missing_images"] == 1 and json["folds"][0]["ap"] == pytest.approx(1.0)


def test_detector_breaking_the_contract_is_named(tmp_path: Path) -> None:
    write_fold(tmp_path, 1, GOOD_FOLD)
    write_image(tmp_path, "2002/07/19/big/img_1")
    dataset = load_fddb(tmp_path, folds=[1])

    def drops_frames(frames: list[Frame]) -> list[Detections]:
        return []

    with pytest.raises(ConfigError, match="0 results for a batch of 1"):
        evaluate_fddb(drops_frames, dataset, progress=False, out=io.StringIO())


# --- the real folds ----------------------------------------------------------------------------


@pytest.mark.data
def test_real_folds_counts_and_missing_images() -> None:
    root = fddb_dir()
    dataset = load_fddb(root.parent)  # the reference-data root is accepted too
    assert dataset.root == root
    for fold in dataset.folds:
        listed = (root / "FDDB-folds" / f"FDDB-fold-{fold.number:02d}.txt").read_text().split()
        assert fold.num_annotated == len(listed)
        assert len(fold.images) + len(fold.missing) == len(listed)
        assert all(im.path.is_file() and im.num_faces >= 1 for im in fold.images)
    # Figures of the shared copy, as its README states them.
    assert (dataset.num_annotated, dataset.num_images) == (2845, 2777)
    assert (dataset.num_faces + dataset.num_missing_faces, dataset.num_faces) == (5171, 5093)
    listed_missing = (root / "missing_images.txt").read_text().split()
    assert sorted(dataset.missing_images) == sorted(listed_missing)
    assert not any((root / "originalPics" / f"{n}.jpg").exists() for n in listed_missing)


@pytest.mark.data
def test_real_folds_with_a_ground_truth_detector() -> None:
    dataset = load_fddb(fddb_dir(), max_images_per_fold=3)
    assert [len(f.images) for f in dataset.folds] == [3] * 10
    out = io.StringIO()
    result = evaluate_fddb(GroundTruthDetector(dataset), dataset, batch_size=4, out=out)
    assert result.fold_ap == pytest.approx((1.0,) * 10)
    assert (result.mean_ap, result.pooled_ap, result.tpr_at_max_fp) == pytest.approx((1, 1, 1))
    lines = out.getvalue().splitlines()
    assert lines[0] == "FDDB-fold-1 Val AP: 1.0000"
    assert lines[10:13] == [
        "FDDB Dataset Average AP: 1.0000",
        "mAP: 1.0000",
        "FDDB TPR@1000FP: 1.0000",
    ]
    assert lines[13].startswith(f"FDDB images: 30 evaluated ({dataset.num_faces} faces); 68 of")


@pytest.mark.data
def test_real_folds_partial_detector_and_repeats() -> None:
    dataset = load_fddb(fddb_dir(), folds=[2, 5], max_images_per_fold=4)
    # Finding one face per image: precision stays 1, recall stops at images / faces.
    expected = [len(f.images) / f.num_faces for f in dataset.folds]
    assert min(expected) < 1.0, "the chosen images should include one with several faces"
    detect: DetectFn = GroundTruthDetector(dataset, first_face_only_calls=set(range(100)))
    partial = evaluate_fddb(detect, dataset, batch_size=3, progress=False, out=io.StringIO())
    assert partial.fold_ap == pytest.approx(expected)
    assert partial.mean_ap == pytest.approx(np.mean(expected))
    assert partial.tpr_at_max_fp == pytest.approx(dataset.num_images / dataset.num_faces)

    # Two runs per batch, the second finding one face per image: mean and sample std.
    odd_calls = set(range(1, 100, 2))
    detect = GroundTruthDetector(dataset, first_face_only_calls=odd_calls)
    out = io.StringIO()
    result = evaluate_fddb(detect, dataset, batch_size=3, progress=False, out=out, repeats=2)
    assert result.repeats == 2
    assert result.fold_ap == pytest.approx([(1 + e) / 2 for e in expected])
    assert result.fold_ap_std == pytest.approx([(1 - e) / math.sqrt(2) for e in expected])
    assert result.mean_ap_std == pytest.approx((1 - np.mean(expected)) / math.sqrt(2))
    assert out.getvalue().splitlines()[0] == (
        f"FDDB-fold-2 Val AP: {(1 + expected[0]) / 2:.4f} ± {(1 - expected[0]) / math.sqrt(2):.4f}"
    )
    assert "Detector runs: 2 per image" in out.getvalue()

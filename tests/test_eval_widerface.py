from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from veil.data import data_root
from veil.detections import Detections
from veil.detectors.base import Frame
from veil.errors import DatasetError
from veil.eval import read_image
from veil.eval.widerface import (
    WiderImage,
    evaluate_widerface,
    load_widerface,
    parse_wider_gt,
    widerface_aps,
)

DATA = data_root(required=False)


def wider_dir() -> Path:
    if DATA is None or not (DATA / "widerface" / "wider_face_split").is_dir():
        pytest.skip("reference data not found: set VEIL_DATA to the folder holding widerface/")
    return DATA / "widerface"


# --- the official scoring rules, on hand-made images -----------------------------------------

A = [10, 10, 40, 50]  # x, y, w, h as in the official files
B = [100, 20, 40, 50]
C = [30, 200, 60, 80]
NOWHERE = [300.0, 300.0, 340.0, 340.0]


def xyxy(xywh: list[int]) -> list[float]:
    return [xywh[0], xywh[1], xywh[0] + xywh[2], xywh[1] + xywh[3]]


def image(gt: list[list[int]], easy: list[int], hard: list[int]) -> WiderImage:
    counted = {"easy": easy, "medium": easy, "hard": hard}
    return WiderImage(
        event="0--Test",
        name=f"img_{len(gt)}",
        path=Path("unused.jpg"),
        gt_xywh=np.array(gt, dtype=np.float64).reshape(-1, 4),
        attributes=np.zeros((len(gt), 6), dtype=np.int64),
        counted={k: np.array(v, dtype=np.int64) for k, v in counted.items()},
    )


def dets(boxes: list[list[float]], scores: list[float]) -> Detections:
    return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32))


THREE_FACES = image([A, B, C], easy=[0, 1], hard=[0, 1, 2])
# Scores normalise to A 1.0, C 0.75, NOWHERE 0.5, B 0.0.
THREE_FACES_DETS = dets([xyxy(A), xyxy(C), NOWHERE, xyxy(B)], [0.9, 0.8, 0.7, 0.5])


def test_official_rules_by_hand() -> None:
    aps = widerface_aps([THREE_FACES], [THREE_FACES_DETS])
    # easy: C only matches an ignored face, so no proposal. (R, P): (.5, 1), (.5, 1/2), (1, 2/3)
    assert aps["easy"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert aps["medium"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    # hard: (1/3, 1), (2/3, 1), (2/3, 2/3), (1, 3/4)
    assert aps["hard"] == pytest.approx(2 / 3 + 1 / 3 * 0.75)


def test_images_without_boxes_add_no_false_positives_but_placeholders_do() -> None:
    no_boxes = image([], easy=[], hard=[])
    fp = dets([NOWHERE], [0.6])  # normalises to 0.25, between NOWHERE and B
    aps = widerface_aps([THREE_FACES, no_boxes], [THREE_FACES_DETS, fp])
    assert aps["easy"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    # The official files give a face-less image one all-zero box: then detections count.
    placeholder = image([[0, 0, 0, 0]], easy=[], hard=[])
    aps = widerface_aps([THREE_FACES, placeholder], [THREE_FACES_DETS, fp])
    # easy: (.5, 1), (.5, 1/2), (.5, 1/3), (1, 2/4)
    assert aps["easy"] == pytest.approx(0.5 + 0.5 * 0.5)
    # hard: (1/3, 1), (2/3, 1), (2/3, 2/3), (2/3, 2/4), (1, 3/5)
    assert aps["hard"] == pytest.approx(2 / 3 + 1 / 3 * 0.6)


def test_duplicate_detection_is_a_proposal_without_recall() -> None:
    two_faces = image([A, B], easy=[0, 1], hard=[0, 1])
    near_a = [12.0, 11.0, 51.0, 61.0]
    found = dets([xyxy(A), near_a, xyxy(B)], [0.9, 0.8, 0.7])
    # (R, P): (.5, 1), (.5, 1/2), (1, 2/3)
    assert widerface_aps([two_faces], [found])["easy"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    # Detections in any order are ranked by score first.
    shuffled = dets([xyxy(B), xyxy(A), near_a], [0.7, 0.9, 0.8])
    assert widerface_aps([two_faces], [shuffled])["easy"] == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_no_counted_faces_is_an_error() -> None:
    with pytest.raises(DatasetError, match="easy"):
        widerface_aps([image([A], easy=[], hard=[0])], [dets([xyxy(A)], [0.9])])


def test_malformed_ground_truth_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "gt.txt"
    path.write_text("0--Parade/a.jpg\n2\n1 2 3 4 0 0 0 0 0 0\n1 2 3 x 0 0 0 0 0 0\n")
    with pytest.raises(DatasetError, match="10 integers") as info:
        parse_wider_gt(path)
    assert f"{path}:4:" in str(info.value)
    path.write_text("0--Parade/a.jpg\n1\n0 0 0 0 0 0 0 0 0 0\nb.jpg\n1\n")
    with pytest.raises(DatasetError, match=re.escape("event/name.jpg")) as info:
        parse_wider_gt(path)
    assert f"{path}:4:" in str(info.value)


# --- the real validation subset ----------------------------------------------------------------


@pytest.mark.data
def test_real_ground_truth_and_images_present() -> None:
    root = wider_dir()
    entries = parse_wider_gt(root / "wider_face_split" / "wider_face_val_bbx_gt.txt")
    assert len(entries) == 3226
    # Face-less images carry one all-zero row, exactly as the .mat files do.
    faceless = [name for name, xywh, _ in entries if not xywh.any()]
    assert "0--Parade/0_Parade_Parade_0_275.jpg" in faceless
    dataset = load_widerface(root.parent)  # the reference-data root is accepted too
    on_disk = sorted(p for p in (root / "WIDER_val" / "images").rglob("*.jpg"))
    assert dataset.num_annotated == 3226
    assert dataset.num_present == len(dataset.images) == len(on_disk) == 668
    assert sorted(im.path for im in dataset.images) == on_disk
    for im in dataset.images:
        for setting in ("easy", "medium", "hard"):
            assert all(0 <= i < len(im.gt_xywh) for i in im.counted[setting])
        # Harder settings count a superset of the faces of easier ones.
        assert set(im.counted["easy"]) <= set(im.counted["medium"]) <= set(im.counted["hard"])
    assert 0 < dataset.num_faces("easy") < dataset.num_faces("medium") < dataset.num_faces("hard")


class GroundTruthDetector:
    """Each image's faces, shifted a little, scored 0.6 to 0.95, plus one false positive at
    0.05 (below every face); recognises images by their pixels."""

    def __init__(self, images: tuple[WiderImage, ...]) -> None:
        self.boxes: dict[str, npt.NDArray[np.float64]] = {
            self.key(read_image(im.path)): im.boxes_xyxy for im in images
        }

    @staticmethod
    def key(frame: Frame) -> str:
        return hashlib.sha1(frame.tobytes()).hexdigest() + str(frame.shape)

    def __call__(self, frames: list[Frame]) -> list[Detections]:
        out = []
        for frame in frames:
            boxes = self.boxes[self.key(frame)].copy()
            w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            boxes += np.stack([0.05 * w, 0.05 * h, 0.03 * w, 0.0 * h], axis=1)
            false_positive = [[0.0, 0.0, 8.0, 8.0]]
            scores = np.append(np.linspace(0.95, 0.6, len(boxes)), 0.05)
            out.append(Detections(np.concatenate([boxes, false_positive]), scores))
        return out


@pytest.mark.data
def test_real_images_with_a_ground_truth_detector() -> None:
    root = wider_dir()
    dataset = load_widerface(root, max_images=8)
    out = io.StringIO()
    result = evaluate_widerface(
        GroundTruthDetector(dataset.images), root, batch_size=3, max_images=8, out=out
    )
    assert (result.easy, result.medium, result.hard) == pytest.approx((1.0, 1.0, 1.0))
    assert result.num_images == 8
    assert result.faces == {s: dataset.num_faces(s) for s in ("easy", "medium", "hard")}
    assert result.faces["easy"] > 0
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["Easy Val AP: 1.0000", "Medium Val AP: 1.0000", "Hard Val AP: 1.0000"]
    assert lines[3].startswith("WIDER FACE val: 8 images scored, 668 of 3226 present")
    assert result.to_json()["hard_ap"] == pytest.approx(1.0)


@pytest.mark.data
def test_real_images_missing_the_small_faces() -> None:
    root = wider_dir()
    dataset = load_widerface(root, max_images=8)
    detector = GroundTruthDetector(dataset.images)
    # Miss every face under 30 px high: the easy set has none of them, the hard set many.
    detector.boxes = {k: b[(b[:, 3] - b[:, 1]) >= 30] for k, b in detector.boxes.items()}
    result = evaluate_widerface(detector, root, max_images=8, progress=False, out=io.StringIO())
    kept_hard = 0
    for im in dataset.images:
        heights = im.gt_xywh[im.counted["hard"], 3]
        kept_hard += int((heights >= 30).sum())
    # Precision stays 1 above the false positives, so hard AP is the share of faces found.
    assert result.hard == pytest.approx(kept_hard / dataset.num_faces("hard"))
    assert result.hard < 0.5
    assert result.easy == pytest.approx(1.0)

"""FaceBoxes: the split port against an independent restatement of the original code."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest
import torch

from tests.reference.faceboxes_original import (
    OriginalFaceBoxes,
    detect_original,
    load_original,
    prior_box,
)
from veil.data import data_root
from veil.detectors.base import InputGeometry
from veil.detectors.boxes import box_iou
from veil.detectors.faceboxes import FaceBoxes, faceboxes_priors
from veil.detectors.retinaface import RetinaFace
from veil.errors import CheckpointError


def _data() -> Path:
    root = data_root(required=False)
    if root is None:
        pytest.skip("reference data not found (set VEIL_DATA to the shared data folder)")
    return root


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    path = _data() / "faceboxes" / "FaceBoxesProd.pth"
    if not path.is_file():
        pytest.skip(f"FaceBoxes weights not found at {path}")
    return path


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> FaceBoxes:
    return FaceBoxes.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def original(checkpoint: Path) -> OriginalFaceBoxes:
    return load_original(checkpoint)


def fddb_images(count: int) -> list[tuple[str, npt.NDArray[np.uint8]]]:
    """The first ``count`` images of FDDB fold 1 that are present."""
    root = _data() / "fddb"
    out = []
    for name in (root / "FDDB-folds" / "FDDB-fold-01.txt").read_text().split():
        path = root / "originalPics" / f"{name}.jpg"
        if path.is_file():
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            assert image is not None, path
            out.append((name, np.asarray(image, dtype=np.uint8)))
        if len(out) == count:
            return out
    pytest.skip(f"fewer than {count} FDDB fold-1 images present under {root}")


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [(1024, 1024, (128, 32, 32)), (1080, 1920, (128, 34, 60)), (333, 517, (128, 11, 17))],
)
def test_head_gives_a_stride_32_activation_for_any_input_size(
    height: int, width: int, expected: tuple[int, int, int]
) -> None:
    detector = FaceBoxes().eval()
    with torch.no_grad():
        activation = detector.head(torch.zeros(1, 3, height, width))
    assert tuple(activation.shape[1:]) == expected
    assert detector.activation_channels == expected[0]


@pytest.mark.parametrize("size", [(1024, 1024), (1088, 1920), (660, 928), (37, 101)])
def test_priors_equal_the_original_prior_box(size: tuple[int, int]) -> None:
    ours = faceboxes_priors(size[0], size[1], torch.device("cpu"))
    assert torch.equal(ours, prior_box(size))


def test_head_then_tail_equals_the_original_unsplit_forward(
    model: FaceBoxes, original: OriginalFaceBoxes
) -> None:
    image = fddb_images(1)[0][1]
    x, _ = model.preprocess([image], InputGeometry(480, 352))
    torch.manual_seed(0)
    batch = torch.cat([x, torch.randn(1, 3, 352, 480) * 60])  # a real frame and a noisy one
    with torch.no_grad():
        activation = model.head(batch)
        loc, conf = model.tail(activation)
        ref_loc, ref_conf = original(batch)
    assert activation.shape == (2, 128, 11, 15)
    assert loc.shape == ref_loc.shape == (2, model.priors(352, 480, x.device).shape[0], 4)
    torch.testing.assert_close(loc, ref_loc, atol=1e-5, rtol=0)
    torch.testing.assert_close(conf.softmax(-1), ref_conf, atol=1e-5, rtol=0)


def test_detections_match_the_original_pipeline_on_fddb(
    model: FaceBoxes, original: OriginalFaceBoxes
) -> None:
    """Original test.py at scale s vs our detect() letterboxed at that same scale.

    s is about 2 and chosen so that the scaled width is a multiple of 32; the geometry is that
    width by the scaled height rounded up to 32, so our letterbox scale is exactly s. What may
    still differ: the original resamples both axes at 1/s while ours resamples the height at
    h/round(h*s) (sub-pixel), and ours pads the bottom with the mean up to the multiple of 32
    where the original's convolutions pad with zeros / pooling with -inf right at the image
    edge. Both only touch faces at the bottom edge; our boxes are clipped to the frame, so the
    original's are clipped too before comparing.
    """
    matched_faces = 0
    for name, image in fddb_images(6):
        h, w = image.shape[:2]
        width = 32 * round(2 * w / 32)
        scale = width / w
        geometry = InputGeometry(width, 32 * math.ceil(round(h * scale) / 32))
        ref = detect_original(original, image, scale)
        ref[:, 0:4:2] = ref[:, 0:4:2].clip(0, w)
        ref[:, 1:4:2] = ref[:, 1:4:2].clip(0, h)
        ref = ref[ref[:, 4] >= 0.5]
        ours = model.detect([image], geometry)[0].above(0.5)
        assert len(ours) == len(ref), name
        iou = box_iou(torch.from_numpy(ref[:, :4]), torch.from_numpy(ours.xyxy)).numpy()
        best = iou.argmax(axis=1)
        assert iou.max(axis=1).min() >= 0.9, (name, iou)
        assert sorted(best.tolist()) == list(range(len(ours))), name  # one-to-one
        np.testing.assert_allclose(ours.confidence[best], ref[:, 4], atol=0.02, err_msg=name)
        matched_faces += len(ours)
    assert matched_faces >= 6  # these images hold faces: the comparison is not vacuous


def test_checkpoint_loads_frozen_with_its_sha256(model: FaceBoxes, checkpoint: Path) -> None:
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert model.weights_id == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert model.name == "faceboxes" and model.stride == 32
    assert model.default_geometry == InputGeometry(1024, 1024)


def test_prefixed_and_wrapped_state_dicts_load_the_same_weights(
    model: FaceBoxes, checkpoint: Path, tmp_path: Path
) -> None:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    prefixed = tmp_path / "prefixed.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, prefixed)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state, "epoch": 300}, wrapped)
    for path in (prefixed, wrapped):
        loaded = FaceBoxes.from_checkpoint(path)
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), (path.name, key)


def test_retinaface_weights_are_rejected_naming_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "retinaface.pth"
    torch.save(RetinaFace().state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        FaceBoxes.from_checkpoint(path)
    message = str(err.value)
    assert "missing keys" in message and "conv1.conv.weight" in message
    assert "unexpected keys" in message and "body.stage1.0.0.weight" in message


def test_a_foreign_dict_is_rejected_naming_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "random.pth"
    torch.save({"encoder.weight": torch.randn(3, 3), "conv1.conv.weight": torch.randn(2)}, path)
    with pytest.raises(CheckpointError) as err:
        FaceBoxes.from_checkpoint(path)
    message = str(err.value)
    assert "unexpected keys: encoder.weight" in message
    assert "conv1.conv.weight (checkpoint (2,), model (24, 3, 7, 7))" in message
    # every other one of the 174 tensors is missing; the message names the first and counts
    assert "missing keys: conf.0.bias, conf.0.weight" in message and "(173 in all)" in message


def test_a_truncated_checkpoint_is_rejected(checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "truncated.pth"
    path.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or not a torch checkpoint"):
        FaceBoxes.from_checkpoint(path)


def test_a_missing_file_and_a_non_state_dict_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        FaceBoxes.from_checkpoint(tmp_path / "absent.pth")
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        FaceBoxes.from_checkpoint(path)


def test_decode_rejects_outputs_that_do_not_fit_the_input_size() -> None:
    detector = FaceBoxes().eval()
    with torch.no_grad():
        raw = detector(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="priors"):
        detector.decode_raw(raw, 128, 128)

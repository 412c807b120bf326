"""Choosing a detector by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from veil.data import data_root
from veil.detectors import DETECTORS, FaceBoxes, RetinaFace, load_detector
from veil.detectors.retinaface import ONNX_SHA256, read_wheel_onnx
from veil.errors import CheckpointError, ConfigError


def test_the_default_is_retinaface_from_the_wheel() -> None:
    detector = load_detector()
    assert isinstance(detector, RetinaFace)
    assert detector.weights_id == ONNX_SHA256
    assert detector.name == "retinaface" and detector.head_modules == ("body.stage1", "body.stage2")
    assert DETECTORS == ("retinaface", "retinaface-stage1", "faceboxes", "faceboxes-stem")
    assert load_detector("retinaface-stage1").head_modules == ("body.stage1",)


def test_retinaface_accepts_a_copy_of_its_onnx_file(tmp_path: Path) -> None:
    path = tmp_path / "retinaface_mnet025.onnx"
    path.write_bytes(read_wheel_onnx())
    assert load_detector("RetinaFace", weights=path).weights_id == ONNX_SHA256
    path.write_bytes(b"not onnx")
    with pytest.raises(CheckpointError, match="sha256"):
        load_detector("retinaface", weights=path)


def test_faceboxes_needs_weights_and_loads_them() -> None:
    with pytest.raises(ConfigError, match="needs weights"):
        load_detector("faceboxes")
    root = data_root(required=False)
    if root is None:
        pytest.skip("reference data not found (set VEIL_DATA to the shared data folder)")
    detector = load_detector("faceboxes", root / "faceboxes" / "FaceBoxesProd.pth")
    assert isinstance(detector, FaceBoxes) and not detector.training


def test_an_unknown_name_lists_the_known_ones() -> None:
    known = r"retinaface, retinaface-stage1, faceboxes"
    with pytest.raises(ConfigError, match=r"unknown detector 'yolo'.*" + known):
        load_detector("yolo")

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from veil.data import data_root
from veil.detectors import load_decoder
from veil.detectors.faceboxes import FaceBoxes
from veil.errors import ConfigError


def test_the_weightless_decoder_decodes_exactly_like_the_real_model() -> None:
    root = data_root(required=False)
    if root is None:
        pytest.skip("reference data not found: set VEIL_DATA")
    model = FaceBoxes.from_checkpoint(root / "faceboxes" / "FaceBoxesProd.pth")
    frames = [np.full((200, 300, 3), v, np.uint8) for v in (40, 200)]
    rng = np.random.default_rng(0)
    frames = [np.clip(f + rng.integers(0, 60, f.shape), 0, 255).astype(np.uint8) for f in frames]
    x, boxes = model.preprocess(frames, model.default_geometry)
    with torch.no_grad():
        raw = model(x)
    decoder = load_decoder("faceboxes")
    assert decoder.weights_id == "untrained"  # the outside holds no weights
    ours = decoder.decode(raw, boxes, x.shape[2], x.shape[3], score_threshold=0.01)
    ref = model.decode(raw, boxes, x.shape[2], x.shape[3], score_threshold=0.01)
    assert sum(len(d) for d in ref) > 0
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(a.xyxy, b.xyxy)
        np.testing.assert_array_equal(a.confidence, b.confidence)


def test_unknown_decoder_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="retinaface, retinaface-stage1, faceboxes"):
        load_decoder("yolo")


def test_retinaface_decoder_needs_no_files(tmp_path: Path) -> None:
    decoder = load_decoder("retinaface")
    assert decoder.priors(640, 640, torch.device("cpu")).shape == (16800, 4)

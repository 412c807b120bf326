"""RetinaFace-MobileNet0.25: our torch rebuild against onnxruntime running the wheel's ONNX."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
import torch

from veil.data import data_root
from veil.detectors.base import InputGeometry
from veil.detectors.boxes import box_iou
from veil.detectors.retinaface import ONNX_SHA256, RetinaFace, read_wheel_onnx
from veil.errors import CheckpointError

# Outputs of MobileNet stages 1 and 2 in the exported graph: where the two splits' heads end.
STAGE1_OUTPUT = "/fx/stage1/stage1.5/stage1.5.1/stage1.5.1.2/LeakyRelu_output_0"
STAGE2_OUTPUT = "/fx/stage2/stage2.5/stage2.5.1/stage2.5.1.2/LeakyRelu_output_0"


@pytest.fixture(scope="module")
def model() -> RetinaFace:
    """The split after stage 1 runs the whole original network: compared with the graph."""
    return RetinaFace.from_package(split="retinaface-stage1")


@pytest.fixture(scope="module")
def deep() -> RetinaFace:
    """The default split, after stage 2."""
    return RetinaFace.from_package()


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    """The wheel's graph, also exposing the stage-1 and stage-2 tensors as outputs."""
    proto = onnx.load_from_string(read_wheel_onnx())
    for name in (STAGE1_OUTPUT, STAGE2_OUTPUT):
        proto.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def fddb_fold1(count: int) -> list[tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]]:
    """The first ``count`` present fold-1 images with their faces' ellipses as xyxy boxes."""
    root = data_root(required=False)
    if root is None:
        pytest.skip("reference data not found (set VEIL_DATA to the shared data folder)")
    lines = (root / "fddb" / "FDDB-folds" / "FDDB-fold-01-ellipseList.txt").read_text().split("\n")
    out: list[tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]] = []
    i = 0
    while len(out) < count and i < len(lines) and lines[i].strip():
        name, faces = lines[i].strip(), int(lines[i + 1])
        boxes = []
        for line in lines[i + 2 : i + 2 + faces]:
            major, minor, angle, cx, cy, _ = (float(v) for v in line.split())
            # half extents of the rotated ellipse's axis-aligned bounding box
            hw = math.hypot(major * math.cos(angle), minor * math.sin(angle))
            hh = math.hypot(major * math.sin(angle), minor * math.cos(angle))
            boxes.append([cx - hw, cy - hh, cx + hw, cy + hh])
        i += 2 + faces
        path = root / "fddb" / "originalPics" / f"{name}.jpg"
        image = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
        if image is not None:
            out.append((np.asarray(image, np.uint8), np.array(boxes, np.float32)))
    if len(out) < count:
        pytest.skip(f"fewer than {count} FDDB fold-1 images present under {root}")
    return out


def test_wheel_weights_are_the_pinned_onnx(model: RetinaFace) -> None:
    data = read_wheel_onnx()
    assert hashlib.sha256(data).hexdigest() == ONNX_SHA256 == model.weights_id
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    # every tensor of the graph (conv weights, BatchNorm folded into biases) is loaded
    initializers = onnx.load_from_string(data).graph.initializer
    assert len(list(model.parameters())) == len(initializers) == 112
    assert sum(p.numel() for p in model.parameters()) == sum(
        int(np.prod(init.dims)) for init in initializers
    )


def test_raw_outputs_and_split_point_match_onnxruntime(
    model: RetinaFace, session: ort.InferenceSession
) -> None:
    image = fddb_fold1(1)[0][0]
    x, _ = model.preprocess([image], model.default_geometry)
    loc_ref, conf_ref, landmarks_ref, stage1_ref, _ = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        activation = model.head(x)
        loc, conf, landmarks = model.tail(activation)
    assert activation.shape == (1, 64, 80, 80)  # stride 8 on a 640x640 input
    assert loc.shape == (1, 16800, 4) and landmarks.shape == (1, 16800, 10)
    np.testing.assert_allclose(activation.numpy(), stage1_ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(loc.numpy(), loc_ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(conf.softmax(-1).numpy(), conf_ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(landmarks.numpy(), landmarks_ref, atol=1e-4, rtol=1e-4)


def test_a_16_by_9_batch_matches_onnxruntime(
    model: RetinaFace, session: ort.InferenceSession
) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 288, 512) * 50
    loc_ref, conf_ref, *_ = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        loc, conf, _ = model(x)
    np.testing.assert_allclose(loc.numpy(), loc_ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(conf.softmax(-1).numpy(), conf_ref, atol=1e-4, rtol=1e-4)


def test_deep_split_sends_stage_2_and_keeps_the_detections(
    deep: RetinaFace, model: RetinaFace, session: ort.InferenceSession
) -> None:
    """The default head ends at stage 2 (the graph's tensor); its tail builds the stride-8 level
    without stage 1 and still finds the faces the whole network finds."""
    image = fddb_fold1(1)[0][0]
    x, _ = deep.preprocess([image], deep.default_geometry)
    *_, stage2_ref = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        activation = deep.head(x)
        loc, conf, _ = deep.tail(activation)
        _, conf_full, _ = model(x)
    assert activation.shape == (1, 128, 40, 40)  # stride 16 on a 640x640 input
    np.testing.assert_allclose(activation.numpy(), stage2_ref, atol=1e-4, rtol=1e-4)
    assert loc.shape == (1, 16800, 4)
    assert deep.tail_state().keys() == model.tail_state().keys() - {
        k for k in model.tail_state() if k.startswith("body.stage2.")
    }
    # the confident anchors of the whole network stay confident without stage 1's lateral
    full, cut = conf_full.softmax(-1)[0, :, 1], conf.softmax(-1)[0, :, 1]
    assert (cut[full > 0.9] > 0.5).float().mean() >= 0.9


def test_activation_strides_while_geometry_is_a_multiple_of_32(
    model: RetinaFace, deep: RetinaFace
) -> None:
    assert model.activation_shape(InputGeometry(1920, 1088)) == (64, 136, 240)
    assert deep.activation_shape(InputGeometry(1920, 1088)) == (128, 68, 120)
    assert model.stride == deep.stride == 32
    assert model.priors(1088, 1920, torch.device("cpu")).shape == (
        (136 * 240 + 68 * 120 + 34 * 60) * 2,
        4,
    )


@pytest.mark.parametrize("split", ["retinaface", "retinaface-stage1"])
def test_detections_on_fddb_faces_are_sensible(split: str) -> None:
    detector = RetinaFace.from_package(split=split)
    faces = found = 0
    for image, truth in fddb_fold1(8):
        confident = detector.detect([image])[0].above(0.5)
        assert len(confident) >= 1
        iou = box_iou(torch.from_numpy(truth), torch.from_numpy(confident.xyxy)).numpy()
        faces += len(truth)
        found += int((iou.max(axis=1) >= 0.5).sum())
        # the most confident detection is one of the annotated faces
        assert iou[:, 0].max() >= 0.5
        # landmarks (eyes, nose, mouth corners) sit inside their box, eyes above the mouth
        assert confident.landmarks is not None
        for box, points in zip(confident.xyxy, confident.landmarks, strict=True):
            x1, y1, x2, y2 = box
            margin = 0.1 * (x2 - x1)
            assert np.all(points[:, 0] >= x1 - margin) and np.all(points[:, 0] <= x2 + margin)
            assert np.all(points[:, 1] >= y1 - margin) and np.all(points[:, 1] <= y2 + margin)
            assert points[:2, 1].max() < points[3:, 1].min()
    assert found >= 0.9 * faces


def test_other_onnx_bytes_are_refused(tmp_path: Path) -> None:
    data = bytearray(read_wheel_onnx())
    data[-1] ^= 0xFF
    path = tmp_path / "tampered.onnx"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        RetinaFace.from_onnx_file(path)
    with pytest.raises(CheckpointError, match="do not exist"):
        RetinaFace.from_onnx_file(tmp_path / "absent.onnx")

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

# Output of MobileNet stage 1 in the exported graph: where our head ends.
STAGE1_OUTPUT = "/fx/stage1/stage1.5/stage1.5.1/stage1.5.1.2/LeakyRelu_output_0"


@pytest.fixture(scope="module")
def model() -> RetinaFace:
    return RetinaFace.from_package()


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    """The wheel's graph, also exposing the stage-1 tensor as an output."""
    proto = onnx.load_from_string(read_wheel_onnx())
    proto.graph.output.append(
        onnx.helper.make_tensor_value_info(STAGE1_OUTPUT, onnx.TensorProto.FLOAT, None)
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
    loc_ref, conf_ref, landmarks_ref, stage1_ref = session.run(None, {"input": x.numpy()})
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
    loc_ref, conf_ref, _, _ = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        loc, conf, _ = model(x)
    np.testing.assert_allclose(loc.numpy(), loc_ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(conf.softmax(-1).numpy(), conf_ref, atol=1e-4, rtol=1e-4)


def test_activation_is_stride_8_while_geometry_is_a_multiple_of_32(model: RetinaFace) -> None:
    assert model.activation_shape(InputGeometry(1920, 1088)) == (64, 136, 240)
    assert model.stride == 32 and model.activation_stride == 8
    assert model.priors(1088, 1920, torch.device("cpu")).shape == (
        (136 * 240 + 68 * 120 + 34 * 60) * 2,
        4,
    )


def test_detections_on_fddb_faces_are_sensible(model: RetinaFace) -> None:
    faces = found = 0
    for image, truth in fddb_fold1(8):
        confident = model.detect([image])[0].above(0.5)
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

"""The trusted zone's fast paths against the reference ones they replaced, on real frames:
the lean letterbox, the head through torch (BN folded, channels_last) and onnxruntime, the
vectorised NMS, and the per-role thread counts."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stream.frames import Frame as StreamFrame
from stream.wire import Envelope
from tests.tiny_detector import TinyDetector, constant_profile
from veil.calibrate import video_frames
from veil.config import ThreadsConfig, load_config
from veil.data import data_root
from veil.detectors import load_detector
from veil.detectors.base import (
    Frame,
    InputGeometry,
    SplitDetector,
    letterbox_scale,
    resize_interpolation,
)
from veil.detectors.boxes import nms
from veil.detectors.head_runtime import build_head, fold_batch_norm, resolve_runtime
from veil.errors import ConfigError
from veil.runner import thread_group
from workers.trusted.obfuscator import Obfuscator, ProfileTable

GEOMETRY_1080P = InputGeometry(1920, 1088)
CPU = torch.device("cpu")
# The heads' activations reach about 7; float rounding in another order of the same sums
# (folded BN, another memory layout, onnxruntime's kernels) stays under 5e-5 there.
HEAD_TOLERANCE = 1e-4


def _data() -> Path:
    root = data_root(required=False)
    if root is None:
        pytest.skip("reference data not found (set VEIL_DATA to the shared data folder)")
    return root


@pytest.fixture(scope="module")
def street() -> list[Frame]:
    return video_frames(_data() / "videos" / "street_1080p.mp4", every=40, limit=2)


@pytest.fixture(scope="module")
def faceboxes() -> SplitDetector:
    return load_detector("faceboxes", _data() / "faceboxes" / "FaceBoxesProd.pth")


def old_preprocess(detector: SplitDetector, frames: list[Frame], geometry: InputGeometry) -> Tensor:
    """The letterbox this project used before: float at full resolution, bilinear resize in
    torch, ``(x - mean) / std`` into a zero-filled batch (kept here as the reference)."""
    mean = torch.tensor(detector.mean_bgr).view(3, 1, 1)
    std = torch.tensor(detector.std_bgr).view(3, 1, 1)
    batch = torch.zeros(len(frames), 3, geometry.height, geometry.width)
    for i, frame in enumerate(frames):
        h, w = frame.shape[:2]
        scale = letterbox_scale(w, h, geometry)
        new_w = min(geometry.width, max(1, round(w * scale)))
        new_h = min(geometry.height, max(1, round(h * scale)))
        img = torch.from_numpy(frame).permute(2, 0, 1).float()
        if (new_h, new_w) != (h, w):
            img = F.interpolate(img[None], size=(new_h, new_w), mode="bilinear")[0]
        batch[i, :, :new_h, :new_w] = (img - mean) / std
    return batch


@torch.no_grad()
def test_the_lean_letterbox_gives_the_old_activation_on_a_1080p_frame(
    faceboxes: SplitDetector, street: list[Frame]
) -> None:
    old = old_preprocess(faceboxes, street, GEOMETRY_1080P)
    new, boxes = faceboxes.preprocess(street, GEOMETRY_1080P)
    # 1080p fits 1920x1088 unscaled: the same input exactly, padding rows included.
    assert torch.equal(new, old)
    assert [b.scale for b in boxes] == [1.0, 1.0]
    torch.testing.assert_close(faceboxes.head(new), faceboxes.head(old), rtol=0, atol=1e-5)


def test_the_planar_normalisation_divides_by_a_standard_deviation_other_than_one() -> None:
    class Scaled(TinyDetector):
        std_bgr = (58.4, 57.1, 57.4)

    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8), np.zeros((30, 64, 3), np.uint8)]
    new, _ = Scaled().preprocess(frames, InputGeometry(64, 48))
    old = old_preprocess(Scaled(), frames, InputGeometry(64, 48))
    torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-6)
    assert float(new[0, :, :, 40:].abs().max()) == 0.0 and float(new[1, :, 30:].abs().max()) == 0.0


@torch.no_grad()
def test_the_gpus_normalisation_is_made_once_per_device_and_matches_the_planes() -> None:
    """The GPU letterbox's fused multiply-add, checked here on the CPU: the same values as
    the planar path, and its tensors made once (not copied to the device every call)."""

    class Scaled(TinyDetector):
        std_bgr = (58.4, 57.1, 57.4)

    det = Scaled()
    shift, scale = det._normalisation(CPU)
    assert det._normalisation(CPU)[0] is shift
    pixels = np.random.default_rng(4).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    planes = np.empty((3, 48, 64), np.float32)
    det._normalise_planes(pixels, planes)
    fused = torch.from_numpy(pixels).permute(2, 0, 1) * scale + shift
    torch.testing.assert_close(fused, torch.from_numpy(planes), rtol=0, atol=1e-5)


def test_a_reused_input_is_refilled_and_its_padding_cleared(
    faceboxes: SplitDetector, street: list[Frame]
) -> None:
    buffer = torch.full((3, 3, 1088, 1920), 55.0)  # stale values everywhere, one row spare
    new, _ = faceboxes.preprocess(street, GEOMETRY_1080P, out=buffer)
    assert new.data_ptr() == buffer.data_ptr() and new.shape[0] == 2
    assert torch.equal(new, old_preprocess(faceboxes, street, GEOMETRY_1080P))
    # Frames that fit unscaled but leave padding below (1920x700) and to the right (1000x1088).
    short = np.ascontiguousarray(street[0][:700])
    narrow = np.ascontiguousarray(np.concatenate([street[0][:, :1000], street[1][:8, :1000]]))
    again, _ = faceboxes.preprocess([short, narrow], GEOMETRY_1080P, out=buffer)
    assert again.data_ptr() == buffer.data_ptr()
    assert torch.equal(again, old_preprocess(faceboxes, [short, narrow], GEOMETRY_1080P))


@torch.no_grad()
def test_padding_already_zero_is_not_zeroed_again_and_a_size_change_clears_it(
    faceboxes: SplitDetector, street: list[Frame]
) -> None:
    buffer = torch.full((2, 3, 1088, 1920), 55.0)
    padded: list[tuple[int, int] | None] = [(1080, 1920)]  # its padding for 1920x1080 frames
    short = np.ascontiguousarray(street[0][:700])
    first, _ = faceboxes.preprocess([short], GEOMETRY_1080P, buffer, padded)
    assert padded == [(700, 1920)]  # another size: zeroed below row 700 and recorded
    assert torch.equal(first, old_preprocess(faceboxes, [short], GEOMETRY_1080P))
    buffer[0, :, 700:] = 7.0  # the memo is trusted: a same-size frame leaves the padding alone
    kept, _ = faceboxes.preprocess([short], GEOMETRY_1080P, buffer, padded)
    assert float(kept[0, :, 700:].min()) == 7.0
    buffer[0, :, 700:] = 0.0
    taller = np.ascontiguousarray(street[1][:900])  # another size: its own padding zeroed
    buffer[0, :, 900:] = 9.0
    again, _ = faceboxes.preprocess([taller, short], GEOMETRY_1080P, buffer, padded)
    assert padded == [(900, 1920), (700, 1920)]
    assert torch.equal(again, old_preprocess(faceboxes, [taller, short], GEOMETRY_1080P))
    smaller = torch.empty(1, 3, 1088, 1920)  # a buffer too small: a new one, a new memo
    faceboxes.preprocess([short, short], GEOMETRY_1080P, smaller, padded)
    assert padded == [(700, 1920), (700, 1920)]


@torch.no_grad()
def test_a_resized_frame_differs_from_the_old_path_by_uint8_rounding_only(
    faceboxes: SplitDetector,
) -> None:
    frames = video_frames(_data() / "videos" / "single_face.mp4", every=1, limit=1)  # 640x360
    geometry = InputGeometry(1024, 1024)  # upscaled 1.6x: cv2 resizes in uint8
    old = old_preprocess(faceboxes, frames, geometry)
    new, _ = faceboxes.preprocess(frames, geometry)
    assert float((new - old).abs().max()) <= 1.0  # rounding to uint8, within one grey level
    assert float((new - old).abs().mean()) < 0.3
    a_old, a_new = faceboxes.head(old), faceboxes.head(new)
    assert float((a_new - a_old).abs().mean()) < 0.01 * float(a_old.abs().mean())


def test_folding_removes_every_batch_norm(faceboxes: SplitDetector) -> None:
    assert any(isinstance(m, nn.BatchNorm2d) for m in faceboxes.modules())
    folded = fold_batch_norm(faceboxes)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in faceboxes.modules())  # a copy


def test_the_letterbox_shortcut_gives_bilinears_bytes_where_it_applies(
    street: list[Frame],
) -> None:
    """Nearest-exact in place of bilinear only at one odd integer factor, where the two agree
    byte for byte: a real 1080p frame into 640x640 (factor 3), random frames at 3x and 5x."""
    rng = np.random.default_rng(0)
    cases = [(street[0], (640, 360))] + [
        (rng.integers(0, 256, (90 * k, 160 * k, 3), dtype=np.uint8), (160, 90)) for k in (3, 5)
    ]
    for pixels, size in cases:
        h, w = pixels.shape[:2]
        assert resize_interpolation(w, h, *size) == cv2.INTER_NEAREST_EXACT
        exact = cv2.resize(pixels, size, interpolation=cv2.INTER_NEAREST_EXACT)
        np.testing.assert_array_equal(
            exact, cv2.resize(pixels, size, interpolation=cv2.INTER_LINEAR)
        )
    # 2x (bilinear averages two pixels), 1.5x and a factor in one direction only: bilinear.
    for w, h, new_w, new_h in [(1280, 720, 640, 360), (960, 540, 640, 360), (1920, 1080, 640, 540)]:
        assert resize_interpolation(w, h, new_w, new_h) == cv2.INTER_LINEAR
    retinaface = load_detector("retinaface")
    x, _ = retinaface.preprocess(street[:1], InputGeometry(640, 640))
    reference = cv2.resize(street[0], (640, 360), interpolation=cv2.INTER_LINEAR)
    mean = torch.tensor(retinaface.mean_bgr).view(3, 1, 1)
    expected = torch.from_numpy(reference).permute(2, 0, 1).float() - mean
    torch.testing.assert_close(x[0, :, :360], expected, rtol=0, atol=0)


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
@pytest.mark.parametrize("name", ["faceboxes", "retinaface"])
@torch.no_grad()
def test_each_head_runtime_gives_the_reference_activation_at_1080p(
    name: str, runtime: str, faceboxes: SplitDetector, street: list[Frame]
) -> None:
    detector = faceboxes if name == "faceboxes" else load_detector("retinaface")
    x, _ = detector.preprocess(street, GEOMETRY_1080P)  # a batch of two real frames
    expected = detector.head(x)
    head = build_head(detector, GEOMETRY_1080P, torch.device("cpu"), runtime, threads=1)
    assert head.name == runtime
    got = head(x)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=0, atol=HEAD_TOLERANCE)
    torch.testing.assert_close(head(x[1:]), expected[1:], rtol=0, atol=HEAD_TOLERANCE)


@pytest.mark.parametrize("name", ["faceboxes", "retinaface"])
@torch.no_grad()
def test_a_float16_head_stays_within_half_precision_of_the_float32_one(
    name: str, faceboxes: SplitDetector, street: list[Frame]
) -> None:
    """model.precision float16 (the GPU's setting), run here on the CPU: measured, the error is
    0.2-0.7% of the activation's std in RMS and at most 0.016 (RetinaFace's std is 0.16, its
    int8 wire step about as large)."""
    detector = faceboxes if name == "faceboxes" else load_detector("retinaface")
    geometry = GEOMETRY_1080P if name == "faceboxes" else InputGeometry(640, 640)
    x, _ = detector.preprocess(street, geometry)
    expected = detector.head(x)
    head = build_head(detector, geometry, torch.device("cpu"), "auto", 1, "float16")
    assert head.name == "torch"  # auto: onnxruntime runs float32 only
    got = head(x)
    assert got.dtype == torch.float16 and got.shape == expected.shape
    error = got.float() - expected
    std = float(expected.std())
    assert float(error.pow(2).mean().sqrt()) < 0.02 * std
    assert float(error.abs().max()) < 0.2 * std


@pytest.mark.parametrize(
    ("runtime", "precision"),
    [("onnxruntime", "float32"), ("torch", "float32"), ("torch", "float16")],
)
def test_every_head_runtime_and_precision_adds_the_profiles_noise(
    runtime: str, precision: str
) -> None:
    """The edge's step in each setting a host can take (a GPU's is torch). The torch head ran
    under inference mode until this test: the noise, added in place after it, then failed on
    the first frame."""
    det = TinyDetector()
    table = ProfileTable(det, det.default_geometry, [constant_profile(det, 0.9, 2.0, 3.0)], CPU)
    obf = Obfuscator(
        det, det.default_geometry, table, CPU, head_runtime=runtime, precision=precision
    )
    assert obf.head.name == runtime and obf._mu.dtype == getattr(torch, precision)
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    frames = [StreamFrame(Envelope("s", i, None, 0.0), pixels) for i in range(8)]
    out = obf.run(frames, [0.9] * 8)
    clean = det.head(det.preprocess([pixels], det.default_geometry)[0])[0].detach().numpy()
    residual = np.stack([o.activation for o in out]) - clean
    assert all(o.activation.dtype == np.float32 for o in out)
    n = residual.size  # 8 frames of 384 elements: bounds at about five standard errors
    assert abs(residual.mean() - 3.0) < 5 * 2.0 / np.sqrt(n)
    assert abs(residual.std() - 2.0) < 5 * 2.0 / np.sqrt(2 * n)
    with pytest.raises(ConfigError, match="onnxruntime runs float32 only"):
        build_head(det, det.default_geometry, CPU, "onnxruntime", 1, "float16")


def test_head_runtime_choice_and_its_errors() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_runtime("auto", cpu) == "onnxruntime"  # installed here
    assert resolve_runtime("auto", cuda) == "torch"
    assert resolve_runtime("torch", cpu) == "torch"
    assert resolve_runtime("auto", cpu, "float16") == "torch"
    with pytest.raises(ConfigError, match=r"model\.precision 'bfloat16' is not one of float32"):
        resolve_runtime("torch", cpu, "bfloat16")
    with pytest.raises(ConfigError, match=r"model\.precision: 'half' is not one of"):
        load_config(None, env={"VEIL__MODEL__PRECISION": "half"})
    assert load_config(None, env={"VEIL__MODEL__PRECISION": "float16"}).model.precision == (
        "float16"
    )
    with pytest.raises(ConfigError, match="head_runtime 'tensorrt' is not one of auto"):
        resolve_runtime("tensorrt", cpu)
    with pytest.raises(ConfigError, match="onnxruntime runs the head on the CPU"):
        resolve_runtime("onnxruntime", cuda)
    with pytest.raises(ConfigError, match=r"model\.head_runtime: 'onnx' is not one of"):
        load_config(None, env={"VEIL__MODEL__HEAD_RUNTIME": "onnx"})


def old_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """veil's NMS before it was vectorised: a Python loop over the full IoU matrix."""
    order = torch.argsort(scores, descending=True, stable=True)
    x1, y1, x2, y2 = boxes[order].float().unbind(1)
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    xx1 = torch.maximum(x1[:, None], x1[None, :])
    yy1 = torch.maximum(y1[:, None], y1[None, :])
    xx2 = torch.minimum(x2[:, None], x2[None, :])
    yy2 = torch.minimum(y2[:, None], y2[None, :])
    inter = (xx2 - xx1 + 1).clamp(min=0) * (yy2 - yy1 + 1).clamp(min=0)
    iou = inter / (areas[:, None] + areas[None, :] - inter)
    suppressed = torch.zeros(len(iou), dtype=torch.bool)
    keep: list[int] = []
    for i in range(len(iou)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long)]


@pytest.mark.parametrize("sigma", [0.0, 1.0, 3.0])
@torch.no_grad()
def test_vectorised_nms_keeps_exactly_the_old_boxes_on_real_detections(
    sigma: float, faceboxes: SplitDetector, street: list[Frame]
) -> None:
    x, _ = faceboxes.preprocess(street[:1], GEOMETRY_1080P)
    a = faceboxes.head(x)
    a = a + sigma * torch.randn(a.shape, generator=torch.Generator().manual_seed(7))
    boxes, scores, _ = faceboxes.decode_raw(faceboxes.tail(a), 1088, 1920)
    candidates = torch.nonzero(scores[0] > 0.05).flatten()
    top = candidates[torch.argsort(scores[0][candidates], descending=True, stable=True)][:5000]
    b, s = boxes[0][top], scores[0][top]
    assert len(b) > (200 if sigma else 10)  # noisy logits give thousands
    assert torch.equal(nms(b, s, 0.3), old_nms(b, s, 0.3))
    assert nms(b[:0], s[:0], 0.3).shape == (0,)


def test_thread_defaults_share_the_cores_among_the_roles_of_a_process_group() -> None:
    default = ThreadsConfig()
    group = {"edge", "detect", "triton"}
    assert [default.for_role(r, group, cores=2) for r in ("edge", "triton", "detect")] == [1, 1, 1]
    assert [default.for_role(r, group, cores=16) for r in ("edge", "triton", "detect")] == [8, 4, 4]
    assert default.for_role("edge", {"edge"}, cores=16) == 16  # veil edge alone
    assert ThreadsConfig(edge=3).for_role("edge", group, cores=2) == 3
    assert load_config(None, env={"VEIL__THREADS__DETECT": "2"}).threads.detect == 2
    with pytest.raises(ConfigError, match=r"^threads\.edge must be at least 1, got 0$"):
        load_config(None, env={"VEIL__THREADS__EDGE": "0"})
    run = load_config(None, env={})
    assert thread_group(run, {"edge", "detect", "sink"}) == {"edge", "detect", "triton"}
    assert thread_group(run, {"edge"}) == {"edge"}


def test_the_edge_sets_its_threads_in_the_thread_that_runs_it() -> None:
    from tests.tiny_detector import TinyDetector

    det = TinyDetector()
    table = ProfileTable(det, det.default_geometry, [], torch.device("cpu"))
    obf = Obfuscator(det, det.default_geometry, table, torch.device("cpu"), threads=2)
    obf.set_threads(1)
    seen: list[int] = []
    frame = StreamFrame(Envelope("s", 0, None, 0.0), np.zeros((48, 64, 3), np.uint8))

    def work() -> None:
        obf.run([frame], [0.0])
        seen.append(torch.get_num_threads())

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert seen == [1] and obf.head.threads == 1
    with pytest.raises(ConfigError, match="threads must be at least 1"):
        obf.set_threads(0)

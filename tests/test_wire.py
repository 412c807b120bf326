"""Wire format v1: round trips, the int8 error bound, message sizes, and one rejection reason
per kind of malformed message."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from stream.kafka import DEFAULT_MAX_REQUEST_SIZE
from stream.wire import (
    HEADER_KIND,
    HEADER_PROFILE,
    HEADER_SEQUENCE,
    HEADER_STREAM,
    HEADER_VERSION,
    MAGIC,
    PREFIX,
    WIRE_VERSION,
    ActivationMessage,
    ControlMessage,
    DetectionMessage,
    Envelope,
    FramePlacement,
    Provenance,
    Quantisation,
    decode,
    decode_control,
    decode_detection,
    dequantise_int8,
    encode,
    encode_control,
    encode_detection,
    quantise_int8,
)
from veil.detections import Detections
from veil.errors import ConfigError, WireFormatError

FACEBOXES_1080P = (128, 34, 60)  # FaceBoxes activation for 1920x1080 letterboxed to 1920x1088
PLACEMENT_1080P = FramePlacement(1920, 1080, 1.0, 1920, 1088)


def _message(
    payload: np.ndarray[Any, Any],
    quantisation: Quantisation = "float16",
    **overrides: Any,
) -> ActivationMessage:
    fields: dict[str, Any] = {
        "stream_id": "lobby-cam-3",
        "sequence": 41,
        "pts": 1.64,
        "capture_time": 1_731_000_000.125,
        "model": "faceboxes",
        "weights_id": "9f" * 32,
        "profile_id": "fb-1088x1920-a",
        "alpha": 0.35,
        "placement": FramePlacement(1280, 720, 0.5, 640, 384),
        "payload": payload,
        "quantisation": quantisation,
    }
    fields.update(overrides)
    return ActivationMessage(*_envelope_and_provenance(fields), **fields)


def _envelope_and_provenance(fields: dict[str, Any]) -> tuple[Envelope, Provenance]:
    """Take the per-frame fields out of ``fields`` into the two types that carry them."""
    envelope = Envelope(*(fields.pop(k) for k in ("stream_id", "sequence", "pts", "capture_time")))
    provenance = Provenance(
        *(fields.pop(k) for k in ("model", "weights_id", "profile_id", "alpha"))
    )
    return envelope, provenance


def _rng_payload(seed: int, shape: tuple[int, int, int] = (6, 12, 20)) -> np.ndarray[Any, Any]:
    return (np.random.default_rng(seed).standard_normal(shape) * 4).astype(np.float32)


def _split(value: bytes) -> tuple[dict[str, Any], bytes]:
    _magic, _version, header_len = PREFIX.unpack_from(value)
    header = json.loads(value[PREFIX.size : PREFIX.size + header_len])
    return header, value[PREFIX.size + header_len :]


def _join(header: dict[str, Any] | bytes, payload: bytes, version: int = WIRE_VERSION) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return PREFIX.pack(MAGIC, version, len(raw)) + raw + payload


# ------------------------------------------------------------------ activations: round trips


def test_float16_round_trip_keeps_every_field() -> None:
    msg = _message(_rng_payload(0))
    key, value, headers = encode(msg)
    assert key == b"lobby-cam-3"
    assert value[:4] == MAGIC
    assert dict(headers) == {
        HEADER_VERSION: b"1",
        HEADER_KIND: b"activation",
        HEADER_STREAM: b"lobby-cam-3",
        HEADER_SEQUENCE: b"41",
        HEADER_PROFILE: b"fb-1088x1920-a",
    }
    out = decode(key, value, headers)
    for name in ("stream_id", "sequence", "pts", "capture_time", "model", "weights_id"):
        assert getattr(out, name) == getattr(msg, name)
    assert (out.profile_id, out.alpha, out.quantisation) == ("fb-1088x1920-a", 0.35, "float16")
    assert out.placement == msg.placement
    # float16 stays float16 from the wire to Triton (the tail takes FP16): no copy, no cast.
    assert out.payload.dtype == np.float16 and out.shape == (6, 12, 20)
    # float16 keeps 11 significant bits: relative error <= 2**-11.
    np.testing.assert_allclose(out.payload, msg.payload, rtol=2**-11, atol=1e-7)


def test_header_is_compact_json_after_magic_version_and_length() -> None:
    msg = _message(_rng_payload(1), pts=None)
    _key, value, _headers = encode(msg)
    magic, version, header_len = struct.unpack(">4sHI", value[:10])
    assert (magic, version) == (b"VEIL", 1)
    header_text = value[10 : 10 + header_len].decode()
    assert " " not in header_text
    header = json.loads(header_text)
    assert header["shape"] == [6, 12, 20]
    assert (header["dtype"], header["quantisation"], header["pts"]) == ("float16", "float16", None)
    assert len(value) == 10 + header_len + 2 * 6 * 12 * 20
    assert decode(None, value).pts is None  # key and headers are optional mirrors


@pytest.mark.parametrize("seed", range(12))
def test_int8_round_trip_error_is_within_half_a_step_per_channel(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    shape = (int(rng.integers(1, 9)), int(rng.integers(1, 15)), int(rng.integers(1, 15)))
    payload = rng.standard_normal(shape).astype(np.float32) * rng.uniform(
        0.01, 50, (shape[0], 1, 1)
    )
    payload += rng.uniform(-20, 20, (shape[0], 1, 1)).astype(np.float32)  # channels off zero
    payload = payload.astype(np.float32)
    if seed % 3 == 0:
        payload[0] = 0.0  # an all-zero channel must come back exact
    msg = _message(payload, "int8")
    out = decode(*encode(msg))
    assert out.quantisation == "int8" and out.shape == shape
    _q, scale, _zero = quantise_int8(payload)
    error = np.abs(out.payload - payload).reshape(shape[0], -1).max(axis=1)
    bound = scale / 2 * (1 + 1e-5) + 1e-6 * np.abs(payload).reshape(shape[0], -1).max(axis=1)
    assert (error <= bound).all(), (error, bound)
    if seed % 3 == 0:
        assert (out.payload[0] == 0).all()


def test_int8_quantisation_is_standard_affine() -> None:
    values = np.array([[[-1.0, 0.0, 3.0]], [[2.0, 4.0, 6.0]]], np.float32)
    q, scale, zero = quantise_int8(values)
    np.testing.assert_allclose(scale, [4 / 254.999, 6 / 254.999], rtol=1e-6)
    # Zero is exact: it maps to the zero point.
    assert q[0, 0, 1] == zero[0]
    assert zero[1] == -128  # a non-negative channel starts at the bottom of int8
    assert q[1, 0, 2] == 127
    np.testing.assert_allclose(dequantise_int8(q, scale, zero), values, atol=scale.max() / 2)


def test_faceboxes_1080p_sizes_fit_kafka_default_message_size() -> None:
    payload = _rng_payload(2, FACEBOXES_1080P)
    values = {
        quant: encode(_message(payload, quant, placement=PLACEMENT_1080P))[1]
        for quant in ("float16", "int8")
    }
    elements = 128 * 34 * 60
    assert elements == 261_120
    header_bytes = {q: PREFIX.size + PREFIX.unpack_from(v)[2] for q, v in values.items()}
    assert len(values["float16"]) == header_bytes["float16"] + 2 * elements  # 522,240 + header
    assert len(values["int8"]) == header_bytes["int8"] + 5 * 128 + elements  # 261,760 + header
    assert all(h < 1024 for h in header_bytes.values())
    # Room left under the 1 MiB default for Kafka's record and batch overhead.
    assert len(values["float16"]) < DEFAULT_MAX_REQUEST_SIZE - 100_000


def test_numpy_scalars_are_accepted_and_stored_as_python_values() -> None:
    msg = _message(
        _rng_payload(3),
        sequence=np.int64(7),
        alpha=np.float32(0.25),
        capture_time=np.float64(5.5),
        placement=FramePlacement(np.int64(64), 48, np.float32(0.5), 32, 32),  # type: ignore[arg-type]
    )
    assert type(msg.sequence) is int and type(msg.alpha) is float
    out = decode(*encode(msg))
    assert (out.sequence, out.alpha, out.placement.scale) == (7, 0.25, 0.5)


def test_placement_maps_to_the_detector_letterbox() -> None:
    import torch

    from veil.detectors.base import InputGeometry, Letterbox

    placement = FramePlacement.from_letterbox(Letterbox(0.5, 1280, 720), InputGeometry(640, 384))
    assert placement == FramePlacement(1280, 720, 0.5, 640, 384)
    assert placement.geometry() == InputGeometry(640, 384)
    boxes = placement.letterbox().to_frame(torch.tensor([[10.0, 20.0, 700.0, 400.0]]))
    assert boxes.tolist() == [[20.0, 40.0, 1280.0, 720.0]]  # scaled back, clipped to frame


# ------------------------------------------------------------------ activations: rejections


def _good() -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    return encode(_message(_rng_payload(4)))


def _edit_header(change: Callable[[dict[str, Any]], None]) -> bytes:
    _key, value, _headers = _good()
    header, payload = _split(value)
    change(header)
    return _join(header, payload)


def _set(name: str, val: Any) -> Callable[[dict[str, Any]], None]:
    return lambda header: header.__setitem__(name, val)


def _drop(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda header: header.pop(name)


def _inf_payload() -> bytes:
    _key, value, _headers = _good()
    header, payload = _split(value)
    values = np.frombuffer(payload, "<f2").copy()
    values[17] = np.inf
    return _join(header, values.tobytes())


def _int8_with_scale(scale: float) -> bytes:
    _key, value, _headers = encode(_message(_rng_payload(5), "int8"))
    header, payload = _split(value)
    return _join(header, struct.pack("<f", scale) + payload[4:])


REJECTIONS: dict[str, tuple[Callable[[], bytes], str]] = {
    "foreign JSON": (lambda: b'{"boxes": []}', "not a veil activation message: magic"),
    "wrong magic": (lambda: b"KAFK" + _good()[1][4:], "magic b'KAFK'"),
    "future version": (
        lambda: _join(_split(_good()[1])[0], _split(_good()[1])[1], version=2),
        "unsupported activation wire version 2",
    ),
    "shorter than prefix": (lambda: _good()[1][:7], "shorter than the 10-byte prefix"),
    "cut inside header": (lambda: _good()[1][:40], "truncated inside its header"),
    "cut inside payload": (lambda: _good()[1][:-3], "payload truncated"),
    "absurd header length": (
        lambda: PREFIX.pack(MAGIC, 1, 10**9) + b"{}",
        "header length 1000000000 exceeds",
    ),
    "bad JSON": (lambda: _join(b'{"stream_id": "a",', b""), "not valid JSON"),
    "JSON not an object": (lambda: _join(b"[1, 2, 3]", b""), "must be a JSON object"),
    "header not UTF-8": (lambda: _join(b'{"\xff": 1}', b""), "not UTF-8"),
    "shape vs bytes": (
        lambda: _edit_header(_set("shape", [6, 12, 19])),
        "shape/dtype mismatch",
    ),
    "dtype vs quantisation": (
        lambda: _edit_header(_set("dtype", "int8")),
        "dtype 'int8' does not match quantisation 'float16'",
    ),
    "unknown quantisation": (
        lambda: _edit_header(_set("quantisation", "bfloat16")),
        "unknown quantisation 'bfloat16'",
    ),
    "shape not CHW": (lambda: _edit_header(_set("shape", [6, 240])), "three positive integers"),
    "NaN in header": (
        lambda: _edit_header(_set("capture_time", math.nan)),
        "non-finite number NaN",
    ),
    "Infinity in header": (
        lambda: _edit_header(_set("pts", math.inf)),
        "non-finite number Infinity",
    ),
    "inf in payload": (_inf_payload, "payload has non-finite values"),
    "int8 zero scale": (lambda: _int8_with_scale(0.0), "scales must be finite and positive"),
    "int8 NaN scale": (lambda: _int8_with_scale(math.nan), "scales must be finite and positive"),
    "alpha out of range": (lambda: _edit_header(_set("alpha", 1.5)), "alpha must be in [0, 1]"),
    "missing field": (lambda: _edit_header(_drop("weights_id")), "lacks the field 'weights_id'"),
    "negative sequence": (lambda: _edit_header(_set("sequence", -1)), "sequence must be >= 0"),
    "float sequence": (lambda: _edit_header(_set("sequence", 3.0)), "sequence must be an integer"),
    "empty stream id": (lambda: _edit_header(_set("stream_id", "")), "stream_id must be a non"),
    "zero frame width": (lambda: _edit_header(_set("frame_width", 0)), "frame_width must be >= 1"),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_decode_rejects_malformed_values_with_their_reason(case: str) -> None:
    make_value, reason = REJECTIONS[case]
    with pytest.raises(WireFormatError) as info:
        decode(None, make_value())
    assert reason in str(info.value)


def test_unknown_header_fields_are_ignored_for_forward_compatibility() -> None:
    value = _edit_header(_set("camera_vendor", "acme"))
    assert decode(None, value).stream_id == "lobby-cam-3"


def test_decode_rejects_a_tombstone() -> None:
    with pytest.raises(WireFormatError, match="no value"):
        decode(b"lobby-cam-3", None)


def test_decode_rejects_key_or_headers_that_disagree_with_the_body() -> None:
    key, value, headers = _good()
    with pytest.raises(WireFormatError, match="key b'other-cam' does not match"):
        decode(b"other-cam", value, headers)
    tampered = [(n, b"99" if n == HEADER_SEQUENCE else v) for n, v in headers]
    with pytest.raises(WireFormatError, match="veil-sequence='99' does not match"):
        decode(key, value, tampered)
    # Headers the format does not own are ignored.
    assert decode(key, value, [*headers, ("traceparent", b"00-abc")]).sequence == 41


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"payload": np.full((2, 3, 4), np.nan, np.float32)}, "payload is not finite"),
        ({"payload": np.full((2, 3, 4), 1e6, np.float32)}, "exceeds the float16 range"),
    ],
)
def test_encode_refuses_payloads_it_cannot_represent(
    overrides: dict[str, Any], reason: str
) -> None:
    with pytest.raises(WireFormatError, match=reason):
        encode(_message(**overrides))


def test_int8_carries_values_beyond_the_float16_range() -> None:
    payload = np.linspace(-1e6, 1e6, 2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    out = decode(*encode(_message(payload, "int8")))
    assert np.abs(out.payload - payload).max() <= 1e6 / 255 + 1


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"payload": np.zeros((4, 5), np.float32)}, r"\[C, H, W\]"),
        ({"payload": np.zeros((0, 5, 5), np.float32)}, "non-empty"),
        ({"payload": np.zeros((2, 5, 5), np.int16)}, "floating point"),
        ({"sequence": -3}, "sequence must be >= 0"),
        ({"alpha": -0.1}, r"alpha must be in \[0, 1\]"),
        ({"alpha": True}, "alpha must be a number"),
        ({"stream_id": ""}, "stream_id"),
        ({"quantisation": "fp8"}, "quantisation must be one of"),
        ({"capture_time": math.inf}, "capture_time must be finite"),
        ({"version": 2}, "unsupported wire version 2"),
    ],
)
def test_invalid_activation_messages_cannot_be_built(
    overrides: dict[str, Any], reason: str
) -> None:
    fields = {"payload": _rng_payload(6)} | overrides
    with pytest.raises(WireFormatError, match=reason):
        _message(**fields)


def test_invalid_placement_cannot_be_built() -> None:
    with pytest.raises(WireFormatError, match="scale must be positive"):
        FramePlacement(640, 480, 0.0, 640, 480)
    with pytest.raises(WireFormatError, match="input_height must be >= 1"):
        FramePlacement(640, 480, 1.0, 640, 0)


# ------------------------------------------------------------------ detections


def _detections_message(**overrides: Any) -> DetectionMessage:
    fields: dict[str, Any] = {
        "stream_id": "lobby-cam-3",
        "sequence": 41,
        "pts": 1.64,
        "capture_time": 1_731_000_000.125,
        "detections": Detections(
            np.array([[10.123, 20.5, 110.0, 140.25], [300, 40, 360, 120]], np.float32),
            np.array([0.98765, 0.5], np.float32),
        ),
        "model": "faceboxes",
        "weights_id": "9f" * 32,
        "profile_id": "none",
        "alpha": 0.0,
        "produced_time": 1_731_000_000.300,
    }
    fields.update(overrides)
    return DetectionMessage(*_envelope_and_provenance(fields), **fields)


def test_detection_round_trip() -> None:
    msg = _detections_message()
    key, value, headers = encode_detection(msg)
    assert key == b"lobby-cam-3"
    assert dict(headers)[HEADER_KIND] == b"detection"
    body = json.loads(value)
    assert body["boxes"][0] == [10.12, 20.5, 110.0, 140.25]  # 0.01 px on the wire
    out = decode_detection(key, value, headers)
    assert (out.stream_id, out.sequence, out.pts, out.profile_id) == (
        "lobby-cam-3",
        41,
        1.64,
        "none",
    )
    assert (out.capture_time, out.produced_time, out.alpha) == (
        1_731_000_000.125,
        1_731_000_000.3,
        0.0,
    )
    np.testing.assert_allclose(out.detections.xyxy, msg.detections.xyxy, atol=0.005)
    np.testing.assert_allclose(out.detections.confidence, msg.detections.confidence, atol=5.1e-5)


def test_detection_round_trip_without_faces() -> None:
    msg = _detections_message(detections=Detections.empty(), pts=None)
    out = decode_detection(*encode_detection(msg))
    assert len(out.detections) == 0 and out.pts is None


@pytest.mark.parametrize(
    ("body_change", "reason"),
    [
        (lambda b: b.pop("format"), "not a veil detection message"),
        (lambda b: b.__setitem__("version", 9), "unsupported detection wire version 9"),
        (lambda b: b.__setitem__("boxes", [[1, 2, 3]]), "not a detections record"),
        (lambda b: b.__setitem__("scores", [0.5]), "2 boxes but 1 confidences"),
        (lambda b: b.pop("produced_time"), "lacks the field 'produced_time'"),
        (lambda b: b.__setitem__("alpha", 3), r"alpha must be in \[0, 1\]"),
    ],
)
def test_decode_detection_rejects_malformed_bodies(
    body_change: Callable[[dict[str, Any]], Any], reason: str
) -> None:
    key, value, _headers = encode_detection(_detections_message())
    body = json.loads(value)
    body_change(body)
    with pytest.raises(WireFormatError, match=reason):
        decode_detection(key, json.dumps(body).encode())


def test_decode_detection_rejects_non_json_and_mismatched_key() -> None:
    with pytest.raises(WireFormatError, match="not valid JSON"):
        decode_detection(b"a", b"VEIL\x00\x01")
    _key, value, headers = encode_detection(_detections_message())
    with pytest.raises(WireFormatError, match="does not match its stream id"):
        decode_detection(b"another", value, headers)


def test_detections_with_non_finite_boxes_cannot_be_built() -> None:
    bad = Detections(np.array([[0, 0, np.inf, 5]], np.float32), np.array([0.9], np.float32))
    with pytest.raises(WireFormatError, match="detections must be finite"):
        _detections_message(detections=bad)


# ------------------------------------------------------------------ control


def test_control_round_trip_and_tombstone() -> None:
    key, value, headers = encode_control(ControlMessage("lobby-cam-3", 0.6, 1_731_000_000.0))
    assert key == b"lobby-cam-3" and value is not None
    assert decode_control(key, value, headers) == ControlMessage(
        "lobby-cam-3", 0.6, 1_731_000_000.0
    )
    key, value, headers = encode_control(ControlMessage("lobby-cam-3", None))
    assert value is None
    assert decode_control(key, value, headers).alpha is None


@pytest.mark.parametrize("alpha", [-0.01, 1.01, math.nan, math.inf, "0.5", True])
def test_control_alpha_outside_unit_interval_is_a_config_error(alpha: Any) -> None:
    with pytest.raises(ConfigError, match=r"alpha must be a number in \[0, 1\]"):
        ControlMessage("cam", alpha)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (b"cam", b'{"format":"veil.control","version":1,"alpha":1.5}', r"in \[0, 1\]"),
        (b"cam", b'{"format":"veil.control","version":1,"alpha":NaN}', "non-finite number"),
        (b"cam", b'{"format":"veil.control","version":2,"alpha":0.5}', "version 2"),
        (b"cam", b'{"alpha":0.5}', "not a veil control message"),
        (b"cam", b'{"format":"veil.control","version":1}', "lacks the field 'alpha'"),
        (b"cam", b"0.5", "must be a JSON object"),
        (None, b'{"format":"veil.control","version":1,"alpha":0.5}', "no key"),
        (b"\xff\xfe", b'{"format":"veil.control","version":1,"alpha":0.5}', "not UTF-8"),
    ],
)
def test_decode_control_rejects_malformed_records(
    key: bytes | None, value: bytes, reason: str
) -> None:
    with pytest.raises(WireFormatError, match=reason):
        decode_control(key, value)


def test_messages_are_frozen() -> None:
    msg = _message(_rng_payload(8))
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.alpha = 0.9  # type: ignore[misc]


def test_the_in_process_wire_round_trip_is_what_the_outside_decodes() -> None:
    import torch

    from veil.inference import through_wire

    a = torch.randn(2, 3, 4, 5) * 3
    half = through_wire(a, "float16")
    assert torch.equal(half, a.half().float())
    int8 = through_wire(a, "int8")
    step = (a.amax(dim=(2, 3)) - a.amin(dim=(2, 3))).clamp_min(0) / 255
    error = (int8 - a).abs().amax(dim=(2, 3))
    assert bool((error <= step / 2 + 1e-6).all()), (error, step)
    assert not torch.equal(int8, a)


def test_int8_rounding_never_wraps_even_on_half_steps() -> None:
    """No clip pass: values that sit on half steps (where rounding could reach 128 with 255
    steps) and channels of one sign still come back within half a step."""
    rng = np.random.default_rng(7)
    for trial in range(300):
        step = np.float32(rng.uniform(0.01, 2.0))
        ties = (rng.integers(-300, 300, (4, 8, 8)) + 0.5) * step
        values = (ties if trial % 2 else np.abs(ties) + 0.25 * step).astype(np.float32)
        q, scale, zero = quantise_int8(values)
        error = np.abs(dequantise_int8(q, scale, zero) - values).reshape(4, -1).max(axis=1)
        assert (error <= scale / 2 * (1 + 1e-4)).all(), (trial, error / scale)

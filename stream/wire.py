"""Wire format v1: what crosses Kafka between the trusted zone and the outside.

Three messages, all keyed by stream id so that one stream stays on one partition, in order:

* :class:`ActivationMessage` (``veil.activations``): the noisy head activation of one frame,
  a binary value (magic, version, length-prefixed JSON header, raw tensor bytes).
* :class:`DetectionMessage` (``veil.detections``): the tail's face boxes for that frame, JSON.
* :class:`ControlMessage` (``veil.control``, compacted): the noise strength ``alpha`` per stream.

Every record may carry an Ed25519 signature of its key, value and headers in the headers
``veil-signer`` and ``veil-signature`` (:mod:`stream.signing`); the layouts here do not change.

The byte layout is specified in ``docs/wire-format.md``; change the two together.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

import numpy as np
import numpy.typing as npt

from veil.detections import Detections
from veil.errors import ConfigError, WireFormatError

if TYPE_CHECKING:
    from veil.detectors.base import InputGeometry, Letterbox

WIRE_VERSION: Final = 1
MAGIC: Final = b"VEIL"
# magic (4 bytes), format version (uint16), header length (uint32); big-endian (network order).
PREFIX: Final = struct.Struct(">4sHI")
# A header of a few hundred bytes is normal; a bigger one means a corrupt length prefix.
MAX_HEADER_BYTES: Final = 64 * 1024
# Any other JSON document on the wire (detection and control values) is refused beyond this.
MAX_JSON_BYTES: Final = 1024 * 1024

Quantisation = Literal["float16", "int8"]
QUANTISATIONS: Final[tuple[str, ...]] = get_args(Quantisation)

# Kafka headers mirror the routing fields so that brokers, dead-letter tooling and consumers can
# route or filter without parsing the value.
HEADER_VERSION: Final = "veil-version"
HEADER_KIND: Final = "veil-kind"
HEADER_STREAM: Final = "veil-stream"
HEADER_SEQUENCE: Final = "veil-sequence"
HEADER_PROFILE: Final = "veil-profile"
HEADER_ERROR: Final = "veil-error"
# Control records: the operator's issue time (unix seconds), on tombstones too, so that an edge
# can refuse a control record older than the last it applied (workers/trusted/control.py).
HEADER_ISSUED: Final = "veil-issued"

KIND_ACTIVATION: Final = "activation"
KIND_DETECTION: Final = "detection"
KIND_CONTROL: Final = "control"

CLEAN_PROFILE: Final = "none"

Headers = list[tuple[str, bytes]]
Float32Array = npt.NDArray[np.float32]

# int8 spans [-128, 127], 255 steps; a channel's range is cut into a hair fewer (quantise_int8).
_INT8_STEPS: Final = 255 - 1e-3


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise WireFormatError(reason)


def _finite(value: Any, name: str) -> float:
    """``value`` as a finite float, or WireFormatError naming the field."""
    _require(
        isinstance(value, numbers.Real) and not isinstance(value, bool),
        f"{name} must be a number, got {value!r}",
    )
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range
        number = math.inf
    _require(math.isfinite(number), f"{name} must be finite, got {value!r:.40}")
    return number


def _text(value: Any, name: str) -> str:
    _require(isinstance(value, str) and value != "", f"{name} must be a non-empty string")
    return str(value)


def _count(value: Any, name: str, minimum: int) -> int:
    _require(
        isinstance(value, numbers.Integral) and not isinstance(value, bool),
        f"{name} must be an integer, got {value!r}",
    )
    count = int(value)
    _require(count >= minimum, f"{name} must be >= {minimum}, got {count}")
    return count


def _check_alpha(value: Any, name: str = "alpha") -> float:
    alpha = _finite(value, name)
    _require(0.0 <= alpha <= 1.0, f"{name} must be in [0, 1], got {alpha}")
    return alpha


def _reject_constant(token: str) -> float:
    # Python's json accepts NaN/Infinity, which are not JSON and never valid in a veil field.
    raise WireFormatError(f"header JSON contains the non-finite number {token}")


def _dumps(obj: dict[str, Any]) -> bytes:
    try:
        return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    except ValueError as exc:
        raise WireFormatError(f"cannot encode a non-finite number: {exc}") from exc


def _loads(data: bytes, what: str, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """``data`` as a JSON object, or WireFormatError with a one-line reason: too large, not
    UTF-8, not JSON, nested too deeply, or numbers Python refuses to read."""
    _require(len(data) <= max_bytes, f"{what} is {len(data)} bytes, more than {max_bytes}")
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise WireFormatError(f"{what} is not UTF-8: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise WireFormatError(f"{what} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise WireFormatError(f"{what} is nested too deeply to be read") from exc
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WireFormatError(f"{what} is not valid JSON: {first[:200]}") from exc
    _require(isinstance(obj, dict), f"{what} must be a JSON object, got {type(obj).__name__}")
    return dict(obj)


def _field(obj: dict[str, Any], name: str, what: str) -> Any:
    if name not in obj:
        raise WireFormatError(f"{what} lacks the field {name!r}")
    return obj[name]


def _check_mirrors(
    key: bytes | None, headers: Sequence[tuple[str, bytes]], expected: dict[str, str], kind: str
) -> None:
    """Key and Kafka headers are optional copies of body fields; present, they must agree."""
    stream = expected[HEADER_STREAM]
    if key is not None:
        _require(
            key == stream.encode(),
            f"{kind} message key {key!r} does not match its stream id {stream!r}",
        )
    for name, raw in headers:
        if name in expected:
            value = raw.decode("utf-8", errors="replace") if raw is not None else None
            _require(
                value == expected[name],
                f"{kind} message header {name}={value!r} does not match the body "
                f"({expected[name]!r})",
            )


@dataclass(frozen=True)
class Envelope:
    """A frame's identity and times, made once by its source and carried unchanged by every
    record made from it (activation, detection, dead letter): ``stream_id`` and ``sequence``
    (from 0, never reused) name the frame, ``pts`` is the source's presentation time in seconds
    (None when it gives none), ``capture_time`` unix seconds at decode."""

    stream_id: str
    sequence: int
    pts: float | None
    capture_time: float

    def __post_init__(self) -> None:
        # Plain Python values: numpy scalars are accepted but would not serialise to JSON.
        object.__setattr__(self, "stream_id", _text(self.stream_id, "stream_id"))
        object.__setattr__(self, "sequence", _count(self.sequence, "sequence", 0))
        object.__setattr__(self, "pts", None if self.pts is None else _finite(self.pts, "pts"))
        object.__setattr__(self, "capture_time", _finite(self.capture_time, "capture_time"))


@dataclass(frozen=True)
class Provenance:
    """What made an activation, and so its detections: the detector, its weights, the noise
    profile applied (``"none"``: clean) and that profile's alpha. Set once by head+noise."""

    model: str
    weights_id: str
    profile_id: str
    alpha: float

    def __post_init__(self) -> None:
        for name in ("model", "weights_id", "profile_id"):
            object.__setattr__(self, name, _text(getattr(self, name), name))
        object.__setattr__(self, "alpha", _check_alpha(self.alpha))


class EnvelopeFields:
    """Read access to the :class:`Envelope` of a frame or of a record made from it."""

    envelope: Envelope

    @property
    def stream_id(self) -> str:
        return self.envelope.stream_id

    @property
    def sequence(self) -> int:
        return self.envelope.sequence

    @property
    def pts(self) -> float | None:
        return self.envelope.pts

    @property
    def capture_time(self) -> float:
        return self.envelope.capture_time


class ProvenanceFields:
    """Read access to the :class:`Provenance` of an activation or of its detections."""

    provenance: Provenance

    @property
    def model(self) -> str:
        return self.provenance.model

    @property
    def weights_id(self) -> str:
        return self.provenance.weights_id

    @property
    def profile_id(self) -> str:
        return self.provenance.profile_id

    @property
    def alpha(self) -> float:
        return self.provenance.alpha


class _Enveloped(EnvelopeFields, ProvenanceFields):
    """A per-frame message: its envelope and provenance."""


def _frame_fields(msg: _Enveloped) -> dict[str, Any]:
    """The per-frame fields, as they travel in JSON."""
    e, p = msg.envelope, msg.provenance
    return {
        "stream_id": e.stream_id,
        "sequence": e.sequence,
        "pts": e.pts,
        "capture_time": e.capture_time,
        "model": p.model,
        "weights_id": p.weights_id,
        "profile_id": p.profile_id,
        "alpha": p.alpha,
    }


def _frame_headers(msg: _Enveloped, kind: str) -> Headers:
    """The Kafka headers that mirror routing fields of the body."""
    return [
        (HEADER_VERSION, str(WIRE_VERSION).encode()),
        (HEADER_KIND, kind.encode()),
        (HEADER_STREAM, msg.stream_id.encode()),
        (HEADER_SEQUENCE, str(msg.sequence).encode()),
        (HEADER_PROFILE, msg.profile_id.encode()),
    ]


def _read_frame_fields(
    h: dict[str, Any],
    key: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    kind: str,
    what: str,
) -> tuple[Envelope, Provenance]:
    """The per-frame fields activation and detection messages share, checked against the
    Kafka key and headers that mirror them."""
    stream_id = _text(_field(h, "stream_id", what), "stream_id")
    sequence = _count(_field(h, "sequence", what), "sequence", 0)
    profile_id = _text(_field(h, "profile_id", what), "profile_id")
    _check_mirrors(
        key,
        headers,
        {
            HEADER_VERSION: str(WIRE_VERSION),
            HEADER_KIND: kind,
            HEADER_STREAM: stream_id,
            HEADER_SEQUENCE: str(sequence),
            HEADER_PROFILE: profile_id,
        },
        kind,
    )
    pts = _field(h, "pts", what)
    envelope = Envelope(
        stream_id,
        sequence,
        None if pts is None else _finite(pts, "pts"),
        _finite(_field(h, "capture_time", what), "capture_time"),
    )
    provenance = Provenance(
        _text(_field(h, "model", what), "model"),
        _text(_field(h, "weights_id", what), "weights_id"),
        profile_id,
        _check_alpha(_field(h, "alpha", what)),
    )
    return envelope, provenance


def _check_enveloped(msg: _Enveloped, version: int) -> None:
    _require(version == WIRE_VERSION, f"unsupported wire version {version}")
    _require(isinstance(msg.envelope, Envelope), "envelope must be an Envelope")
    _require(isinstance(msg.provenance, Provenance), "provenance must be a Provenance")


# --------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class FramePlacement:
    """Where the frame sits in the model input: what the tail needs to map boxes to frame pixels.

    The frame was scaled by ``scale`` and placed top-left in an ``input_width x input_height``
    input (see :class:`veil.detectors.base.Letterbox`).
    """

    frame_width: int
    frame_height: int
    scale: float
    input_width: int
    input_height: int

    def __post_init__(self) -> None:
        for name in ("frame_width", "frame_height", "input_width", "input_height"):
            object.__setattr__(self, name, _count(getattr(self, name), name, 1))
        scale = _finite(self.scale, "scale")
        _require(scale > 0, f"scale must be positive, got {scale}")
        object.__setattr__(self, "scale", scale)

    @classmethod
    def from_letterbox(cls, letterbox: Letterbox, geometry: InputGeometry) -> FramePlacement:
        return cls(
            frame_width=letterbox.frame_width,
            frame_height=letterbox.frame_height,
            scale=float(letterbox.scale),
            input_width=geometry.width,
            input_height=geometry.height,
        )

    def letterbox(self) -> Letterbox:
        # Imported here: veil.detectors.base pulls in torch, which decoding a message must not.
        from veil.detectors.base import Letterbox

        return Letterbox(self.scale, self.frame_width, self.frame_height)

    def geometry(self) -> InputGeometry:
        from veil.detectors.base import InputGeometry

        return InputGeometry(self.input_width, self.input_height)


@dataclass(frozen=True, eq=False)
class ActivationMessage(_Enveloped):
    """One frame's (noisy) head activation, ``payload`` ``[C, H, W]``.

        ``quantisation`` is how the payload travels: ``float16`` (default; relative error about
        5e-4) or ``int8`` (per-channel affine, half the bytes, absolute error at most half a
        channel step, see :func:`quantise_int8`). :func:`decode` returns a float16 payload as it
    travelled (the tail takes FP16) and an int8 one dequantised to float32.
        ``profile_id`` is the noise profile applied, or ``"none"`` for a clean activation.
    """

    envelope: Envelope
    provenance: Provenance
    placement: FramePlacement
    payload: npt.NDArray[np.floating[Any]]
    quantisation: Quantisation = "float16"
    version: int = WIRE_VERSION

    def __post_init__(self) -> None:
        _check_enveloped(self, self.version)
        _require(isinstance(self.placement, FramePlacement), "placement must be a FramePlacement")
        _require(
            self.quantisation in QUANTISATIONS,
            f"quantisation must be one of {QUANTISATIONS}, got {self.quantisation!r}",
        )
        payload = self.payload
        _require(isinstance(payload, np.ndarray), "payload must be a numpy array")
        _require(
            payload.ndim == 3 and min(payload.shape) > 0,
            f"payload must be a non-empty [C, H, W] array, got shape {payload.shape}",
        )
        _require(
            np.issubdtype(payload.dtype, np.floating),
            f"payload must be floating point, got {payload.dtype}",
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.payload.shape
        return int(c), int(h), int(w)

    @property
    def wire_dtype(self) -> str:
        return "float16" if self.quantisation == "float16" else "int8"


def quantise_int8(
    values: npt.NDArray[np.floating[Any]],
) -> tuple[npt.NDArray[np.int8], Float32Array, npt.NDArray[np.int8]]:
    """Per-channel affine int8: ``x ~= (q - zero_point[c]) * scale[c]``.

    Each channel's range is widened to include 0 (as in ONNX/PyTorch quantisation) so that
    zero is exact and the zero point fits in int8. Rounding error is at most ``scale[c] / 2``.
    An all-zero channel gets scale 1 and is exact. The range is cut into ``255 - 1e-3`` steps
    rather than 255: rounding (half to even, symmetric) then keeps every value in [-128, 127]
    (the channel's minimum lands on -128 exactly, its maximum at most 127, with float32's
    rounding far inside the margin), so no clip pass is needed (it took 0.15 of 0.6 ms at
    128x40x40). ``ValueError`` if a value is not finite or a channel's range overflows float32
    (read off the channels' extremes, which a NaN or an infinity reaches: no pass of its own).
    """
    x = np.asarray(values, dtype=np.float32)
    flat = x.reshape(x.shape[0], -1)
    low = np.minimum(flat.min(axis=1), 0.0)
    high = np.maximum(flat.max(axis=1), 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        scale = ((high - low) / _INT8_STEPS).astype(np.float32)
    if not np.isfinite(scale).all():
        raise ValueError("payload is not finite, or a channel's range overflows float32")
    scale[scale == 0] = 1.0
    zero_point = -128.0 - np.round(low / scale)  # in [-128, 127]: low / scale >= -254.999
    q = np.round(flat / scale[:, None])
    q += zero_point[:, None]
    return q.astype(np.int8).reshape(x.shape), scale, zero_point.astype(np.int8)


def dequantise_int8(
    quantised: npt.NDArray[np.int8], scale: Float32Array, zero_point: npt.NDArray[np.int8]
) -> Float32Array:
    q = quantised.astype(np.float32) - zero_point.astype(np.float32)[:, None, None]
    values: Float32Array = (q * scale[:, None, None]).astype(np.float32)
    return values


def _payload_bytes(msg: ActivationMessage) -> bytes:
    values = np.asarray(msg.payload)
    where = f"stream {msg.stream_id} seq {msg.sequence}"
    if msg.quantisation == "int8":
        try:
            quantised, scale, zero_point = quantise_int8(values)
        except ValueError as exc:
            raise WireFormatError(f"{where}: {exc}") from exc
        return scale.astype("<f4").tobytes() + zero_point.tobytes() + quantised.tobytes()
    if not np.isfinite(values).all():
        raise WireFormatError(f"{where}: payload is not finite")
    with np.errstate(over="ignore"):  # overflow to inf is detected just below
        half = values.astype("<f2")
    if not np.isfinite(half).all():
        raise WireFormatError(
            f"{where}: payload exceeds the float16 range (|x| > 65504); send it as int8"
        )
    return half.tobytes(order="C")


def _expected_payload_size(quantisation: str, shape: tuple[int, int, int]) -> int:
    c, h, w = shape
    if quantisation == "float16":
        return 2 * c * h * w
    return 4 * c + c + c * h * w  # scales (float32), zero points (int8), values (int8)


def encode(msg: ActivationMessage) -> tuple[bytes, bytes, Headers]:
    """ActivationMessage -> (key, value, headers) for ``veil.activations``."""
    p = msg.placement
    header = {
        **_frame_fields(msg),
        "shape": list(msg.shape),
        "dtype": msg.wire_dtype,
        "quantisation": msg.quantisation,
        "frame_width": p.frame_width,
        "frame_height": p.frame_height,
        "scale": p.scale,
        "input_width": p.input_width,
        "input_height": p.input_height,
    }
    header_bytes = _dumps(header)
    value = PREFIX.pack(MAGIC, WIRE_VERSION, len(header_bytes)) + header_bytes
    value += _payload_bytes(msg)
    headers = _frame_headers(msg, KIND_ACTIVATION)
    return msg.stream_id.encode(), value, headers


def _activation_header(value: bytes) -> tuple[dict[str, Any], int]:
    """The prefix checked (magic, version, header length) and the header parsed: (header,
    where the payload starts)."""
    _require(
        len(value) >= PREFIX.size,
        f"activation message truncated: {len(value)} bytes, shorter than the "
        f"{PREFIX.size}-byte prefix",
    )
    magic, version, header_len = PREFIX.unpack_from(value)
    _require(magic == MAGIC, f"not a veil activation message: magic {magic!r}, want {MAGIC!r}")
    _require(
        version == WIRE_VERSION,
        f"unsupported activation wire version {version} (this build reads {WIRE_VERSION})",
    )
    _require(
        header_len <= MAX_HEADER_BYTES,
        f"activation header length {header_len} exceeds {MAX_HEADER_BYTES} bytes",
    )
    body_start = PREFIX.size + header_len
    _require(
        len(value) >= body_start,
        f"activation message truncated inside its header: {len(value)} bytes, header ends at "
        f"{body_start}",
    )
    header = _loads(value[PREFIX.size : body_start], "activation header", MAX_HEADER_BYTES)
    return header, body_start


def _activation_payload(
    h: dict[str, Any], payload_raw: memoryview
) -> tuple[Quantisation, np.ndarray[Any, Any]]:
    """The header's shape, quantisation and dtype checked against each other and against the
    payload's size: (quantisation, the payload decoded)."""
    what = "activation header"
    shape_field = _field(h, "shape", what)
    _require(
        isinstance(shape_field, list)
        and len(shape_field) == 3
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape_field),
        f"activation shape must be three positive integers [C, H, W], got {shape_field!r}",
    )
    shape = (int(shape_field[0]), int(shape_field[1]), int(shape_field[2]))
    quantisation = _field(h, "quantisation", what)
    _require(
        quantisation in QUANTISATIONS,
        f"unknown quantisation {quantisation!r} (known: {', '.join(QUANTISATIONS)})",
    )
    dtype = _field(h, "dtype", what)
    want_dtype = "float16" if quantisation == "float16" else "int8"
    _require(
        dtype == want_dtype,
        f"dtype {dtype!r} does not match quantisation {quantisation!r} (want {want_dtype!r})",
    )
    want = _expected_payload_size(quantisation, shape)
    if len(payload_raw) < want:
        raise WireFormatError(
            f"activation payload truncated: {len(payload_raw)} bytes, shape {list(shape)} "
            f"as {quantisation} needs {want}"
        )
    _require(
        len(payload_raw) == want,
        f"activation payload has {len(payload_raw)} bytes but shape {list(shape)} as "
        f"{quantisation} needs {want}: shape/dtype mismatch",
    )
    return quantisation, _decode_payload(payload_raw, quantisation, shape)


def decode(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]] = ()
) -> ActivationMessage:
    """(key, value, headers) from ``veil.activations`` -> ActivationMessage (a float16 payload
    as float16, an int8 one dequantised to float32).

    Raises WireFormatError naming the reason: foreign message (magic), unsupported version,
    truncated value or payload, bad header JSON, missing or invalid field, shape/dtype
    mismatch, non-finite values, or key/headers that disagree with the body.
    """
    _require(value is not None, "activation message has no value (tombstone)")
    assert value is not None  # for mypy; _require raised otherwise
    h, body_start = _activation_header(value)
    what = "activation header"
    quantisation, payload = _activation_payload(h, memoryview(value)[body_start:])

    return ActivationMessage(
        *_read_frame_fields(h, key, headers, KIND_ACTIVATION, what),
        placement=FramePlacement(
            frame_width=_count(_field(h, "frame_width", what), "frame_width", 1),
            frame_height=_count(_field(h, "frame_height", what), "frame_height", 1),
            scale=_finite(_field(h, "scale", what), "scale"),
            input_width=_count(_field(h, "input_width", what), "input_width", 1),
            input_height=_count(_field(h, "input_height", what), "input_height", 1),
        ),
        payload=payload,
        quantisation=quantisation,
    )


def _decode_payload(
    raw: memoryview, quantisation: str, shape: tuple[int, int, int]
) -> npt.NDArray[np.floating[Any]]:
    c = shape[0]
    if quantisation == "float16":
        half = np.frombuffer(raw, dtype="<f2").reshape(shape)  # a view of the record, read-only
        _require(bool(np.isfinite(half).all()), "activation payload has non-finite values")
        return half
    scale = np.frombuffer(raw, dtype="<f4", count=c).astype(np.float32)
    zero_point = np.frombuffer(raw, dtype=np.int8, count=c, offset=4 * c)
    quantised = np.frombuffer(raw, dtype=np.int8, offset=5 * c).reshape(shape)
    _require(
        bool(np.isfinite(scale).all() and (scale > 0).all()),
        "activation int8 scales must be finite and positive",
    )
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused just below
        values = dequantise_int8(quantised, scale, zero_point)
    _require(
        bool(np.isfinite(values).all()),
        "activation int8 payload overflows float32: its scales are absurd "
        f"(largest {float(scale.max()):.3g})",
    )
    return values


# --------------------------------------------------------------------------- detections


@dataclass(frozen=True, eq=False)
class DetectionMessage(_Enveloped):
    """The tail's face detections for one frame, in that frame's pixels.

    Boxes travel rounded to 0.01 px and scores to 1e-4 (``Detections.to_json``); landmarks are
    not sent.
    """

    envelope: Envelope
    provenance: Provenance
    detections: Detections
    produced_time: float
    version: int = WIRE_VERSION

    def __post_init__(self) -> None:
        _check_enveloped(self, self.version)
        object.__setattr__(self, "produced_time", _finite(self.produced_time, "produced_time"))
        _require(isinstance(self.detections, Detections), "detections must be a Detections")
        _require(
            bool(np.isfinite(self.detections.xyxy).all())
            and bool(np.isfinite(self.detections.confidence).all()),
            "detections must be finite",
        )


def encode_detection(msg: DetectionMessage) -> tuple[bytes, bytes, Headers]:
    """DetectionMessage -> (key, value, headers) for ``veil.detections``; value is JSON."""
    body = {
        "format": "veil.detection",
        "version": WIRE_VERSION,
        **_frame_fields(msg),
        "produced_time": msg.produced_time,
        **msg.detections.to_json(),
    }
    return msg.stream_id.encode(), _dumps(body), _frame_headers(msg, KIND_DETECTION)


def decode_detection(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]] = ()
) -> DetectionMessage:
    """(key, value, headers) from ``veil.detections`` -> DetectionMessage, or WireFormatError."""
    _require(value is not None, "detection message has no value (tombstone)")
    assert value is not None
    what = "detection message"
    body = _loads(value, what)
    _require(
        body.get("format") == "veil.detection",
        f"not a veil detection message: format {body.get('format')!r}",
    )
    version = body.get("version")
    _require(
        version == WIRE_VERSION,
        f"unsupported detection wire version {version!r} (this build reads {WIRE_VERSION})",
    )
    try:
        detections = Detections.from_json(body)
    except ValueError as exc:
        raise WireFormatError(f"{what}: {exc}") from exc
    return DetectionMessage(
        *_read_frame_fields(body, key, headers, KIND_DETECTION, what),
        detections=detections,
        produced_time=_finite(_field(body, "produced_time", what), "produced_time"),
    )


# --------------------------------------------------------------------------- control


@dataclass(frozen=True)
class ControlMessage:
    """Noise strength for one stream on the compacted control topic: ``stream_id -> alpha``.

    ``alpha=None`` is a tombstone: the override is withdrawn and the stream falls back to its
    worker's configured alpha (and compaction may drop the key).
    """

    stream_id: str
    alpha: float | None
    updated_time: float | None = None

    def __post_init__(self) -> None:
        # Operators set these by hand, so a bad value is a configuration mistake.
        if not isinstance(self.stream_id, str) or not self.stream_id:
            raise ConfigError("control message: stream_id must be a non-empty string")
        if self.alpha is not None:
            alpha = self.alpha
            if (
                isinstance(alpha, bool)
                or not isinstance(alpha, (int, float))
                or not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0)
            ):
                raise ConfigError(
                    f"control message for stream {self.stream_id!r}: alpha must be a number "
                    f"in [0, 1], got {alpha!r}"
                )
        if self.updated_time is not None and not (
            isinstance(self.updated_time, (int, float)) and math.isfinite(self.updated_time)
        ):
            raise ConfigError(
                f"control message for stream {self.stream_id!r}: updated_time must be finite"
            )


def encode_control(msg: ControlMessage) -> tuple[bytes, bytes | None, Headers]:
    """ControlMessage -> (key, value, headers); a tombstone has value None."""
    headers: Headers = [
        (HEADER_VERSION, str(WIRE_VERSION).encode()),
        (HEADER_KIND, KIND_CONTROL.encode()),
        (HEADER_STREAM, msg.stream_id.encode()),
    ]
    if msg.updated_time is not None:
        headers.append((HEADER_ISSUED, repr(float(msg.updated_time)).encode()))
    if msg.alpha is None:
        return msg.stream_id.encode(), None, headers
    body = {
        "format": "veil.control",
        "version": WIRE_VERSION,
        "alpha": float(msg.alpha),
        "updated_time": msg.updated_time,
    }
    return msg.stream_id.encode(), _dumps(body), headers


def decode_control(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]] = ()
) -> ControlMessage:
    """(key, value, headers) from ``veil.control`` -> ControlMessage, or WireFormatError.

    The stream id is the key (compaction works on keys), so a control record without one is
    rejected.
    """
    _require(key is not None and key != b"", "control message has no key (the stream id)")
    assert key is not None
    try:
        stream_id = key.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireFormatError(f"control message key is not UTF-8: {exc}") from exc
    _check_mirrors(
        None,
        headers,
        {HEADER_VERSION: str(WIRE_VERSION), HEADER_KIND: KIND_CONTROL, HEADER_STREAM: stream_id},
        "control",
    )
    issued = _control_issued(headers)
    if value is None:
        return ControlMessage(stream_id, None, issued)
    body = _loads(value, "control message")
    _require(
        body.get("format") == "veil.control",
        f"not a veil control message: format {body.get('format')!r}",
    )
    _require(
        body.get("version") == WIRE_VERSION,
        f"unsupported control wire version {body.get('version')!r} "
        f"(this build reads {WIRE_VERSION})",
    )
    updated = body.get("updated_time")
    if issued is not None and updated is not None:
        _require(
            _finite(updated, "updated_time") == issued,
            f"control message header {HEADER_ISSUED}={issued!r} does not match the body "
            f"({updated!r})",
        )
    try:
        return ControlMessage(
            stream_id,
            _field(body, "alpha", "control message"),
            issued if updated is None else updated,
        )
    except ConfigError as exc:
        raise WireFormatError(str(exc)) from exc


def _control_issued(headers: Sequence[tuple[str, bytes]]) -> float | None:
    """The ``veil-issued`` header as a finite number, None when absent."""
    values = [raw for name, raw in headers if name == HEADER_ISSUED]
    if not values:
        return None
    _require(len(values) == 1, f"control message has {len(values)} {HEADER_ISSUED} headers")
    text = (values[0] or b"").decode("utf-8", errors="replace")
    try:
        number = float(text)
    except ValueError as exc:
        raise WireFormatError(
            f"control message header {HEADER_ISSUED}={text[:40]!r} is not a number"
        ) from exc
    return _finite(number, HEADER_ISSUED)


# --------------------------------------------------------------------------- status

KIND_STATUS: Final = "status"
StatusOutcome = Literal["started", "applied", "refused"]
STATUS_OUTCOMES: Final[tuple[str, ...]] = get_args(StatusOutcome)


@dataclass(frozen=True)
class StatusMessage:
    """What the trusted zone answers on the compacted status topic, one record per stream:
    the alpha and profile in force, the floor the zone keeps (``min_alpha``, and whether a
    clean stream is allowed), the calibrated alphas, and the outcome of the last request
    (``request_time``: the ``updated_time`` of the control record it answers)."""

    stream_id: str
    alpha: float
    profile_id: str
    min_alpha: float
    allow_clean: bool
    available: tuple[float, ...]
    outcome: StatusOutcome
    reason: str
    time: float
    request_time: float | None = None
    requested_alpha: float | None = None

    def __post_init__(self) -> None:
        _text(self.stream_id, "stream_id")
        _require(self.outcome in STATUS_OUTCOMES, f"unknown status outcome {self.outcome!r}")
        object.__setattr__(self, "available", tuple(_check_alpha(a) for a in self.available))


def encode_status(msg: StatusMessage) -> tuple[bytes, bytes, Headers]:
    """StatusMessage -> (key, value, headers) for ``<prefix>.status``; value is JSON."""
    body = {"format": "veil.status", "version": WIRE_VERSION, **dataclasses.asdict(msg)}
    body["available"] = list(msg.available)
    headers: Headers = [
        (HEADER_VERSION, str(WIRE_VERSION).encode()),
        (HEADER_KIND, KIND_STATUS.encode()),
        (HEADER_STREAM, msg.stream_id.encode()),
    ]
    return msg.stream_id.encode(), _dumps(body), headers


def decode_status(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]] = ()
) -> StatusMessage:
    """(key, value, headers) from ``<prefix>.status`` -> StatusMessage, or WireFormatError."""
    _require(value is not None, "status message has no value (tombstone)")
    assert value is not None
    body = _loads(value, "status message")
    _require(body.pop("format", None) == "veil.status", "not a veil status message")
    version = body.pop("version", None)
    _require(version == WIRE_VERSION, f"unsupported status wire version {version!r}")
    names = {f.name for f in dataclasses.fields(StatusMessage)}
    _require(set(body) <= names, f"status message has unknown fields {sorted(set(body) - names)}")
    try:
        msg = StatusMessage(**{**body, "available": tuple(body.get("available", ()))})
    except TypeError as exc:
        raise WireFormatError(f"status message: {exc}") from exc
    _require(key == msg.stream_id.encode(), "status message key does not match its stream id")
    return msg

"""Ed25519 signatures on Kafka records (no broker): keys, sign/verify, each refusal and its
reason, and the attacks they stop in the detect worker (fakes of test_detect_worker.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import stat
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from stream.kafka import DEFAULT_TOPICS, KafkaLink, OutgoingRecord
from stream.signing import (
    HEADER_SIGNATURE,
    HEADER_SIGNER,
    ROLE_DETECT,
    ROLE_EDGE,
    ROLE_OPERATOR,
    Role,
    Signer,
    TrustedKey,
    Verifier,
    decode_signed_control,
    key_id,
    keys_for,
    load_private_key,
    load_public_key,
    log_signing_state,
    sign_control,
    signer_for,
    verifier_for,
    verify,
)
from stream.wire import (
    ActivationMessage,
    ControlMessage,
    DetectionMessage,
    Envelope,
    FramePlacement,
    Provenance,
    decode,
    decode_control,
    encode,
    encode_control,
    encode_detection,
)
from tests.test_detect_worker import (
    GEOMETRY,
    SHAPE,
    FakeConsumer,
    FakeProducer,
    FakeRecord,
    FakeTail,
    activation,
    committed,
    dead_letters,
    detections_of,
    make_worker,
)
from tests.tiny_detector import TinyDetector
from veil.cli import main
from veil.config import SigningConfig, load_config
from veil.detections import Detections
from veil.detectors.base import Letterbox
from veil.errors import ConfigError, WireFormatError
from veil.outputs import read_detection
from workers.trusted.edge import EdgeWorker, RequestRefused
from workers.trusted.obfuscator import ObfuscatedFrame
from workers.untrusted.detect import DetectWorker

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ROLES: tuple[Role, ...] = (ROLE_EDGE, ROLE_DETECT, ROLE_OPERATOR)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Key pairs written by the CLI, as an operator would."""
    folder = tmp_path_factory.mktemp("keys") / "veil-keys"
    assert main(["keys", "init", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def signers(keys: Path) -> dict[Role, Signer]:
    return {role: Signer.from_file(keys / f"{role}.key", role) for role in ROLES}


@pytest.fixture(scope="module")
def verifier(keys: Path) -> Verifier:
    return Verifier(TrustedKey(r, load_public_key(keys / f"{r}.pub")) for r in ROLES)


@pytest.fixture(scope="module")
def detector() -> TinyDetector:
    return TinyDetector()


def signed(record: FakeRecord, signer: Signer) -> FakeRecord:
    added = signer.headers(record.key, record.value, record.headers)
    return dataclasses.replace(record, headers=[*record.headers, *added])


def reason_of(verifier: Verifier, record: FakeRecord, role: Role = ROLE_EDGE) -> str:
    with pytest.raises(WireFormatError) as info:
        verifier.verify(record.key, record.value, record.headers, role)
    assert "\n" not in str(info.value)
    return str(info.value)


# --- keys -------------------------------------------------------------------------------------


def test_keys_init_writes_a_pair_per_role_private_keys_0600(
    keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = sorted(p.name for p in keys.iterdir())
    assert names == sorted(f"{r}.{ext}" for r in ROLES for ext in ("key", "pub"))
    ids = set()
    for role in ROLES:
        assert stat.S_IMODE((keys / f"{role}.key").stat().st_mode) == 0o600
        private = load_private_key(keys / f"{role}.key")
        public = load_public_key(keys / f"{role}.pub")
        assert key_id(private.public_key()) == key_id(public)
        assert len(key_id(public)) == 16 and int(key_id(public), 16) >= 0
        ids.add(key_id(public))
    assert len(ids) == 3  # three distinct key pairs

    before = {p.name: p.read_bytes() for p in keys.iterdir()}
    capsys.readouterr()
    assert main(["keys", "init", str(keys)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in keys.iterdir()} == before


def test_keys_init_refuses_a_folder_holding_any_one_key(tmp_path: Path) -> None:
    (tmp_path / "detect.pub").write_text("mine")
    assert main(["keys", "init", str(tmp_path)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["detect.pub"]


def _ec_pem(private: bool) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    if private:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize(
    ("content", "loader", "message"),
    [
        (None, load_private_key, "does not exist"),
        (b"not a key", load_private_key, "is not an unencrypted PEM private key"),
        (b"not a key", load_public_key, "is not a PEM public key"),
        ("edge.pub", load_private_key, "(it is a public key)"),
        ("edge.key", load_public_key, "is a private key: give the public key"),
        ("ec-private", load_private_key, "not an Ed25519 private key"),
        ("ec-public", load_public_key, "not an Ed25519 public key"),
        ("folder", load_public_key, "is a folder"),
    ],
)
def test_a_bad_key_file_is_a_one_line_config_error(
    keys: Path, tmp_path: Path, content: Any, loader: Any, message: str
) -> None:
    path = tmp_path / "key.pem"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content in ("edge.pub", "edge.key"):
        path.write_bytes((keys / content).read_bytes())
    elif content == "ec-private":
        path.write_bytes(_ec_pem(private=True))
    elif content == "ec-public":
        path.write_bytes(_ec_pem(private=False))
    elif content == "folder":
        path.mkdir()
    with pytest.raises(ConfigError) as info:
        loader(path)
    assert message in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)


# --- sign and verify --------------------------------------------------------------------------


def test_a_signed_activation_verifies_and_still_decodes(
    signers: dict[Role, Signer], verifier: Verifier
) -> None:
    record = signed(activation(3), signers[ROLE_EDGE])
    names = [name for name, _ in record.headers]
    assert names[-2:] == [HEADER_SIGNER, HEADER_SIGNATURE]
    assert dict(record.headers)[HEADER_SIGNER] == signers[ROLE_EDGE].key_id.encode()
    assert dict(record.headers)[HEADER_SIGNATURE].startswith(b"ed25519-v1:")
    verifier.verify(record.key, record.value, record.headers, ROLE_EDGE)
    assert decode(record.key, record.value, record.headers).sequence == 3  # headers ignored
    # The functional form, with a bare mapping of trusted keys.
    verify(record.key, record.value, record.headers, verifier.trusted, ROLE_EDGE)
    # An outgoing record, signed whole.
    out = signers[ROLE_EDGE].signed(
        OutgoingRecord("t", record.key, record.value, activation(3).headers)
    )
    verifier.verify(out.key, out.value, out.headers, ROLE_EDGE)
    assert out.headers == record.headers


def _flip_payload(r: FakeRecord) -> FakeRecord:
    value = bytearray(r.value or b"")
    value[-1] ^= 0x01
    return dataclasses.replace(r, value=bytes(value))


def _set_header(r: FakeRecord, name: str, raw: bytes) -> FakeRecord:
    return dataclasses.replace(r, headers=[(n, raw if n == name else v) for n, v in r.headers])


TAMPERING: dict[str, Callable[[FakeRecord], FakeRecord]] = {
    "value": _flip_payload,
    "header": lambda r: _set_header(r, "veil-profile", b"fb-other"),
    "added header": lambda r: dataclasses.replace(r, headers=[*r.headers, ("x-extra", b"1")]),
    "removed header": lambda r: dataclasses.replace(
        r, headers=[(n, v) for n, v in r.headers if n != "veil-sequence"]
    ),
    "key": lambda r: dataclasses.replace(r, key=b"other-stream"),
    "reordered headers": lambda r: dataclasses.replace(
        r, headers=[r.headers[1], r.headers[0], *r.headers[2:]]
    ),
}


@pytest.mark.parametrize("what", sorted(TAMPERING))
def test_a_tampered_record_is_a_bad_signature(
    signers: dict[Role, Signer], verifier: Verifier, what: str
) -> None:
    record = TAMPERING[what](signed(activation(1), signers[ROLE_EDGE]))
    assert reason_of(verifier, record) == "bad signature (tampered or forged)"


def test_unsigned_unknown_and_wrong_role_records_are_refused_with_their_reason(
    signers: dict[Role, Signer], verifier: Verifier
) -> None:
    assert reason_of(verifier, activation(1)) == (
        "unsigned: activations need the edge key's signature"
    )
    attacker = Signer(Ed25519PrivateKey.generate(), ROLE_EDGE)
    assert reason_of(verifier, signed(activation(1), attacker)) == (
        f"signed by unknown key {attacker.key_id} (not among the trusted keys)"
    )
    # A detect key cannot sign activations, nor an edge key detections or control records.
    swapped = signed(activation(1), signers[ROLE_DETECT])
    assert reason_of(verifier, swapped) == (
        "signed by the detect key where the edge key is required"
    )
    edge_signed = signed(activation(1), signers[ROLE_EDGE])
    assert reason_of(verifier, edge_signed, ROLE_DETECT) == (
        "signed by the edge key where the detect key is required"
    )
    # The role is in the signed data: a key trusted for a role cannot sign for another one.
    own = Ed25519PrivateKey.generate()
    as_detect = signed(activation(1), Signer(own, ROLE_DETECT))
    edge_only = Verifier([TrustedKey(ROLE_EDGE, own.public_key())])
    assert reason_of(edge_only, as_detect) == "bad signature (tampered or forged)"
    # The signer's id swapped for a trusted one: the signature does not fit that key.
    relabelled = _set_header(
        signed(activation(1), attacker), HEADER_SIGNER, signers[ROLE_EDGE].key_id.encode()
    )
    assert reason_of(verifier, relabelled) == "bad signature (tampered or forged)"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda h: [x for x in h if x[0] != HEADER_SIGNATURE], "veil-signature header is missing"),
        (lambda h: [x for x in h if x[0] != HEADER_SIGNER], "veil-signer header is missing"),
        (lambda h: [*h, h[-1]], "2 veil-signature headers, want one"),
        (lambda h: [*h[:-1], (HEADER_SIGNATURE, b"ed25519-v1:!!")], "is not base64"),
        (lambda h: [*h[:-1], (HEADER_SIGNATURE, b"ed25519-v1:AAAA")], "3 bytes"),
        (lambda h: [*h[:-1], (HEADER_SIGNATURE, b"rsa-v9:AAAA")], "unsupported signature scheme"),
        (lambda h: [*h[:-2], (HEADER_SIGNER, b"zz"), h[-1]], "is not 16 hex digits"),
    ],
)
def test_malformed_signature_headers_are_named(
    signers: dict[Role, Signer], verifier: Verifier, change: Any, reason: str
) -> None:
    record = signed(activation(1), signers[ROLE_EDGE])
    assert reason in reason_of(
        verifier, dataclasses.replace(record, headers=change(record.headers))
    )


def test_a_signed_record_cannot_be_signed_again(signers: dict[Role, Signer]) -> None:
    record = signed(activation(1), signers[ROLE_EDGE])
    with pytest.raises(WireFormatError, match="already signed"):
        signed(record, signers[ROLE_EDGE])


def test_the_edge_signs_every_activation_record(
    signers: dict[Role, Signer], verifier: Verifier
) -> None:
    frame = ObfuscatedFrame(
        Envelope("s", 5, None, time.time()),
        Provenance("tiny", "0" * 64, "none", 0.0),
        np.full(SHAPE, 5.0, dtype=np.float32),
        Letterbox(1.0, 64, 48),
    )
    edge = SimpleNamespace(
        quantisation="float16",
        obfuscator=SimpleNamespace(geometry=GEOMETRY),
        partitions=SimpleNamespace(of={"s": 2}),
        link=KafkaLink("unused:0", False),
        signer=signers[ROLE_EDGE],
    )
    record = EdgeWorker._record(cast(EdgeWorker, edge), frame)
    assert record.partition == 2 and record.topic == DEFAULT_TOPICS.activations
    verifier.verify(record.key, record.value, record.headers, ROLE_EDGE)
    edge.signer = None  # no keys: unsigned, as before
    unsigned = EdgeWorker._record(cast(EdgeWorker, edge), frame)
    assert HEADER_SIGNER not in dict(unsigned.headers)


def test_a_signed_zone_refuses_alpha_over_http(verifier: Verifier) -> None:
    edge = SimpleNamespace(
        _streams={"s": object()},
        control=SimpleNamespace(alphas={"s": 0.8}),
        control_verifier=verifier,
    )
    with pytest.raises(RequestRefused, match="operator key only") as refused:
        asyncio.run(EdgeWorker.request_alpha(cast(EdgeWorker, edge), "s", 0.9))
    assert refused.value.status == 403 and refused.value.field == "alpha"


# --- the detect worker: verification comes before any state --------------------------------


def signing_worker(
    detector: TinyDetector,
    producer: FakeProducer,
    consumer: FakeConsumer,
    signers: dict[Role, Signer] | None,
    verifier: Verifier | None,
) -> DetectWorker:
    worker = make_worker(FakeTail(detector), detector, producer, consumer)
    worker.signer = None if signers is None else signers[ROLE_DETECT]
    worker.verifier = verifier
    return worker


def forged(seq: int, *, stream: str = "s1", offset: int, value: float = 1.0) -> FakeRecord:
    """What anyone who reaches the broker can publish: a well-formed activation."""
    msg = ActivationMessage(
        Envelope(stream, seq, None, time.time()),
        Provenance("tiny", "0" * 64, "none", 0.0),
        placement=FramePlacement.from_letterbox(Letterbox(1.0, 64, 48), GEOMETRY),
        payload=np.full(SHAPE, value, dtype=np.float32),
    )
    key, raw, headers = encode(msg)
    return FakeRecord(key, raw, list(headers), offset=offset)


async def test_without_keys_a_forged_huge_sequence_drops_the_genuine_frames(
    detector: TinyDetector,
) -> None:
    """The attack as measured by hand: it works on an unsigned pipeline."""
    producer, consumer = FakeProducer(), FakeConsumer()
    worker = signing_worker(detector, producer, consumer, None, None)
    genuine = [dataclasses.replace(activation(i, stream="s1"), offset=i + 1) for i in range(5)]
    await worker.handle([forged(10**9, offset=0), *genuine])
    assert detections_of(producer) == [10**9]  # a fake detection, five genuine frames lost
    assert worker.stats.duplicates == 5


async def test_a_forged_huge_sequence_is_dead_lettered_and_moves_no_dedupe_window(
    detector: TinyDetector, signers: dict[Role, Signer], verifier: Verifier
) -> None:
    producer, consumer = FakeProducer(), FakeConsumer()
    worker = signing_worker(detector, producer, consumer, signers, verifier)
    attacker = Signer(Ed25519PrivateKey.generate(), ROLE_EDGE)
    bad = [forged(10**9, offset=0), signed(forged(10**9 + 1, offset=1), attacker)]
    genuine = [signed(activation(i, stream="s1"), signers[ROLE_EDGE]) for i in range(100)]
    genuine = [dataclasses.replace(r, offset=i + 2) for i, r in enumerate(genuine)]
    await worker.handle([*bad, *genuine])

    assert detections_of(producer) == list(range(100))  # every genuine frame published
    assert worker.deduper.highest("s1") == 99
    letters = dead_letters(producer)
    assert sorted(letters) == [0, 1]
    assert letters[0]["veil-error"] == (
        b"activation refused: unsigned: activations need the edge key's signature"
    )
    assert b"signed by unknown key" in letters[1]["veil-error"]
    assert worker.stats.unverified == worker.stats.dead_letters == 2
    assert worker.stats.duplicates == 0 and committed(consumer) == 102
    # The detections are signed with the detect key, and only with it.
    for _, key, value, headers in producer.on(DEFAULT_TOPICS.detections):
        verifier.verify(key, value, list(headers.items()), ROLE_DETECT)


async def test_a_forged_stream_a_constant_payload_and_a_tampered_record_are_dead_lettered(
    detector: TinyDetector, signers: dict[Role, Signer], verifier: Verifier
) -> None:
    producer, consumer = FakeProducer(), FakeConsumer()
    worker = signing_worker(detector, producer, consumer, signers, verifier)
    edge = signers[ROLE_EDGE]
    records = [
        forged(0, stream="cam-lobby", offset=0),  # a stream no camera has
        signed(forged(1, stream="cam-lobby", offset=1), signers[ROLE_DETECT]),
        forged(2, offset=2, value=65000.0),  # constant 65000 values
        _flip_payload(signed(activation(3, stream="s1"), edge)),  # changed in transit
        dataclasses.replace(signed(activation(4, stream="s1"), edge), offset=4),
    ]
    await worker.handle(records)

    letters = dead_letters(producer)
    assert sorted(letters) == [0, 1, 2, 3]
    assert b"unsigned" in letters[0]["veil-error"]
    assert b"signed by the detect key where the edge key is required" in letters[1]["veil-error"]
    assert b"unsigned" in letters[2]["veil-error"]
    assert b"bad signature (tampered or forged)" in letters[3]["veil-error"]
    assert detections_of(producer) == [4]
    assert worker.deduper.highest("cam-lobby") is None  # never reached the window


# --- detections downstream --------------------------------------------------------------------


def detection_record(seq: int, signer: Signer | None) -> FakeRecord:
    msg = DetectionMessage(
        Envelope("s1", seq, None, time.time()),
        Provenance("tiny", "0" * 64, "none", 0.0),
        Detections(np.array([[1, 2, 30, 40]], np.float32), np.array([0.9], np.float32)),
        time.time(),
    )
    key, value, headers = encode_detection(msg)
    record = FakeRecord(key, value, list(headers), offset=seq, topic=DEFAULT_TOPICS.detections)
    return record if signer is None else signed(record, signer)


def test_the_reader_of_detections_keeps_only_the_detect_keys(
    signers: dict[Role, Signer], verifier: Verifier
) -> None:
    good = read_detection(detection_record(1, signers[ROLE_DETECT]), verifier)
    assert good is not None and good.sequence == 1
    with capture_logs() as logs:
        assert read_detection(detection_record(2, None), verifier) is None
        assert read_detection(detection_record(3, signers[ROLE_EDGE]), verifier) is None
        tampered = _flip_payload(detection_record(4, signers[ROLE_DETECT]))
        assert read_detection(tampered, verifier) is None
    reasons = [e["reason"] for e in logs if e["event"] == "sink.unverified_detection"]
    assert reasons == [
        "unsigned: detections need the detect key's signature",
        "signed by the edge key where the detect key is required",
        "bad signature (tampered or forged)",
    ]
    # Without keys, as before: decoded, unsigned or not.
    plain = read_detection(detection_record(5, None), None)
    assert plain is not None and plain.sequence == 5


# --- control records --------------------------------------------------------------------------


def test_control_records_are_signed_by_the_operator_and_carry_their_issue_time(
    signers: dict[Role, Signer], verifier: Verifier
) -> None:
    msg = ControlMessage("s1", 0.9, 1_731_000_000.5)
    key, value, headers = sign_control(msg, signers[ROLE_OPERATOR])
    assert dict(headers)["veil-issued"] == b"1731000000.5"
    assert decode_signed_control(key, value, headers, verifier) == msg
    tombstone = sign_control(ControlMessage("s1", None, 1_731_000_001.0), signers[ROLE_OPERATOR])
    assert tombstone[1] is None
    assert decode_signed_control(*tombstone, verifier).updated_time == 1_731_000_001.0

    forged_key, forged_value, forged_headers = encode_control(ControlMessage("s1", 0.0, 2e9))
    with pytest.raises(WireFormatError, match=r"^unsigned: control records need the operator"):
        decode_signed_control(forged_key, forged_value, forged_headers, verifier)
    by_edge = [
        *forged_headers,
        *signers[ROLE_EDGE].headers(forged_key, forged_value, forged_headers),
    ]
    with pytest.raises(WireFormatError, match="signed by the edge key where the operator key"):
        decode_signed_control(forged_key, forged_value, by_edge, verifier)
    with pytest.raises(ConfigError, match="signed with the operator key, not the edge key"):
        sign_control(msg, signers[ROLE_EDGE])
    # The issue time header must agree with the body.
    bad = [(n, b"1.0" if n == "veil-issued" else v) for n, v in encode_control(msg)[2]]
    with pytest.raises(WireFormatError, match=r"veil-issued=1\.0 does not match the body"):
        decode_control(key, value, bad)


# --- configuration ----------------------------------------------------------------------------


def test_no_keys_means_unsigned_with_one_warning() -> None:
    config = SigningConfig()
    for role in ("edge", "detect", "sink"):
        assert keys_for(config, role).signer is None and keys_for(config, role).verifier is None
    with capture_logs() as logs:
        log_signing_state(config)
    assert [e["event"] for e in logs] == ["signing.off"]
    assert logs[0]["log_level"] == "warning"


def test_required_signing_without_keys_refuses_to_start() -> None:
    config = SigningConfig(required=True)
    with pytest.raises(ConfigError, match=r"signing\.private_key is not set"):
        keys_for(config, "edge")
    with pytest.raises(ConfigError, match=r"signing\.detect_public_key is not set"):
        keys_for(config, "sink")


def test_a_key_folder_gives_each_role_of_veil_run_its_own_keys(keys: Path) -> None:
    config = SigningConfig(private_key=str(keys))
    edge, detect, sink = (keys_for(config, r) for r in ("edge", "detect", "sink"))
    assert edge.signer is not None and edge.signer.role == ROLE_EDGE
    assert detect.signer is not None and detect.signer.role == ROLE_DETECT
    assert edge.signer.key_id != detect.signer.key_id
    assert sink.signer is None and sink.verifier is not None
    assert sink.verifier.roles() == {ROLE_EDGE, ROLE_DETECT, ROLE_OPERATOR}


def test_per_role_files_and_their_mistakes(keys: Path) -> None:
    detect = SigningConfig(
        private_key=str(keys / "detect.key"),
        edge_public_key=str(keys / "edge.pub"),
        detect_public_key=str(keys / "detect.pub"),
        required=True,
    )
    role = keys_for(detect, "detect")
    assert role.signer is not None and role.verifier is not None
    assert role.verifier.roles() == {ROLE_EDGE, ROLE_DETECT}
    # The detect worker must know the edge key.
    no_edge = dataclasses.replace(detect, edge_public_key=None)
    with pytest.raises(ConfigError, match=r"activations are verified here but signing\.edge_pub"):
        keys_for(no_edge, "detect")
    # The edge key configured where the detect worker's private key belongs.
    with pytest.raises(ConfigError, match="is the edge key; the detect role needs the detect key"):
        signer_for(dataclasses.replace(detect, private_key=str(keys / "edge.key")), ROLE_DETECT)
    # A private key that is not the one of the role's public key.
    with pytest.raises(ConfigError, match=r"does not match signing.detect_public_key"):
        signer_for(
            SigningConfig(
                private_key=str(keys / "operator.key"), detect_public_key=str(keys / "detect.pub")
            ),
            ROLE_DETECT,
        )
    foreign = Ed25519PrivateKey.generate()
    other = Verifier([TrustedKey(ROLE_DETECT, foreign.public_key())])
    assert other.roles() == {ROLE_DETECT}
    with pytest.raises(ConfigError, match="does not exist"):
        verifier_for(dataclasses.replace(detect, edge_public_key=str(keys / "nope.pub")), [])
    same = dataclasses.replace(detect, edge_public_key=str(keys / "detect.pub"))
    with pytest.raises(ConfigError, match="configured for both the edge and the detect role"):
        verifier_for(same, [ROLE_EDGE])


def test_the_shipped_configurations_document_the_signing_section() -> None:
    example = load_config(CONFIGS / "veil.yaml", env={}).signing
    assert example == SigningConfig(
        private_key="/keys",
        edge_public_key="/keys/edge.pub",
        detect_public_key="/keys/detect.pub",
        operator_public_key="/keys/operator.pub",
        required=True,
    )
    assert load_config(CONFIGS / "embedded.yaml", env={}).signing == SigningConfig()
    env = {"VEIL__SIGNING__PRIVATE_KEY": "/k/edge.key", "VEIL__SIGNING__REQUIRED": "true"}
    overridden = load_config(CONFIGS / "edge.yaml", env=env).signing
    assert overridden.private_key == "/k/edge.key" and overridden.required

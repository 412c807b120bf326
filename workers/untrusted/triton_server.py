"""Run the ``tritonserver`` binary of the ``nvidia-pytriton`` wheel on a model repository.

The wheel ships the server, the Python backend and one Python-backend stub per Python
version, but no ``pytorch_libtorch`` backend: here the tail is served by its Python-backend
model (``<name>_tail``); ``<name>_tail_ts`` needs the NGC Triton image.

Quirks handled here:

* the stub must sit in the backend folder, named ``triton_python_backend_stub``, and must match
  this interpreter's version; the wheel keeps the stubs apart, so a private backend folder of
  links is built per server;
* the stub links ``libpython3.X.so`` and loads the first one on the library path, so this
  interpreter's ``LIBDIR`` goes first on ``LD_LIBRARY_PATH`` (the wheel's own libraries after);
* the stub ignores PYTHONPATH; the exported ``model.py`` reads site-packages from its config
  and, as a fallback, from ``VEIL_TRITON_SITE_PACKAGES``, which is set to this interpreter's;
* the Python backend's shared-memory regions get a per-server name prefix, so that servers
  started side by side on one host do not collide.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from stream.broker import free_loopback_port
from stream.runtime import (
    MMAP_THRESHOLD_BYTES,
    TRIM_THRESHOLD_BYTES,
    die_with_parent,
    watch_child,
)
from veil.config import TritonTlsConfig
from veil.errors import ConfigError, ServiceError
from workers.untrusted.tail_client import grpc_client
from workers.untrusted.triton_repo import SITE_PACKAGES_ENV, THREADS_ENV, TailManifest

_LOG_TAIL_CHARS = 4000
_EXIT_TIMEOUT_S = 5  # Triton's own grace period for in-flight requests on shutdown


class TritonDistribution:
    """Paths inside the installed ``nvidia-pytriton`` wheel."""

    def __init__(self) -> None:
        spec = importlib.util.find_spec("pytriton")
        if spec is None or spec.origin is None:
            raise ConfigError(
                "the nvidia-pytriton package is not installed; it provides tritonserver"
            )
        package = Path(spec.origin).parent
        self.root = package / "tritonserver"
        self.binary = self.root / "bin" / "tritonserver"
        self.python_backend = self.root / "backends" / "python"
        self.caches = self.root / "caches"
        self.libs = package.parent / "nvidia_pytriton.libs"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        self.stub = self.root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not self.binary.is_file():
            raise ConfigError(f"tritonserver binary not found at {self.binary}")
        if not self.stub.is_file():
            raise ConfigError(
                f"nvidia-pytriton has no Python-backend stub for Python {version} ({self.stub})"
            )

    def backends(self) -> set[str]:
        """Backends the wheel ships (``python`` only, in 0.7.0)."""
        return {p.name for p in (self.root / "backends").iterdir() if p.is_dir()}


class EmbeddedTriton:
    """A ``tritonserver`` child process on free loopback ports, loading ``models`` explicitly.

    ``models`` defaults to the Python-backend models named in the repository's
    ``veil-model.json``: the clean tail and one per profile that has its own tail. Use
    ``async with EmbeddedTriton(repo) as server:`` or :meth:`start` / :meth:`stop`;
    ``server.grpc_url`` is what a client connects to.

    ``server_cert``/``server_key`` (PEM): gRPC over TLS only (``--grpc-use-ssl``);
    ``client_ca`` also requires client certificates that it signed (``--grpc-use-ssl-mutual``).
    ``client_tls`` is how clients connect (the CA that signed ``server_cert``, and a client
    certificate for mutual TLS): the readiness wait uses it, and so can callers
    (``server.client_tls``). The HTTP and metrics endpoints stay plaintext on loopback.
    """

    def __init__(
        self,
        model_repository: Path | str,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        *,
        models: Sequence[str] | None = None,
        startup_timeout_s: float = 180.0,
        stop_timeout_s: float = 30.0,
        log_verbose: int = 0,
        server_cert: Path | str | None = None,
        server_key: Path | str | None = None,
        client_ca: Path | str | None = None,
        client_tls: TritonTlsConfig | None = None,
        threads: int | None = None,
    ) -> None:
        if threads is not None and threads < 1:
            raise ConfigError(f"threads.triton must be at least 1, got {threads}")
        self.threads = threads  # torch threads of the Python models (None: torch's default)
        self._tls_flags = _tls_flags(server_cert, server_key, client_ca, client_tls)
        self.client_tls = client_tls if self._tls_flags else None
        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise ConfigError(f"model repository {self.model_repository} is not a folder")
        self.models = (
            list(models)
            if models is not None
            else TailManifest.read(self.model_repository).models("python")
        )
        if not self.models:
            raise ConfigError("EmbeddedTriton needs at least one model to load")
        self._distribution = TritonDistribution()
        self._check_models()
        self._requested_ports = (grpc_port, http_port, metrics_port)
        self.grpc_port = self.http_port = self.metrics_port = 0
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.log_verbose = log_verbose
        self.shm_region_prefix = f"veil-triton-{os.getpid()}-{uuid.uuid4().hex[:8]}-"
        self.startup_seconds: float | None = None
        self.returncode: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._log_path: Path | None = None
        self._started = 0.0  # monotonic time of launch()

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    async def start(self) -> None:
        """Start the server and wait until it and every model are ready."""
        self.launch()
        await self.wait_ready()

    def launch(self) -> None:
        """Start the server process (its ports are known from here on) without waiting for
        it: what starts beside it meanwhile, then :meth:`wait_ready`."""
        if self._process is not None:
            raise ServiceError("EmbeddedTriton was already started")
        self._started = time.monotonic()
        self._workdir = tempfile.TemporaryDirectory(prefix="veil-triton-")
        workdir = Path(self._workdir.name)
        backends = self._link_backends(workdir / "backends")
        self.grpc_port, self.http_port, self.metrics_port = (
            port or free_loopback_port() for port in self._requested_ports
        )
        self._log_path = workdir / "tritonserver.log"
        command = [
            str(self._distribution.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--cache-directory={self._distribution.caches}",
            "--model-control-mode=explicit",
            # config.pbtxt is complete: no stub launched only to ask model.py to fill it in.
            "--disable-auto-complete-config",
            *(f"--load-model={name}" for name in self.models),
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            "--strict-readiness=true",
            f"--exit-timeout-secs={_EXIT_TIMEOUT_S}",
            f"--log-verbose={self.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_region_prefix}",
            *self._tls_flags,
        ]
        with self._log_path.open("wb") as log:
            # Under the reaper: the server runs in a group of its own that dies with it and with
            # this process (kill -9 included), its Python backend stubs too.
            self._process = subprocess.Popen(
                [sys.executable, "-m", "stream.reaper", *command],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                preexec_fn=die_with_parent,
            )

    async def wait_ready(self) -> None:
        """Until the launched server and every model are ready; stopped if that fails."""
        try:
            await self._wait_ready(self._started + self.startup_timeout_s)
        except BaseException:
            await self.stop()
            raise
        self.startup_seconds = time.monotonic() - self._started

    async def stop(self) -> None:
        """Ask the server to exit (SIGTERM), kill it after ``stop_timeout_s``, clean up."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout_s
            while process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if process.poll() is None:
                process.send_signal(signal.SIGHUP)  # the reaper kills the server's whole group
                await asyncio.to_thread(process.wait)
        if process is not None:
            self.returncode = process.returncode
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    async def watch(self) -> None:
        """A stage for the runtime: raises ServiceError when the server process exits."""
        if self._process is None:
            raise ServiceError("EmbeddedTriton is not started")
        await watch_child(f"tritonserver on {self.grpc_url}", self._process, self.log_tail)

    def log_tail(self, chars: int = _LOG_TAIL_CHARS) -> str:
        """The end of the server's combined stdout and stderr."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_bytes()[-chars:].decode("utf-8", errors="replace")

    async def __aenter__(self) -> EmbeddedTriton:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    def _check_models(self) -> None:
        available = self._distribution.backends()
        for name in self.models:
            config_path = self.model_repository / name / "config.pbtxt"
            if not config_path.is_file():
                raise ConfigError(f"model {name!r}: {config_path} not found")
            config = _parse_config(config_path)
            backend = config.backend or _PLATFORM_BACKENDS.get(config.platform, config.platform)
            if backend not in available:
                raise ConfigError(
                    f"model {name!r} needs Triton's {backend!r} backend, which the "
                    f"nvidia-pytriton wheel does not ship (it has {sorted(available)}); serve it "
                    "from the NGC Triton image instead"
                )

    def _link_backends(self, backends: Path) -> Path:
        python = backends / "python"
        python.mkdir(parents=True)
        for item in self._distribution.python_backend.iterdir():
            if item.is_file():
                (python / item.name).symlink_to(item)
        (python / "triton_python_backend_stub").symlink_to(self._distribution.stub)
        return backends

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR")
        library_path = [str(libdir)] if libdir else []
        library_path.append(str(self._distribution.libs))
        if env.get("LD_LIBRARY_PATH"):
            library_path.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(library_path)
        paths = sysconfig.get_paths()
        env[SITE_PACKAGES_ENV] = os.pathsep.join(
            dict.fromkeys([paths["purelib"], paths["platlib"]])
        )
        if self.threads is not None:
            env[THREADS_ENV] = str(self.threads)
        # The server's own response buffers, as keep_freed_memory does for veil's processes.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD_BYTES))
        env.setdefault("MALLOC_TRIM_THRESHOLD_", str(TRIM_THRESHOLD_BYTES))
        return env

    async def _wait_ready(self, deadline: float) -> None:
        process = self._process
        assert process is not None
        async with grpc_client(self.grpc_url, self.client_tls) as client:
            while True:
                if process.poll() is not None:
                    raise ServiceError(
                        f"tritonserver exited with code {process.returncode} while starting "
                        f"(models {self.models}):\n{self.log_tail()}"
                    )
                if await _all_ready(client, self.models):
                    return
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"tritonserver was not ready after {self.startup_timeout_s:.0f} s "
                        f"(models {self.models}):\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.2)


_PLATFORM_BACKENDS = {
    "pytorch_libtorch": "pytorch",
    "onnxruntime_onnx": "onnxruntime",
    "tensorrt_plan": "tensorrt",
    "tensorflow_savedmodel": "tensorflow",
    "tensorflow_graphdef": "tensorflow",
}


def _tls_flags(
    server_cert: Path | str | None,
    server_key: Path | str | None,
    client_ca: Path | str | None,
    client_tls: TritonTlsConfig | None,
) -> list[str]:
    """tritonserver's gRPC TLS flags; [] for plaintext. Refuses settings that do not fit."""
    if server_cert is None and server_key is None:
        if client_ca is not None:
            raise ConfigError("EmbeddedTriton: client_ca (mutual TLS) needs server_cert/key")
        return []
    if server_cert is None or server_key is None:
        raise ConfigError("EmbeddedTriton: server_cert and server_key go together")
    if client_tls is None or not client_tls.enabled:
        raise ConfigError(
            "EmbeddedTriton: a TLS server needs client_tls (enabled, with the CA that signed "
            "server_cert) for its readiness wait"
        )
    if client_ca is not None and client_tls.cert_file is None:
        raise ConfigError("EmbeddedTriton: mutual TLS needs client_tls.cert_file/key_file")
    for path in (server_cert, server_key, client_ca):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"EmbeddedTriton TLS: {path} is not a file")
    mode = "--grpc-use-ssl-mutual=true" if client_ca is not None else "--grpc-use-ssl=true"
    flags = [mode, f"--grpc-server-cert={server_cert}", f"--grpc-server-key={server_key}"]
    return flags + ([f"--grpc-root-cert={client_ca}"] if client_ca is not None else [])


def _parse_config(path: Path) -> Any:
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"{path} is not a valid Triton model config: {exc}") from exc


async def _all_ready(client: Any, models: Sequence[str]) -> bool:
    try:
        if not await client.is_server_ready(client_timeout=2.0):
            return False
        for name in models:
            if not await client.is_model_ready(name, client_timeout=2.0):
                return False
    except InferenceServerException:
        return False  # not listening yet
    return True

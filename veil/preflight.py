"""Checks before anything starts: ports free, sources openable (files) or reachable (URLs),
weights and profile bank present. Each failure is one :class:`ConfigError` line naming the
problem and the setting, raised before any server or worker starts.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from urllib.parse import unquote, urlsplit

import av
import av.error

from stream.sources import LIVE_SCHEMES, redact_url
from veil.config import StreamConfig, VeilConfig
from veil.errors import ConfigError

# Default ports of the live schemes, for the reachability check of a URL without one.
_DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443}
REACH_TIMEOUT_S = 3.0


def check_port_free(host: str, port: int, setting: str) -> None:
    """ConfigError naming ``setting`` when nothing can listen on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As servers do: a port whose last connection is in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"{setting}: port {port} on {host} is already in use (choose another port "
                    "or stop what listens there)"
                ) from exc
            raise ConfigError(
                f"{setting}: cannot listen on {host}:{port} ({exc.strerror or exc})"
            ) from exc


def _live_address(url: str, setting: str) -> tuple[str, int]:
    parts = urlsplit(url)
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme.lower()]
    except ValueError as exc:
        raise ConfigError(f"{setting}: {redact_url(url)}: invalid port ({exc})") from exc
    if not parts.hostname:
        raise ConfigError(f"{setting}: {redact_url(url)} names no host")
    return parts.hostname, port


def check_reachable(url: str, setting: str, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """ConfigError when a camera's host:port accepts no TCP connection within ``timeout_s``."""
    host, port = _live_address(url, setting)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConfigError(
            f"{setting}: {redact_url(url)}: cannot reach {host}:{port} ({reason})"
        ) from exc


def probe_file(path: Path, setting: str) -> Fraction | None:
    """Open ``path``, decode its first frame; its frame rate (None when it declares none)."""
    if not path.exists():
        raise ConfigError(f"{setting}: {path}: file not found")
    if not path.is_file():
        raise ConfigError(f"{setting}: {path} is not a file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ConfigError(f"{setting}: {path} has no video stream")
            stream = container.streams.video[0]
            if next(container.decode(stream), None) is None:
                raise ConfigError(f"{setting}: {path} has no decodable frame")
            rate = stream.average_rate or stream.guessed_rate
    except (av.error.FFmpegError, OSError) as exc:
        raise ConfigError(f"{setting}: {path} is not a readable video ({exc})") from exc
    return Fraction(rate) if rate else None


def check_source(stream: StreamConfig) -> Fraction | None:
    """A file source opens and decodes (its frame rate is returned); a URL's host is reachable
    (None: a live source's rate is known only once it streams)."""
    setting = f"streams.{stream.id}.source"
    parts = urlsplit(stream.source)
    scheme = parts.scheme.lower()
    if scheme in LIVE_SCHEMES:
        check_reachable(stream.source, setting)
        return None
    if scheme in ("", "file") or len(scheme) == 1:  # one letter: a Windows drive
        return probe_file(Path(unquote(parts.path) if scheme == "file" else stream.source), setting)
    raise ConfigError(
        f"{setting}: unsupported URL scheme {scheme!r}; use a file path, rtsp://, rtsps://, "
        "http:// or https://"
    )


def check_sources(streams: Iterable[StreamConfig]) -> dict[str, Fraction | None]:
    """Every source checked; each stream's frame rate where its file declares one."""
    return {stream.id: check_source(stream) for stream in streams}


def check_http_port(config: VeilConfig) -> None:
    obs = config.observability
    if obs.http_port is not None and obs.http_port != 0:
        check_port_free(obs.http_host, obs.http_port, "observability.http_port")


def check_model_files(config: VeilConfig) -> None:
    """Weights and an explicitly named profile bank exist (the default bank is made on use)."""
    weights = config.model.weights
    if weights is not None and not Path(weights).is_file():
        raise ConfigError(f"model.weights: {weights}: file not found")
    bank = config.profile_bank
    needs_bank = any(s.alpha > 0 for s in config.streams)
    if bank is not None and needs_bank and not Path(bank).is_dir():
        raise ConfigError(f"profile_bank: {bank}: no such folder (veil calibrate --out writes one)")


def check_edge(config: VeilConfig) -> dict[str, Fraction | None]:
    """The trusted zone's checks (``veil edge``, ``veil run``): port, model files, sources."""
    check_http_port(config)
    check_model_files(config)
    return check_sources(config.streams)

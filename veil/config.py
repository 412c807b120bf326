"""Deployment configuration: one YAML file (configs/), every field overridable from the
environment as ``VEIL__SECTION__FIELD`` (lists by index: ``VEIL__STREAMS__0__ALPHA=0.9``).

Validation happens once, at load, and names the offending field.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from veil.errors import ConfigError

ENV_PREFIX = "VEIL__"
EMBEDDED = "embedded"


@dataclass(frozen=True)
class ModelConfig:
    name: str = "retinaface"
    weights: str | None = None  # checkpoint path; FaceBoxes needs one, RetinaFace ships its own
    geometry: str | None = None  # "WxH"; default: the model's own
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # How the edge runs the head (veil.detectors.head_runtime): torch (batch norm folded,
    # channels_last), onnxruntime (the same head exported to ONNX, CPU provider) or auto:
    # onnxruntime on a CPU where it is installed (on the 2-core reference host it ran the
    # FaceBoxes head at 1920x1088 in about half the time of torch), torch on a GPU. The
    # activation is the same to float rounding either way; the noise layer is always torch.
    head_runtime: Literal["auto", "torch", "onnxruntime"] = "auto"
    # The head's and the noise's arithmetic on the edge: float16 (torch only, the GPU's
    # setting) halves the head's memory traffic; the wire carries float16 or int8 either way.
    precision: Literal["float32", "float16"] = "float32"


# The roles whose compute has a thread count, and their weights in the default share.
THREAD_ROLES: dict[str, int] = {"edge": 2, "triton": 1, "detect": 1}


def host_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class ThreadsConfig:
    """Intra-op threads (torch's, and onnxruntime's for the head) per role, each set when the
    role starts: ``edge`` (letterbox, head, noise), ``detect`` (box decoding and NMS) and
    ``triton`` (the tail in the embedded tritonserver's Python model).

    Unset (the default), a role gets its share of the host's cores among the roles of its
    process group, weighted edge 2, triton 1, detect 1 (the head is the heaviest step, box
    decoding the lightest), at least 1: ``veil run`` on 2 cores gives each 1 and on 16 cores
    8/4/4; a role run alone (``veil edge``) takes every core. More threads than cores costs
    more than it gives: OpenMP threads spin against each other (two threads per process on two
    busy cores ran the pipeline at 4.4 fps against 5.6).
    """

    edge: int | None = None
    detect: int | None = None
    triton: int | None = None

    def __post_init__(self) -> None:
        for role in THREAD_ROLES:
            value = getattr(self, role)
            if value is not None and value < 1:
                raise ConfigError(f"threads.{role} must be at least 1, got {value}")

    def for_role(self, role: str, group: Collection[str], cores: int | None = None) -> int:
        """``role``'s threads when the roles of ``group`` share this host's ``cores``."""
        if role not in THREAD_ROLES:
            raise ConfigError(f"threads: no role {role!r}; known: {', '.join(THREAD_ROLES)}")
        configured: int | None = getattr(self, role)
        if configured is not None:
            return configured
        weights = sum(THREAD_ROLES[r] for r in {role, *group} if r in THREAD_ROLES)
        return max(1, (cores or host_cores()) * THREAD_ROLES[role] // weights)


@dataclass(frozen=True)
class StreamConfig:
    id: str
    source: str
    policy: Literal["realtime", "lossless"] = "realtime"
    alpha: float = 0.8
    loop: bool = False
    # The trusted zone's floor: no control record may set a weaker alpha (default: the
    # weakest calibrated profile); alpha 0 (clean) only with allow_clean.
    min_alpha: float | None = None
    allow_clean: bool = False
    # A file is read at its own frame rate, as a camera would deliver it; false: flat out.
    pace: bool = True


def check_stream(s: StreamConfig) -> None:
    """ConfigError naming the field of ``s`` that is out of range (config or HTTP API)."""
    if not s.id or not s.id.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"streams: id {s.id!r} must be letters, digits, '-', '_', '.'")
    if not 0.0 <= s.alpha <= 1.0:
        raise ConfigError(f"streams.{s.id}.alpha must be in [0, 1], got {s.alpha}")
    if s.min_alpha is not None and not 0.0 < s.min_alpha <= 1.0:
        raise ConfigError(f"streams.{s.id}.min_alpha must be in (0, 1], got {s.min_alpha}")


_TLS_PROTOCOLS = ("SSL", "SASL_SSL")


def _check_pair(where: str, cert_file: str | None, key_file: str | None) -> None:
    if (cert_file is None) != (key_file is None):
        raise ConfigError(f"{where}: cert_file and key_file go together (mutual TLS), set both")


@dataclass(frozen=True)
class KafkaSecurityConfig:
    """How every Kafka client connects: TLS (``SSL``), SASL, both (``SASL_SSL``) or neither.

    ``ca_file`` holds the CA certificates that signed the brokers' (None: the system's);
    ``cert_file``/``key_file`` a client certificate for mutual TLS. SASL reads its password from
    ``password_file`` when a client starts (a password never sits in the YAML).
    """

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    username: str | None = None
    password_file: str | None = None
    check_hostname: bool = True

    def __post_init__(self) -> None:
        where = "kafka.security"
        tls = self.protocol in _TLS_PROTOCOLS
        _check_pair(where, self.cert_file, self.key_file)
        if not tls and (self.ca_file or self.cert_file):
            raise ConfigError(
                f"{where}: ca_file/cert_file/key_file need protocol SSL or SASL_SSL, "
                f"not {self.protocol}"
            )
        sasl = (self.sasl_mechanism, self.username, self.password_file)
        if self.protocol.startswith("SASL_") and None in sasl:
            raise ConfigError(
                f"{where}: protocol {self.protocol} needs sasl_mechanism, username and "
                "password_file"
            )
        if not self.protocol.startswith("SASL_") and any(v is not None for v in sasl):
            raise ConfigError(
                f"{where}: sasl_mechanism/username/password_file need protocol SASL_PLAINTEXT "
                f"or SASL_SSL, not {self.protocol}"
            )

    @property
    def tls(self) -> bool:
        return self.protocol in _TLS_PROTOCOLS

    def password(self) -> str:
        """The SASL password: ``password_file``'s first line."""
        if self.password_file is None:
            raise ConfigError("kafka.security.password_file is not set")
        try:
            text = Path(self.password_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"kafka.security.password_file {self.password_file}: cannot read it "
                f"({exc.strerror or exc})"
            ) from exc
        password = text.splitlines()[0] if text else ""
        if not password:
            raise ConfigError(f"kafka.security.password_file {self.password_file} is empty")
        return password


@dataclass(frozen=True)
class TritonTlsConfig:
    """TLS to Triton's gRPC endpoint: ``ca_file`` holds the root certificates that signed the
    server's (None: gRPC's defaults); ``cert_file``/``key_file`` a client certificate, for a
    server started with ``--grpc-use-ssl-mutual=true``."""

    enabled: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        _check_pair("triton.tls", self.cert_file, self.key_file)
        if not self.enabled and (self.ca_file or self.cert_file):
            raise ConfigError("triton.tls: ca_file/cert_file/key_file need enabled: true")


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap: str = EMBEDDED  # "embedded" starts the bundled tansu broker
    idempotent: bool | None = None  # default: on for real Kafka, off for tansu (unsupported)
    # int8 (per-channel affine) halves the bytes; it lost at most 0.001 of FDDB AP (README).
    payload: Literal["float16", "int8"] = "int8"
    group_id: str = "veil-detect"
    max_request_size: int = 4 * 1024 * 1024
    topic_prefix: str = "veil"  # topics <prefix>.activations, .detections, .control, ...
    data_dir: str | None = None  # embedded broker only: topics and records in files, not memory
    # The detect group's session timeout; None: 3000 on the embedded broker, 10000 on Kafka.
    session_timeout_ms: int | None = None
    security: KafkaSecurityConfig = field(default_factory=KafkaSecurityConfig)


@dataclass(frozen=True)
class BatchingConfig:
    max_batch: int = 8
    max_wait_ms: float = 20.0
    cuda_streams: int = 2


@dataclass(frozen=True)
class TritonConfig:
    url: str = EMBEDDED  # "embedded" starts the bundled tritonserver on an exported repository
    # The folder `veil export --out` wrote; None: `veil run` exports under the cache folder.
    model_repository: str | None = None
    timeout_s: float = 30.0
    # Model ``veil detect`` calls; None = the repository's Python-backend ``<name>_tail``. The
    # NGC image serves ``<name>_tail_ts`` (pytorch_libtorch) instead.
    model: str | None = None
    tls: TritonTlsConfig = field(default_factory=TritonTlsConfig)
    # Tensors through system shared memory instead of inside the gRPC messages: "auto" where
    # the URL is loopback and the server accepts it (the embedded server; else gRPC with a
    # warning), "on" (a server on this host, else an error), "off".
    shared_memory: Literal["auto", "on", "off"] = "auto"


@dataclass(frozen=True)
class OutputConfig:
    jsonl: str | None = None  # detections, one JSON object per line
    annotated_dir: str | None = None  # one annotated MP4 per stream (veil run)
    # A live source's annotated video starts a new file past this size or this age.
    annotated_rotate_mb: float = 512.0
    annotated_rotate_s: float = 3600.0
    # A live MJPEG preview of the annotated streams on the HTTP port (veil run).
    preview: bool = False
    preview_fps: float = 10.0

    def __post_init__(self) -> None:
        if self.preview_fps <= 0:
            raise ConfigError("outputs.preview_fps must be > 0")
        if self.annotated_rotate_mb <= 0 or self.annotated_rotate_s <= 0:
            raise ConfigError("outputs: annotated_rotate_mb and annotated_rotate_s must be > 0")


@dataclass(frozen=True)
class ObservabilityConfig:
    log_format: Literal["console", "json"] = "console"
    log_level: str = "info"
    http_port: int | None = None  # /metrics, /healthz, /readyz; None = off
    http_host: str = "127.0.0.1"  # where they listen; 0.0.0.0 only when asked for
    failure_linger_s: float = 1.0  # after a fatal error /readyz answers 503 this long, then exit
    # The edge's HTTP API (/v1/..., same port): who may change streams, alphas and the bank:
    # loopback (peers on this host only), any (every peer that reaches http_host) or off
    # (read-only: GET only). Reading is open to whoever reaches the port, like /metrics.
    api_writes: Literal["loopback", "any", "off"] = "loopback"


@dataclass(frozen=True)
class SigningConfig:
    """Ed25519 keys (``veil keys init DIR``) of the records on Kafka (stream.signing)."""

    # This role's signing key: edge.key (veil edge), detect.key (veil detect), or the folder
    # `veil keys init` wrote (veil run: each role takes its own, and unset public keys are
    # read from <role>.pub there).
    private_key: str | None = None
    edge_public_key: str | None = None  # verifies activations (detect worker)
    detect_public_key: str | None = None  # verifies detections (their readers)
    operator_public_key: str | None = None  # verifies control records (edge)
    # true: refuse to start without keys; false with no key set: run unsigned, with a warning.
    required: bool = False


@dataclass(frozen=True)
class VeilConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    profile_bank: str | None = None  # default: a per-model folder under ~/.cache/veil
    streams: tuple[StreamConfig, ...] = ()
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    triton: TritonConfig = field(default_factory=TritonConfig)
    outputs: OutputConfig = field(default_factory=OutputConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    signing: SigningConfig = field(default_factory=SigningConfig)
    threads: ThreadsConfig = field(default_factory=ThreadsConfig)

    def __post_init__(self) -> None:
        ids = [s.id for s in self.streams]
        if len(ids) != len(set(ids)):
            raise ConfigError(f"streams: ids must be unique, got {ids}")
        for s in self.streams:
            check_stream(s)
        if self.batching.max_batch < 1 or self.batching.max_wait_ms < 0:
            raise ConfigError("batching: max_batch must be >= 1 and max_wait_ms >= 0")
        if self.batching.cuda_streams < 1:
            raise ConfigError("batching.cuda_streams must be >= 1")
        if self.outputs.preview and self.observability.http_port is None:
            raise ConfigError(
                "outputs.preview: the preview is served on observability.http_port, which is "
                "off (set a port, or 0 for a free one; `veil run --preview` picks one)"
            )


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors))
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(hint))}")
        return value
    if origin is tuple:
        (item,) = get_args(hint)[:1]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # VEIL__...=1 arrives YAML-parsed as 1
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return hint(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: expected a {hint.__name__}, got {value!r}") from exc
    if hint is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return str(value)
    return value


def _build(cls: Any, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"{where or 'config'}: unknown field(s) {sorted(unknown)}; known: {sorted(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from exc


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    for key, value in sorted(env.items()):
        if not key.startswith(ENV_PREFIX):
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        node: Any = data
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"{key}: no list item {part!r}")
                if last:
                    node[int(part)] = yaml.safe_load(value)
                else:
                    node = node[int(part)]
            else:
                if not isinstance(node, dict):
                    raise ConfigError(
                        f"{key}: {'.'.join(path[:i])} is a value, it has no field {part!r}"
                    )
                if last:
                    node[part] = yaml.safe_load(value) if value != "" else None
                else:
                    if node.get(part) is None:  # absent, or an empty YAML section
                        node[part] = {}
                    node = node[part]
    return data


def load_config(path: Path | str | None = None, env: Mapping[str, str] | None = None) -> VeilConfig:
    """Read YAML (optional), apply ``VEIL__...`` environment overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {p} does not exist") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p}: invalid YAML ({exc})") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
        data = loaded
    data = _apply_env(data, os.environ if env is None else env)
    config: VeilConfig = _build(VeilConfig, data, "")
    return config

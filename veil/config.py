"""Deployment configuration: one YAML file (configs/), every field overridable from the
environment as ``VEIL__SECTION__FIELD`` (lists by index: ``VEIL__STREAMS__0__ALPHA=0.9``).

Validation happens once, at load, and names the offending field.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Mapping
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


@dataclass(frozen=True)
class StreamConfig:
    id: str
    source: str
    policy: Literal["realtime", "lossless"] = "realtime"
    alpha: float = 0.8
    loop: bool = False


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap: str = EMBEDDED  # "embedded" starts the bundled tansu broker
    idempotent: bool | None = None  # default: on for real Kafka, off for tansu (unsupported)
    payload: Literal["float16", "int8"] = "float16"
    group_id: str = "veil-detect"
    max_request_size: int = 4 * 1024 * 1024
    topic_prefix: str = "veil"  # topics <prefix>.activations, .detections, .control, ...
    data_dir: str | None = None  # embedded broker only: topics and records in files, not memory


@dataclass(frozen=True)
class BatchingConfig:
    max_batch: int = 8
    max_wait_ms: float = 20.0
    cuda_streams: int = 2


@dataclass(frozen=True)
class TritonConfig:
    url: str = EMBEDDED  # "embedded" starts the bundled tritonserver on an exported repository
    model_repository: str = "runs/triton-repository"
    timeout_s: float = 30.0
    # Model ``veil detect`` calls; None = the repository's Python-backend ``<name>_tail``. The
    # NGC image serves ``<name>_tail_ts`` (pytorch_libtorch) instead.
    model: str | None = None


@dataclass(frozen=True)
class OutputConfig:
    jsonl: str | None = None  # detections, one JSON object per line
    annotated_dir: str | None = None  # one annotated MP4 per stream


@dataclass(frozen=True)
class ObservabilityConfig:
    log_format: Literal["console", "json"] = "console"
    log_level: str = "info"
    http_port: int | None = None  # /metrics, /healthz, /readyz; None = off
    http_host: str = "127.0.0.1"  # where they listen; 0.0.0.0 only when asked for
    failure_linger_s: float = 1.0  # after a fatal error /readyz answers 503 this long, then exit


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

    def __post_init__(self) -> None:
        ids = [s.id for s in self.streams]
        if len(ids) != len(set(ids)):
            raise ConfigError(f"streams: ids must be unique, got {ids}")
        for s in self.streams:
            if not s.id or not s.id.replace("-", "").replace("_", "").replace(".", "").isalnum():
                raise ConfigError(f"streams: id {s.id!r} must be letters, digits, '-', '_', '.'")
            if not 0.0 <= s.alpha <= 1.0:
                raise ConfigError(f"streams.{s.id}.alpha must be in [0, 1], got {s.alpha}")
        if self.batching.max_batch < 1 or self.batching.max_wait_ms < 0:
            raise ConfigError("batching: max_batch must be >= 1 and max_wait_ms >= 0")
        if self.batching.cuda_streams < 1:
            raise ConfigError("batching.cuda_streams must be >= 1")


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

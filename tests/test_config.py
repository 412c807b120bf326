"""configs/*.yaml load and validate; environment overrides; ConfigError messages name the
offending field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from veil.config import (
    BatchingConfig,
    KafkaConfig,
    KafkaSecurityConfig,
    ModelConfig,
    SigningConfig,
    StreamConfig,
    TritonConfig,
    TritonTlsConfig,
    VeilConfig,
    load_config,
)
from veil.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIGS.glob("*.yaml"))

TWO_STREAMS = """\
streams:
  - id: lobby
    source: rtsp://cam.local/stream1
    alpha: 0.8
  - id: archive
    source: /videos/a.mp4
    policy: lossless
"""


def write(tmp_path: Path, text: str, name: str = "veil.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> VeilConfig:
    return load_config(write(tmp_path, text), env={} if env is None else env)


# -- the shipped configuration files ---------------------------------------------------------


def test_the_expected_configuration_files_are_shipped() -> None:
    assert {p.name for p in CONFIG_FILES} >= {
        "veil.yaml",
        "embedded.yaml",
        "edge.yaml",
        "detect.yaml",
    }


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_shipped_file_loads_and_validates(path: Path) -> None:
    config = load_config(path, env={})
    assert isinstance(config, VeilConfig)
    assert config.model.name in ("retinaface", "faceboxes")
    assert all(0.0 <= s.alpha <= 1.0 for s in config.streams)


def test_example_has_a_realtime_camera_and_a_lossless_file() -> None:
    config = load_config(CONFIGS / "veil.yaml", env={})
    camera, recording = config.streams
    assert camera.source.startswith("rtsp://")
    assert camera.policy == "realtime"
    assert "://" not in recording.source
    assert recording.policy == "lossless"
    assert camera.alpha != recording.alpha  # alpha is set per stream
    assert config.kafka.bootstrap == "kafka:9092"
    assert config.triton.url == "triton:8001"
    assert config.triton.model == "faceboxes_tail_ts"
    assert config.model == ModelConfig("faceboxes", "/weights/FaceBoxesProd.pth", "1920x1088")


def test_example_sets_every_field_of_every_section() -> None:
    """veil.yaml documents the whole schema: no field is left to an implicit default."""
    import dataclasses

    import yaml

    data = yaml.safe_load((CONFIGS / "veil.yaml").read_text())
    assert set(data) == {f.name for f in dataclasses.fields(VeilConfig)}
    for section, cls in (
        ("model", ModelConfig),
        ("kafka", KafkaConfig),
        ("batching", BatchingConfig),
        ("triton", TritonConfig),
        ("kafka.security", KafkaSecurityConfig),
        ("triton.tls", TritonTlsConfig),
        ("signing", SigningConfig),
    ):
        node = data
        for part in section.split("."):  # "kafka.security": a section inside a section
            node = node[part]
        assert set(node) == {f.name for f in dataclasses.fields(cls)}, section
    for stream in data["streams"]:
        assert set(stream) == {f.name for f in dataclasses.fields(StreamConfig)}


def test_embedded_file_is_exactly_the_defaults_veil_run_uses() -> None:
    assert load_config(CONFIGS / "embedded.yaml", env={}) == VeilConfig()
    assert load_config(None, env={}) == VeilConfig()
    assert VeilConfig().kafka.bootstrap == "embedded"
    assert VeilConfig().triton.url == "embedded"


def test_deployment_roles_point_at_the_compose_services() -> None:
    edge = load_config(CONFIGS / "edge.yaml", env={})
    detect = load_config(CONFIGS / "detect.yaml", env={})
    assert edge.kafka.bootstrap == detect.kafka.bootstrap == "kafka:9092"
    assert edge.kafka.idempotent is True and detect.kafka.idempotent is True
    assert detect.triton.url == "triton:8001"
    assert detect.triton.model_repository == "/models"
    assert detect.triton.model == f"{edge.model.name}_tail_ts"
    assert [s.id for s in edge.streams] == ["lobby-cam", "archive-2024-05"]
    assert detect.streams == ()  # the outside has no sources


# -- environment overrides -------------------------------------------------------------------


def test_env_overrides_a_scalar(tmp_path: Path) -> None:
    config = load_text(tmp_path, "kafka:\n  bootstrap: a:9092\n", {"VEIL__KAFKA__BOOTSTRAP": "b:1"})
    assert config.kafka.bootstrap == "b:1"


def test_env_overrides_create_nested_sections_without_a_file() -> None:
    config = load_config(
        None,
        env={
            "VEIL__MODEL__DEVICE": "cuda:1",
            "VEIL__BATCHING__MAX_BATCH": "16",
            "VEIL__BATCHING__MAX_WAIT_MS": "5",
            "VEIL__TRITON__TIMEOUT_S": "2.5",
        },
    )
    assert config.model.device == "cuda:1"
    assert config.batching.max_batch == 16 and isinstance(config.batching.max_batch, int)
    assert config.batching.max_wait_ms == 5.0 and isinstance(config.batching.max_wait_ms, float)
    assert config.triton.timeout_s == 2.5
    assert config.model.name == "retinaface"  # untouched fields keep their defaults


def test_env_overrides_fill_an_empty_yaml_section(tmp_path: Path) -> None:
    config = load_text(tmp_path, "kafka:\n", {"VEIL__KAFKA__PAYLOAD": "int8"})
    assert config.kafka.payload == "int8"


def test_env_overrides_a_list_item_by_index(tmp_path: Path) -> None:
    config = load_text(
        tmp_path, TWO_STREAMS, {"VEIL__STREAMS__0__ALPHA": "0.9", "VEIL__STREAMS__1__ALPHA": "0.6"}
    )
    assert [s.alpha for s in config.streams] == [0.9, 0.6]
    assert config.streams[0].id == "lobby"  # the rest of the item is kept


def test_env_replaces_a_whole_list_item_or_list_with_yaml(tmp_path: Path) -> None:
    config = load_text(tmp_path, TWO_STREAMS, {"VEIL__STREAMS__1": "{id: new, source: b.mp4}"})
    assert config.streams[1] == StreamConfig(id="new", source="b.mp4")
    config = load_text(tmp_path, TWO_STREAMS, {"VEIL__STREAMS": "[{id: only, source: c.mp4}]"})
    assert [s.id for s in config.streams] == ["only"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("false", False), ("yes", True), ("no", False), ("1", True), ("0", False)],
)
def test_env_booleans(tmp_path: Path, text: str, expected: bool) -> None:
    config = load_text(
        tmp_path, TWO_STREAMS, {"VEIL__STREAMS__1__LOOP": text, "VEIL__KAFKA__IDEMPOTENT": text}
    )
    assert config.streams[1].loop is expected
    assert config.kafka.idempotent is expected


def test_env_empty_string_means_null(tmp_path: Path) -> None:
    text = "model:\n  weights: /w.pth\n  geometry: 640x480\nobservability:\n  http_port: 9100\n"
    config = load_text(
        tmp_path,
        text,
        {
            "VEIL__MODEL__WEIGHTS": "",
            "VEIL__OBSERVABILITY__HTTP_PORT": "",
            "VEIL__KAFKA__IDEMPOTENT": "",
        },
    )
    assert config.model.weights is None
    assert config.model.geometry == "640x480"
    assert config.observability.http_port is None
    assert config.kafka.idempotent is None


def test_env_keys_are_case_insensitive_and_other_variables_are_ignored(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        TWO_STREAMS,
        {"veil__kafka__group_id": "g2", "VEIL_KAFKA_GROUP_ID": "ignored", "PATH": "/bin"},
    )
    assert config.kafka.group_id == "veil-detect"  # lower-case prefix is not VEIL__
    config = load_text(tmp_path, TWO_STREAMS, {"VEIL__Kafka__Group_Id": "g3"})
    assert config.kafka.group_id == "g3"


def test_process_environment_is_read_when_env_is_not_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VEIL__STREAMS__0__ALPHA", "0.4")
    config = load_config(write(tmp_path, TWO_STREAMS))
    assert config.streams[0].alpha == 0.4


def test_env_override_is_validated_like_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"streams\.lobby\.alpha must be in \[0, 1\], got 1\.5"):
        load_text(tmp_path, TWO_STREAMS, {"VEIL__STREAMS__0__ALPHA": "1.5"})


# -- errors ----------------------------------------------------------------------------------


def test_unknown_field_is_named_with_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "kafka:\n  bootstrapp: kafka:9092\n")
    message = str(info.value)
    assert message.startswith("kafka: unknown field(s) ['bootstrapp']")
    known = re.search(r"known: \[(.*)\]", message)
    assert known is not None
    assert "'bootstrap'" in known.group(1) and "'max_request_size'" in known.group(1)


def test_unknown_top_level_section_and_stream_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config: unknown field\(s\) \['modle'\]; known: "):
        load_text(tmp_path, "modle:\n  name: faceboxes\n")
    with pytest.raises(ConfigError, match=r"^streams\[0\]: unknown field\(s\) \['alfa'\]"):
        load_text(tmp_path, "streams:\n  - {id: a, source: a.mp4, alfa: 0.5}\n")


def test_unknown_section_from_the_environment_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['kafak'\]"):
        load_text(tmp_path, TWO_STREAMS, {"VEIL__KAFAK__BOOTSTRAP": "x:1"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("batching:\n  max_batch: many\n", "batching.max_batch: expected a int, got 'many'"),
        ("batching:\n  max_wait_ms: true\n", "batching.max_wait_ms: expected a number, got True"),
        ("kafka:\n  idempotent: maybe\n", "kafka.idempotent: expected true or false, got 'maybe'"),
        ("streams:\n  - {id: a, source: a.mp4, loop: 2}\n", "streams[0].loop: expected true or"),
        ("kafka: 5\n", "kafka: expected a mapping, got int"),
        ("streams:\n  id: a\n", "streams: expected a list, got dict"),
        ("model:\n  name: [a, b]\n", "model.name: expected text, got ['a', 'b']"),
        ("observability:\n  http_port: eighty\n", "observability.http_port: expected a int"),
    ],
)
def test_wrong_type_names_the_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    assert message in str(info.value)


def test_missing_required_stream_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "streams:\n  - id: a\n")
    assert str(info.value).startswith("streams[0]: ")
    assert "'source'" in str(info.value)


@pytest.mark.parametrize("alpha", [1.5, -0.1])
def test_alpha_out_of_range_names_the_stream(tmp_path: Path, alpha: float) -> None:
    text = TWO_STREAMS.replace("alpha: 0.8", f"alpha: {alpha}")
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    assert str(info.value) == f"streams.lobby.alpha must be in [0, 1], got {alpha}"


def test_alpha_bounds_are_inclusive(tmp_path: Path) -> None:
    text = TWO_STREAMS.replace("alpha: 0.8", "alpha: 1")
    config = load_text(tmp_path, text, {"VEIL__STREAMS__1__ALPHA": "0"})
    assert [s.alpha for s in config.streams] == [1.0, 0.0]


def test_duplicate_stream_ids(tmp_path: Path) -> None:
    text = TWO_STREAMS.replace("id: archive", "id: lobby")
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    assert str(info.value) == "streams: ids must be unique, got ['lobby', 'lobby']"


def test_stream_id_characters(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"streams: id 'lobby cam' must be letters, digits"):
        load_text(tmp_path, TWO_STREAMS.replace("id: lobby", "id: lobby cam"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            TWO_STREAMS.replace("policy: lossless", "policy: fast"),
            "streams[1].policy: 'fast' is not one of ['realtime', 'lossless']",
        ),
        (
            "kafka:\n  payload: bf16\n",
            "kafka.payload: 'bf16' is not one of ['float16', 'int8']",
        ),
        (
            "observability:\n  log_format: xml\n",
            "observability.log_format: 'xml' is not one of ['console', 'json']",
        ),
    ],
)
def test_bad_literal_lists_the_allowed_values(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    assert str(info.value) == message


def test_batching_bounds(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"max_batch must be >= 1"):
        load_text(tmp_path, "batching:\n  max_batch: 0\n")
    with pytest.raises(ConfigError, match=r"max_wait_ms >= 0"):
        load_text(tmp_path, "batching:\n  max_wait_ms: -1\n")
    with pytest.raises(ConfigError, match=r"batching\.cuda_streams must be >= 1"):
        load_text(tmp_path, "batching:\n  cuda_streams: 0\n")


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  name: [faceboxes\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"config file {path}: invalid YAML (")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"config file {path}: top level must be a mapping"


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_text(tmp_path, "") == VeilConfig()


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"config file {path} does not exist"


@pytest.mark.parametrize("index", ["2", "first"])
def test_bad_env_list_index(tmp_path: Path, index: str) -> None:
    key = f"VEIL__STREAMS__{index}__ALPHA"
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, TWO_STREAMS, {key: "0.5"})
    assert str(info.value) == f"{key}: no list item {index.lower()!r}"


def test_env_cannot_descend_into_a_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, TWO_STREAMS, {"VEIL__STREAMS__0__ALPHA__MAX": "1"})
    assert (
        str(info.value)
        == "VEIL__STREAMS__0__ALPHA__MAX: streams.0.alpha is a value, it has no field 'max'"
    )


def test_a_preview_needs_the_http_port() -> None:
    from veil.config import ObservabilityConfig, OutputConfig

    with pytest.raises(ConfigError, match=r"outputs\.preview: .*http_port"):
        VeilConfig(outputs=OutputConfig(preview=True))
    VeilConfig(outputs=OutputConfig(preview=True), observability=ObservabilityConfig(http_port=0))
    with pytest.raises(ConfigError, match="preview_fps"):
        OutputConfig(preview_fps=0)

"""Exporting a tail as a Triton model repository (no server: see test_triton.py for that)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from google.protobuf import text_format
from torch import Tensor, nn
from tritonclient.grpc import model_config_pb2

from veil.detectors.base import InputGeometry, SplitDetector
from veil.detectors.boxes import decode_ssd
from veil.errors import ConfigError
from workers.untrusted.triton_repo import (
    MANIFEST_FILE,
    SITE_PACKAGES_PARAMETER,
    TailManifest,
    export_model_repository,
    python_model_source,
)

GEOMETRY = InputGeometry(128, 96)


class StandInDetector(SplitDetector):
    """A small split detector with landmarks: head stride 32, tail at strides 32 and 64."""

    name = "stand-in"
    weights_id = "0" * 64
    stride = 32
    activation_channels = 16
    mean_bgr = (104.0, 117.0, 123.0)
    default_geometry = GEOMETRY
    anchors = 2

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 8, stride=8)
        )
        norm = nn.BatchNorm2d(16)
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), norm, nn.ReLU())
        self.down = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.loc = nn.ModuleList(nn.Conv2d(16, self.anchors * 4, 1) for _ in range(2))
        self.conf = nn.ModuleList(nn.Conv2d(16, self.anchors * 2, 1) for _ in range(2))
        self.landmarks = nn.ModuleList(nn.Conv2d(16, self.anchors * 10, 1) for _ in range(2))
        assert norm.running_mean is not None and norm.running_var is not None
        with torch.no_grad():  # non-trivial running statistics, so that freezing folds them
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
        self.eval()

    def head(self, x: Tensor) -> Tensor:
        activation: Tensor = self.stem(x)
        return activation

    def tail(self, activation: Tensor) -> tuple[Tensor, ...]:
        first = self.body(activation)
        sources = [first, self.down(first)]
        n = activation.shape[0]
        out: list[list[Tensor]] = [[], [], []]
        for i, source in enumerate(sources):
            for j, (layer, width) in enumerate(
                ((self.loc[i], 4), (self.conf[i], 2), (self.landmarks[i], 10))
            ):
                out[j].append(layer(source).permute(0, 2, 3, 1).reshape(n, -1, width))
        return tuple(torch.cat(parts, dim=1) for parts in out)

    def priors(self, input_height: int, input_width: int, device: torch.device) -> Tensor:
        cells = []
        for step in (32, 64):
            ys, xs = torch.meshgrid(
                torch.arange(-(-input_height // step), device=device),
                torch.arange(-(-input_width // step), device=device),
                indexing="ij",
            )
            centres = torch.stack(
                [(xs + 0.5) * step / input_width, (ys + 0.5) * step / input_height], dim=-1
            ).reshape(-1, 1, 2)
            sizes = torch.tensor([[step / input_width, step / input_height]], device=device)
            sizes = torch.cat([sizes, 2 * sizes]).expand(len(centres), -1, -1)
            cells.append(torch.cat([centres.expand(-1, self.anchors, -1), sizes], -1))
        return torch.cat([c.reshape(-1, 4) for c in cells])

    def decode_raw(
        self, raw: Sequence[Tensor], input_height: int, input_width: int
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        priors = self.priors(input_height, input_width, raw[0].device)
        scale = torch.tensor([input_width, input_height] * 2, device=raw[0].device)
        boxes = decode_ssd(raw[0], priors, (0.1, 0.2)) * scale
        return boxes, raw[1].softmax(-1)[..., 1], None


class BatchOfTwoDetector(StandInDetector):
    """A tail that reads the batch size as a Python int, which the trace freezes at 2."""

    def tail(self, activation: Tensor) -> tuple[Tensor, ...]:
        loc, conf, landmarks = super().tail(activation)
        return loc.reshape(int(activation.shape[0]), -1, 4), conf, landmarks


@pytest.fixture(scope="module")
def detector() -> StandInDetector:
    return StandInDetector()


@pytest.fixture(scope="module")
def repository(detector: StandInDetector, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model_repository(
        detector, GEOMETRY, tmp_path_factory.mktemp("repo"), max_batch_size=8, instance_count=2
    )


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_manifest_describes_the_tail(detector: StandInDetector, repository: Path) -> None:
    manifest = TailManifest.read(repository)
    assert manifest.detector == "stand-in"
    assert manifest.weights_id == detector.weights_id
    assert manifest.geometry == GEOMETRY
    # 128x96 input at stride 32: a 16 x 3 x 4 activation; priors 2 per cell at 3x4 and 2x2.
    assert manifest.activation_shape == (16, 3, 4)
    assert manifest.output_names == ("loc", "conf", "landmarks")
    priors = 2 * (3 * 4 + 2 * 2)
    assert manifest.output_shapes == ((priors, 4), (priors, 2), (priors, 10))
    assert (manifest.python_model, manifest.torchscript_model) == (
        "stand_in_tail",
        "stand_in_tail_ts",
    )
    assert TailManifest.from_json(json.loads((repository / MANIFEST_FILE).read_text())) == manifest


def test_python_model_config(repository: Path) -> None:
    config = read_config(repository / "stand_in_tail" / "config.pbtxt")
    assert config.backend == "python"
    assert config.max_batch_size == 8
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(i.name, list(i.dims)) for i in config.input] == [("activation", [16, 3, 4])]
    assert [(o.name, list(o.dims)) for o in config.output] == [
        ("loc", [32, 4]),
        ("conf", [32, 2]),
        ("landmarks", [32, 10]),
    ]
    group = config.instance_group[0]
    assert (group.count, group.kind) == (2, model_config_pb2.ModelInstanceGroup.KIND_CPU)
    site_packages = config.parameters[SITE_PACKAGES_PARAMETER].string_value
    assert Path(torch.__file__).parents[1] == Path(site_packages.split(":")[0])
    assert (repository / "stand_in_tail" / "1" / "model.py").read_text() == python_model_source()


def test_libtorch_model_config_uses_indexed_names(repository: Path) -> None:
    config = read_config(repository / "stand_in_tail_ts" / "config.pbtxt")
    assert config.platform == "pytorch_libtorch"
    assert [i.name for i in config.input] == ["activation__0"]
    assert [o.name for o in config.output] == ["loc__0", "conf__1", "landmarks__2"]
    assert config.parameters["INFERENCE_MODE"].string_value == "true"
    ts_bytes = (repository / "stand_in_tail_ts" / "1" / "model.pt").read_bytes()
    assert ts_bytes == (repository / "stand_in_tail" / "1" / "tail.pt").read_bytes()


def test_gpu_instances(detector: StandInDetector, tmp_path: Path) -> None:
    export_model_repository(detector, GEOMETRY, tmp_path, device_kind="gpu")
    for model in ("stand_in_tail", "stand_in_tail_ts"):
        kind = read_config(tmp_path / model / "config.pbtxt").instance_group[0].kind
        assert kind == model_config_pb2.ModelInstanceGroup.KIND_GPU


def test_torchscript_matches_the_eager_tail_at_any_batch(
    detector: StandInDetector, repository: Path
) -> None:
    tail = torch.jit.load(str(repository / "stand_in_tail" / "1" / "tail.pt"))  # type: ignore[no-untyped-call]
    for batch in (1, 5):
        activation = torch.rand(batch, 16, 3, 4) * 3
        with torch.no_grad():
            expected = detector.tail(activation)
            got = tail(activation)
        assert len(got) == 3
        for e, g in zip(expected, got, strict=True):
            assert g.shape == e.shape
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_torchscript_holds_only_the_tail(detector: StandInDetector, repository: Path) -> None:
    tail = torch.jit.load(str(repository / "stand_in_tail" / "1" / "tail.pt"))  # type: ignore[no-untyped-call]
    assert not tail.state_dict()  # frozen: the weights it uses are graph constants
    stored = sorted(tuple(c.shape) for c in _graph_constants(tail))
    kernels = [(16, 16, 3, 3)] * 2 + [(8, 16, 1, 1)] * 2 + [(4, 16, 1, 1)] * 2
    assert [s for s in stored if len(s) == 4] == sorted(kernels + [(20, 16, 1, 1)] * 2)
    head_kernels = [tuple(p.shape) for p in detector.stem.parameters() if p.dim() == 4]
    assert head_kernels == [(8, 3, 3, 3), (16, 8, 8, 8)]


def _graph_constants(module: torch.jit.ScriptModule) -> list[Any]:
    return [
        node.output().toIValue()
        for node in module.inlined_graph.nodes()
        if node.kind() == "prim::Constant" and node.output().type().kind() == "TensorType"
    ]


def test_export_leaves_the_detector_alone(tmp_path: Path) -> None:
    detector = StandInDetector().train()
    export_model_repository(detector, GEOMETRY, tmp_path)
    assert detector.training
    assert all(p.requires_grad for p in detector.parameters())


def test_reexport_replaces_the_models(detector: StandInDetector, tmp_path: Path) -> None:
    export_model_repository(detector, GEOMETRY, tmp_path, max_batch_size=4)
    export_model_repository(detector, InputGeometry(64, 64), tmp_path, max_batch_size=2)
    manifest = TailManifest.read(tmp_path)
    assert (manifest.activation_shape, manifest.max_batch_size) == ((16, 2, 2), 2)
    assert read_config(tmp_path / "stand_in_tail" / "config.pbtxt").max_batch_size == 2


def test_a_tail_that_fixes_the_batch_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="traced tail differs from the eager one at batch 3"):
        export_model_repository(BatchOfTwoDetector(), GEOMETRY, tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be at least 1"),
        ({"device_kind": "tpu"}, "device_kind must be 'cpu' or 'gpu'"),
        ({"output_names": ["loc", "conf"]}, "must be 3 distinct names"),
        ({"output_names": ["loc", "conf", "lm__2"]}, "without '__'"),
        ({"model_name": "tail/../x"}, "may hold only letters"),
    ],
)
def test_bad_arguments(
    detector: StandInDetector, tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        export_model_repository(detector, GEOMETRY, tmp_path, **kwargs)  # type: ignore[arg-type]


def test_geometry_must_fit_the_stride(detector: StandInDetector, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="multiple of its stride 32"):
        export_model_repository(detector, InputGeometry(100, 96), tmp_path)


def test_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a veil tail repository"):
        TailManifest.read(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"format": "other/1"}))
    with pytest.raises(ConfigError, match="format 'other/1'"):
        TailManifest.read(tmp_path)

"""Exporting a tail as a Triton model repository, with a profile bank, and routing each message
to its profile's tail (no server: see test_triton.py and test_pipeline.py for that)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from torch import Tensor, nn
from tritonclient.grpc import model_config_pb2

from stream.kafka import KafkaLink
from stream.wire import (
    ActivationMessage,
    Envelope,
    FramePlacement,
    Provenance,
    decode_detection,
    encode,
)
from veil.detectors.base import InputGeometry, Letterbox, SplitDetector
from veil.detectors.boxes import decode_ssd
from veil.errors import ConfigError, ProfileError
from veil.noise import NoiseLayer
from veil.profiles import NoiseProfile, ProfileBank, ProfileMeta, profile_from_layer
from workers.untrusted.detect import DetectWorker
from workers.untrusted.tail_client import (
    ActivationArray,
    FloatArray,
    TailRouter,
    TritonTail,
    cast,
)
from workers.untrusted.triton_repo import (
    MANIFEST_FILE,
    PROFILE_PARAMETER,
    SITE_PACKAGES_PARAMETER,
    TAIL_SHA256_PARAMETER,
    TailManifest,
    TailRoute,
    export_model_repository,
    python_model_source,
)
from workers.untrusted.triton_server import EmbeddedTriton

GEOMETRY = InputGeometry(128, 96)


class StandInDetector(SplitDetector):
    """A small split detector with landmarks: head stride 32, tail at strides 32 and 64."""

    name = "stand-in"
    head_modules = ("stem",)
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
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
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
            assert g.dtype == torch.float16  # the response's bytes halved
            torch.testing.assert_close(g.float(), e, rtol=2e-3, atol=1e-4)  # float16 rounding


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


def test_a_repository_an_older_veil_wrote_is_exported_again(
    detector: StandInDetector, tmp_path: Path
) -> None:
    from veil.runner import export_tail

    export_tail(detector, GEOMETRY, tmp_path)
    model_py = tmp_path / "stand_in_tail" / "1" / "model.py"
    assert TailManifest.read(tmp_path).python_models_current(tmp_path)
    model_py.write_text(model_py.read_text().replace("WARM_BATCHES = 4", "WARM_BATCHES = 2"))
    assert not TailManifest.read(tmp_path).python_models_current(tmp_path)
    export_tail(detector, GEOMETRY, tmp_path)
    assert "WARM_BATCHES = 4" in model_py.read_text()


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


# --- A profile bank: one model per profile that carries its own tail --------------------------

ACTIVATION = (16, 3, 4)  # StandInDetector at GEOMETRY


def perturbed_tail(detector: SplitDetector, scale: float = 1.5) -> dict[str, Tensor]:
    """The detector's tail state with every conv kernel changed deterministically."""
    return {
        k: v * scale + 0.05 if k.endswith("weight") and v.dim() == 4 else v.clone()
        for k, v in detector.tail_state().items()
    }


def make_profile(
    alpha: float,
    sigma: float,
    tail: dict[str, Tensor] | None = None,
    **meta: Any,
) -> NoiseProfile:
    layer = NoiseLayer(ACTIVATION, 0.0, 1.0, initial_sigma=sigma)
    fields: dict[str, Any] = {
        "model": "stand-in",
        "weights_id": "0" * 64,
        "geometry": str(GEOMETRY),
        "activation_shape": ACTIVATION,
        "alpha": alpha,
        "s_min": 0.0,
        "s_max": 1.0,
    } | meta
    return profile_from_layer(layer, ProfileMeta(**fields), tail)


@pytest.fixture(scope="module")
def bank_profiles(detector: StandInDetector) -> tuple[NoiseProfile, NoiseProfile]:
    """(alpha 0.5 without a tail, alpha 0.8 with a tuned tail)."""
    return make_profile(0.5, 0.1), make_profile(0.8, 0.2, perturbed_tail(detector))


@pytest.fixture(scope="module")
def bank_repository(
    bank_profiles: tuple[NoiseProfile, NoiseProfile], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    bank = ProfileBank(tmp_path_factory.mktemp("bank"))
    for profile in bank_profiles:
        bank.save(profile)
    return export_model_repository(
        StandInDetector(), GEOMETRY, tmp_path_factory.mktemp("bank-repo"), bank=bank.root
    )


def test_a_bank_export_routes_each_profile_to_its_tail(
    bank_profiles: tuple[NoiseProfile, NoiseProfile], bank_repository: Path
) -> None:
    plain, tuned = bank_profiles
    manifest = TailManifest.read(bank_repository)
    tuned_model = f"stand_in_tail_{tuned.profile_id}"
    routes = manifest.profile_routes()
    assert set(routes) == {"none", plain.profile_id, tuned.profile_id}
    assert (routes["none"].python, routes["none"].torchscript) == (
        "stand_in_tail",
        "stand_in_tail_ts",
    )
    assert routes[plain.profile_id] == dataclasses.replace(routes["none"], alpha=0.5)
    assert (routes[tuned.profile_id].python, routes[tuned.profile_id].torchscript) == (
        tuned_model,
        f"{tuned_model}_ts",
    )
    assert routes[tuned.profile_id].alpha == 0.8
    assert manifest.models("python") == ["stand_in_tail", tuned_model]
    assert manifest.backend_of(f"{tuned_model}_ts") == "torchscript"
    assert manifest.route("0123456789abcdef") is None
    on_disk = json.loads((bank_repository / MANIFEST_FILE).read_text())
    assert on_disk["format"] == "veil-tail-repository/2"
    assert on_disk["profiles"][tuned.profile_id]["python"] == tuned_model
    assert TailManifest.from_json(on_disk) == manifest
    # The embedded server loads the clean tail and every tuned one.
    assert EmbeddedTriton(bank_repository).models == ["stand_in_tail", tuned_model]


def test_the_tuned_model_runs_the_profile_tail_not_the_clean_one(
    detector: StandInDetector,
    bank_profiles: tuple[NoiseProfile, NoiseProfile],
    bank_repository: Path,
) -> None:
    tuned = bank_profiles[1]
    model = f"stand_in_tail_{tuned.profile_id}"
    config = read_config(bank_repository / model / "config.pbtxt")
    route = TailManifest.read(bank_repository).profile_routes()[tuned.profile_id]
    assert config.parameters[PROFILE_PARAMETER].string_value == tuned.profile_id
    assert config.parameters[TAIL_SHA256_PARAMETER].string_value == route.torchscript_sha256
    ts = read_config(bank_repository / f"{model}_ts" / "config.pbtxt")
    assert ts.platform == "pytorch_libtorch"
    assert [o.name for o in ts.output] == ["loc__0", "conf__1", "landmarks__2"]
    script = torch.jit.load(str(bank_repository / model / "1" / "tail.pt"))  # type: ignore[no-untyped-call]
    activation = torch.rand(2, *ACTIVATION) * 3
    with torch.no_grad():
        expected = tuned.detector_for(detector).tail(activation)
        clean = detector.tail(activation)
        got = script(activation)
    for e, c, g in zip(expected, clean, got, strict=True):
        torch.testing.assert_close(g.float(), e, rtol=2e-3, atol=1e-4)  # float16 rounding
        assert float((g.float() - c).abs().max()) > 0.1


def test_reexport_without_the_bank_removes_the_profile_models(
    bank_profiles: tuple[NoiseProfile, NoiseProfile], tmp_path: Path
) -> None:
    detector = StandInDetector()
    export_model_repository(detector, GEOMETRY, tmp_path, profiles=bank_profiles)
    tuned_model = f"stand_in_tail_{bank_profiles[1].profile_id}"
    assert (tmp_path / tuned_model).is_dir() and (tmp_path / f"{tuned_model}_ts").is_dir()
    export_model_repository(detector, GEOMETRY, tmp_path)
    assert not (tmp_path / tuned_model).exists() and not (tmp_path / f"{tuned_model}_ts").exists()
    assert set(TailManifest.read(tmp_path).profile_routes()) == {"none"}


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"geometry": "64x64"}, r"does not fit: geometry 64x64 \(serving 128x96\)"),
        ({"weights_id": "f" * 64}, r"does not fit: weights ffffffffffff \(serving 000000000000\)"),
        ({"model": "retinaface"}, r"does not fit: model 'retinaface' \(serving 'stand-in'\)"),
    ],
)
def test_a_bank_for_another_model_is_refused_naming_the_mismatch(
    tmp_path: Path, meta: dict[str, Any], message: str
) -> None:
    ProfileBank(tmp_path / "bank").save(make_profile(0.5, 0.1, **meta))
    with pytest.raises(ProfileError, match=message):
        export_model_repository(
            StandInDetector(), GEOMETRY, tmp_path / "repo", bank=tmp_path / "bank"
        )
    assert not (tmp_path / "repo").exists()  # refused before anything is written


def test_a_missing_bank_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"profile bank .*nowhere is not a folder"):
        export_model_repository(StandInDetector(), GEOMETRY, tmp_path, bank=tmp_path / "nowhere")


def test_a_format_1_manifest_serves_the_clean_tail_only(repository: Path) -> None:
    data = json.loads((repository / MANIFEST_FILE).read_text())
    data["format"] = "veil-tail-repository/1"
    del data["profiles"]
    manifest = TailManifest.from_json(data)
    assert manifest.profile_routes() == {
        "none": TailRoute("stand_in_tail", "stand_in_tail_ts", manifest.torchscript_sha256)
    }


# --- Routing in the detect worker (fake Triton and Kafka: the real ones are in test_pipeline) --


class FakeTail(TritonTail):
    """Runs a detector's tail in-process and records the rows it was sent."""

    def __init__(self, model_name: str, detector: SplitDetector) -> None:
        super().__init__("fake:0", model_name)
        self.detector = detector
        self.batches: list[list[int]] = []  # the sequence numbers (payload values) per call
        self.started = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False

    async def infer(self, activations: ActivationArray) -> tuple[FloatArray, ...]:
        self.batches.append([int(a.flat[0]) for a in activations])
        with torch.no_grad():
            tail = self.detector.tail(torch.from_numpy(activations).float())
            return tuple(o.numpy() for o in tail)


@dataclasses.dataclass
class FakeRecord:
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    offset: int
    topic: str = "veil.activations"
    partition: int = 0


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes, list[tuple[str, bytes]]]] = []

    async def send_and_wait(self, topic: str, value: bytes, key: bytes, headers: Any) -> None:
        self.sent.append((topic, key, value, list(headers)))

    async def send(
        self, topic: str, value: bytes, key: bytes, headers: Any, partition: int | None = None
    ) -> Any:
        await self.send_and_wait(topic, value, key, headers)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


class FakeConsumer:
    def __init__(self) -> None:
        self.commits: list[dict[Any, int]] = []

    async def commit(self, offsets: dict[Any, int]) -> None:
        self.commits.append(offsets)


def activation_record(seq: int, profile_id: str) -> FakeRecord:
    msg = ActivationMessage(
        Envelope("s", seq, None, 0.0),
        Provenance("stand-in", "0" * 64, profile_id, 0.0 if profile_id == "none" else 0.5),
        placement=FramePlacement.from_letterbox(Letterbox(1.0, 128, 96), GEOMETRY),
        payload=np.full(ACTIVATION, float(seq), dtype=np.float32),
    )
    key, value, headers = encode(msg)
    return FakeRecord(key, value, list(headers), offset=seq)


async def test_a_mixed_batch_is_split_per_profile_model_and_unknown_profiles_are_dead_letters(
    detector: StandInDetector,
    bank_profiles: tuple[NoiseProfile, NoiseProfile],
    bank_repository: Path,
) -> None:
    plain, tuned = bank_profiles
    manifest = TailManifest.read(bank_repository)
    clean_tail = FakeTail("stand_in_tail", detector)
    tuned_tail = FakeTail(f"stand_in_tail_{tuned.profile_id}", tuned.detector_for(detector))
    routes = {pid: route.python for pid, route in manifest.profile_routes().items()}
    router = TailRouter({t.model_name: t for t in (clean_tail, tuned_tail)}, routes)
    worker = DetectWorker(KafkaLink("unused:0", False), router, detector, manifest)
    worker._producer, worker._consumer = FakeProducer(), FakeConsumer()
    await router.start()
    assert clean_tail.started and tuned_tail.started
    profile_of = ["none", tuned.profile_id, "feedfacefeedface", tuned.profile_id, plain.profile_id]
    await worker.handle([activation_record(i, p) for i, p in enumerate(profile_of)])

    assert clean_tail.batches == [[0, 4]]  # clean and the profile without a tail
    assert tuned_tail.batches == [[1, 3]]
    assert worker.stats.dead_letters == 1 and worker.stats.published == 4
    sent = worker._producer.sent
    dead = [(key, dict(headers)) for topic, key, _, headers in sent if topic == "veil.deadletter"]
    assert len(dead) == 1
    assert dead[0][1]["veil-error"].decode().startswith("unknown profile feedfacefeedface")
    published = [
        decode_detection(key, value, headers)
        for topic, key, value, headers in sent
        if topic == "veil.detections"
    ]
    assert [(d.sequence, d.profile_id) for d in published] == [
        (i, p) for i, p in enumerate(profile_of) if i != 2
    ]
    assert list(worker._consumer.commits[-1].values()) == [5]  # the dead letter too


def test_a_router_from_one_tail_serves_every_profile_with_that_backend(
    bank_profiles: tuple[NoiseProfile, NoiseProfile], bank_repository: Path
) -> None:
    plain, tuned = bank_profiles
    manifest = TailManifest.read(bank_repository)
    given = TritonTail("127.0.0.1:1", "stand_in_tail_ts", manifest, timeout_s=3.0)
    router = TailRouter.from_manifest(given, manifest)
    tuned_model = f"stand_in_tail_{tuned.profile_id}_ts"
    assert router.model_for("none") == router.model_for(plain.profile_id) == "stand_in_tail_ts"
    assert router.model_for(tuned.profile_id) == tuned_model
    assert router.model_for("feedfacefeedface") is None
    assert router.tails["stand_in_tail_ts"] is given
    sibling = router.tails[tuned_model]
    assert (sibling.url, sibling.timeout_s, sibling.manifest) == (given.url, 3.0, manifest)
    with pytest.raises(ConfigError, match="'other_tail' is not a tail of the repository"):
        TailRouter.from_manifest(TritonTail("127.0.0.1:1", "other_tail"), manifest)


def test_cast_converts_read_only_float16_exactly_and_keeps_what_already_fits() -> None:
    rng = np.random.default_rng(0)
    half = rng.normal(size=(2, 300, 4)).astype(np.float16)
    half.setflags(write=False)  # as tritonclient's as_numpy returns a response buffer
    single = cast(half, np.float32)
    assert single.dtype == np.float32 and single.flags.c_contiguous and single.flags.writeable
    np.testing.assert_array_equal(single, half.astype(np.float32))
    back = cast(single[:, ::2], np.float16)  # a strided view is made contiguous
    assert back.flags.c_contiguous
    np.testing.assert_array_equal(back, half[:, ::2])
    assert cast(single, np.float32) is single

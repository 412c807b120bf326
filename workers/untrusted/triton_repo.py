"""Export a detector's tail as a Triton model repository.

Two models serve the same TorchScript of the tail; both take the activation in FP16, as it
travels on the wire (the TorchScript casts it to float32 first), compute in float32 and return
FP16 (half the response's bytes: measured, FaceBoxes at 1920x1088 returns 1 MB a frame in FP32,
and a batch of 4 spent 2.8 ms in Triton's output copy and 5.9 ms in transport):

* ``<name>_tail``: Python backend (the only backend in the ``nvidia-pytriton`` wheel that
  :mod:`workers.untrusted.triton_server` runs); ``1/model.py`` runs ``1/tail.pt`` with torch.
* ``<name>_tail_ts``: the ``pytorch_libtorch`` backend of the NGC Triton image. That backend
  binds tensors by the ``<name>__<index>`` convention, so its tensors are ``activation__0``,
  ``loc__0``, ``conf__1``, ... where the Python model has ``activation``, ``loc``, ``conf``.

Exported with a profile bank, the repository also holds one such pair per profile that carries
its own fine-tuned tail, named ``<name>_tail_<profile_id>`` and ``<name>_tail_<profile_id>_ts``;
profiles without a tail are read by the clean tail.

``veil-model.json`` at the repository root (:class:`TailManifest`) records which detector,
weights and geometry the repository serves, and which model reads each profile's activations
(``profiles``: profile id -> models, ``"none"`` -> the clean tail), so that a client can check
that it talks to the tail it expects and route every message to its profile's tail.

The TorchScript is traced from a CPU copy of the detector and frozen: freezing inlines the
parameters the tail uses and drops the head's, which therefore never leave the trusted zone.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import re
import shutil
import sys
import sysconfig
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from google.protobuf import text_format
from torch import Tensor, nn
from tritonclient.grpc import model_config_pb2

from stream.runtime import MALLOPT_SETTINGS
from stream.wire import CLEAN_PROFILE
from veil.detectors.base import InputGeometry, SplitDetector, file_sha256
from veil.errors import ConfigError
from veil.profiles import NoiseProfile, ProfileBank

MANIFEST_FILE = "veil-model.json"
MANIFEST_FORMAT = "veil-tail-repository/2"
_READABLE_FORMATS = ("veil-tail-repository/1", MANIFEST_FORMAT)  # 1: no profiles
TORCHSCRIPT_FILE = "tail.pt"
PYTHON_MODEL_FILE = "model.py"
WARM_BATCHES = 4  # the Python model runs batches of 1 to this many at start (model.py)
LIBTORCH_MODEL_FILE = "model.pt"  # the file name the pytorch_libtorch backend loads
INPUT_NAME = "activation"
DEFAULT_OUTPUT_NAMES = ("loc", "conf", "landmarks")
# config.pbtxt parameters; the client reads the veil_* ones back to check the tail it talks to.
SITE_PACKAGES_PARAMETER = "veil_site_packages"
SITE_PACKAGES_ENV = "VEIL_TRITON_SITE_PACKAGES"
# Torch threads of the Python model (threads.triton, set by EmbeddedTriton); unset: torch's.
THREADS_ENV = "VEIL_TRITON_THREADS"
WEIGHTS_ID_PARAMETER = "veil_weights_id"
DETECTOR_PARAMETER = "veil_detector"
GEOMETRY_PARAMETER = "veil_geometry"
PROFILE_PARAMETER = "veil_profile"
TAIL_SHA256_PARAMETER = "veil_tail_sha256"

DeviceKind = Literal["cpu", "gpu"]

_TRACE_BATCH = 2  # not 1, so that a batch dimension hard-coded by the trace shows up below
_CHECK_BATCH = 3
_TRACE_TOLERANCE = 1e-4  # absolute, beside the float16 output's relative rounding:
_OUTPUT_RTOL = 2e-3  # two float16 half-ulps (2^-11 each)


Backend = Literal["python", "torchscript"]
BACKENDS: tuple[Backend, ...] = ("python", "torchscript")


@dataclass(frozen=True)
class TailRoute:
    """The two models (one per backend) that read one profile's activations."""

    python: str
    torchscript: str
    torchscript_sha256: str
    alpha: float = 0.0  # the profile's alpha (0 for the clean tail); for people reading the file

    def model(self, backend: Backend) -> str:
        return self.python if backend == "python" else self.torchscript

    def to_json(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "python": self.python,
            "torchscript": self.torchscript,
            "torchscript_sha256": self.torchscript_sha256,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TailRoute:
        return cls(
            python=str(data["python"]),
            torchscript=str(data["torchscript"]),
            torchscript_sha256=str(data["torchscript_sha256"]),
            alpha=float(data.get("alpha", 0.0)),
        )


Routes = Mapping[str, "TailRoute"]


@dataclass(frozen=True)
class TailManifest:
    """What a tail repository serves: the contents of its ``veil-model.json``.

    ``python_model`` / ``torchscript_model`` are the clean tail; ``routes`` maps every profile
    id the repository serves (``"none"`` included) to the models that read its activations.
    """

    detector: str
    weights_id: str
    geometry: InputGeometry
    activation_shape: tuple[int, int, int]
    output_names: tuple[str, ...]
    output_shapes: tuple[tuple[int, ...], ...]
    max_batch_size: int
    python_model: str
    torchscript_model: str
    torchscript_sha256: str
    routes: Mapping[str, TailRoute] = field(default_factory=dict)

    @classmethod
    def of(
        cls, detector: SplitDetector, geometry: InputGeometry, plan: _ExportPlan, routes: Routes
    ) -> TailManifest:
        """The manifest of an export: ``routes`` holds the clean tail's under ``"none"``."""
        clean = routes[CLEAN_PROFILE]
        return cls(
            detector=detector.name,
            weights_id=detector.weights_id,
            geometry=geometry,
            activation_shape=plan.common.activation_shape,
            output_names=plan.output_names,
            output_shapes=plan.common.output_shapes,
            max_batch_size=plan.common.max_batch_size,
            python_model=clean.python,
            torchscript_model=clean.torchscript,
            torchscript_sha256=clean.torchscript_sha256,
            routes=routes,
        )

    def clean_route(self) -> TailRoute:
        return TailRoute(self.python_model, self.torchscript_model, self.torchscript_sha256)

    def profile_routes(self) -> dict[str, TailRoute]:
        """Profile id -> models, always with ``"none"`` (the clean tail)."""
        return {CLEAN_PROFILE: self.clean_route(), **self.routes}

    def route(self, profile_id: str) -> TailRoute | None:
        """The models for ``profile_id``, or None if the repository does not serve it."""
        return self.profile_routes().get(profile_id)

    def backend_of(self, model: str) -> Backend | None:
        """Which backend's models ``model`` is one of (None: not a model of this repository)."""
        for route in self.profile_routes().values():
            for backend in BACKENDS:
                if route.model(backend) == model:
                    return backend
        return None

    def models(self, backend: Backend) -> list[str]:
        """Every model of ``backend`` that the routes name, the clean tail first."""
        return list(dict.fromkeys(r.model(backend) for r in self.profile_routes().values()))

    def python_models_current(self, repository: Path) -> bool:
        """Whether every Python model in ``repository`` runs this veil's ``model.py``."""
        source = python_model_source()
        for model in self.models("python"):
            path = Path(repository) / model / "1" / PYTHON_MODEL_FILE
            if not path.is_file() or path.read_text() != source:
                return False
        return True

    def torchscript_sha256_of(self, model: str) -> str | None:
        for route in self.profile_routes().values():
            if model in (route.python, route.torchscript):
                return route.torchscript_sha256
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "detector": self.detector,
            "weights_id": self.weights_id,
            "geometry": str(self.geometry),
            "activation_shape": list(self.activation_shape),
            "output_names": list(self.output_names),
            "output_shapes": [list(shape) for shape in self.output_shapes],
            "max_batch_size": self.max_batch_size,
            "models": {"python": self.python_model, "torchscript": self.torchscript_model},
            "torchscript_sha256": self.torchscript_sha256,
            "profiles": {pid: r.to_json() for pid, r in self.profile_routes().items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TailManifest:
        if data.get("format") not in _READABLE_FORMATS:
            raise ConfigError(
                f"{MANIFEST_FILE}: format {data.get('format')!r} is not {MANIFEST_FORMAT!r}"
            )
        try:
            c, h, w = (int(v) for v in data["activation_shape"])
            profiles = data.get("profiles", {})  # format 1: the clean tail only
            return cls(
                detector=str(data["detector"]),
                weights_id=str(data["weights_id"]),
                geometry=InputGeometry.parse(str(data["geometry"])),
                activation_shape=(c, h, w),
                output_names=tuple(str(n) for n in data["output_names"]),
                output_shapes=tuple(tuple(int(d) for d in s) for s in data["output_shapes"]),
                max_batch_size=int(data["max_batch_size"]),
                python_model=str(data["models"]["python"]),
                torchscript_model=str(data["models"]["torchscript"]),
                torchscript_sha256=str(data["torchscript_sha256"]),
                routes={str(pid): TailRoute.from_json(r) for pid, r in profiles.items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{MANIFEST_FILE} is malformed: {exc!r}") from exc

    def write(self, repository: Path) -> Path:
        path = repository / MANIFEST_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, repository: Path | str) -> TailManifest:
        """Read ``veil-model.json`` from a repository folder (or the file itself)."""
        path = Path(repository)
        if path.is_dir():
            path = path / MANIFEST_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"{path} not found: not a veil tail repository") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_json(data)


class _Tail(nn.Module):
    """The tail as a module's ``forward``, which is what tracing and Triton call: it takes
    the float16 activation as it travelled on the wire, computes in float32 and returns
    float16."""

    def __init__(self, detector: SplitDetector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, activation: Tensor) -> tuple[Tensor, ...]:
        return tuple(out.half() for out in self.detector.tail(activation.float()))


def export_model_repository(
    detector: SplitDetector,
    geometry: InputGeometry,
    out_dir: Path | str,
    *,
    bank: ProfileBank | Path | str | None = None,
    profiles: Sequence[NoiseProfile] = (),
    max_batch_size: int = 16,
    max_queue_delay_us: int = 0,
    instance_count: int = 1,
    device_kind: DeviceKind = "cpu",
    model_name: str | None = None,
    output_names: Sequence[str] | None = None,
) -> Path:
    """Write a Triton model repository serving ``detector``'s tail at ``geometry``.

    ``model_name`` defaults to ``<detector.name>_tail``; ``output_names`` to ``loc``, ``conf``,
    ``landmarks`` in the order the tail returns them. Every profile of ``bank`` (a folder or a
    :class:`ProfileBank`) and of ``profiles`` that carries a fine-tuned tail gets its own two
    models, ``<model_name>_<profile_id>[_ts]``; the others are read by the clean tail. A profile
    for another model, weights or geometry is refused (:class:`ProfileError`, naming the
    mismatch). Re-exporting into the same folder replaces the models and the manifest (and
    removes profile models that are no longer served). Returns ``out_dir``.

    ``max_queue_delay_us``: how long Triton's dynamic batcher waits for more requests; 0 (the
    default) batches only what is queued already. The detect worker sends whole batches, and
    Triton's statistics showed a 2 ms delay as 2.1 ms of queueing in every request (RetinaFace
    at 640x640, 22.1 ms per request; 20.1 ms with 0).
    """
    _check_export_arguments(max_batch_size, max_queue_delay_us, instance_count, device_kind)
    detector.check_geometry(geometry)
    name = model_name or f"{_model_name_stem(detector.name)}_tail"
    _check_model_name(name)
    served = _profiles_to_serve(detector, geometry, bank, profiles)

    # A CPU copy leaves the caller's detector (device, training flag) untouched.
    source = copy.deepcopy(detector).to("cpu").eval()
    activation_shape = source.activation_shape(geometry)
    names, output_shapes = _output_signature(source, activation_shape, output_names)
    batching = _ConfigCommon(
        activation_shape, output_shapes, max_batch_size, max_queue_delay_us, instance_count
    )
    plan = _ExportPlan.of(detector, geometry, batching, names, device_kind)
    repository = Path(out_dir)
    repository.mkdir(parents=True, exist_ok=True)
    clean = _write_models(plan, source, repository, name, CLEAN_PROFILE)
    routes = {CLEAN_PROFILE: clean}
    for profile in served:
        routes[profile.profile_id] = _profile_route(plan, source, repository, name, profile, clean)
    _remove_stale_profile_models(repository, name, routes.values())
    TailManifest.of(detector, geometry, plan, routes).write(repository)
    return repository


@dataclass(frozen=True)
class _ExportPlan:
    """What every model of one repository shares: shapes, batching, instances, parameters."""

    common: _ConfigCommon
    output_names: tuple[str, ...]
    instance_kind: str
    parameters: dict[str, str]

    @classmethod
    def of(
        cls,
        detector: SplitDetector,
        geometry: InputGeometry,
        common: _ConfigCommon,
        output_names: tuple[str, ...],
        device_kind: DeviceKind,
    ) -> _ExportPlan:
        """The plan of ``detector``'s repository; its parameters name what it serves."""
        return cls(
            common,
            output_names,
            "KIND_GPU" if device_kind == "gpu" else "KIND_CPU",
            {
                WEIGHTS_ID_PARAMETER: detector.weights_id,
                DETECTOR_PARAMETER: detector.name,
                GEOMETRY_PARAMETER: str(geometry),
            },
        )


def _write_models(
    plan: _ExportPlan, source: SplitDetector, repository: Path, name: str, profile_id: str
) -> TailRoute:
    """Trace ``source``'s tail and write its Python-backend and libtorch models."""
    _check_model_name(name)
    tail = _trace_tail(source, plan.common.activation_shape)
    python_dir = _fresh_model_dir(repository / name)
    torchscript_dir = _fresh_model_dir(repository / f"{name}_ts")
    torchscript = python_dir / "1" / TORCHSCRIPT_FILE
    with _torchscript_deprecations_silenced():
        torch.jit.save(tail, str(torchscript))
    shutil.copyfile(torchscript, torchscript_dir / "1" / LIBTORCH_MODEL_FILE)
    (python_dir / "1" / PYTHON_MODEL_FILE).write_text(python_model_source())
    sha256 = file_sha256(torchscript)
    parameters = {**plan.parameters, PROFILE_PARAMETER: profile_id, TAIL_SHA256_PARAMETER: sha256}
    python_config = plan.common.build(
        name,
        INPUT_NAME,
        plan.output_names,
        plan.instance_kind,
        {**parameters, SITE_PACKAGES_PARAMETER: _site_packages()},
    )
    python_config.backend = "python"
    torchscript_config = plan.common.build(
        f"{name}_ts",
        f"{INPUT_NAME}__0",
        [f"{n}__{i}" for i, n in enumerate(plan.output_names)],
        plan.instance_kind,
        {**parameters, "INFERENCE_MODE": "true"},
    )
    torchscript_config.platform = "pytorch_libtorch"
    for model_dir, config in ((python_dir, python_config), (torchscript_dir, torchscript_config)):
        (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))
    return TailRoute(name, f"{name}_ts", sha256)


def _profile_route(
    plan: _ExportPlan,
    source: SplitDetector,
    repository: Path,
    name: str,
    profile: NoiseProfile,
    clean: TailRoute,
) -> TailRoute:
    """``<name>_<profile_id>`` for a profile with its own tail; the clean tail otherwise."""
    if profile.tail is None:
        return replace(clean, alpha=profile.alpha)
    tuned = profile.detector_for(source)
    model = f"{name}_{profile.profile_id}"
    route = _write_models(plan, tuned, repository, model, profile.profile_id)
    return replace(route, alpha=profile.alpha)


def _check_export_arguments(
    max_batch_size: int, max_queue_delay_us: int, instance_count: int, device_kind: str
) -> None:
    if max_batch_size < 1:
        raise ConfigError(f"max_batch_size must be at least 1, got {max_batch_size}")
    if max_queue_delay_us < 0:
        raise ConfigError(f"max_queue_delay_us must not be negative, got {max_queue_delay_us}")
    if instance_count < 1:
        raise ConfigError(f"instance_count must be at least 1, got {instance_count}")
    if device_kind not in ("cpu", "gpu"):
        raise ConfigError(f"device_kind must be 'cpu' or 'gpu', got {device_kind!r}")


def _check_model_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"Triton model name {name!r} may hold only letters, digits, _ . -")


def _profiles_to_serve(
    detector: SplitDetector,
    geometry: InputGeometry,
    bank: ProfileBank | Path | str | None,
    profiles: Sequence[NoiseProfile],
) -> list[NoiseProfile]:
    """The bank's profiles and ``profiles``, each checked against the exported model."""
    chosen = list(profiles)
    if bank is not None:
        bank = bank if isinstance(bank, ProfileBank) else ProfileBank(bank)
        if not bank.root.is_dir():
            raise ConfigError(f"profile bank {bank.root} is not a folder")
        chosen += bank.profiles()
    shape = detector.activation_shape(geometry)
    for profile in chosen:
        profile.check_fits(detector.name, detector.weights_id, geometry, shape)
    unique = {p.profile_id: p for p in chosen}
    return sorted(unique.values(), key=lambda p: (p.alpha, p.profile_id))


def _remove_stale_profile_models(repository: Path, name: str, routes: Iterable[TailRoute]) -> None:
    """Remove ``<name>_<profile id>[_ts]`` models of an earlier export that no route names."""
    keep = {model for route in routes for model in (route.python, route.torchscript)}
    pattern = re.compile(re.escape(name) + r"_[0-9a-f]{16}(_ts)?")
    for path in repository.iterdir():
        stale = path.name not in keep and pattern.fullmatch(path.name)
        if stale and path.is_dir() and (path / "config.pbtxt").is_file():
            shutil.rmtree(path)


def python_model_source() -> str:
    """The text of ``<name>_tail/1/model.py``: imports and constants,
    :func:`prepend_site_packages` called at import, and :class:`TritonPythonModel`."""
    header = (
        '"""Triton Python-backend model of a veil tail, written by '
        'workers.untrusted.triton_repo."""\n'
        "\n"
        "from __future__ import annotations\n"
        "\n"
        "import json\n"
        "import os\n"
        "import re\n"
        "import sys\n"
        "from pathlib import Path\n"
        "from typing import Any\n"
        "\n"
        f"SITE_PACKAGES_PARAMETER = {SITE_PACKAGES_PARAMETER!r}\n"
        f"SITE_PACKAGES_ENV = {SITE_PACKAGES_ENV!r}\n"
        f"THREADS_ENV = {THREADS_ENV!r}\n"
        f"TORCHSCRIPT_FILE = {TORCHSCRIPT_FILE!r}\n"
        f"WARM_BATCHES = {WARM_BATCHES!r}\n"
        f"MALLOPT_SETTINGS = {MALLOPT_SETTINGS!r}\n"
        "\n\n"
    )
    setup = (
        "\n\n"
        "# At import: the stub imports numpy (for triton_python_backend_utils) before initialize.\n"
        'prepend_site_packages(Path(__file__).resolve().parents[1] / "config.pbtxt")\n'
        "\n\n"
    )
    return (
        header
        + inspect.getsource(prepend_site_packages)
        + setup
        + inspect.getsource(TritonPythonModel)
    )


def prepend_site_packages(config_path: Path) -> list[str]:
    """Put the site-packages named in ``config_path`` (else ``$VEIL_TRITON_SITE_PACKAGES``)
    first on ``sys.path``; return those that exist.

    Part of ``model.py``. Triton's stub embeds the base interpreter with its default
    ``sys.path`` and ignores PYTHONPATH; its own site-packages may hold numpy 2, with which
    the Python backend returns wrong (empty) outputs. The stub imports numpy between importing
    ``model.py`` and calling ``initialize``, so this runs at import and reads ``config.pbtxt``
    itself (standard library only: nothing else can be imported yet).
    """
    key = re.escape(SITE_PACKAGES_PARAMETER)
    pattern = r'key:\s*"' + key + r'"\s*value\s*\{\s*string_value:\s*"([^"]*)"'
    match = re.search(pattern, config_path.read_text()) if config_path.is_file() else None
    candidates = [
        *(match.group(1).split(os.pathsep) if match else []),
        *os.environ.get(SITE_PACKAGES_ENV, "").split(os.pathsep),
    ]
    site_packages = [p for p in dict.fromkeys(candidates) if p and os.path.isdir(p)]
    sys.path[:] = site_packages + [p for p in sys.path if p not in site_packages]
    return site_packages


class TritonPythonModel:
    """The Python-backend model; :func:`python_model_source` writes it out as ``model.py``.

    It runs in Triton's stub, an embedded interpreter whose ``sys.path`` is the base
    interpreter's (PYTHONPATH is ignored), after :func:`prepend_site_packages` has put the
    exporting environment's site-packages first.
    """

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        import numpy
        import torch
        import triton_python_backend_utils as pb_utils

        if int(numpy.__version__.split(".")[0]) >= 2:
            raise RuntimeError(
                f"numpy {numpy.__version__} from {numpy.__file__} was imported; the Python "
                f"backend needs numpy < 2 (sys.path starts {sys.path[:3]}; set "
                f"{SITE_PACKAGES_ENV} to an environment that has it)"
            )
        if args["model_instance_kind"] == "GPU":
            self._device = torch.device(f"cuda:{args['model_instance_device_id']}")
        else:
            self._device = torch.device("cpu")
        if os.environ.get(THREADS_ENV):
            torch.set_num_threads(int(os.environ[THREADS_ENV]))
        if sys.platform.startswith("linux"):  # as stream.runtime.keep_freed_memory does
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            for parameter, value in MALLOPT_SETTINGS:  # big tensors stay on the heap once freed
                libc.mallopt(parameter, value)
        path = Path(args["model_repository"]) / args["model_version"] / TORCHSCRIPT_FILE
        self._tail = torch.jit.load(str(path), map_location=self._device).eval()  # type: ignore[no-untyped-call]
        self._input_name: str = config["input"][0]["name"]
        self._output_names: list[str] = [output["name"] for output in config["output"]]
        self._numpy: Any = numpy
        self._torch: Any = torch
        self._pb_utils: Any = pb_utils
        # TorchScript's profiling executor optimises on the first calls, and each new batch
        # size's first call is 30-50% slower: pay that while the server is starting rather
        # than on the first requests (sizes up to WARM_BATCHES, what a pipeline sends).
        dims = [int(d) for d in config["input"][0]["dims"]]  # int64s come as JSON strings
        sizes = [1, *range(1, min(WARM_BATCHES, int(config.get("max_batch_size", 1))) + 1)]
        with torch.inference_mode():
            for n in sizes:
                self._tail(torch.zeros(n, *dims, device=self._device, dtype=torch.float16))

    def execute(self, requests: list[Any]) -> list[Any]:
        """Run the dynamic batch as one tensor and split the outputs back per request."""
        np, torch, pb_utils = self._numpy, self._torch, self._pb_utils
        arrays = [
            pb_utils.get_input_tensor_by_name(request, self._input_name).as_numpy()
            for request in requests
        ]
        joined = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)  # one: no copy
        batch = torch.from_numpy(joined).to(self._device)
        with torch.inference_mode():
            outputs = [out.cpu().numpy() for out in self._tail(batch)]
        responses = []
        start = 0
        for array in arrays:
            stop = start + len(array)
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(out[start:stop]))
                for name, out in zip(self._output_names, outputs, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start = stop
        return responses


@dataclass(frozen=True)
class _ConfigCommon:
    activation_shape: tuple[int, int, int]
    output_shapes: tuple[tuple[int, ...], ...]
    max_batch_size: int
    max_queue_delay_us: int
    instance_count: int

    def build(
        self,
        name: str,
        input_name: str,
        output_names: Sequence[str],
        instance_kind: str,
        parameters: dict[str, str],
    ) -> Any:
        config = model_config_pb2.ModelConfig(name=name, max_batch_size=self.max_batch_size)
        config.input.add(
            name=input_name, data_type=model_config_pb2.TYPE_FP16, dims=self.activation_shape
        )
        for out_name, shape in zip(output_names, self.output_shapes, strict=True):
            config.output.add(name=out_name, data_type=model_config_pb2.TYPE_FP16, dims=shape)
        # Batches queued requests without waiting for more unless a delay is given.
        config.dynamic_batching.SetInParent()
        config.dynamic_batching.max_queue_delay_microseconds = self.max_queue_delay_us
        config.instance_group.add(
            count=self.instance_count,
            kind=model_config_pb2.ModelInstanceGroup.Kind.Value(instance_kind),
        )
        for key, value in parameters.items():
            config.parameters[key].string_value = value
        return config


def _trace_tail(source: SplitDetector, activation_shape: tuple[int, int, int]) -> Any:
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(_TRACE_BATCH, *activation_shape, generator=generator).half()
    with torch.no_grad(), _torchscript_deprecations_silenced():
        # check_trace would trace a second time; the batch-3 check below covers more.
        traced = torch.jit.trace(_Tail(source), example, check_trace=False)  # type: ignore[no-untyped-call]
        frozen = torch.jit.freeze(traced.eval())
        check = torch.randn(_CHECK_BATCH, *activation_shape, generator=generator).half()
        expected = source.tail(check.float())
        got = frozen(check)
    for i, (e, g) in enumerate(zip(expected, got, strict=True)):
        if e.shape != g.shape or not torch.allclose(
            e, g.float(), rtol=_OUTPUT_RTOL, atol=_TRACE_TOLERANCE
        ):
            raise ConfigError(
                f"{source.name}: the traced tail differs from the eager one at batch "
                f"{_CHECK_BATCH} (output {i}: shape {tuple(g.shape)} vs {tuple(e.shape)}); the "
                "tail must not depend on the batch size through Python values"
            )
    return frozen


@contextlib.contextmanager
def _torchscript_deprecations_silenced() -> Iterator[None]:
    """torch 2.13 deprecates torch.jit; Triton's pytorch_libtorch backend still loads only it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.", DeprecationWarning)
        yield


def _output_signature(
    source: SplitDetector,
    activation_shape: tuple[int, int, int],
    output_names: Sequence[str] | None,
) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """The tail's output names and per-row shapes, from one probe; fp32 outputs only."""
    with torch.no_grad():
        probe = source.tail(torch.zeros(1, *activation_shape))
    names = _output_names(output_names, len(probe), source.name)
    for out_name, out in zip(names, probe, strict=True):
        if out.dtype != torch.float32:
            raise ConfigError(f"{source.name}: tail output {out_name!r} is {out.dtype}, not fp32")
    return tuple(names), tuple(tuple(int(d) for d in out.shape[1:]) for out in probe)


def _output_names(given: Sequence[str] | None, count: int, detector: str) -> list[str]:
    if given is None:
        if count > len(DEFAULT_OUTPUT_NAMES):
            raise ConfigError(
                f"{detector}: the tail returns {count} outputs; name them with output_names"
            )
        return list(DEFAULT_OUTPUT_NAMES[:count])
    names = list(given)
    if len(names) != count or len(set(names)) != count:
        raise ConfigError(
            f"{detector}: output_names {names} must be {count} distinct names, one per tail output"
        )
    for name in names:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) or "__" in name:
            raise ConfigError(f"output name {name!r} must be an identifier without '__'")
    return names


def _model_name_stem(detector_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", detector_name).strip("_").lower() or "detector"


def _fresh_model_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    (path / "1").mkdir(parents=True)
    return path


def _site_packages() -> str:
    """This interpreter's site-packages, for model.py to put on the stub's ``sys.path``."""
    paths = sysconfig.get_paths()
    return os.pathsep.join(dict.fromkeys([paths["purelib"], paths["platlib"]]))

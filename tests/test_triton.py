"""The FaceBoxes tail on a real Triton server (the nvidia-pytriton wheel's tritonserver), and a
noise profile's own tail exported with ``veil export --bank`` and served beside the clean one.

One server per module (and one for the profile bank's repository): starting it (and torch inside
the Python backend) takes seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import pytest_asyncio
import torch
from tritonclient.utils import InferenceServerException

from tests.fixtures_triton import tuned_tail_state
from veil.cli import main
from veil.data import data_root
from veil.detectors.base import Frame, InputGeometry
from veil.detectors.faceboxes import FaceBoxes
from veil.errors import ConfigError, ServiceError
from veil.inference import make_detect_fn
from veil.noise import NoiseLayer, noise_source
from veil.profiles import ProfileBank, ProfileMeta, profile_from_layer
from workers.untrusted.shared_memory import SharedMemorySlots
from workers.untrusted.tail_client import (
    ActivationArray,
    FloatArray,
    TailRouter,
    TritonTail,
)
from workers.untrusted.triton_repo import TailManifest, export_model_repository
from workers.untrusted.triton_server import EmbeddedTriton

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.services, pytest.mark.data]

GEOMETRY = InputGeometry(512, 512)
MAX_BATCH = 4
# Long enough that concurrent requests reliably meet in one dynamic batch on a loaded host.
QUEUE_DELAY_US = 100_000
FDDB_IMAGES = ("2002/08/11/big/img_591", "2002/08/26/big/img_265", "2002/07/19/big/img_423")


@pytest.fixture(scope="module")
def data() -> Path:
    root = data_root(required=False)
    if root is None or not (root / "faceboxes" / "FaceBoxesProd.pth").is_file():
        pytest.skip("reference data (faceboxes/FaceBoxesProd.pth, fddb/) not found: set VEIL_DATA")
    return root


@pytest.fixture(scope="module")
def detector(data: Path) -> FaceBoxes:
    return FaceBoxes.from_checkpoint(data / "faceboxes" / "FaceBoxesProd.pth")


@pytest.fixture(scope="module")
def frames(data: Path) -> list[Frame]:
    images = []
    for name in FDDB_IMAGES:
        image = cv2.imread(str(data / "fddb" / "originalPics" / f"{name}.jpg"))
        assert image is not None, f"FDDB image {name} is missing from the reference data"
        images.append(np.asarray(image, dtype=np.uint8))
    return images


@pytest.fixture(scope="module")
def face_centres(data: Path) -> list[list[tuple[float, float]]]:
    """Ground-truth ellipse centres of the FDDB images, from fold 1's ellipse list."""
    lines = (data / "fddb" / "FDDB-folds" / "FDDB-fold-01-ellipseList.txt").read_text().split()
    by_image: dict[str, list[tuple[float, float]]] = {}
    i = 0
    while i < len(lines):
        name, count = lines[i], int(lines[i + 1])
        fields = lines[i + 2 : i + 2 + 6 * count]
        by_image[name] = [
            (float(fields[6 * k + 3]), float(fields[6 * k + 4])) for k in range(count)
        ]
        i += 2 + 6 * count
    return [by_image[name] for name in FDDB_IMAGES]


@pytest.fixture(scope="module")
def activations(detector: FaceBoxes, frames: list[Frame]) -> ActivationArray:
    """The real head activations of three FDDB images, as the trusted zone sends them (float16,
    which the detect worker passes to Triton as it is)."""
    with torch.no_grad():
        x, _ = detector.preprocess(frames, GEOMETRY)
        return detector.head(x).numpy().astype(np.float16)


@pytest.fixture(scope="module")
def repository(detector: FaceBoxes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model_repository(
        detector,
        GEOMETRY,
        tmp_path_factory.mktemp("triton-repo"),
        max_batch_size=MAX_BATCH,
        max_queue_delay_us=QUEUE_DELAY_US,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(repository: Path) -> AsyncIterator[EmbeddedTriton]:
    triton = EmbeddedTriton(repository)
    await triton.start()
    print(f"\ntritonserver ready in {triton.startup_seconds:.1f} s")
    yield triton
    await triton.stop()


def reference_tail(detector: FaceBoxes, activations: ActivationArray) -> list[FloatArray]:
    """The eager tail in process on the same (float16) values, computed in float32."""
    with torch.no_grad():
        return [out.numpy() for out in detector.tail(torch.from_numpy(activations).float())]


def assert_rows(
    results: list[tuple[FloatArray, ...]], rows: list[int], expected: list[FloatArray]
) -> None:
    """Each one-row answer of ``results`` is row ``rows[i]`` of the expected outputs."""
    for row, got in zip(rows, results, strict=True):
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g[0], e[row], rtol=2e-3, atol=1e-4)


async def test_triton_tail_equals_the_in_process_tail(
    server: EmbeddedTriton,
    repository: Path,
    detector: FaceBoxes,
    activations: ActivationArray,
) -> None:
    expected = reference_tail(detector, activations)
    async with TritonTail(server.grpc_url, "faceboxes_tail", TailManifest.read(repository)) as tail:
        assert tail.signature.output_names == ("loc", "conf")
        assert tail.signature.datatype == "FP16"  # the wire's float16, not widened to FP32
        for batch in (1, 3):
            started = time.monotonic()
            got = await tail.infer(activations[:batch])
            print(f"batch {batch}: {1000 * (time.monotonic() - started):.0f} ms round trip")
            assert [g.shape for g in got] == [(batch, 5456, 4), (batch, 5456, 2)]
            assert all(g.dtype == np.float32 for g in got)  # served in FP16, read as float32
            for g, e in zip(got, expected, strict=True):
                np.testing.assert_allclose(g, e[:batch], rtol=2e-3, atol=1e-4)


async def test_triton_outputs_find_the_fddb_faces(
    server: EmbeddedTriton,
    repository: Path,
    detector: FaceBoxes,
    frames: list[Frame],
    face_centres: list[list[tuple[float, float]]],
) -> None:
    with torch.no_grad():
        x, letterboxes = detector.preprocess(frames, GEOMETRY)
        activations = detector.head(x).numpy()
    async with TritonTail(server.grpc_url, "faceboxes_tail", TailManifest.read(repository)) as tail:
        raw = await tail.infer(activations)
    detections = detector.decode(
        [torch.from_numpy(r) for r in raw], letterboxes, GEOMETRY.height, GEOMETRY.width
    )
    for frame_detections, centres in zip(detections, face_centres, strict=True):
        confident = frame_detections.xyxy[frame_detections.confidence > 0.5]
        for cx, cy in centres:
            inside = (
                (confident[:, 0] <= cx)
                & (cx <= confident[:, 2])
                & (confident[:, 1] <= cy)
                & (cy <= confident[:, 3])
            )
            assert inside.any(), f"no confident box around the face at ({cx:.0f}, {cy:.0f})"


async def test_concurrent_requests_share_a_batch_and_get_their_own_rows(
    server: EmbeddedTriton, detector: FaceBoxes, activations: ActivationArray
) -> None:
    expected = reference_tail(detector, activations)
    async with TritonTail(server.grpc_url, "faceboxes_tail") as tail:
        before = await _statistics(tail)
        rows = [2, 0, 1]
        results = await asyncio.gather(*(tail.infer(activations[r : r + 1]) for r in rows))
        after = await _statistics(tail)
    assert_rows(results, rows, expected)
    inferences = after.inference_count - before.inference_count
    executions = after.execution_count - before.execution_count
    assert inferences == 3
    assert executions < 3, "the three concurrent requests never shared an execution"


async def _statistics(tail: TritonTail) -> Any:
    stats = await tail._client.get_inference_statistics("faceboxes_tail")
    return stats.model_stats[0]


async def test_batches_above_max_batch_size_are_sent_in_chunks(
    server: EmbeddedTriton, detector: FaceBoxes, activations: ActivationArray
) -> None:
    batch = np.concatenate([activations, activations[::-1]])  # 6 rows, max_batch_size 4
    expected = reference_tail(detector, batch)
    async with TritonTail(server.grpc_url, "faceboxes_tail") as tail:
        got = await tail.infer(batch)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=2e-3, atol=1e-4)


async def test_wrong_inputs_get_clear_errors(
    server: EmbeddedTriton, activations: ActivationArray
) -> None:
    async with TritonTail(server.grpc_url, "faceboxes_tail") as tail:
        with pytest.raises(ConfigError, match=r"\(1, 128, 8, 8\) do not fit .* \[N, 128, 16, 16\]"):
            await tail.infer(activations[:1, :, :8, :8])
        with pytest.raises(ConfigError, match="must be a float16 or float32 array, not float64"):
            await tail.infer(activations[:1].astype(np.float64))
        # Past the client's own check, the server refuses the shape; that maps to ConfigError.
        with pytest.raises(ConfigError, match="INVALID_ARGUMENT") as refused:
            await tail._infer_chunk(np.ascontiguousarray(activations[:1, :, :8, :8]))
        assert "[-1,128,16,16]" in str(refused.value)


async def test_a_server_running_another_tail_is_refused(
    server: EmbeddedTriton, repository: Path
) -> None:
    manifest = TailManifest.read(repository)
    other_geometry = dataclasses.replace(
        manifest, geometry=InputGeometry(1024, 1024), activation_shape=(128, 32, 32)
    )
    with pytest.raises(ConfigError, match=r"takes activations \[128, 16, 16\] but the manifest"):
        await TritonTail(server.grpc_url, "faceboxes_tail", other_geometry).start()
    other_weights = dataclasses.replace(manifest, weights_id="f" * 64)
    with pytest.raises(ConfigError, match="serves weights c0cb2b1e40710c0a"):
        await TritonTail(server.grpc_url, "faceboxes_tail", other_weights).start()


async def test_the_libtorch_model_needs_the_ngc_image(
    server: EmbeddedTriton, repository: Path
) -> None:
    with pytest.raises(ConfigError, match="needs Triton's 'pytorch' backend"):
        EmbeddedTriton(repository, models=["faceboxes_tail_ts"])
    with pytest.raises(ServiceError, match="'faceboxes_tail_ts' is not ready"):
        await TritonTail(server.grpc_url, "faceboxes_tail_ts").start()


PROFILE_GEOMETRY = InputGeometry(256, 256)
NOISE_SEED = 7


@pytest.fixture(scope="module")
def tuned_bank(detector: FaceBoxes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bank of one profile (alpha 0.8) that carries its own tail, at 256x256."""
    shape = detector.activation_shape(PROFILE_GEOMETRY)
    layer = NoiseLayer(shape, 0.0, 1.0, initial_sigma=0.05)
    meta = ProfileMeta(
        detector.name, detector.weights_id, str(PROFILE_GEOMETRY), shape, 0.8, 0.0, 1.0
    )
    root = tmp_path_factory.mktemp("tuned-bank")
    ProfileBank(root).save(profile_from_layer(layer, meta, tuned_tail_state(detector)))
    return root


def export_cli(data: Path, bank: Path, out: Path, geometry: InputGeometry) -> int:
    weights = data / "faceboxes" / "FaceBoxesProd.pth"
    return main(
        [
            *("export", "--model", "faceboxes", "--weights", str(weights)),
            *("--geometry", str(geometry), "--bank", str(bank), "--out", str(out)),
        ]
    )


async def test_a_profile_tail_exported_with_the_bank_gives_the_in_process_boxes(
    data: Path,
    detector: FaceBoxes,
    frames: list[Frame],
    tuned_bank: Path,
    tmp_path: Path,
) -> None:
    assert export_cli(data, tuned_bank, tmp_path / "repo", PROFILE_GEOMETRY) == 0
    manifest = TailManifest.read(tmp_path / "repo")
    (profile,) = ProfileBank(tuned_bank).profiles()
    route = manifest.route(profile.profile_id)
    assert route is not None and route.python == f"faceboxes_tail_{profile.profile_id}"
    # In process, with a fixed noise seed: the same draw make_detect_fn makes.
    with torch.no_grad():
        x, letterboxes = detector.preprocess(frames, PROFILE_GEOMETRY)
        noisy = profile.layer()(detector.head(x), noise_source("cpu", NOISE_SEED))
        expected = [o.numpy() for o in profile.detector_for(detector).tail(noisy)]
        clean = [o.numpy() for o in detector.tail(noisy)]
    in_process = make_detect_fn(
        detector, PROFILE_GEOMETRY, profile, score_threshold=0.5, seed=NOISE_SEED
    )(frames)
    async with (
        EmbeddedTriton(tmp_path / "repo") as server,
        TritonTail(server.grpc_url, manifest.python_model, manifest) as tail,
    ):
        router = TailRouter.from_manifest(tail, manifest)
        await router.start()
        try:
            served = await router.infer(profile.profile_id, noisy.numpy())
            served_clean = await router.infer("none", noisy.numpy())
        finally:
            await router.stop()
    for got, want, got_clean, want_clean in zip(served, expected, served_clean, clean, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-3)
        np.testing.assert_allclose(got_clean, want_clean, rtol=2e-3, atol=1e-3)
        # Not the clean tail: the profile's own tail read the noise.
        assert float(np.abs(got - want_clean).max()) > 0.1
    boxes = detector.decode(
        [torch.from_numpy(r) for r in served],
        letterboxes,
        PROFILE_GEOMETRY.height,
        PROFILE_GEOMETRY.width,
        score_threshold=0.5,
    )
    for via_triton, reference in zip(boxes, in_process, strict=True):
        assert len(via_triton) == len(reference)
        np.testing.assert_allclose(via_triton.xyxy, reference.xyxy, rtol=0, atol=1.0)
    assert sum(len(b) for b in boxes) >= 3  # the comparison is not vacuous


async def test_export_refuses_a_bank_for_another_geometry_in_one_line(
    data: Path, tuned_bank: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert export_cli(data, tuned_bank, tmp_path / "repo", GEOMETRY) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("veil: error: noise profile ") and "\n" not in error
    assert "geometry 256x256 (serving 512x512)" in error
    assert not (tmp_path / "repo").exists()


async def _registered_regions(tail: TritonTail) -> set[str]:
    status = await tail._client.get_system_shared_memory_status()
    return set(status.regions)


def _mapped_regions(tail: TritonTail) -> set[str]:
    """The regions of ``tail``'s slots under /dev/shm (read while it is started)."""
    return _mapped(_prefix(tail))


def _prefix(tail: TritonTail) -> str:
    assert tail._slots is not None
    return tail._slots._prefix


def _mapped(prefix: str) -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(f"{prefix}-*")}


async def test_shared_memory_gives_the_grpc_outputs_and_leaves_nothing_behind(
    server: EmbeddedTriton, activations: ActivationArray
) -> None:
    async with (
        TritonTail(server.grpc_url, "faceboxes_tail") as shared,
        TritonTail(server.grpc_url, "faceboxes_tail", shared_memory="off") as plain,
    ):
        assert shared.uses_shared_memory and not plain.uses_shared_memory  # loopback: auto on
        registered = await _registered_regions(shared)
        assert len(registered) == 2 * 3  # two slots of one input and two outputs
        assert registered == _mapped_regions(shared)
        prefix = _prefix(shared)
        for rows in (slice(0, 1), slice(0, 3), slice(1, 3)):
            got, want = await shared.infer(activations[rows]), await plain.infer(activations[rows])
            for g, w in zip(got, want, strict=True):
                assert g.dtype == np.float32 and g.flags.writeable
                np.testing.assert_array_equal(g, w)
        first = await shared.infer(activations[:1])
        await shared.infer(activations[2:3])  # reuses the slot: the first answer is a copy
        np.testing.assert_array_equal(first[0], (await plain.infer(activations[:1]))[0])
    async with TritonTail(server.grpc_url, "faceboxes_tail", shared_memory="off") as probe:
        assert not await _registered_regions(probe)
    assert not _mapped(prefix)


async def test_a_cancelled_request_retires_its_slot_and_the_next_ones_are_right(
    server: EmbeddedTriton, detector: FaceBoxes, activations: ActivationArray
) -> None:
    expected = reference_tail(detector, activations)
    async with TritonTail(server.grpc_url, "faceboxes_tail") as tail:
        before = await _registered_regions(tail)
        prefix = _prefix(tail)
        pending = asyncio.ensure_future(tail.infer(activations[:1]))
        await asyncio.sleep(0.01)  # in flight: the server's queue delay alone is 100 ms
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        results = await asyncio.gather(*(tail.infer(activations[r : r + 1]) for r in (2, 1, 0)))
        await tail.infer(activations[:1])  # the cancelled request is done: its slot goes
        after = await _registered_regions(tail)
        assert len(after) == len(before) and after != before  # a fresh slot in its place
    assert_rows(results, [2, 1, 0], expected)
    assert not _mapped(prefix)


async def test_a_server_that_refuses_shared_memory(
    server: EmbeddedTriton, activations: ActivationArray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a Triton in another container answers (it cannot open this host's /dev/shm key):
    ``auto`` keeps the tensors on gRPC, ``on`` stops with the reason."""

    async def refuse(self: SharedMemorySlots, client: Any) -> None:
        raise InferenceServerException("Unable to open shared memory region: '/veil-x'")

    monkeypatch.setattr(SharedMemorySlots, "start", refuse)
    async with TritonTail(server.grpc_url, "faceboxes_tail") as tail:
        assert not tail.uses_shared_memory
        (loc, _) = await tail.infer(activations[:1])
        assert loc.shape == (1, 5456, 4) and np.isfinite(loc).all() and loc.any()
    with pytest.raises(ConfigError, match=r"system shared memory refused: .*Unable to open"):
        await TritonTail(server.grpc_url, "faceboxes_tail", shared_memory="on").start()
    with pytest.raises(ConfigError, match="shared_memory must be auto, on or off, got 'yes'"):
        TritonTail(server.grpc_url, "faceboxes_tail", shared_memory="yes")  # type: ignore[arg-type]


async def test_server_stops_cleanly(server: EmbeddedTriton, activations: ActivationArray) -> None:
    """Runs last: stops the module's server."""
    pid = server.pid
    assert pid is not None and server.is_running()
    async with TritonTail(server.grpc_url, "faceboxes_tail", timeout_s=5) as tail:
        await server.stop()
        with pytest.raises(ServiceError) as down:
            await tail.infer(activations[:1])
    assert down.value.retriable
    assert server.returncode == 0
    assert not server.is_running()
    with pytest.raises(ProcessLookupError):  # no stub left in the server's process group
        os.killpg(pid, 0)
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(server.shm_region_prefix)]

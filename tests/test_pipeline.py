"""The whole pipeline on real services: tansu (or Kafka in Docker) and the bundled Triton.

A real video goes through sources -> head + noise -> Kafka -> Triton tail -> detections, and
what comes out is compared with the same model run in-process on the same frames. The Triton
repository is exported with the profile bank, so a profile's own tail serves its frames.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import pytest_asyncio
import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from tritonclient.grpc.aio import InferenceServerClient

from stream.kafka import DEFAULT_TOPICS, KafkaLink, ensure_topics
from stream.wire import (
    ActivationMessage,
    DetectionMessage,
    Envelope,
    Provenance,
    decode,
    encode,
)
from tests.fixtures_kafka import KafkaTarget, kafka_target  # noqa: F401
from tests.fixtures_triton import TritonTarget, triton_server, tuned_tail_state
from veil.alpha import set_alpha
from veil.config import (
    BatchingConfig,
    KafkaConfig,
    ModelConfig,
    ObservabilityConfig,
    OutputConfig,
    StreamConfig,
    TritonConfig,
    VeilConfig,
)
from veil.data import data_root
from veil.detectors.base import Frame, InputGeometry
from veil.detectors.faceboxes import FaceBoxes
from veil.errors import ConfigError, ProfileError
from veil.noise import NoiseLayer
from veil.profiles import ProfileBank, ProfileMeta, profile_from_layer
from veil.runner import RunSummary, run_pipeline
from workers.trusted.edge import EdgeWorker
from workers.trusted.obfuscator import Obfuscator, ProfileTable
from workers.untrusted.detect import DetectWorker
from workers.untrusted.tail_client import TritonTail
from workers.untrusted.triton_repo import Backend, TailManifest, export_model_repository

pytestmark = [pytest.mark.services, pytest.mark.data]
GEOMETRY = InputGeometry(640, 384)  # single_face.mp4 is 640x360: letterboxed, 24 rows of pad


@pytest.fixture(scope="module")
def data() -> Path:
    root = data_root(required=False)
    if root is None:
        pytest.skip("reference data not found: set VEIL_DATA to run the pipeline tests")
    return root


@pytest.fixture(scope="module")
def weights(data: Path) -> Path:
    return data / "faceboxes" / "FaceBoxesProd.pth"


@pytest.fixture(scope="module")
def detector(weights: Path) -> FaceBoxes:
    return FaceBoxes.from_checkpoint(weights)


@pytest.fixture(scope="module")
def video(data: Path) -> Path:
    return data / "videos" / "single_face.mp4"


@pytest.fixture(scope="module")
def bank(detector: FaceBoxes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small, known profiles (alpha 0.5 and 0.9), enough to see noise and switch; the 0.9
    one carries its own tail, which the outside must run for its frames."""
    root = tmp_path_factory.mktemp("bank")
    shape = detector.activation_shape(GEOMETRY)
    for alpha, sigma in ((0.5, 0.02), (0.9, 0.05)):
        layer = NoiseLayer(shape, 0.0, 1.0, initial_sigma=sigma)
        meta = ProfileMeta(
            detector.name, detector.weights_id, str(GEOMETRY), shape, alpha, 0.0, 1.0
        )
        tail = tuned_tail_state(detector) if alpha == 0.9 else None
        ProfileBank(root).save(profile_from_layer(layer, meta, tail))
    return root


@pytest.fixture(scope="module")
def repository(detector: FaceBoxes, bank: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model_repository(detector, GEOMETRY, tmp_path_factory.mktemp("repo"), bank=bank)


async def inference_count(triton: TritonTarget, model: str) -> int:
    async with InferenceServerClient(triton.url) as client:
        stats = await client.get_inference_statistics(model)
    return int(stats.model_stats[0].inference_count)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def triton(repository: Path) -> AsyncIterator[TritonTarget]:
    async with triton_server(repository) as target:
        yield target


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def topics(kafka_target: KafkaTarget) -> str:  # noqa: F811
    await ensure_topics(kafka_target.bootstrap_servers)
    return kafka_target.bootstrap_servers


def config_for(
    streams: tuple[StreamConfig, ...],
    bootstrap: str,
    triton: TritonTarget,
    weights: Path,
    bank: Path,
    repository: Path,
    group: str,
) -> VeilConfig:
    return VeilConfig(
        model=ModelConfig(name="faceboxes", weights=str(weights), geometry=str(GEOMETRY)),
        profile_bank=str(bank),
        streams=streams,
        # float16: the comparisons with the model in process below are to a fraction of a pixel.
        kafka=KafkaConfig(bootstrap=bootstrap, idempotent=False, group_id=group, payload="float16"),
        batching=BatchingConfig(max_batch=4, max_wait_ms=10),
        triton=TritonConfig(url=triton.url, model=triton.model, model_repository=str(repository)),
    )


def decode_video(path: Path) -> list[Frame]:
    with av.open(str(path)) as container:
        return [
            np.asarray(f.to_ndarray(format="bgr24"), dtype=np.uint8)
            for f in container.decode(video=0)
        ]


async def read_topic(bootstrap: str, topic: str, key: bytes) -> list[bytes]:
    """Every record value on ``topic`` whose key is ``key``, from the beginning."""
    return [value for value, _ in await read_records(bootstrap, topic, key)]


async def read_records(
    bootstrap: str, topic: str, key: bytes
) -> list[tuple[bytes, dict[str, bytes]]]:
    """(value, headers) of every record on ``topic`` whose key is ``key``."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    values: list[tuple[bytes, dict[str, bytes]]] = []
    try:
        end = None
        while True:
            batches = await consumer.getmany(timeout_ms=1000)
            if not batches:
                if end is not None:
                    break
                end = True
                continue
            end = None
            for records in batches.values():
                values.extend((r.value, dict(r.headers)) for r in records if r.key == key)
    finally:
        await consumer.stop()
    return values


@pytest.mark.asyncio(loop_scope="module")
async def test_a_real_video_through_the_whole_pipeline_matches_the_model_in_process(
    topics: str,
    triton: TritonTarget,
    detector: FaceBoxes,
    weights: Path,
    bank: Path,
    repository: Path,
    video: Path,
) -> None:
    stream = StreamConfig(
        id="e2e-clean", source=str(video), policy="lossless", alpha=0.0, allow_clean=True
    )
    config = config_for((stream,), topics, triton, weights, bank, repository, "g-e2e")
    received: list[DetectionMessage] = []
    summary: RunSummary = await run_pipeline(
        config, print_detections=False, on_detection=received.append
    )

    frames = decode_video(video)
    assert len(frames) == 72
    # Lossless: every frame read was published, and every one came back with detections.
    assert summary.edge.frames_in == summary.edge.frames_published == 72
    assert summary.tally.frames == 72
    got = {d.sequence: d.detections for d in received}
    assert sorted(got) == list(range(72))
    expected = detector.detect(frames, GEOMETRY, score_threshold=0.5)
    faces = 0
    for seq, ref in enumerate(expected):
        out = got[seq]
        assert len(out) == len(ref), (
            f"frame {seq}: {len(out)} faces via Kafka+Triton, {len(ref)} in-process"
        )
        # float16 on the wire moves boxes by a fraction of a pixel.
        np.testing.assert_allclose(out.xyxy, ref.xyxy, atol=2.0)
        np.testing.assert_allclose(out.confidence, ref.confidence, atol=0.01)
        faces += len(out)
    assert faces >= 60  # one face in (nearly) every frame: the comparison is not vacuous

    # What crossed the wire: activations only. Every record is header + C*H*W float16 values,
    # and no run of 48 raw pixel bytes from any frame occurs in any of them.
    values = await read_topic(topics, DEFAULT_TOPICS.activations, b"e2e-clean")
    assert len(values) == 72
    c, h, w = detector.activation_shape(GEOMETRY)
    rng = np.random.default_rng(0)
    for value in values:
        msg = decode(b"e2e-clean", value)
        assert msg.payload.shape == (c, h, w)
        assert len(value) - c * h * w * 2 < 1024  # nothing but a small header beside the tensor
    for frame in frames[::9]:
        flat = frame.tobytes()
        for start in rng.integers(0, len(flat) - 48, size=20):
            window = flat[start : start + 48]
            assert not any(window in v for v in values)


@pytest.mark.asyncio(loop_scope="module")
async def test_alpha_changes_live_and_every_message_names_its_profile(
    topics: str,
    triton: TritonTarget,
    detector: FaceBoxes,
    weights: Path,
    bank: Path,
    repository: Path,
    video: Path,
) -> None:
    profiles = {p.alpha: p.profile_id for p in ProfileBank(bank).profiles()}
    manifest = TailManifest.read(repository)
    backend: Backend = "python" if triton.kind == "embedded" else "torchscript"
    routes = {a: manifest.route(pid) for a, pid in profiles.items()}
    assert routes[0.5] == replace(manifest.clean_route(), alpha=0.5)
    tuned_route = routes[0.9]
    assert tuned_route is not None and tuned_route != manifest.clean_route()
    tuned_model = tuned_route.model(backend)
    tuned_before = await inference_count(triton, tuned_model)
    stream = StreamConfig(
        id="live-alpha", source=str(video), policy="lossless", alpha=0.5, loop=True
    )
    config = config_for((stream,), topics, triton, weights, bank, repository, "g-live")
    stop = asyncio.Event()
    seen: list[tuple[int, float, str]] = []
    answers: dict[str, Any] = {}
    sent = False

    async def requests() -> None:
        """The operator's requests through `veil alpha set`'s path, each answered."""
        try:
            await set_alpha(topics, "no-such-stream", 0.9)
        except ConfigError as exc:
            answers["unknown"] = str(exc)
        answers["clean"] = await set_alpha(topics, "live-alpha", 0.0)
        answers["below"] = await set_alpha(topics, "live-alpha", 0.3)
        answers["uncalibrated"] = await set_alpha(topics, "live-alpha", 0.7)
        answers["applied"] = await set_alpha(topics, "live-alpha", 0.9)

    def on_detection(msg: object) -> None:
        nonlocal sent
        seen.append((msg.sequence, msg.alpha, msg.profile_id))  # type: ignore[attr-defined]
        if len(seen) == 10 and not sent:
            sent = True
            asyncio.get_running_loop().create_task(requests())
        if (
            any(a == 0.9 for _, a, _ in seen[-5:])
            and len([1 for _, a, _ in seen if a == 0.9]) >= 10
        ):
            stop.set()

    await asyncio.wait_for(
        run_pipeline(config, print_detections=False, stop=stop, on_detection=on_detection),
        timeout=240,
    )
    assert "unknown stream 'no-such-stream'" in answers["unknown"]
    assert answers["clean"].outcome == "refused" and "clean" in answers["clean"].reason
    assert answers["uncalibrated"].outcome == "refused"
    assert "below this stream's floor 0.5" in answers["below"].reason  # the default floor
    assert "no calibrated profile for alpha 0.7" in answers["uncalibrated"].reason
    assert answers["uncalibrated"].available == (0.5, 0.9)
    applied = answers["applied"]
    assert (applied.outcome, applied.alpha, applied.profile_id) == ("applied", 0.9, profiles[0.9])
    assert sent
    assert seen[0][1:] == (0.5, profiles[0.5])
    switched = [i for i, (_, a, _) in enumerate(seen) if a == 0.9]
    assert switched, "the new alpha never reached the trusted-zone worker"
    # Once applied, it stays applied, and each message names the profile that made it.
    assert all(a == 0.9 for _, a, _ in seen[switched[0] :])
    assert all(p == profiles[a] for _, a, p in seen)
    # The alpha 0.9 frames were read by that profile's own tail, not by the clean one.
    tuned_rows = await inference_count(triton, tuned_model) - tuned_before
    assert tuned_rows >= len(seen) - switched[0]


def test_an_alpha_without_a_profile_is_refused_with_the_available_ones(
    detector: FaceBoxes, bank: Path
) -> None:
    table = ProfileTable.from_bank(detector, GEOMETRY, ProfileBank(bank), torch.device("cpu"))
    obfuscator = Obfuscator(detector, GEOMETRY, table, torch.device("cpu"))
    with pytest.raises(ProfileError, match=r"available alphas: \[0.5, 0.9\]"):
        EdgeWorker(
            [StreamConfig(id="x", source="x.mp4", alpha=0.7)],
            obfuscator,
            KafkaLink("127.0.0.1:1", idempotent=False),
        )
    with pytest.raises(ProfileError, match="alpha must be a number in"):
        table.row(1.5)


@pytest.mark.asyncio(loop_scope="module")
async def test_malformed_and_foreign_messages_go_to_the_dead_letter_topic(
    topics: str,
    triton: TritonTarget,
    detector: FaceBoxes,
    repository: Path,
    video: Path,
) -> None:
    manifest = TailManifest.read(repository)
    frames = decode_video(video)[:2]
    x, letterboxes = detector.preprocess(frames, GEOMETRY)
    with torch.no_grad():
        acts = detector.head(x).numpy()
    from stream.wire import FramePlacement

    def message(seq: int, model: str = "faceboxes") -> ActivationMessage:
        return ActivationMessage(
            Envelope("dlq", seq, None, 0.0),
            Provenance(model, detector.weights_id, "none", 0.0),
            placement=FramePlacement.from_letterbox(letterboxes[seq % 2], GEOMETRY),
            payload=acts[seq % 2],
        )

    producer = AIOKafkaProducer(bootstrap_servers=topics, acks="all", max_request_size=4 << 20)
    await producer.start()
    try:
        for payload in (message(0), message(1, model="yolo"), message(2)):
            key, value, headers = encode(payload)
            await producer.send_and_wait(DEFAULT_TOPICS.activations, value, key, headers=headers)
        await producer.send_and_wait(DEFAULT_TOPICS.activations, b"not veil at all", b"dlq")
        truncated = encode(message(3))[1][:300]
        await producer.send_and_wait(DEFAULT_TOPICS.activations, truncated, b"dlq")
    finally:
        await producer.stop()
    async with TritonTail(triton.url, triton.model, manifest) as tail:
        worker = DetectWorker(
            KafkaLink(topics, idempotent=False), tail, detector, manifest, group_id="g-dlq"
        )
        async with worker:
            await worker.run(idle_timeout_s=8)
    assert worker.stats.dead_letters == 3
    assert worker.lag and all(v >= 0 for v in worker.lag.values())  # the lag metric is fed
    dead = {
        v: h["veil-error"].decode()
        for v, h in await read_records(topics, DEFAULT_TOPICS.dead_letter, b"dlq")
    }
    # Each bad record is kept byte for byte, with its own reason.
    assert "magic" in dead[b"not veil at all"].lower() or "veil" in dead[b"not veil at all"]
    assert any("yolo" in reason for reason in dead.values())
    assert any("truncat" in reason.lower() for reason in dead.values())
    detections = await read_topic(topics, DEFAULT_TOPICS.detections, b"dlq")
    assert len(detections) == 2  # the two good messages, around the bad ones


@pytest.mark.asyncio(loop_scope="module")
async def test_a_corrupt_source_is_reported_and_the_other_streams_lose_nothing(
    topics: str,
    triton: TritonTarget,
    weights: Path,
    bank: Path,
    repository: Path,
    video: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_text("this is not a video")
    streams = (
        StreamConfig(id="good", source=str(video), policy="lossless", alpha=0.5),
        StreamConfig(id="broken", source=str(broken), policy="lossless", alpha=0.5),
    )
    config = config_for(streams, topics, triton, weights, bank, repository, "g-broken")
    config = replace(config, outputs=OutputConfig(annotated_dir=str(tmp_path / "annotated")))
    # The check before start refuses a file that is no video; one that breaks while it is
    # read (checked here) is a stream's failure, reported while the others go on.
    monkeypatch.setattr("veil.runner.check_edge", lambda config: {})
    received: list[DetectionMessage] = []
    summary = await run_pipeline(config, print_detections=False, on_detection=received.append)
    assert "broken" in summary.edge.source_errors
    assert "broken.mp4" in summary.edge.source_errors["broken"]
    assert sorted(d.sequence for d in received if d.stream_id == "good") == list(range(72))
    # The annotated video (drawn inside the zone) has every frame of the good stream.
    with av.open(str(tmp_path / "annotated" / "good.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 72


@pytest.mark.asyncio(loop_scope="module")
async def test_signed_records_end_to_end_and_forgeries_change_nothing(
    topics: str,
    triton: TritonTarget,
    detector: FaceBoxes,
    weights: Path,
    bank: Path,
    repository: Path,
    video: Path,
    tmp_path: Path,
) -> None:
    """With keys (`veil keys init`), the edge signs every activation, the detect worker verifies
    each one before its dedupe window and signs its detections, and the sink verifies those:
    a forged activation with sequence 10**9 and a forged detection, published before the run,
    change nothing."""
    # Imported here, in one place: the signing test's own dependencies.
    from stream.signing import ROLE_DETECT, ROLE_EDGE, init_keys, keys_for
    from stream.wire import FramePlacement, encode_detection
    from veil.config import SigningConfig
    from veil.detections import Detections
    from veil.errors import WireFormatError

    keys = tmp_path / "keys"
    init_keys(keys)
    sid = "e2e-signed"
    x, letterboxes = detector.preprocess(decode_video(video)[:1], GEOMETRY)
    with torch.no_grad():
        act = detector.head(x).numpy()[0]
    profile_id = {p.alpha: p.profile_id for p in ProfileBank(bank).profiles()}[0.5]
    provenance = Provenance("faceboxes", detector.weights_id, profile_id, 0.5)
    forged = ActivationMessage(
        Envelope(sid, 10**9, None, 0.0),
        provenance,
        placement=FramePlacement.from_letterbox(letterboxes[0], GEOMETRY),
        payload=act,
    )
    boxes = Detections(np.array([[1, 2, 30, 40]], np.float32), np.array([0.99], np.float32))
    fake = DetectionMessage(Envelope(sid, 500, None, 0.0), provenance, boxes, 0.0)
    producer = AIOKafkaProducer(bootstrap_servers=topics, acks="all", max_request_size=4 << 20)
    await producer.start()
    try:
        for topic, (key, value, headers) in (
            (DEFAULT_TOPICS.activations, encode(forged)),
            (DEFAULT_TOPICS.detections, encode_detection(fake)),
        ):
            await producer.send_and_wait(topic, value, key, headers=headers)
    finally:
        await producer.stop()

    stream = StreamConfig(id=sid, source=str(video), policy="lossless", alpha=0.5)
    config = config_for((stream,), topics, triton, weights, bank, repository, "g-signed")
    config = replace(config, signing=SigningConfig(private_key=str(keys), required=True))
    received: list[DetectionMessage] = []
    summary = await run_pipeline(
        config, print_detections=False, settle_timeout_s=120, on_detection=received.append
    )

    assert summary.edge.frames_published == 72
    assert sorted(d.sequence for d in received) == list(range(72))  # not 500
    verifier = keys_for(config.signing, "sink").verifier
    assert verifier is not None
    refused: dict[str, list[str]] = {ROLE_EDGE: [], ROLE_DETECT: []}
    for topic, role in (
        (DEFAULT_TOPICS.activations, ROLE_EDGE),
        (DEFAULT_TOPICS.detections, ROLE_DETECT),
    ):
        for raw, found in await read_records(topics, topic, sid.encode()):
            try:
                verifier.verify(sid.encode(), raw, list(found.items()), role)
            except WireFormatError as exc:
                refused[role].append(str(exc))
    unsigned = "unsigned: {} need the {} key's signature"
    assert refused[ROLE_EDGE] == [unsigned.format("activations", "edge")]  # the forged one
    assert refused[ROLE_DETECT] == [unsigned.format("detections", "detect")]
    dead = [
        h["veil-error"]
        for _, h in await read_records(topics, DEFAULT_TOPICS.dead_letter, sid.encode())
    ]
    assert dead == [b"activation refused: " + unsigned.format("activations", "edge").encode()]


async def read_preview(url: str, parts: int) -> list[tuple[int, Frame]]:
    """``parts`` JPEG parts of an MJPEG response: (the X-Sequence header, the image)."""
    import cv2

    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET /{path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        assert head.startswith("HTTP/1.1 200") and "multipart/x-mixed-replace" in head, head
        found: list[tuple[int, Frame]] = []
        while len(found) < parts:
            lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
            assert lines[0] == "--veilframe", lines
            fields = dict(line.split(": ", 1) for line in lines[1:] if line)
            jpeg = await reader.readexactly(int(fields["Content-Length"]))
            await reader.readexactly(2)
            image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
            found.append((int(fields["X-Sequence"]), np.asarray(image, np.uint8)))
        return found
    finally:
        writer.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_the_live_preview_serves_annotated_frames_as_mjpeg(
    topics: str,
    triton: TritonTarget,
    weights: Path,
    bank: Path,
    repository: Path,
    video: Path,
) -> None:
    stream = StreamConfig(id="watched", source=str(video), policy="lossless", alpha=0.5, loop=True)
    config = config_for((stream,), topics, triton, weights, bank, repository, "g-preview")
    config = replace(
        config,
        outputs=OutputConfig(preview=True),
        observability=replace(config.observability, http_port=0),
    )
    lines: list[str] = []
    stop = asyncio.Event()
    result: dict[str, Any] = {}

    async def watch() -> None:
        try:
            url = next(line.split(": ", 1)[1] for line in lines if "live preview" in line)
            result["parts"] = await asyncio.wait_for(read_preview(url, 3), 60)
        except BaseException as exc:  # reported by the asserts below
            result["error"] = exc
        finally:
            stop.set()

    def on_detection(_msg: DetectionMessage) -> None:
        if "task" not in result:
            result["task"] = asyncio.get_running_loop().create_task(watch())

    await asyncio.wait_for(
        run_pipeline(
            config, say=lines.append, print_detections=False, stop=stop, on_detection=on_detection
        ),
        timeout=240,
    )
    assert "parts" in result, result.get("error")
    sequences = [seq for seq, _ in result["parts"]]
    assert sequences == sorted(set(sequences)), sequences  # each part a newer frame
    image = result["parts"][-1][1]
    assert image.shape == (360, 640, 3)  # the source's own frame, not the letterboxed input
    green = (image[..., 1] > 180) & (image[..., 0] < 90) & (image[..., 2] < 90)
    assert int(green.sum()) > 100, "no box drawn on the preview"


def _own_triton_config(
    bootstrap: str, weights: Path, bank: Path, video: Path, repository: Path
) -> VeilConfig:
    """``veil run`` of the looped video at alpha 0.5 with an embedded Triton of its own on
    ``repository``, and an HTTP port."""
    stream = StreamConfig(id="reload", source=str(video), policy="lossless", alpha=0.5, loop=True)
    return VeilConfig(
        model=ModelConfig(name="faceboxes", weights=str(weights), geometry=str(GEOMETRY)),
        profile_bank=str(bank),
        streams=(stream,),
        kafka=KafkaConfig(bootstrap=bootstrap, idempotent=False, group_id="g-reload"),
        batching=BatchingConfig(max_batch=4, max_wait_ms=10),
        triton=TritonConfig(model_repository=str(repository)),
        observability=ObservabilityConfig(http_port=0),
    )


@pytest.mark.asyncio(loop_scope="module")
async def test_a_profile_reloaded_under_veil_run_is_served_outside_with_its_tail(
    topics: str,
    weights: Path,
    bank: Path,
    video: Path,
    tmp_path: Path,
) -> None:
    from veil.http_client import call

    profiles = {p.alpha: p for p in ProfileBank(bank).profiles()}
    running = ProfileBank(tmp_path / "bank")
    running.save(profiles[0.5])  # the tuned 0.9 profile comes later, calibrated "meanwhile"
    config = _own_triton_config(topics, weights, running.root, video, tmp_path / "repo")
    lines: list[str] = []
    stop = asyncio.Event()
    seen: list[tuple[float, str]] = []
    result: dict[str, Any] = {}

    def operator() -> None:
        """What an operator does by hand: a new profile in the bank, reload, switch to it."""
        url = next(line for line in lines if "/metrics" in line).split()[-1]
        url = url.removesuffix("/metrics")
        running.save(profiles[0.9])
        result["reload"] = call(url, "POST", "/v1/bank/reload")
        result["alpha"] = call(url, "PUT", "/v1/streams/reload/alpha", {"alpha": 0.9})

    async def run_operator() -> None:
        try:
            await asyncio.to_thread(operator)
        except BaseException as exc:  # reported by the asserts below
            result["error"] = exc
            stop.set()

    def on_detection(msg: DetectionMessage) -> None:
        seen.append((msg.alpha, msg.profile_id))
        if "task" not in result:
            result["task"] = asyncio.get_running_loop().create_task(run_operator())
        if sum(1 for a, _ in seen if a == 0.9) >= 5:
            stop.set()

    summary = await asyncio.wait_for(
        run_pipeline(
            config, say=lines.append, print_detections=False, stop=stop, on_detection=on_detection
        ),
        timeout=300,
    )
    assert "error" not in result, result["error"]
    assert result["reload"]["added"] == [0.9], result
    assert result["alpha"]["outcome"] == "applied", result
    # Detected outside, by the new profile's own tail, which Triton loaded after the reload.
    assert (0.9, profiles[0.9].profile_id) in seen
    manifest = TailManifest.read(tmp_path / "repo")
    assert manifest.route(profiles[0.9].profile_id) != manifest.clean_route()
    assert summary.tally.frames == len(seen)

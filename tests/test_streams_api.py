"""The trusted zone's HTTP API and per-stream health against a real running edge: the serve graph
of `veil edge` in process, on the session's broker, with RetinaFace at 320x256 on the CPU.

A stream added over HTTP publishes frames; removing it flushes and stops it while the other
keeps running; an unreachable camera shows down (with reconnects) in /readyz and the metrics;
an alpha below the floor is refused over HTTP with the reason; a profile calibrated after start
becomes usable after a bank reload; the OpenAPI document matches what is served; `veil streams`
drives the same API. A dropped RTSP camera shows down at the source.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_asyncio
import structlog

from stream.broker import free_loopback_port
from stream.demo_clip import make_demo_clip
from stream.kafka import TopicNames, assigned_reader, ensure_topics, read_to_end
from stream.runtime import Backoff
from stream.sources import VideoSource
from stream.wire import ControlMessage, decode_control
from tests.fixtures_kafka import KafkaTarget, kafka_target  # noqa: F401
from tests.test_rtsp import RtspServer, rtsp_server  # noqa: F401
from veil import http_api
from veil.cli import main
from veil.config import (
    BatchingConfig,
    KafkaConfig,
    ModelConfig,
    ObservabilityConfig,
    StreamConfig,
    VeilConfig,
)
from veil.noise import NoiseLayer
from veil.observability import Request
from veil.profiles import ProfileBank, ProfileMeta, profile_from_layer
from veil.runner import Graph, build_obfuscator, serve
from workers.trusted.edge import EdgeWorker
from workers.trusted.obfuscator import Obfuscator

pytestmark = pytest.mark.services
GEOMETRY = "320x256"


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """main() points structlog at the captured stderr; later tests get the old one back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


async def http(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One request to the edge's status port: (status, JSON or text body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n"
    writer.write(head.encode() + data)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    top, _, payload = raw.decode().partition("\r\n\r\n")
    status = int(top.split()[1])
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in a Prometheus exposition, or None when absent."""
    for line in text.splitlines():
        match = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    return None


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_clip(tmp_path_factory.mktemp("clips") / "c.mp4", 3, 10, (320, 240))


def _config(kafka: str, bank: Path, port: int, streams: tuple[StreamConfig, ...]) -> VeilConfig:
    return VeilConfig(
        model=ModelConfig(name="retinaface", geometry=GEOMETRY, device="cpu"),
        profile_bank=str(bank),
        streams=streams,
        kafka=KafkaConfig(bootstrap=kafka, idempotent=False, topic_prefix="api"),
        batching=BatchingConfig(max_batch=4, max_wait_ms=5),
        observability=ObservabilityConfig(http_port=port),
    )


def _file(sid: str, clip: Path) -> StreamConfig:
    # alpha 0 allowed, and nothing weaker than 0.9 otherwise: the floor the test hits.
    return StreamConfig(
        sid, str(clip), "lossless", alpha=0.0, loop=True, min_alpha=0.9, allow_clean=True
    )


def _camera() -> StreamConfig:  # nothing listens there: unreachable
    return StreamConfig("cam", f"rtsp://127.0.0.1:{free_loopback_port()}/live", alpha=0.0,
                        min_alpha=0.9, allow_clean=True)  # fmt: skip


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bank")


@pytest.fixture(scope="module")
def obfuscator(kafka_target: KafkaTarget, bank: Path, clip: Path) -> Obfuscator:  # noqa: F811
    asyncio.run(ensure_topics(kafka_target.bootstrap_servers, topics=TopicNames("api")))
    return build_obfuscator(_config(kafka_target.bootstrap_servers, bank, 0, (_file("a", clip),)))


@pytest_asyncio.fixture
async def running(
    kafka_target: KafkaTarget,  # noqa: F811
    bank: Path,
    clip: Path,
    obfuscator: Obfuscator,
) -> AsyncIterator[tuple[int, asyncio.Task[Graph]]]:
    """An edge serving file stream ``a`` and the unreachable camera ``cam``; its port."""
    port = free_loopback_port()
    config = _config(kafka_target.bootstrap_servers, bank, port, (_file("a", clip), _camera()))
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve(config, frozenset({"edge"}), obfuscator=obfuscator, say=lambda _: None, stop=stop)
    )

    async def ready() -> bool:
        if task.done():
            task.result()
        try:
            return (await http(port, "GET", "/readyz"))[0] == 200
        except OSError:
            return False

    await until(ready, "the edge to be ready")
    yield port, task
    stop.set()
    await asyncio.wait_for(task, 60)


async def _streams(port: int) -> dict[str, dict[str, Any]]:
    status, body = await http(port, "GET", "/v1/streams")
    assert status == 200, body
    return {s["id"]: s for s in body["streams"]}


async def test_health_shows_the_unreachable_camera_down_and_the_edge_degraded(
    running: tuple[int, asyncio.Task[Graph]],
) -> None:
    port, _ = running

    async def camera_retried() -> bool:
        return bool((await _streams(port))["cam"]["reconnects"] >= 2)

    await until(camera_retried, "two reconnect attempts of the camera")
    status, ready = await http(port, "GET", "/readyz")
    assert status == 200 and ready["status"] == "degraded", ready
    assert {s["id"]: s["state"] for s in ready["streams"]} == {"a": "up", "cam": "down"}
    cam = (await _streams(port))["cam"]
    assert cam["state"] == "down" and "cannot open" in cam["error"], cam
    await asyncio.sleep(0.6)  # one health period: the gauges follow
    text = (await http(port, "GET", "/metrics"))[1]
    assert metric(text, "veil_source_up", stream="cam") == 0.0
    assert metric(text, "veil_source_up", stream="a") == 1.0
    assert (metric(text, "veil_source_reconnects_total", stream="cam") or 0) >= 2
    assert metric(text, "veil_frames_in_total", stream="cam") == 0.0  # a series, not none
    assert (metric(text, "veil_frames_published_total", stream="a") or 0) > 0
    assert (metric(text, "veil_stream_frames_per_second", stream="a") or 0) > 0
    assert (metric(text, "veil_stream_publish_latency_seconds_count", stream="a") or 0) > 0
    assert metric(text, "veil_stream_alpha", stream="a") == 0.0
    assert metric(text, "veil_stream_profile_info", stream="a", profile_id="none") == 1.0
    assert metric(text, "veil_build_info", model="retinaface", version="0.1.0") == 1.0


async def test_a_stream_added_over_http_publishes_and_its_removal_spares_the_other(
    running: tuple[int, asyncio.Task[Graph]], clip: Path
) -> None:
    port, task = running
    status, added = await http(port, "POST", "/v1/streams", _file("b", clip).__dict__)
    assert status == 201 and added["id"] == "b", added

    async def b_published() -> bool:
        return bool((await _streams(port))["b"]["frames_published"] >= 5)

    await until(b_published, "frames of the added stream published")
    deadline = time.monotonic() + 120
    status, gone = await http(port, "DELETE", "/v1/streams/b")
    while status == 202 and time.monotonic() < deadline:  # still publishing (a loaded host)
        status, gone = await http(port, "DELETE", "/v1/streams/b")
    assert status == 200 and gone["removed"], gone
    assert gone["stream"]["state"] == "removed"
    # Everything it decoded was published before it was forgotten.
    assert gone["stream"]["frames_published"] == gone["stream"]["frames_in"] > 0, gone
    streams = await _streams(port)
    assert set(streams) == {"a", "cam"}
    before = streams["a"]["frames_published"]

    async def a_goes_on() -> bool:
        return bool((await _streams(port))["a"]["frames_published"] > before + 5)

    await until(a_goes_on, "stream a to keep publishing")
    assert not task.done()
    assert metric((await http(port, "GET", "/metrics"))[1], "veil_source_up", stream="b") is None


async def test_bad_input_is_a_4xx_naming_the_field(
    running: tuple[int, asyncio.Task[Graph]], clip: Path
) -> None:
    port, _ = running
    cases: list[tuple[str, str, Any, int, str | None]] = [
        ("POST", "/v1/streams", {"id": "x", "source": str(clip), "alpha": "high"}, 400, "alpha"),
        ("POST", "/v1/streams", {"id": "x"}, 400, "source"),
        ("POST", "/v1/streams", {"id": "x", "source": str(clip), "fps": 3}, 400, "fps"),
        ("POST", "/v1/streams", {"id": "x", "source": "/nowhere.mp4"}, 400, "source"),
        ("POST", "/v1/streams", {"id": "x y", "source": str(clip)}, 400, "id"),
        ("POST", "/v1/streams", {"id": "x", "source": str(clip), "alpha": 0.5}, 400, "alpha"),
        ("POST", "/v1/streams", {"id": "a", "source": str(clip)}, 409, "id"),
        ("POST", "/v1/streams", b"{not json", 400, None),
        ("DELETE", "/v1/streams/nope", None, 404, "id"),
        ("PUT", "/v1/streams/nope/alpha", {"alpha": 0.9}, 404, "id"),
        ("PUT", "/v1/streams/a/alpha", {"alpha": 7}, 400, "alpha"),
        ("PUT", "/v1/streams/a/alpha", {}, 400, "alpha"),
        ("GET", "/v1/bank/reload", None, 405, None),
        ("GET", "/v1/streams/a/preview", None, 409, None),  # veil run --preview serves it
    ]
    for method, path, body, want, field in cases:
        status, answer = await http(port, method, path, body)
        assert (status, answer.get("field")) == (want, field), (method, path, body, answer)
        assert answer["error"] and "\n" not in answer["error"], answer


async def test_alpha_over_http_is_refused_below_the_floor_and_a_reloaded_profile_applies(
    running: tuple[int, asyncio.Task[Graph]],
    bank: Path,
    obfuscator: Obfuscator,
    kafka_target: KafkaTarget,  # noqa: F811
) -> None:
    port, _ = running
    status, refused = await http(port, "PUT", "/v1/streams/a/alpha", {"alpha": 0.5})
    assert status == 409 and refused["outcome"] == "refused", refused
    assert "below this stream's floor 0.9" in refused["error"], refused
    assert refused["alpha"] == 0.0  # nothing changed
    status, missing = await http(port, "PUT", "/v1/streams/a/alpha", {"alpha": 0.95})
    assert status == 409 and "no calibrated profile for alpha 0.95" in missing["reason"]
    # A profile calibrated while the edge runs (a synthetic one: this is about plumbing).
    det, shape = obfuscator.detector, obfuscator.detector.activation_shape(obfuscator.geometry)
    meta = ProfileMeta(det.name, det.weights_id, GEOMETRY, shape, 0.95, 0.0, 1.0)
    profile = profile_from_layer(NoiseLayer(shape, 0.0, 1.0), meta)
    ProfileBank(bank).save(profile)
    status, reloaded = await http(port, "POST", "/v1/bank/reload")
    assert status == 200 and reloaded["added"] == [0.95], reloaded
    status, applied = await http(port, "PUT", "/v1/streams/a/alpha", {"alpha": 0.95})
    assert status == 200 and applied["outcome"] == "applied", applied
    assert applied["profile_id"] == profile.profile_id
    assert (await _streams(port))["a"]["profile_id"] == profile.profile_id
    # The request went through the control topic, as `veil alpha set` sends it: a restart,
    # which replays that topic, keeps it.
    requests = await _control_records(kafka_target.bootstrap_servers)
    assert ("a", 0.95) in [(r.stream_id, r.alpha) for r in requests], requests


async def _control_records(bootstrap: str) -> list[ControlMessage]:
    topic = TopicNames("api").control
    consumer, parts = await assigned_reader(bootstrap, topic, None, "test-control", "no topic")
    found: list[ControlMessage] = []
    try:
        await read_to_end(
            consumer,
            parts,
            lambda r: found.append(decode_control(r.key, r.value, r.headers)),
            timeout_s=10,
            what=topic,
        )
    finally:
        await consumer.stop()
    return found


async def test_the_openapi_document_matches_what_is_served(
    running: tuple[int, asyncio.Task[Graph]],
) -> None:
    port, _ = running
    status, document = await http(port, "GET", "/openapi.json")
    assert status == 200 and document == json.loads(json.dumps(http_api.OPENAPI))
    documented = {(m.upper(), p) for p, ops in document["paths"].items() for m in ops}
    fixed = {("GET", "/metrics"), ("GET", "/healthz"), ("GET", "/readyz")}
    assert documented == {(r.method, r.path) for r in http_api.ROUTES} | fixed
    for method, path in documented:  # each documented operation is answered, not 404/405
        status, answer = await http(port, method, path.replace("{id}", "nope"), {})
        assert status not in (405,) and not (status == 404 and answer.get("field") is None), (
            method,
            path,
            answer,
        )


async def test_veil_streams_drives_the_api(
    running: tuple[int, asyncio.Task[Graph]], capsys: pytest.CaptureFixture[str]
) -> None:
    port, _ = running
    url = ["--url", f"http://127.0.0.1:{port}"]
    assert await asyncio.to_thread(main, ["streams", "list", *url]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^a: up, alpha", out, re.M) and re.search(r"^cam: down", out, re.M), out
    code = await asyncio.to_thread(main, ["streams", "set-alpha", "a", "0.5", *url])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "refused" in err[0] and "floor 0.9" in err[0], err
    assert await asyncio.to_thread(main, ["streams", "reload-bank", *url]) == 0
    assert "alphas" in capsys.readouterr().out


async def test_no_stream_up_is_not_ready_with_the_streams_listed(
    kafka_target: KafkaTarget,  # noqa: F811
    bank: Path,
    obfuscator: Obfuscator,
) -> None:
    port = free_loopback_port()
    config = _config(kafka_target.bootstrap_servers, bank, port, (_camera(),))
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve(config, frozenset({"edge"}), obfuscator=obfuscator, say=lambda _: None, stop=stop)
    )

    async def answered() -> bool:
        try:
            return (await http(port, "GET", "/readyz"))[0] == 503
        except OSError:
            return False

    try:
        await until(answered, "readiness")
        await asyncio.sleep(1.5)
        status, ready = await http(port, "GET", "/readyz")
        assert status == 503 and ready["status"] == "not ready", ready
        assert ready["streams"] == [{"id": "cam", "state": "down"}]
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def test_writes_are_refused_from_peers_the_setting_does_not_allow() -> None:
    edge = cast(EdgeWorker, object())  # refused before the edge is asked anything
    remote = Request("POST", "/v1/streams", b"{}", loopback=False)
    answer = await http_api.handler(edge, "loopback")(remote)
    assert answer is not None and answer.status == 403
    local = Request("DELETE", "/v1/streams/a", b"", loopback=True)
    answer = await http_api.handler(edge, "off")(local)
    assert answer is not None and answer.status == 403
    assert await http_api.handler(edge)(Request("GET", "/elsewhere", b"", True)) is None


@pytest.mark.timeout(60)
async def test_a_dropped_rtsp_camera_shows_down_with_reconnects(
    rtsp_server: RtspServer,  # noqa: F811
) -> None:
    source = VideoSource(
        "door", rtsp_server.url, read_timeout_s=2, reconnect=Backoff(0.2, 0.5, jitter=0.5)
    )
    async with source:
        frames = source.frames()
        await asyncio.wait_for(anext(frames), 15)
        assert source.connected and source.last_error is None
        rtsp_server.stop()
        deadline = time.monotonic() + 120
        while source.connected or source.stats.reconnects < 2:
            assert time.monotonic() < deadline, "the camera still shows up"
            await asyncio.sleep(0.05)
        assert source.last_error

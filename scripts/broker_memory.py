"""The embedded broker's memory under a realistic load, with and without trimming.

Four streams (``--streams``) each publish a ~0.5 MB float16 activation (``--record-bytes``) at
``--fps`` to ``veil.activations`` (3 partitions), as the edge worker does; one consumer group
reads them and commits after every poll, as the detect worker does. Every ``--sample-s`` it
prints the resident memory (VmRSS) of the broker's processes, then a summary per mode:

* ``memory``: tansu's own memory engine (``storage_engine="memory://tansu/"``, the old default),
  which keeps every record;
* ``store``: the embedded object store in memory (the default), deleting consumed batches
  beyond ``keep_consumed_bytes`` and the oldest beyond ``max_stored_bytes``;
* ``durable``: the same over files in a temporary ``data_dir``.

Usage: ``python scripts/broker_memory.py [--duration 60] [--modes memory,store,durable]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stream.broker import EmbeddedBroker
from stream.kafka import DEFAULT_TOPICS, close_consumer, ensure_topics, make_consumer, make_producer

MiB = 1024 * 1024
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


@dataclass
class Run:
    mode: str
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)  # t, tansu, store
    produced: int = 0
    consumed: int = 0
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return max(t + s for _, t, s, _ in self.samples)

    @property
    def last(self) -> int:
        _, tansu, store, _ = self.samples[-1]
        return tansu + store


async def publish(producer: Any, stream: int, fps: float, payload: bytes, until: float) -> int:
    sent = 0
    period = 1.0 / fps
    next_at = time.monotonic()
    key = f"stream-{stream}".encode()
    while time.monotonic() < until:
        await producer.send_and_wait(DEFAULT_TOPICS.activations, payload, key=key)
        sent += 1
        next_at += period
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    return sent


async def consume(bootstrap: str, stop: asyncio.Event, run: Run) -> None:
    consumer = await make_consumer(
        bootstrap, "veil-detect", [DEFAULT_TOPICS.activations], client_id="bench-detect"
    )
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=8)
            offsets = {tp: records[-1].offset + 1 for tp, records in batches.items() if records}
            run.consumed += sum(len(r) for r in batches.values())
            if offsets:
                await consumer.commit(offsets)
    finally:
        await close_consumer(consumer)


async def one_mode(mode: str, args: argparse.Namespace) -> Run:
    run = Run(mode)
    data_dir = Path(tempfile.mkdtemp(prefix="veil-bench-")) if mode == "durable" else None
    modes: dict[str, dict[str, Any]] = {
        "memory": {"storage_engine": "memory://tansu/"},
        "store": {},
        "durable": {"data_dir": data_dir},
    }
    settings = modes[mode]
    try:
        async with EmbeddedBroker(**settings) as broker:
            await ensure_topics(broker.bootstrap_servers)
            producer = await make_producer(broker.bootstrap_servers, idempotent=False)
            stop = asyncio.Event()
            consumer = asyncio.create_task(consume(broker.bootstrap_servers, stop, run))
            await asyncio.sleep(6)  # the group join takes ~5 s on tansu
            start = time.monotonic()
            until = start + args.duration
            payload = os.urandom(args.record_bytes)
            publishers = [
                asyncio.create_task(publish(producer, s, args.fps, payload, until))
                for s in range(args.streams)
            ]
            print(f"\n== {mode}: {broker.storage_engine}" + (f" in {data_dir}" if data_dir else ""))
            print("     t   tansu MiB   store MiB   total MiB   records held MiB   consumed")
            while time.monotonic() < until + 0.5:
                rss = broker.rss_bytes()
                held = broker.storage_stats().record_bytes if broker.embedded_store else -1
                t = time.monotonic() - start
                run.samples.append((t, rss.get("tansu", 0), rss.get("store", 0), held))
                print(
                    f"{t:6.0f} {rss.get('tansu', 0) / MiB:11.0f} {rss.get('store', 0) / MiB:11.0f}"
                    f" {(rss.get('tansu', 0) + rss.get('store', 0)) / MiB:11.0f}"
                    f" {(held / MiB if held >= 0 else float('nan')):18.0f} {run.consumed:10d}"
                )
                await asyncio.sleep(args.sample_s)
            run.produced = sum(await asyncio.gather(*publishers))
            run.cpu = {name: cpu_s(pid) for name, pid in broker.pids().items()}
            stop.set()
            await consumer
            await producer.stop()
            if broker.embedded_store:
                print(f"   {broker.storage_stats()}")
    finally:
        if data_dir is not None:
            shutil.rmtree(data_dir, ignore_errors=True)
    return run


async def main(args: argparse.Namespace) -> None:
    runs = [await one_mode(mode, args) for mode in args.modes.split(",")]
    offered = args.streams * args.fps * args.record_bytes / MiB
    print(f"\noffered load: {args.streams} streams x {args.fps} fps x {args.record_bytes} B")
    print(f"= {offered:.1f} MiB/s for {args.duration:.0f} s")
    print("mode       produced  rec/s  consumed  peak RSS MiB  final RSS MiB  broker CPU s")
    for r in runs:
        cpu = " + ".join(f"{name} {s:.1f}" for name, s in r.cpu.items())
        print(
            f"{r.mode:9s} {r.produced:9d} {r.produced / args.duration:6.1f} {r.consumed:9d}"
            f" {r.peak / MiB:13.0f} {r.last / MiB:14.0f}  {cpu}"
        )
    by_mode = {r.mode: r for r in runs}
    if "memory" in by_mode:
        for other in ("store", "durable"):
            if other in by_mode:
                ratio = by_mode["memory"].last / by_mode[other].last
                print(f"final RSS, memory engine / {other}: {ratio:.1f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--fps", type=float, default=9.0)
    parser.add_argument("--record-bytes", type=int, default=523_000)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--modes", default="memory,store,durable")
    asyncio.run(main(parser.parse_args()))

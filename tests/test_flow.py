"""Realtime flow control: frames taken from a source wait for the outside's commits."""

from __future__ import annotations

import asyncio
from typing import Any

from workers.trusted.flow import FlowControl


class FakeCommits:
    """What the detect group has committed per partition (a consumer's ``committed``)."""

    def __init__(self) -> None:
        self.offsets: dict[int, int | None] = {0: None}

    async def committed(self, tp: Any) -> int | None:
        return self.offsets.get(tp.partition)

    async def stop(self) -> None:
        return None


def flow(limit: int = 2, give_up_s: float = 10.0) -> tuple[FlowControl, FakeCommits]:
    control = FlowControl("unused:9092", "g", "veil.activations", limit, poll_s=0.001,
                          give_up_s=give_up_s)  # fmt: skip
    commits = FakeCommits()
    control._consumer = commits
    control._base = {0: 100}  # the partition held 100 records before this edge started
    return control, commits


async def test_frames_wait_for_the_outside_to_commit_what_is_in_flight() -> None:
    control, commits = flow(limit=2)
    await control.acquire(0)
    await control.acquire(0)
    third = asyncio.create_task(control.acquire(0))
    await asyncio.sleep(0.05)
    assert not third.done()  # two frames taken, none committed: the third waits
    control.published(0, records=2, realtime=2)
    await asyncio.sleep(0.05)
    assert not third.done()  # sent, still not committed
    commits.offsets[0] = 101  # the outside committed one of them
    await asyncio.wait_for(third, 1)
    assert control.waited_s > 0.05


async def test_a_group_that_commits_nothing_does_not_stall_the_zone() -> None:
    control, commits = flow(limit=1, give_up_s=0.05)
    await control.acquire(0)
    control.published(0, records=1, realtime=1)
    await asyncio.wait_for(control.acquire(0), 1)  # given up after 0.05 s without commits
    assert control._unbounded
    commits.offsets[0] = 101
    await asyncio.sleep(0.01)  # past the poll interval: the commit is read again
    await control._in_use(0)
    assert not control._unbounded  # its next commit bounds the flight again


async def test_a_frame_never_sent_is_given_back() -> None:
    control, _ = flow(limit=1)
    await control.acquire(0)
    control.release(0)
    await asyncio.wait_for(control.acquire(0), 1)


async def test_the_limit_is_per_realtime_stream_of_the_partition() -> None:
    control, _ = flow(limit=2)
    for _ in range(4):  # two streams share partition 0: four frames in flight
        await asyncio.wait_for(control.acquire(0, streams=2), 1)
    fifth = asyncio.create_task(control.acquire(0, streams=2))
    await asyncio.sleep(0.05)
    assert not fifth.done()
    fifth.cancel()

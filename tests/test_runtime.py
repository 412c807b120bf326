"""The supervised stage runtime: first error wins, graceful drains, retries, child servers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from stream.runtime import (
    Backoff,
    Channel,
    StageFailed,
    Supervisor,
    blocking,
    keep_freed_memory,
    retry,
    watch_child,
)
from veil.errors import ConfigError, ServiceError


async def test_the_first_error_wins_cancels_the_other_stages_and_is_raised() -> None:
    sup = Supervisor("t")
    cancelled: list[str] = []
    channel: Channel[int] = Channel("c", 1)

    async def producer() -> None:
        try:
            for i in range(1000):
                await channel.put(i)  # blocks once the consumer is gone: must not hang
        except asyncio.CancelledError:
            cancelled.append("producer")
            raise

    async def consumer() -> None:
        async for item in channel:
            if item == 3:
                raise ServiceError("publish failed for good")

    async def control() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append("control")
            raise

    sup.add("produce", producer)
    sup.add("consume", consumer)
    sup.add("control", control, background=True)
    started = time.monotonic()
    with pytest.raises(ServiceError, match="publish failed for good"):
        await sup.run()
    assert time.monotonic() - started < 2.0
    assert sorted(cancelled) == ["control", "producer"]
    assert sup.failed_stage == "consume" and not sup.ready


async def test_a_bug_in_a_stage_is_named_and_not_swallowed() -> None:
    sup = Supervisor("t")

    async def broken() -> None:
        raise KeyError("frame")

    sup.add("head+noise", broken)
    with pytest.raises(StageFailed, match="stage head\\+noise failed: KeyError"):
        await sup.run()


async def test_a_graceful_stop_drains_everything_already_read() -> None:
    sup = Supervisor("t")
    first: Channel[int] = Channel("a", 4)
    second: Channel[int] = Channel("b", 4)
    out: list[int] = []
    readiness: list[bool] = []

    async def source() -> None:
        i = 0
        while not sup.stopping.is_set():
            await first.put(i)
            i += 1
            await asyncio.sleep(0.001)
        await first.close()

    async def double() -> None:
        async for item in first:
            await second.put(2 * item)
        await second.close()

    async def sink() -> None:
        async for item in second:
            await asyncio.sleep(0.002)  # slower than the source: the channels fill
            out.append(item)

    async def stop_soon() -> None:
        await asyncio.sleep(0.2)
        readiness.append(sup.ready)
        sup.request_stop()
        readiness.append(sup.ready)

    for name, fn in (("source", source), ("double", double), ("sink", sink)):
        sup.add(name, fn)
    sup.add("stopper", stop_soon, background=True)
    await sup.run()
    assert out == [2 * i for i in range(len(out))] and len(out) > 10  # nothing lost, in order
    assert readiness == [True, False]


async def test_transient_failures_are_retried_with_backoff_and_others_raised() -> None:
    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise ServiceError("broker restarting")
        return "sent"

    fast = Backoff(initial_s=0.01, max_s=0.02)
    result = await retry(flaky, what="send", transient=lambda e: True, backoff=fast)
    assert result == "sent" and len(calls) == 4

    async def wrong() -> None:
        raise ConfigError("record too large")

    with pytest.raises(ConfigError):
        await retry(wrong, what="send", transient=lambda e: False, backoff=fast)
    limited = Backoff(initial_s=0.01, max_s=0.02, max_attempts=2)
    calls.clear()
    with pytest.raises(ServiceError):
        await retry(lambda: flaky(), what="send", transient=lambda e: True, backoff=limited)
    assert len(calls) == 3
    with pytest.raises(ConfigError, match="jitter"):
        Backoff(jitter=2.0)


async def test_blocking_work_runs_off_the_event_loop() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    await blocking("nms", time.sleep, 0.3)
    task.cancel()
    assert ticks >= 10


async def test_a_child_that_dies_is_noticed_with_its_last_log_line() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "print('bind: address in use'); exit(3)"], stdout=subprocess.PIPE
    )
    out = child.stdout.read().decode() if child.stdout else ""
    with pytest.raises(ServiceError, match=r"exited with status 3.*address in use"):
        await asyncio.wait_for(watch_child("tansu", child, lambda: out), 5)


def test_a_child_server_dies_with_its_parent_even_on_kill_9(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    parent_code = textwrap.dedent(
        f"""
        import subprocess, sys, time
        from stream.runtime import die_with_parent
        child = subprocess.Popen(["sleep", "60"], preexec_fn=die_with_parent)
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 20
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the parent did not start its child"
        time.sleep(0.05)
    child_pid = int(pid_file.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while _alive(child_pid):
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.05)


def test_under_the_reaper_a_servers_own_children_die_with_its_parent_too(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG kills the server, not what it started (tritonserver's backend stubs):
    the reaper takes the server's whole process group down when its parent is killed -9."""
    pid_file = tmp_path / "grandchild.pid"
    parent_code = textwrap.dedent(
        f"""
        import subprocess, sys, time
        from stream.runtime import die_with_parent
        server = f"sleep 60 & echo $! > {str(pid_file)!r}; wait"
        subprocess.Popen(
            [sys.executable, "-m", "stream.reaper", "sh", "-c", server],
            preexec_fn=die_with_parent,
        )
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 20
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline, "the server did not start its own child"
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while _alive(grandchild):
        assert time.monotonic() < deadline, "the server's child outlived the killed parent"
        time.sleep(0.05)


def test_the_reaper_ends_as_its_command_did() -> None:
    run = [sys.executable, "-m", "stream.reaper", "sh", "-c"]
    root = Path(__file__).parents[1]
    assert subprocess.run([*run, "exit 3"], cwd=root, timeout=20).returncode == 3
    assert subprocess.run([*run, "kill -9 $$"], cwd=root, timeout=20).returncode == -9


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def test_stages_join_a_running_graph_and_one_that_returns_fails_nothing() -> None:
    sup = Supervisor("live")
    out: Channel[int] = Channel("out", 8, producers=1)
    got: list[int] = []

    async def produce(values: list[int], linger_s: float = 0.0) -> None:
        for v in values:
            await out.put(v)
        await asyncio.sleep(linger_s)
        await out.close()

    async def consume() -> None:
        async for item in out:
            got.append(item)

    async def add_later() -> None:
        await asyncio.sleep(0.05)
        out.add_producer()  # a stream added at runtime: one more producer of the channel
        sup.add("read:late", lambda: produce([10, 11]))

    sup.add("read:first", lambda: produce([1, 2], 0.2))
    sup.add("consume", consume)
    sup.add("adder", add_later, background=True)
    await asyncio.wait_for(sup.run(), 5)
    assert sorted(got) == [1, 2, 10, 11] and sup.error is None
    with pytest.raises(ConfigError, match="ended"):
        out.add_producer()  # the channel has ended behind its last producer
    with pytest.raises(ConfigError, match="after the graph stopped"):
        sup.add("too-late", consume)


async def test_a_stage_added_while_running_that_raises_fails_the_graph() -> None:
    sup = Supervisor("live-fail")

    async def forever() -> None:
        await asyncio.Event().wait()

    async def broken() -> None:
        raise ServiceError("camera driver crashed")

    async def add_broken() -> None:
        await asyncio.sleep(0.05)
        sup.add("read:broken", broken)

    sup.add("forever", forever)
    sup.add("adder", add_broken, background=True)
    with pytest.raises(ServiceError, match="camera driver crashed"):
        await asyncio.wait_for(sup.run(), 5)
    assert sup.failed_stage == "read:broken"


async def test_producers_take_turns_so_none_is_starved() -> None:
    frames: Channel[tuple[str, int]] = Channel("frames", 4, producers=2)
    order: list[str] = []

    async def produce(name: str, count: int) -> None:
        for i in range(count):
            await frames.put((name, i))
        await frames.close()

    async def consume() -> None:
        while (item := await frames.get()) is not None:
            order.append(item[0])
            while (more := frames.get_nowait()) is not None:  # a batcher drains what is there
                order.append(more[0])
            await asyncio.sleep(0)

    await asyncio.gather(produce("busy", 400), produce("quiet", 20), consume())
    # The quiet producer's items are spread over the start, not left behind the busy one's.
    assert max(i for i, name in enumerate(order) if name == "quiet") < 100, order


_PAGE_FAULTS_SCRIPT = textwrap.dedent(
    """
    import ctypes, resource, sys
    from stream.runtime import keep_freed_memory
    if sys.argv[1] == "tuned":
        assert keep_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 16 * 1024 * 1024  # a batch's tensors: 64 MB in all, freed at the end of it
    faults = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [libc.malloc(size) for _ in range(4)]
        for block in blocks:
            ctypes.memset(block, 1, size)
        for block in reversed(blocks):
            libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(sum(faults[1:]))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_tensors_stay_on_the_heap_instead_of_being_faulted_in_again() -> None:
    def faults(mode: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", _PAGE_FAULTS_SCRIPT, mode],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(run.stdout)

    pages = 4 * 16 * 1024 * 1024 // os.sysconf("SC_PAGE_SIZE")  # one batch's
    assert faults("default") > 2 * pages  # of 5 batches, most faulted in again
    assert faults("tuned") < pages // 4  # reused from the heap
    assert keep_freed_memory()  # idempotent

"""The supervised stage runtime every role runs on (edge, detect, ``veil run``).

A role is a graph of **stages**, asyncio tasks joined by bounded :class:`Channel` s, under one
:class:`Supervisor` (after Savant's Kafka adapters and aiokafka's long-lived objects):

* the first error wins: the stage that raised is named in the error, every other stage is
  cancelled and awaited, :attr:`Supervisor.ready` turns false (``/readyz`` 503) and
  :meth:`Supervisor.run` raises it, so the process exits non-zero with one line;
* a graceful stop (:meth:`Supervisor.request_stop`, e.g. on SIGTERM) asks the sources to stop
  reading; what they already read flows through the graph, each channel is closed behind its
  last item, and :meth:`Supervisor.run` returns when every foreground stage has ended;
* background stages (control readers, watchdogs) never keep a graph alive: they are cancelled
  once the foreground has ended;
* stages may be added while the graph runs (a stream added at runtime); a foreground stage that
  returns is simply done (a stream removed on purpose ends its reader that way), only one
  that raises fails the graph;
* work that blocks (PyAV decode, torch, NMS, video encode) goes through :func:`blocking`, which
  runs it in a thread and names it, and a loop watchdog logs whenever the loop stalled anyway;
* transient faults (broker, Triton, network) are retried by :func:`retry` with exponential
  backoff and jitter, forever unless told otherwise, each attempt logged; while a lossless
  stage retries, its input channel fills and its upstream waits (backpressure to the source).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

import structlog

from veil.errors import ConfigError, ServiceError, VeilError

log = structlog.get_logger(__name__)

T = TypeVar("T")
_CLOSED: Final = object()  # the sentinel a closed channel hands out after its last item
_LOOP_STALL_S: Final = 0.5  # a loop that did not run for this long is reported


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter.

    Attempt ``n`` (from 1) waits ``min(max_s, initial_s * 2**(n-1))`` scaled by a random factor
    in ``[1 - jitter, 1]`` (``jitter=1``: full jitter, which spreads many clients retrying at
    once). ``max_attempts=None`` retries forever; a success resets the count.
    """

    initial_s: float = 0.2
    max_s: float = 10.0
    jitter: float = 1.0
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.max_s < self.initial_s:
            raise ConfigError(
                f"backoff needs 0 < initial_s <= max_s, got {self.initial_s} and {self.max_s}"
            )
        if not 0.0 <= self.jitter <= 1.0:
            raise ConfigError(f"backoff jitter must be within [0, 1], got {self.jitter}")
        if self.max_attempts is not None and self.max_attempts < 0:
            raise ConfigError(f"backoff max_attempts must be >= 0, got {self.max_attempts}")

    def delay_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before attempt ``attempt`` (1-based)."""
        # The exponent is capped so that retrying forever never overflows a float.
        ceiling = min(self.max_s, self.initial_s * 2.0 ** min(attempt - 1, 60))
        return ceiling * (1.0 - self.jitter * (rng or random).random())


DEFAULT_BACKOFF: Final = Backoff()


class StageFailed(VeilError):
    """A stage raised something that is not a :class:`VeilError`: a bug or a library error."""


class Channel(Generic[T]):
    """A bounded queue between stages that ends: ``async for item in channel``.

    Each producer calls :meth:`close` once when done; the consumer's iteration ends after the
    last item of the last producer. :meth:`put` waits while the channel is full (backpressure),
    producers in the order they came (none is starved by another).
    """

    def __init__(self, name: str, capacity: int, producers: int = 1) -> None:
        if capacity < 1 or producers < 1:
            raise ConfigError(f"channel {name}: capacity and producers must be >= 1")
        self.name = name
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=capacity)
        self._open_producers = producers
        # Producers wait their turn in order: asyncio.Queue alone lets a producer that always
        # has an item take every freed slot, and starve another (a lossless stream).
        self._turn = asyncio.Lock()

    async def put(self, item: T) -> None:
        async with self._turn:
            await self._queue.put(item)

    def add_producer(self) -> None:
        """One more producer (a stage added while the graph runs) that will :meth:`close`."""
        if self.closed:
            raise ConfigError(f"channel {self.name} has ended: no producer can join it")
        self._open_producers += 1

    async def close(self) -> None:
        """This producer is done; the last one to close ends the channel."""
        self._open_producers -= 1
        if self._open_producers == 0:
            await self._queue.put(_CLOSED)

    async def get(self) -> T | None:
        """The next item; None once the channel has ended (and keeps answering None)."""
        item = await self._queue.get()
        if item is _CLOSED:
            self._queue.put_nowait(_CLOSED)  # a closed channel stays closed
            return None
        return item  # type: ignore[no-any-return]

    def get_nowait(self) -> T | None:
        """An item already waiting, else None (also once the channel has ended)."""
        try:
            item = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
        if item is _CLOSED:
            self._queue.put_nowait(_CLOSED)
            return None
        return item  # type: ignore[no-any-return]

    @property
    def closed(self) -> bool:
        return self._open_producers <= 0

    def qsize(self) -> int:
        return self._queue.qsize()

    def __aiter__(self) -> AsyncIterator[T]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[T]:
        while (item := await self.get()) is not None:
            yield item


async def concurrently(*steps: Awaitable[Any]) -> None:
    """Run ``steps`` at once until all are done; the first to fail cancels the others, and
    its own error (not a group) is raised."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def blocking(what: str, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a worker thread: the event loop keeps serving heartbeats, health
    and the other stages meanwhile. ``what`` names the work in the logs when it is slow."""
    started = time.perf_counter()
    result = await asyncio.to_thread(fn, *args)
    elapsed = time.perf_counter() - started
    if elapsed > 5.0:
        log.warning("runtime.slow_blocking_call", what=what, seconds=round(elapsed, 2))
    return result


async def retry(
    operation: Callable[[], Awaitable[T]],
    *,
    what: str,
    transient: Callable[[BaseException], bool],
    backoff: Backoff = DEFAULT_BACKOFF,
    on_retry: Callable[[BaseException, float], None] | None = None,
    stopping: asyncio.Event | None = None,
) -> T:
    """``await operation()`` until it succeeds; transient failures wait and try again.

    A failure that ``transient`` rejects is raised at once; so is the last transient one when
    ``backoff.max_attempts`` is reached. ``stopping`` cuts the wait short (the error is raised)
    so that a stop is never held up by a service that is gone.
    """
    attempt = 0
    while True:
        try:
            return await operation()
        except Exception as exc:
            if not transient(exc):
                raise
            attempt += 1
            limit = backoff.max_attempts
            if (limit is not None and attempt > limit) or (stopping and stopping.is_set()):
                raise
            delay = backoff.delay_s(attempt)
            log.warning(
                "runtime.retry",
                what=what,
                attempt=attempt,
                delay_s=round(delay, 3),
                error=one_line(exc),
            )
            if on_retry is not None:
                on_retry(exc, delay)
            if stopping is None:
                await asyncio.sleep(delay)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), delay)


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for logs and dead-letter reasons."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


@dataclass
class _Stage:
    name: str
    factory: Callable[[], Awaitable[None]]
    background: bool


class Supervisor:
    """Runs a role's stages; the first error wins. See the module docstring.

    ``add`` stages, then ``await run()`` once. :attr:`stopping` is the event sources watch
    for a graceful stop; :attr:`ready` is what ``/readyz`` answers.
    """

    def __init__(self, name: str, *, cancel_timeout_s: float = 10.0) -> None:
        self.name = name
        self.cancel_timeout_s = cancel_timeout_s
        self.stopping = asyncio.Event()
        self.error: BaseException | None = None
        self.failed_stage: str | None = None
        self._stages: list[_Stage] = []
        self._running = False
        self._ended = False
        self._gates: list[Callable[[], bool]] = []
        self._tasks: dict[asyncio.Task[None], _Stage] = {}
        self._added = asyncio.Event()  # wakes run() when a stage joins the running graph

    def add(
        self, name: str, factory: Callable[[], Awaitable[None]], *, background: bool = False
    ) -> None:
        """A stage: ``factory()`` is awaited as its own task once :meth:`run` starts, or at
        once while it runs (refused once the running graph is stopping or has ended; before
        :meth:`run`, a stage may join a graph already asked to stop, to drain)."""
        if self._ended or self.error is not None or (self._running and self.stopping.is_set()):
            raise ConfigError(f"{self.name}: stage {name} added after the graph stopped")
        stage = _Stage(name, factory, background)
        if not self._running:
            self._stages.append(stage)
            return
        self._tasks[asyncio.create_task(_named(stage), name=f"{self.name}:{name}")] = stage
        self._added.set()

    def ready_when(self, gate: Callable[[], bool]) -> None:
        """Readiness also needs ``gate()`` (e.g. at least one source up)."""
        self._gates.append(gate)

    @property
    def ready(self) -> bool:
        return (
            self._running
            and self.error is None
            and not self.stopping.is_set()
            and all(gate() for gate in self._gates)
        )

    def request_stop(self) -> None:
        """Stop reading input; what was read is still processed (graceful)."""
        if not self.stopping.is_set():
            log.info("runtime.stop_requested", graph=self.name)
            self.stopping.set()

    def fail(self, stage: str, error: BaseException) -> None:
        """Record the first error (later ones are logged only)."""
        if self.error is None:
            self.error, self.failed_stage = error, stage
            log.error("runtime.stage_failed", graph=self.name, stage=stage, error=one_line(error))
        else:
            log.info("runtime.later_error", graph=self.name, stage=stage, error=one_line(error))

    async def run(self) -> None:
        """Run every stage until the foreground ends; raise the first error."""
        if self._running:
            raise ConfigError(f"{self.name}: run() called twice")
        self._running = True
        tasks = self._tasks
        for stage in self._stages:
            tasks[asyncio.create_task(_named(stage), name=f"{self.name}:{stage.name}")] = stage
        tasks[asyncio.create_task(_watch_loop(), name=f"{self.name}:loop-watchdog")] = _Stage(
            "loop-watchdog", _watch_loop, background=True
        )
        try:
            await self._until_done(tasks)
        finally:
            self._ended = True
            await self._cancel(t for t in tasks if not t.done())
            self._running = False
        if self.error is not None:
            raise self.error

    async def _until_done(self, tasks: dict[asyncio.Task[None], _Stage]) -> None:
        """Until no foreground stage is left (stages added meanwhile included) or one fails."""
        seen: set[asyncio.Task[None]] = set()
        while any(t not in seen and not s.background for t, s in tasks.items()):
            self._added.clear()
            added = asyncio.create_task(_until_set(self._added))
            try:
                done, _ = await asyncio.wait(
                    {t for t in tasks if t not in seen} | {added},
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                added.cancel()
            for task in done - {added}:
                seen.add(task)
                if self._ended_badly(task, tasks[task]):
                    return

    def _ended_badly(self, task: asyncio.Task[None], stage: _Stage) -> bool:
        """Record a stage's end: True when it raised (the graph fails)."""
        if task.cancelled():
            return False
        error = task.exception()
        if error is not None:
            self.fail(stage.name, _as_veil_error(stage.name, error))
            return True
        if stage.background:
            log.info("runtime.background_stage_ended", graph=self.name, stage=stage.name)
        return False

    async def _cancel(self, tasks: Iterable[asyncio.Task[None]]) -> None:
        pending = list(tasks)
        for task in pending:
            task.cancel()
        if pending:
            _, stuck = await asyncio.wait(pending, timeout=self.cancel_timeout_s)
            for task in stuck:
                log.error("runtime.stage_stuck", graph=self.name, stage=task.get_name())


async def _until_set(event: asyncio.Event) -> None:
    await event.wait()


async def _named(stage: _Stage) -> None:
    await stage.factory()


def _as_veil_error(stage: str, error: BaseException) -> BaseException:
    if isinstance(error, VeilError):
        return error
    wrapped = StageFailed(f"stage {stage} failed: {one_line(error)}")
    wrapped.__cause__ = error
    return wrapped


async def _watch_loop() -> None:
    """Log when the event loop did not run for a while: some stage blocked it."""
    interval = 0.1
    while True:
        before = time.monotonic()
        await asyncio.sleep(interval)
        stalled = time.monotonic() - before - interval
        if stalled > _LOOP_STALL_S:
            log.warning("runtime.loop_stalled", seconds=round(stalled, 2))


@contextlib.contextmanager
def stop_on_signals(supervisor: Supervisor) -> Any:
    """SIGINT/SIGTERM ask ``supervisor`` to stop gracefully; a second one cancels at once."""
    loop = asyncio.get_running_loop()
    current = asyncio.current_task()

    def on_signal() -> None:
        if supervisor.stopping.is_set() and current is not None:
            log.warning("runtime.second_signal", graph=supervisor.name)
            current.cancel()
        supervisor.request_stop()

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


# -- child processes ---------------------------------------------------------------------------

_PR_SET_PDEATHSIG: Final = 1


def set_parent_death_signal(signum: int) -> None:
    """Ask the kernel to send ``signum`` to this process when its parent dies (Linux)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signum)


# glibc's malloc returns every block over its (adaptive) mmap threshold to the kernel when it
# is freed, so each batch's large tensors are page-faulted in again: 16-25% of the RetinaFace
# tail's time on this project's CPU (19.3 -> 16.2 ms). Keeping up to these sizes on the heap:
MMAP_THRESHOLD_BYTES: Final = 32 * 1024 * 1024  # glibc's largest accepted value on 64-bit
TRIM_THRESHOLD_BYTES: Final = 256 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
# (parameter, value) of every mallopt call, in order: Triton's model.py makes the same calls.
MALLOPT_SETTINGS: Final = (
    (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
    (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
)


def keep_freed_memory() -> bool:
    """Tune glibc's malloc so that freed tensors stay in the process for the next batch
    (idempotent; False where the C library is not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return all(mallopt(parameter, value) for parameter, value in MALLOPT_SETTINGS)


def die_with_parent() -> None:
    """``preexec_fn`` for a child server: the kernel kills it (SIGKILL) when its parent dies,
    even by kill -9, so that no broker or tritonserver is left orphaned on its port."""
    set_parent_death_signal(signal.SIGKILL)


def start_child(
    command: list[str], log_path: Path, env: dict[str, str], what: str
) -> subprocess.Popen[bytes]:
    """Start a child server that dies with this process, its output in ``log_path``;
    ServiceError naming ``what`` when it cannot be run."""
    with log_path.open("wb") as log:
        try:
            return subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                preexec_fn=die_with_parent,  # no orphan on its port if this process dies
            )
        except OSError as exc:
            raise ServiceError(f"cannot run {what}: {exc}") from exc


async def watch_child(
    name: str, process: subprocess.Popen[bytes], log_tail: Callable[[], str]
) -> None:
    """A background stage: raises ServiceError as soon as the child ``process`` exits."""
    while process.poll() is None:
        await asyncio.sleep(0.25)
    last = [line for line in log_tail().splitlines() if line.strip()][-1:] or ["(no output)"]
    raise ServiceError(
        f"{name} (pid {process.pid}) exited with status {process.returncode}; its log ends "
        f"with: {last[0].strip()[:300]}"
    )

"""Tensors to and from a Triton on this host through system shared memory.

Over gRPC a tail's input and outputs travel inside the request and the response: serialised,
framed and copied on both sides (measured on this 2-core CPU for a FaceBoxes 1080p frame,
522 KB in and 522 KB out: 1.2 ms of a 20 ms call). When Triton runs on the same host, the
client can instead write the input into a POSIX shared-memory region that the server maps,
and have the server write the outputs into regions the client maps; the gRPC messages then
carry only names and offsets (Triton's system shared-memory extension).

:class:`SharedMemorySlots` holds a few such sets of regions ("slots"), each large enough for a
batch of the model's ``max_batch_size``, registered with the server at :meth:`start` and
unregistered at :meth:`stop`. A request leases a slot for its whole round trip; a request that
fails or is cancelled retires its slot (the server may still write into it) and a fresh one
takes its place. The server refuses to unregister a region that a request still uses, so a
retired slot's names are unregistered on a later lease (or at :meth:`stop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import InferInput, InferRequestedOutput

from veil.errors import ServiceError

# Triton's datatypes of veil's tails (inputs and outputs) and the numpy type of each.
TENSOR_TYPES: dict[str, type[np.floating[Any]]] = {"FP16": np.float16, "FP32": np.float32}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the served model, per batch item."""

    name: str
    datatype: str  # FP16 or FP32
    shape: tuple[int, ...]  # without the batch dimension

    @property
    def item_bytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(TENSOR_TYPES[self.datatype]).itemsize


@dataclass
class _Region:
    name: str  # as registered with the server, also the key under /dev/shm
    size: int
    handle: Any

    @classmethod
    def create(cls, name: str, size: int) -> _Region:
        return cls(name, size, shm.create_shared_memory_region(name, "/" + name, size))


@dataclass
class Slot:
    """One input region and one region per output, for one request at a time."""

    input: _Region
    outputs: list[_Region]

    def regions(self) -> list[_Region]:
        return [self.input, *self.outputs]

    def request(
        self, spec: TensorSpec, batch: npt.NDArray[Any], outputs: Sequence[TensorSpec]
    ) -> tuple[InferInput, list[InferRequestedOutput]]:
        """``batch`` written into the input region; the request's input and outputs naming
        this slot's regions."""
        shm.set_shared_memory_region(self.input.handle, [batch])
        tensor = InferInput(spec.name, list(batch.shape), spec.datatype)
        tensor.set_shared_memory(self.input.name, batch.nbytes)
        requested = []
        for output, region in zip(outputs, self.outputs, strict=True):
            wanted = InferRequestedOutput(output.name)
            wanted.set_shared_memory(region.name, len(batch) * output.item_bytes)
            requested.append(wanted)
        return tensor, requested

    def output(self, index: int, spec: TensorSpec, rows: int) -> npt.NDArray[Any]:
        """A view of output ``index`` of a ``rows``-item answer (valid until the slot's next
        request: copy it)."""
        view: npt.NDArray[Any] = shm.get_contents_as_numpy(
            self.outputs[index].handle, TENSOR_TYPES[spec.datatype], [rows, *spec.shape]
        )
        return view


class SharedMemorySlots:
    """``slots`` sets of regions for ``model``'s input and outputs on a server of this host."""

    def __init__(
        self,
        model: str,
        input_spec: TensorSpec,
        output_specs: Sequence[TensorSpec],
        max_batch: int,
        slots: int = 2,
    ) -> None:
        if slots < 1 or max_batch < 1:
            raise ValueError("slots and max_batch must be at least 1")
        self.model = model
        self.input_spec = input_spec
        self.output_specs = tuple(output_specs)
        self.max_batch = max_batch
        self.slots = slots
        self._prefix = f"veil-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._made = 0
        self._creating = 0  # slots being registered now
        self._client: Any = None
        self._free: asyncio.Queue[Slot] = asyncio.Queue()
        self._alive: list[Slot] = []
        self._stale: list[str] = []  # retired regions the server still has registered

    async def start(self, client: Any) -> None:
        """Create and register every slot; on any failure nothing stays registered."""
        self._client = client
        try:
            for _ in range(self.slots):
                self._free.put_nowait(await self._new_slot())
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        slots, self._alive = self._alive, []
        for slot in slots:
            await self._retire(slot)
        await self._unregister_stale()
        self._free = asyncio.Queue()
        self._client = None

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[Slot]:
        """A slot for one request, retired if the request does not finish (the next lease
        then makes a fresh one). Registering a fresh slot may raise the server's error."""
        slot = await self._take()
        try:
            yield slot
        except BaseException:
            self._alive.remove(slot)
            await asyncio.shield(self._retire(slot))
            raise
        self._free.put_nowait(slot)

    async def _take(self) -> Slot:
        if self._client is None:
            raise ServiceError(f"shared memory for {self.model} is not started")
        if self._stale:
            await self._unregister_stale()
        if self._free.empty() and len(self._alive) + self._creating < self.slots:
            self._creating += 1
            try:
                return await self._new_slot()
            finally:
                self._creating -= 1
        return await self._free.get()

    async def _new_slot(self) -> Slot:
        n = self._made
        self._made += 1
        sizes = [self.input_spec.item_bytes] + [spec.item_bytes for spec in self.output_specs]
        names = [f"{self._prefix}-{n}-in"] + [
            f"{self._prefix}-{n}-out{i}" for i in range(len(self.output_specs))
        ]
        regions: list[_Region] = []
        try:
            for name, size in zip(names, sizes, strict=True):
                regions.append(_Region.create(name, self.max_batch * size))
        except BaseException:
            for region in regions:
                shm.destroy_shared_memory_region(region.handle)
            raise
        slot = Slot(regions[0], regions[1:])
        self._alive.append(slot)
        try:
            for region in slot.regions():
                await self._client.register_system_shared_memory(
                    region.name, "/" + region.name, region.size
                )
        except BaseException:
            self._alive.remove(slot)
            await asyncio.shield(self._retire(slot))
            raise
        return slot

    async def _retire(self, slot: Slot) -> None:
        """Unmap the slot's regions here (the server keeps its own mapping) and unregister
        them, later where the server still uses one."""
        for region in slot.regions():
            with contextlib.suppress(Exception):
                shm.destroy_shared_memory_region(region.handle)
            self._stale.append(region.name)
        await self._unregister_stale()

    async def _unregister_stale(self) -> None:
        """Unregister the retired regions the server lets go of now (it may also be gone)."""
        stale, self._stale = self._stale, []
        for name in stale:
            try:
                await self._client.unregister_system_shared_memory(name)
            except Exception:  # in use, or the server is unreachable: try again later
                self._stale.append(name)

"""Async gRPC client for a tail served by Triton (see :mod:`workers.untrusted.triton_repo`).

On :meth:`TritonTail.start` the client reads the model's metadata and configuration and, given
the repository's :class:`TailManifest`, checks that the server runs that tail: same input
shape, same outputs, same weights. :meth:`TritonTail.infer` returns the outputs in the order
the tail returns them, whichever of the two exported models (``<name>_tail`` with ``loc``,
``conf``; ``<name>_tail_ts`` with ``loc__0``, ``conf__1``) it talks to.

A repository exported with a profile bank serves one tail per profile that has its own;
:class:`TailRouter` holds one :class:`TritonTail` per model and picks the one that a message's
profile id names in the manifest (``"none"``: the clean tail).

With ``tls`` (:class:`~veil.config.TritonTlsConfig`) the client speaks gRPC over TLS: the
server is verified against ``ca_file`` and, for a server that wants one, ``cert_file``/
``key_file`` are presented (mutual TLS). Without it, a non-loopback server gets one warning.

Errors: a server that is down, overloaded or too slow raises :class:`ServiceError` (retriable);
a request the server rejects as malformed raises :class:`ConfigError`; a failure inside the
model raises a :class:`ServiceError` marked not retriable.
"""

from __future__ import annotations

import asyncio
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt
import structlog
import torch
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException
from tritonclient.utils.shared_memory import SharedMemoryException

from stream.kafka import is_loopback, warn_unencrypted
from veil.config import TritonTlsConfig
from veil.errors import ConfigError, ServiceError, VeilError
from workers.untrusted.shared_memory import TENSOR_TYPES, SharedMemorySlots, Slot, TensorSpec
from workers.untrusted.triton_repo import (
    TAIL_SHA256_PARAMETER,
    WEIGHTS_ID_PARAMETER,
    TailManifest,
)

log = structlog.get_logger(__name__)

# How tensors travel: "on" through system shared memory (the server must run on this host),
# "off" inside the gRPC messages, "auto" shared memory for a loopback URL where the server
# accepts it (else gRPC, with one warning).
SharedMemoryMode = Literal["auto", "on", "off"]

FloatArray = npt.NDArray[np.float32]
ActivationArray = npt.NDArray[np.floating[Any]]  # float16 as from the wire, or float32
_TORCH_TYPES: dict[type[np.floating[Any]], torch.dtype] = {
    np.float16: torch.float16,
    np.float32: torch.float32,
}

_RETRIABLE_STATUSES = {
    "StatusCode.UNAVAILABLE",
    "StatusCode.DEADLINE_EXCEEDED",
    "StatusCode.RESOURCE_EXHAUSTED",
    "StatusCode.ABORTED",
    "StatusCode.CANCELLED",
}
_REJECTED_STATUSES = {
    "StatusCode.INVALID_ARGUMENT",
    "StatusCode.NOT_FOUND",
    "StatusCode.UNIMPLEMENTED",
    "StatusCode.FAILED_PRECONDITION",
    "StatusCode.OUT_OF_RANGE",
}
_INDEXED_NAME = re.compile(r"^(?P<base>.+)__(?P<index>\d+)$")


def grpc_client(url: str, tls: TritonTlsConfig | None = None) -> Any:
    """A ``tritonclient.grpc.aio`` client for ``url``: over TLS when ``tls.enabled`` (the
    files are read now: a missing one is a ConfigError), else plaintext (one warning per
    process when ``url`` is not loopback)."""
    if tls is None or not tls.enabled:
        warn_unencrypted("triton", url)
        return InferenceServerClient(url)
    try:
        return InferenceServerClient(
            url,
            ssl=True,
            root_certificates=tls.ca_file,
            private_key=tls.key_file,
            certificate_chain=tls.cert_file,
        )
    except OSError as exc:
        raise ConfigError(f"triton.tls: cannot read {exc.filename}: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class TailSignature:
    """What the served model takes and returns, as read from the server."""

    input_name: str
    datatype: str  # FP16 (veil's exports) or FP32 (older ones); activations are sent as it
    activation_shape: tuple[int, int, int]
    outputs: tuple[TensorSpec, ...]  # named as the server names them, in the tail's order
    max_batch_size: int
    weights_id: str | None

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(output.name for output in self.outputs)

    @property
    def input(self) -> TensorSpec:
        return TensorSpec(self.input_name, self.datatype, self.activation_shape)


class TritonTail:
    """Runs a tail on Triton: ``async with TritonTail(url, name, manifest) as tail: ...``."""

    def __init__(
        self,
        url: str,
        model_name: str,
        manifest: TailManifest | None = None,
        *,
        timeout_s: float = 10.0,
        tls: TritonTlsConfig | None = None,
        shared_memory: SharedMemoryMode = "auto",
    ) -> None:
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s must be positive, got {timeout_s}")
        if shared_memory not in get_args(SharedMemoryMode):
            raise ConfigError(f"shared_memory must be auto, on or off, got {shared_memory!r}")
        self.url = url
        self.model_name = model_name
        self.manifest = manifest
        self.timeout_s = timeout_s
        self.tls = tls  # gRPC over TLS when tls.enabled
        self.shared_memory = shared_memory
        self._client: Any = None
        self._signature: TailSignature | None = None
        self._slots: SharedMemorySlots | None = None

    def sibling(self, model_name: str, manifest: TailManifest | None) -> TritonTail:
        """A client of another model on the same server, with this one's settings."""
        return TritonTail(
            self.url,
            model_name,
            manifest,
            timeout_s=self.timeout_s,
            tls=self.tls,
            shared_memory=self.shared_memory,
        )

    @property
    def uses_shared_memory(self) -> bool:
        return self._slots is not None

    @property
    def signature(self) -> TailSignature:
        if self._signature is None:
            raise ServiceError(f"TritonTail({self.model_name}) is not started")
        return self._signature

    async def start(self) -> None:
        """Connect and check that the server serves the expected tail."""
        if self._client is not None:
            return
        self._client = grpc_client(self.url, self.tls)
        try:
            if not await self._call(self._client.is_model_ready, self.model_name):
                raise ServiceError(f"model {self.model_name!r} is not ready on {self.url}")
            metadata = await self._call(self._client.get_model_metadata, self.model_name)
            config = await self._call(self._client.get_model_config, self.model_name)
            self._signature = _signature(self.model_name, metadata, config.config, self.manifest)
            await self._start_shared_memory(self._signature)
        except BaseException:
            await self.stop()
            raise

    async def _start_shared_memory(self, signature: TailSignature) -> None:
        """Register the shared-memory slots the mode asks for; in ``auto``, a server that
        cannot map them (one in another container, say) leaves the tensors on gRPC."""
        if self.shared_memory == "off" or (
            self.shared_memory == "auto" and not is_loopback(self.url)
        ):
            return
        slots = SharedMemorySlots(
            self.model_name, signature.input, signature.outputs, signature.max_batch_size
        )
        try:
            await slots.start(self._client)
        except (InferenceServerException, SharedMemoryException, OSError) as exc:
            reason = f"{self.model_name} on {self.url}: system shared memory refused: {exc}"
            if self.shared_memory == "on":
                raise ConfigError(
                    f"{reason} (shared_memory on needs the server on this host)"
                ) from exc
            log.warning("triton.shared_memory_off", reason=reason, fallback="tensors over gRPC")
            return
        self._slots = slots

    async def stop(self) -> None:
        if self._slots is not None:
            slots, self._slots = self._slots, None
            await slots.stop()
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def load(self) -> None:
        """Ask the server to load this model from its repository (a server in explicit model
        control, as veil's embedded one: a model exported after it started)."""
        client = grpc_client(self.url, self.tls)
        try:
            await client.load_model(self.model_name, client_timeout=max(self.timeout_s, 60.0))
        except InferenceServerException as exc:
            raise _translate(exc, self.model_name, self.url) from exc
        finally:
            await client.close()

    async def __aenter__(self) -> TritonTail:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def infer(self, activations: ActivationArray) -> tuple[FloatArray, ...]:
        """``[N, C, H, W]`` float16 or float32 activations -> the tail's raw outputs, each
        ``[N, ...]``. They are sent in the model's input type: a float16 payload to an FP16
        tail (veil's exports) as it is, without a copy.

        Batches larger than the model's ``max_batch_size`` are sent as concurrent chunks.
        """
        signature = self.signature
        if (
            not isinstance(activations, np.ndarray)
            or activations.dtype not in TENSOR_TYPES.values()
        ):
            kind = activations.dtype if isinstance(activations, np.ndarray) else type(activations)
            raise ConfigError(
                f"{self.model_name}: activations must be a float16 or float32 array, not {kind}"
            )
        if activations.ndim != 4 or activations.shape[1:] != signature.activation_shape:
            raise ConfigError(
                f"{self.model_name}: activations of shape {activations.shape} do not fit the "
                f"model's input [N, {', '.join(map(str, signature.activation_shape))}]"
            )
        if len(activations) == 0:
            raise ConfigError(f"{self.model_name}: empty batch")
        step = signature.max_batch_size
        chunks = [activations[i : i + step] for i in range(0, len(activations), step)]
        results = await asyncio.gather(*(self._infer_chunk(chunk) for chunk in chunks))
        if len(results) == 1:
            return results[0]
        return tuple(np.concatenate(parts) for parts in zip(*results, strict=True))

    async def _infer_chunk(self, chunk: ActivationArray) -> tuple[FloatArray, ...]:
        signature = self.signature
        batch = cast(chunk, TENSOR_TYPES[signature.datatype])
        if self._slots is not None:
            return await self._infer_shared(self._slots, batch)
        request = InferInput(signature.input_name, list(chunk.shape), signature.datatype)
        request.set_data_from_numpy(batch)
        outputs = [InferRequestedOutput(name) for name in signature.output_names]
        result = await self._call(self._client.infer, self.model_name, [request], outputs=outputs)
        # A float32 copy (veil's tails answer in FP16) of the read-only response buffer.
        arrays = []
        for name in signature.output_names:
            array = result.as_numpy(name)
            self._require_rows(name, None if array is None else len(array), len(chunk))
            arrays.append(cast(array, np.float32))
        return tuple(arrays)

    async def _infer_shared(
        self, slots: SharedMemorySlots, batch: ActivationArray
    ) -> tuple[FloatArray, ...]:
        """One request through a leased slot: the outputs copied out before it is freed."""
        outputs = self.signature.outputs
        try:
            async with slots.lease() as slot:
                tensor, requested = slot.request(self.signature.input, batch, outputs)
                result = await self._call(
                    self._client.infer, self.model_name, [tensor], outputs=requested
                )
                return tuple(self._copied(slot, result, len(batch)))
        except InferenceServerException as exc:  # registering a fresh slot
            raise _translate(exc, self.model_name, self.url) from exc

    def _copied(self, slot: Slot, result: Any, rows: int) -> list[FloatArray]:
        """The outputs of ``result`` out of ``slot``, as float32 arrays of their own."""
        arrays = []
        for i, spec in enumerate(self.signature.outputs):
            answered = result.get_output(spec.name)
            self._require_rows(
                spec.name, None if answered is None else int(answered.shape[0]), rows
            )
            view = slot.output(i, spec, rows)
            single = cast(view, np.float32)
            arrays.append(view.copy() if single is view else single)
        return arrays

    def _require_rows(self, name: str, answered: int | None, rows: int) -> None:
        """A ServiceError unless output ``name`` came back (``answered`` rows) with ``rows``."""
        if answered != rows:
            raise ServiceError(
                f"{self.model_name}: output {name!r} came back "
                f"{'missing' if answered is None else f'with {answered} rows'} for a batch "
                f"of {rows}"
            )

    async def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        if self._client is None:
            raise ServiceError(f"TritonTail({self.model_name}) is not started")
        try:
            return await method(*args, client_timeout=self.timeout_s, **kwargs)
        except InferenceServerException as exc:
            raise _translate(exc, self.model_name, self.url) from exc


def cast(array: npt.NDArray[Any], dtype: type[np.floating[Any]]) -> npt.NDArray[Any]:
    """``array`` as a C-contiguous ``dtype`` array (itself when it already is one, else a new
    array), converted by torch: numpy 1.26 converts float16 element by element (measured:
    0.37 ms against torch's 0.02 for a FaceBoxes frame's 174k ``loc`` values)."""
    if array.dtype == dtype and array.flags.c_contiguous:
        return array
    with warnings.catch_warnings():  # a read-only response buffer: it is only read here
        warnings.simplefilter("ignore", UserWarning)
        source = torch.from_numpy(np.ascontiguousarray(array))
    converted: npt.NDArray[Any] = source.to(_TORCH_TYPES[dtype]).numpy()
    return converted


def _translate(exc: InferenceServerException, model: str, url: str) -> VeilError:
    status = str(exc.status())
    message = f"Triton at {url}, model {model!r}: {exc.message()} [{status}]"
    if status in _REJECTED_STATUSES:
        return ConfigError(message)
    error = ServiceError(message)
    if status not in _RETRIABLE_STATUSES:
        error.retriable = False  # the model itself failed; the same request would fail again
    return error


def _signature(
    model: str, metadata: Any, config: Any, manifest: TailManifest | None
) -> TailSignature:
    if len(metadata.inputs) != 1:
        raise ConfigError(f"model {model!r} has {len(metadata.inputs)} inputs; a tail has one")
    tensor = metadata.inputs[0]
    dims = [int(d) for d in tensor.shape]
    if tensor.datatype not in TENSOR_TYPES or config.max_batch_size < 1 or len(dims) != 4:
        raise ConfigError(
            f"model {model!r} takes {tensor.datatype} {dims} with max_batch_size "
            f"{config.max_batch_size}; a tail takes batched FP16 or FP32 [N, C, H, W]"
        )
    c, h, w = dims[1:]
    served_names = [output.name for output in metadata.outputs]
    by_base = {_base_name(name): name for name in served_names}
    weights_parameter = config.parameters.get(WEIGHTS_ID_PARAMETER)
    weights_id = weights_parameter.string_value if weights_parameter is not None else None
    if manifest is None:
        ordered = tuple(sorted(served_names, key=_output_index))
    else:
        if (c, h, w) != manifest.activation_shape:
            raise ConfigError(
                f"model {model!r} takes activations [{c}, {h}, {w}] but the manifest "
                f"({manifest.detector} at {manifest.geometry}) expects "
                f"{list(manifest.activation_shape)}: the server runs another geometry or model"
            )
        missing = [name for name in manifest.output_names if name not in by_base]
        if missing:
            raise ConfigError(
                f"model {model!r} returns {served_names}, missing {missing} that the manifest "
                f"of {manifest.detector} names"
            )
        if weights_id is not None and weights_id != manifest.weights_id:
            raise ConfigError(
                f"model {model!r} serves weights {weights_id[:16]}…, the manifest expects "
                f"{manifest.weights_id[:16]}… ({manifest.detector})"
            )
        _check_tail_sha256(model, config, manifest)
        ordered = tuple(by_base[name] for name in manifest.output_names)
    return TailSignature(
        tensor.name,
        tensor.datatype,
        (c, h, w),
        _output_specs(model, metadata, ordered),
        int(config.max_batch_size),
        weights_id,
    )


def _output_specs(model: str, metadata: Any, ordered: Sequence[str]) -> tuple[TensorSpec, ...]:
    served = {output.name: output for output in metadata.outputs}
    specs = []
    for name in ordered:
        output = served[name]
        if output.datatype not in TENSOR_TYPES:
            raise ConfigError(
                f"model {model!r} returns {name!r} as {output.datatype}; a tail returns FP16 "
                "or FP32"
            )
        specs.append(TensorSpec(name, output.datatype, tuple(int(d) for d in output.shape[1:])))
    return tuple(specs)


def _check_tail_sha256(model: str, config: Any, manifest: TailManifest) -> None:
    """The served model must be the tail the manifest names for it (not an older export)."""
    parameter = config.parameters.get(TAIL_SHA256_PARAMETER)
    served = parameter.string_value if parameter is not None else None
    expected = manifest.torchscript_sha256_of(model)
    if served and expected and served != expected:
        raise ConfigError(
            f"model {model!r} serves tail {served[:16]}…, the manifest expects {expected[:16]}…: "
            "the server runs another export of the repository (reload it)"
        )


def _base_name(name: str) -> str:
    match = _INDEXED_NAME.match(name)
    return match["base"] if match else name


def _output_index(name: str) -> int:
    """Position of an output in the tail's result; unindexed names keep the server's order."""
    match = _INDEXED_NAME.match(name)
    return int(match["index"]) if match else 0


class TailRouter:
    """Per profile id, the :class:`TritonTail` of the model that reads its activations.

    ``tails`` maps model names to clients, ``routes`` profile ids to model names. Build one
    from a repository's manifest with :meth:`from_manifest`. :meth:`start` starts every tail
    (so a server that lacks a profile's model fails at start, not on its first frame);
    :meth:`stop` stops only the tails the router made itself.
    """

    def __init__(
        self,
        tails: Mapping[str, TritonTail],
        routes: Mapping[str, str],
        *,
        owned: frozenset[str] = frozenset(),
    ) -> None:
        missing = sorted(set(routes.values()) - set(tails))
        if missing:
            raise ConfigError(f"TailRouter: no tail client for model(s) {missing}")
        self.tails = dict(tails)
        self.routes = dict(routes)
        self._owned = owned

    @classmethod
    def from_manifest(cls, tail: TritonTail, manifest: TailManifest) -> TailRouter:
        """Route every profile of ``manifest`` to the models of ``tail``'s backend.

        ``tail`` (one of the repository's models, e.g. the clean ``<name>_tail`` or
        ``<name>_tail_ts``) says which backend the server runs; the other models of that
        backend get clients like it (same URL, timeout and TLS settings).
        """
        backend = manifest.backend_of(tail.model_name)
        if backend is None:
            raise ConfigError(
                f"model {tail.model_name!r} is not a tail of the repository's manifest "
                f"(it has {manifest.models('python') + manifest.models('torchscript')})"
            )
        routes = {pid: r.model(backend) for pid, r in manifest.profile_routes().items()}
        tails = {tail.model_name: tail}
        for name in routes.values():
            if name not in tails:
                tails[name] = tail.sibling(name, manifest)
        return cls(tails, routes, owned=frozenset(tails) - {tail.model_name})

    def model_for(self, profile_id: str) -> str | None:
        """The model that reads ``profile_id``'s activations; None for an unknown profile."""
        return self.routes.get(profile_id)

    async def add_routes(self, manifest: TailManifest, *, load: bool) -> list[str]:
        """Serve the profiles of ``manifest`` this router does not know yet (a repository
        re-exported with newly calibrated profiles); with ``load``, the server loads each new
        model first. Returns the profile ids added; nothing changes when one fails."""
        template = next(iter(self.tails.values()))
        backend = manifest.backend_of(template.model_name)
        if backend is None:
            raise ConfigError(f"model {template.model_name!r} is not in the new manifest")
        new = {
            pid: r.model(backend)
            for pid, r in manifest.profile_routes().items()
            if pid not in self.routes
        }
        started: dict[str, TritonTail] = {}
        try:
            for name in sorted(set(new.values()) - set(self.tails)):
                tail = template.sibling(name, manifest)
                if load:
                    await tail.load()
                await tail.start()
                started[name] = tail
        except BaseException:
            await asyncio.gather(*(t.stop() for t in started.values()))
            raise
        self.tails.update(started)
        self._owned |= frozenset(started)
        self.routes.update(new)
        return sorted(new)

    async def start(self) -> None:
        results = await asyncio.gather(
            *(tail.start() for tail in self.tails.values()), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.stop()
            raise errors[0]

    async def stop(self) -> None:
        await asyncio.gather(*(self.tails[name].stop() for name in sorted(self._owned)))

    async def infer(self, profile_id: str, activations: ActivationArray) -> tuple[FloatArray, ...]:
        """Run ``activations`` (all of one profile) through that profile's tail."""
        model = self.model_for(profile_id)
        if model is None:
            raise ConfigError(f"unknown profile {profile_id}: no tail model serves it")
        return await self.tails[model].infer(activations)

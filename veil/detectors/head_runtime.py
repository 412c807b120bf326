"""How the trusted zone runs a detector's head (``model.head_runtime``).

* ``torch``: a copy of the head with batch norm folded into its convolutions (FaceBoxes has
  unfolded BN; RetinaFace's ONNX weights come folded) run in channels_last, where max pooling
  and the convolutions are several times faster than in NCHW on a CPU.
* ``onnxruntime``: the same folded head exported to ONNX (in memory, once) and run by
  onnxruntime's CPU provider; on this project's 2-core host it runs the FaceBoxes head at
  1920x1088 in about half the time of channels_last torch.
* ``auto`` (the default): onnxruntime on a CPU where it is installed, torch otherwise (on a
  GPU, cuDNN).

Both give :meth:`SplitDetector.head`'s activation to float rounding (tests check 1e-4
absolute on real frames). The noise layer runs after them, in torch.

``model.precision`` ``float16`` runs the torch head in half precision (the GPU's setting: half
the memory traffic, and tensor cores); the input is cast where it turns channels_last, so it
costs no extra pass. onnxruntime runs float32 only.
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from veil.detectors.base import InputGeometry, SplitDetector
from veil.errors import ConfigError

HeadRuntime = Literal["auto", "torch", "onnxruntime"]
HEAD_RUNTIMES: tuple[str, ...] = get_args(HeadRuntime)
PRECISIONS: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}
_INPUT = "input"
_OUTPUT = "activation"


class _Head(nn.Module):
    """A detector's head as a module's ``forward`` (what tracing and export call)."""

    def __init__(self, detector: SplitDetector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: Tensor) -> Tensor:
        return self.detector.head(x)


def fold_batch_norm(detector: SplitDetector) -> SplitDetector:
    """A frozen copy of ``detector`` whose conv + BatchNorm pairs (a module holding a ``conv``
    Conv2d and a ``bn`` BatchNorm2d, as FaceBoxes' blocks do) are each one biased conv."""
    folded = copy.deepcopy(detector).eval()
    for module in folded.modules():
        conv, bn = getattr(module, "conv", None), getattr(module, "bn", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            module.conv = fuse_conv_bn_eval(conv, bn)
            module.bn = nn.Identity()
    return folded.requires_grad_(False)


class HeadRunner(ABC):
    """Normalised input ``[N, 3, H, W]`` (contiguous float32) -> activation ``[N, C, h, w]``.

    Torch's intra-op threads are the caller's to set (``torch.set_num_threads`` in the thread
    that calls); onnxruntime's pool is the session's, sized by :meth:`set_threads`.
    """

    name: str
    threads: int
    dtype: torch.dtype = torch.float32  # the activation's, as it comes out

    @abstractmethod
    def __call__(self, x: Tensor) -> Tensor: ...

    @abstractmethod
    def set_threads(self, threads: int) -> None:
        """Intra-op threads of the runtime's own pool for the calls that follow."""


class TorchHead(HeadRunner):
    name = "torch"

    def __init__(
        self,
        detector: SplitDetector,
        device: torch.device,
        threads: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        head = _Head(fold_batch_norm(detector)).to(device, dtype)
        self.module = head.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.threads = threads
        self.dtype = dtype

    def set_threads(self, threads: int) -> None:
        self.threads = threads  # torch's pool: the calling thread's torch.set_num_threads

    @torch.no_grad()  # not inference_mode: the noise is added in place outside it
    def __call__(self, x: Tensor) -> Tensor:
        out: Tensor = self.module(x.to(self.dtype, memory_format=torch.channels_last))
        return out.contiguous()


class OnnxHead(HeadRunner):
    """The exported head in an onnxruntime session, opened on the first call (after the
    role's thread count is known) and again after :meth:`set_threads` changes it."""

    name = "onnxruntime"

    def __init__(self, detector: SplitDetector, geometry: InputGeometry, threads: int) -> None:
        self.model = export_head_onnx(detector, geometry)
        self.threads = threads
        self._session: Any = None

    def set_threads(self, threads: int) -> None:
        if threads != self.threads:
            self.threads, self._session = threads, None

    def _open(self) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(self.model, options, providers=["CPUExecutionProvider"])

    def __call__(self, x: Tensor) -> Tensor:
        if self._session is None:
            self._session = self._open()
        array = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)
        (out,) = self._session.run([_OUTPUT], {_INPUT: array})
        return torch.from_numpy(out)


def export_head_onnx(detector: SplitDetector, geometry: InputGeometry) -> bytes:
    """The folded head of a CPU copy of ``detector`` as ONNX bytes, batch size dynamic."""
    source = fold_batch_norm(detector).to("cpu")
    probe = torch.zeros(1, 3, geometry.height, geometry.width)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings(), torch.no_grad():
        path = Path(folder) / "head.onnx"
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            _Head(source),
            (probe,),
            path,
            dynamo=False,
            input_names=[_INPUT],
            output_names=[_OUTPUT],
            dynamic_axes={_INPUT: {0: "batch"}, _OUTPUT: {0: "batch"}},
            opset_version=17,
        )
        return path.read_bytes()


def resolve_runtime(requested: str, device: torch.device, precision: str = "float32") -> str:
    """``auto`` -> onnxruntime on a CPU where it is installed (float32), else torch; checks
    the rest."""
    if requested not in HEAD_RUNTIMES:
        raise ConfigError(
            f"model.head_runtime {requested!r} is not one of {', '.join(HEAD_RUNTIMES)}"
        )
    if precision not in PRECISIONS:
        raise ConfigError(f"model.precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    installed = importlib.util.find_spec("onnxruntime") is not None
    if requested == "auto":
        onnx = installed and device.type == "cpu" and precision == "float32"
        return "onnxruntime" if onnx else "torch"
    if requested == "onnxruntime" and precision != "float32":
        raise ConfigError(
            f"model.head_runtime onnxruntime runs float32 only; model.precision {precision} "
            "needs head_runtime torch (or auto)"
        )
    if requested == "onnxruntime" and not installed:
        raise ConfigError(
            "model.head_runtime onnxruntime: onnxruntime is not installed (pip install "
            "'veil[edge]'), or set head_runtime: torch"
        )
    if requested == "onnxruntime" and device.type != "cpu":
        raise ConfigError(
            f"model.head_runtime onnxruntime runs the head on the CPU; device {device} "
            "needs head_runtime torch (or auto)"
        )
    return requested


def build_head(
    detector: SplitDetector,
    geometry: InputGeometry,
    device: torch.device,
    runtime: str = "auto",
    threads: int = 1,
    precision: str = "float32",
) -> HeadRunner:
    """The head of ``detector`` at ``geometry`` on ``device``, run by ``runtime`` in
    ``precision``."""
    if threads < 1:
        raise ConfigError(f"head threads must be at least 1, got {threads}")
    if resolve_runtime(runtime, device, precision) == "onnxruntime":
        return OnnxHead(detector, geometry, threads)
    return TorchHead(detector, device, threads, PRECISIONS[precision])

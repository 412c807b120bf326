"""The original FaceBoxes.PyTorch inference, restated compactly as a test oracle.

Kept independent of ``veil``: the unsplit network as upstream ``models/faceboxes.py`` runs it
(test phase, softmax inside), its loop-based ``PriorBox`` and ``decode``, the classic
``py_cpu_nms`` and the ``test.py`` pipeline (float image, ``cv2.resize`` by a factor, mean
subtraction, threshold 0.05, top 5000, NMS 0.3, keep 750).
"""

from __future__ import annotations

from itertools import product
from math import ceil
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# upstream data/config.py (clip is False: priors are not clamped)
MIN_SIZES = [[32, 64, 128], [256], [512]]
STEPS = [32, 64, 128]
VARIANCE = [0.1, 0.2]


class BasicConv2d(nn.Module):
    def __init__(
        self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class CRelu(BasicConv2d):
    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return F.relu(torch.cat([x, -x], 1), inplace=True)


class Inception(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(128, 32, kernel_size=1, padding=0)
        self.branch1x1_2 = BasicConv2d(128, 32, kernel_size=1, padding=0)
        self.branch3x3_reduce = BasicConv2d(128, 24, kernel_size=1, padding=0)
        self.branch3x3 = BasicConv2d(24, 32, kernel_size=3, padding=1)
        self.branch3x3_reduce_2 = BasicConv2d(128, 24, kernel_size=1, padding=0)
        self.branch3x3_2 = BasicConv2d(24, 32, kernel_size=3, padding=1)
        self.branch3x3_3 = BasicConv2d(32, 32, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b2 = self.branch1x1_2(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        b3 = self.branch3x3(self.branch3x3_reduce(x))
        b4 = self.branch3x3_3(self.branch3x3_2(self.branch3x3_reduce_2(x)))
        return torch.cat([b1, b2, b3, b4], 1)


class OriginalFaceBoxes(nn.Module):
    """``FaceBoxes(phase='test', num_classes=2)``: returns (loc, softmax(conf))."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = CRelu(3, 24, kernel_size=7, stride=4, padding=3)
        self.conv2 = CRelu(48, 64, kernel_size=5, stride=2, padding=2)
        self.inception1 = Inception()
        self.inception2 = Inception()
        self.inception3 = Inception()
        self.conv3_1 = BasicConv2d(128, 128, kernel_size=1, stride=1, padding=0)
        self.conv3_2 = BasicConv2d(128, 256, kernel_size=3, stride=2, padding=1)
        self.conv4_1 = BasicConv2d(256, 128, kernel_size=1, stride=1, padding=0)
        self.conv4_2 = BasicConv2d(128, 256, kernel_size=3, stride=2, padding=1)
        self.loc = nn.Sequential(
            nn.Conv2d(128, 21 * 4, kernel_size=3, padding=1),
            nn.Conv2d(256, 1 * 4, kernel_size=3, padding=1),
            nn.Conv2d(256, 1 * 4, kernel_size=3, padding=1),
        )
        self.conf = nn.Sequential(
            nn.Conv2d(128, 21 * 2, kernel_size=3, padding=1),
            nn.Conv2d(256, 1 * 2, kernel_size=3, padding=1),
            nn.Conv2d(256, 1 * 2, kernel_size=3, padding=1),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)
        x = F.max_pool2d(self.conv2(x), kernel_size=3, stride=2, padding=1)
        x = self.inception3(self.inception2(self.inception1(x)))
        sources = [x]
        x = self.conv3_2(self.conv3_1(x))
        sources.append(x)
        x = self.conv4_2(self.conv4_1(x))
        sources.append(x)
        loc = [
            l_(s).permute(0, 2, 3, 1).contiguous() for s, l_ in zip(sources, self.loc, strict=True)
        ]
        conf = [
            c(s).permute(0, 2, 3, 1).contiguous() for s, c in zip(sources, self.conf, strict=True)
        ]
        loc_t = torch.cat([o.view(o.size(0), -1) for o in loc], 1)
        conf_t = torch.cat([o.view(o.size(0), -1) for o in conf], 1)
        return loc_t.view(loc_t.size(0), -1, 4), F.softmax(conf_t.view(conf_t.size(0), -1, 2), -1)


def load_original(path: Path) -> OriginalFaceBoxes:
    """``test.py``'s load_model: strip ``module.``, then load (strictly, for the oracle)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state:
        state = state["state_dict"]
    state = {
        k.split("module.", 1)[-1] if k.startswith("module.") else k: v for k, v in state.items()
    }
    net = OriginalFaceBoxes()
    net.load_state_dict(state, strict=True)
    return net.eval()


def prior_box(image_size: tuple[int, int]) -> Tensor:
    """Upstream PriorBox.forward for ``image_size = (height, width)``."""
    steps, min_sizes_all = STEPS, MIN_SIZES
    feature_maps = [[ceil(image_size[0] / s), ceil(image_size[1] / s)] for s in steps]
    anchors: list[float] = []
    for k, f in enumerate(feature_maps):
        for i, j in product(range(f[0]), range(f[1])):
            for min_size in min_sizes_all[k]:
                s_kx = min_size / image_size[1]
                s_ky = min_size / image_size[0]
                offs: list[float]
                if min_size == 32:
                    offs = [0, 0.25, 0.5, 0.75]
                elif min_size == 64:
                    offs = [0, 0.5]
                else:
                    offs = []
                if offs:
                    dense_cx = [(j + o) * steps[k] / image_size[1] for o in offs]
                    dense_cy = [(i + o) * steps[k] / image_size[0] for o in offs]
                    for cy, cx in product(dense_cy, dense_cx):
                        anchors += [cx, cy, s_kx, s_ky]
                else:
                    cx = (j + 0.5) * steps[k] / image_size[1]
                    cy = (i + 0.5) * steps[k] / image_size[0]
                    anchors += [cx, cy, s_kx, s_ky]
    return torch.Tensor(anchors).view(-1, 4)


def decode(loc: Tensor, priors: Tensor, variances: list[float]) -> Tensor:
    boxes = torch.cat(
        (
            priors[:, :2] + loc[:, :2] * variances[0] * priors[:, 2:],
            priors[:, 2:] * torch.exp(loc[:, 2:] * variances[1]),
        ),
        1,
    )
    boxes[:, :2] -= boxes[:, 2:] / 2
    boxes[:, 2:] += boxes[:, :2]
    return boxes


def py_cpu_nms(dets: npt.NDArray[np.float32], thresh: float) -> list[int]:
    """The classic Fast R-CNN CPU NMS (pixel-inclusive areas)."""
    x1, y1, x2, y2, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep: list[int] = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        w = np.maximum(0.0, xx2 - xx1 + 1)
        h = np.maximum(0.0, yy2 - yy1 + 1)
        inter = w * h
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(ovr <= thresh)[0] + 1]
    return keep


@torch.no_grad()
def detect_original(
    net: OriginalFaceBoxes,
    img_raw: npt.NDArray[np.uint8],
    resize: float,
    confidence_threshold: float = 0.05,
    top_k: int = 5000,
    nms_threshold: float = 0.3,
    keep_top_k: int = 750,
) -> npt.NDArray[np.float32]:
    """``test.py`` on one BGR image: ``[K, 5]`` (x1, y1, x2, y2, score) in image pixels."""
    img: npt.NDArray[np.float32] = img_raw.astype(np.float32)
    if resize != 1:
        img = np.asarray(
            cv2.resize(img, None, None, fx=resize, fy=resize, interpolation=cv2.INTER_LINEAR),
            dtype=np.float32,
        )
    im_height, im_width, _ = img.shape
    scale = torch.Tensor([im_width, im_height, im_width, im_height])
    img -= np.array((104, 117, 123), dtype=np.float32)
    x = torch.from_numpy(img.transpose(2, 0, 1)).unsqueeze(0)
    loc, conf = net(x)
    priors = prior_box((im_height, im_width))
    boxes = decode(loc.squeeze(0), priors, VARIANCE) * scale / resize
    boxes_np = boxes.numpy()
    scores = conf.squeeze(0).numpy()[:, 1]
    inds = np.where(scores > confidence_threshold)[0]
    boxes_np, scores = boxes_np[inds], scores[inds]
    order = scores.argsort()[::-1][:top_k]
    boxes_np, scores = boxes_np[order], scores[order]
    dets = np.hstack((boxes_np, scores[:, np.newaxis])).astype(np.float32, copy=False)
    dets = dets[py_cpu_nms(dets, nms_threshold), :]
    return dets[:keep_top_k, :]

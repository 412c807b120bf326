"""Box operations written here (torchvision does not import beside this torch build)."""

from __future__ import annotations

import torch
from torch import Tensor


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of ``[N, 4]`` and ``[M, 4]`` xyxy boxes, ``[N, M]``."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union.clamp(min=1e-12)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression; indices of kept boxes, by descending score.

    Same rule as the classic py_cpu_nms used by FaceBoxes/RetinaFace: a box is dropped when
    its IoU with an already kept, higher-scoring box is strictly above the threshold. The IoU
    matrix is computed once, then the greedy pass walks it on the CPU.
    """
    if boxes.numel() == 0:
        return torch.zeros((0,), dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_boxes = boxes[order].float()
    # The original implementation adds 1 to widths (pixel-inclusive boxes); keep that so that
    # results match the reference formulation.
    x1, y1, x2, y2 = sorted_boxes.unbind(1)
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    xx1 = torch.maximum(x1[:, None], x1[None, :])
    yy1 = torch.maximum(y1[:, None], y1[None, :])
    xx2 = torch.minimum(x2[:, None], x2[None, :])
    yy2 = torch.minimum(y2[:, None], y2[None, :])
    inter = (xx2 - xx1 + 1).clamp(min=0) * (yy2 - yy1 + 1).clamp(min=0)
    iou = (inter / (areas[:, None] + areas[None, :] - inter)).cpu()
    n = iou.shape[0]
    suppressed = torch.zeros(n, dtype=torch.bool)
    keep: list[int] = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def decode_ssd(loc: Tensor, priors: Tensor, variances: tuple[float, float]) -> Tensor:
    """Decode SSD offsets ``[..., P, 4]`` against priors ``[P, 4]`` (cx, cy, w, h) to xyxy."""
    centers = priors[..., :2] + loc[..., :2] * variances[0] * priors[..., 2:]
    sizes = priors[..., 2:] * torch.exp(loc[..., 2:] * variances[1])
    return torch.cat([centers - sizes / 2, centers + sizes / 2], dim=-1)


def encode_ssd(matched_xyxy: Tensor, priors: Tensor, variances: tuple[float, float]) -> Tensor:
    """Inverse of :func:`decode_ssd`: offsets that turn ``priors`` into ``matched_xyxy``."""
    g_cxcy = (matched_xyxy[..., :2] + matched_xyxy[..., 2:]) / 2 - priors[..., :2]
    g_cxcy = g_cxcy / (variances[0] * priors[..., 2:])
    g_wh = (matched_xyxy[..., 2:] - matched_xyxy[..., :2]) / priors[..., 2:]
    g_wh = torch.log(g_wh.clamp(min=1e-6)) / variances[1]
    return torch.cat([g_cxcy, g_wh], dim=-1)

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
    its IoU with an already kept, higher-scoring box is strictly above the threshold (boxes
    pixel-inclusive: widths + 1). Vectorised: the overlapping pairs come from row blocks of
    the IoU matrix (:func:`overlapping_pairs`), the greedy pass is their fixed point
    (:func:`greedy_keep`); no Python loop runs over boxes.
    """
    if boxes.numel() == 0:
        return torch.zeros((0,), dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    first, second = overlapping_pairs(boxes[order].float(), iou_threshold)
    keep = greedy_keep(len(order), first, second)
    return order[torch.nonzero(keep).flatten()]


def overlapping_pairs(
    boxes: Tensor, iou_threshold: float, block: int = 512
) -> tuple[Tensor, Tensor]:
    """Index pairs ``(i, j)``, ``i < j``, of xyxy boxes whose IoU is above the threshold.

    The upper triangle of the IoU matrix, a block of rows at a time: memory stays at a few
    blocks of floats for thousands of boxes (noisy activations give up to top_k of them).
    """
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    n = len(boxes)
    firsts: list[Tensor] = []
    seconds: list[Tensor] = []
    for start in range(0, n, block):
        r, c = slice(start, min(n, start + block)), slice(start, n)
        xx1 = torch.maximum(x1[r, None], x1[None, c])
        yy1 = torch.maximum(y1[r, None], y1[None, c])
        xx2 = torch.minimum(x2[r, None], x2[None, c])
        yy2 = torch.minimum(y2[r, None], y2[None, c])
        inter = (xx2 - xx1 + 1).clamp(min=0) * (yy2 - yy1 + 1).clamp(min=0)
        over = (inter / (areas[r, None] + areas[None, c] - inter)) > iou_threshold
        i, j = torch.nonzero(over.triu_(diagonal=1), as_tuple=True)
        firsts.append(i + start)
        seconds.append(j + start)
    return torch.cat(firsts), torch.cat(seconds)


def greedy_keep(n: int, first: Tensor, second: Tensor) -> Tensor:
    """The greedy pass, vectorised: box j is kept iff no kept box i < j overlaps it, for the
    overlapping pairs ``(first[k], second[k])`` (each ``first < second``) of ``n`` boxes.

    Starting from "all kept", each step recomputes every box from the previous mask. The
    boxes before the first one that changes are final, so the mask reaches the greedy
    result (the only fixed point) in at most as many steps as the longest chain of boxes
    that each suppress the next: a handful on detections.
    """
    keep = torch.ones(n, dtype=torch.bool, device=first.device)
    while True:
        new = torch.bincount(second[keep[first]], minlength=n) == 0
        if torch.equal(new, keep):
            return keep
        keep = new


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

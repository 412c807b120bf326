"""Upstream FaceBoxes.PyTorch ``match`` + ``MultiBoxLoss.forward``, restated as a test oracle.

Independent of ``veil``: jaccard, encode, the "ignore hard gt" matching and hard negative
mining exactly as upstream writes them (labels are all 1 = face; CPU only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def point_form(boxes: Tensor) -> Tensor:
    return torch.cat((boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2), 1)


def jaccard(box_a: Tensor, box_b: Tensor) -> Tensor:
    a, b = box_a.size(0), box_b.size(0)
    max_xy = torch.min(
        box_a[:, 2:].unsqueeze(1).expand(a, b, 2), box_b[:, 2:].unsqueeze(0).expand(a, b, 2)
    )
    min_xy = torch.max(
        box_a[:, :2].unsqueeze(1).expand(a, b, 2), box_b[:, :2].unsqueeze(0).expand(a, b, 2)
    )
    inter_wh = torch.clamp(max_xy - min_xy, min=0)
    inter = inter_wh[:, :, 0] * inter_wh[:, :, 1]
    area_a = ((box_a[:, 2] - box_a[:, 0]) * (box_a[:, 3] - box_a[:, 1])).unsqueeze(1)
    area_b = ((box_b[:, 2] - box_b[:, 0]) * (box_b[:, 3] - box_b[:, 1])).unsqueeze(0)
    return inter / (area_a.expand_as(inter) + area_b.expand_as(inter) - inter)


def encode(matched: Tensor, priors: Tensor, variances: list[float]) -> Tensor:
    g_cxcy = (matched[:, :2] + matched[:, 2:]) / 2 - priors[:, :2]
    g_cxcy /= variances[0] * priors[:, 2:]
    g_wh = (matched[:, 2:] - matched[:, :2]) / priors[:, 2:]
    g_wh = torch.log(g_wh) / variances[1]
    return torch.cat([g_cxcy, g_wh], 1)


def match(
    threshold: float,
    truths: Tensor,
    priors: Tensor,
    variances: list[float],
    labels: Tensor,
    loc_t: Tensor,
    conf_t: Tensor,
    idx: int,
) -> None:
    overlaps = jaccard(truths, point_form(priors))
    best_prior_overlap, best_prior_idx = overlaps.max(1, keepdim=True)
    valid_gt_idx = best_prior_overlap[:, 0] >= 0.2
    best_prior_idx_filter = best_prior_idx[valid_gt_idx, :]
    if best_prior_idx_filter.shape[0] <= 0:
        loc_t[idx] = 0
        conf_t[idx] = 0
        return
    best_truth_overlap, best_truth_idx = overlaps.max(0, keepdim=True)
    best_truth_idx.squeeze_(0)
    best_truth_overlap.squeeze_(0)
    best_prior_idx.squeeze_(1)
    best_prior_idx_filter.squeeze_(1)
    best_truth_overlap.index_fill_(0, best_prior_idx_filter, 2)
    for j in range(best_prior_idx.size(0)):
        best_truth_idx[best_prior_idx[j]] = j
    matches = truths[best_truth_idx]
    conf = labels[best_truth_idx]
    conf[best_truth_overlap < threshold] = 0
    loc_t[idx] = encode(matches, priors, variances)
    conf_t[idx] = conf


def multibox_loss_original(
    loc_data: Tensor,
    conf_data: Tensor,
    priors: Tensor,
    targets: list[Tensor],
    overlap_thresh: float = 0.35,
    negpos_ratio: int = 7,
) -> tuple[Tensor, Tensor, int]:
    """``MultiBoxLoss(2, 0.35, True, 0, True, 7, 0.35, False)``; targets ``[K, 4]`` xyxy."""
    variance = [0.1, 0.2]
    num, num_priors, num_classes = conf_data.shape
    loc_t = torch.Tensor(num, num_priors, 4)
    conf_t = torch.LongTensor(num, num_priors)
    for idx in range(num):
        labels = torch.ones(targets[idx].shape[0])
        match(overlap_thresh, targets[idx], priors, variance, labels, loc_t, conf_t, idx)
    pos = conf_t > 0
    pos_idx = pos.unsqueeze(pos.dim()).expand_as(loc_data)
    loss_l = F.smooth_l1_loss(
        loc_data[pos_idx].view(-1, 4), loc_t[pos_idx].view(-1, 4), reduction="sum"
    )
    batch_conf = conf_data.view(-1, num_classes)
    x_max = batch_conf.data.max()
    lse = torch.log(torch.sum(torch.exp(batch_conf - x_max), 1, keepdim=True)) + x_max
    loss_c = lse - batch_conf.gather(1, conf_t.view(-1, 1))
    loss_c[pos.view(-1, 1)] = 0
    loss_c = loss_c.view(num, -1)
    _, loss_idx = loss_c.sort(1, descending=True)
    _, idx_rank = loss_idx.sort(1)
    num_pos = pos.long().sum(1, keepdim=True)
    num_neg = torch.clamp(negpos_ratio * num_pos, max=pos.size(1) - 1)
    neg = idx_rank < num_neg.expand_as(idx_rank)
    pos_idx = pos.unsqueeze(2).expand_as(conf_data)
    neg_idx = neg.unsqueeze(2).expand_as(conf_data)
    conf_p = conf_data[(pos_idx + neg_idx).gt(0)].view(-1, num_classes)
    targets_weighted = conf_t[(pos + neg).gt(0)]
    loss_c = F.cross_entropy(conf_p, targets_weighted, reduction="sum")
    n = max(float(num_pos.data.sum()), 1.0)
    return loss_l / n, loss_c / n, int(num_pos.sum())

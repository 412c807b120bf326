"""The SSD multibox loss with ground truth, as FaceBoxes.PyTorch trains with it.

Used to calibrate the noise layer against labelled faces: the tail is frozen, so the loss only
steers what the noise may destroy. Matching and hard negative mining follow upstream
``utils/box_utils.match`` and ``layers/modules/multibox_loss.py``; the defaults are the
FaceBoxes training settings (``MultiBoxLoss(2, 0.35, True, 0, True, 7, 0.35, False)`` and
``loc_weight`` 2.0 in ``train.py`` / ``data/config.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from veil.detectors.boxes import box_iou, encode_ssd
from veil.errors import ConfigError

# A ground-truth box whose best prior overlaps it less than this is too hard to force a match
# for (upstream "ignore hard gt").
_MIN_FORCED_OVERLAP = 0.2


@dataclass(frozen=True)
class PriorMatch:
    """Per prior: whether it is a positive, and its encoded regression target."""

    positive: Tensor  # [P] bool
    loc_target: Tensor  # [P, 4]


@dataclass(frozen=True)
class MultiboxLoss:
    localization: Tensor  # smooth L1 over positives, per positive
    confidence: Tensor  # cross entropy over positives and mined negatives, per positive
    total: Tensor  # loc_weight * localization + confidence
    num_positives: int


def priors_to_xyxy(priors: Tensor) -> Tensor:
    return torch.cat([priors[:, :2] - priors[:, 2:] / 2, priors[:, :2] + priors[:, 2:] / 2], 1)


def match_priors(
    truths: Tensor,
    priors: Tensor,
    variances: tuple[float, float] = (0.1, 0.2),
    overlap_threshold: float = 0.35,
) -> PriorMatch:
    """Assign each prior its best ground-truth box; every box also claims its best prior.

    ``truths`` ``[K, 4]`` xyxy and ``priors`` ``[P, 4]`` (cx, cy, w, h), both normalised.
    """
    num_priors = priors.shape[0]
    background = PriorMatch(
        torch.zeros(num_priors, dtype=torch.bool, device=priors.device),
        torch.zeros(num_priors, 4, dtype=priors.dtype, device=priors.device),
    )
    if truths.shape[0] == 0:
        return background
    overlaps = box_iou(truths, priors_to_xyxy(priors))  # [K, P]
    best_prior_overlap, best_prior_idx = overlaps.max(dim=1)
    valid = best_prior_overlap >= _MIN_FORCED_OVERLAP
    if not bool(valid.any()):
        return background
    best_truth_overlap, best_truth_idx = overlaps.max(dim=0)
    best_truth_overlap[best_prior_idx[valid]] = 2.0  # forced matches always count
    # In box order, so that a later box wins a prior that is best for two (as upstream).
    for j, prior in enumerate(best_prior_idx.tolist()):
        best_truth_idx[prior] = j
    matched = truths[best_truth_idx]
    return PriorMatch(
        best_truth_overlap >= overlap_threshold, encode_ssd(matched, priors, variances)
    )


def multibox_loss(
    loc: Tensor,
    conf: Tensor,
    priors: Tensor,
    targets: Sequence[Tensor],
    variances: tuple[float, float] = (0.1, 0.2),
    overlap_threshold: float = 0.35,
    neg_pos_ratio: int = 7,
    loc_weight: float = 2.0,
) -> MultiboxLoss:
    """Multibox loss of raw tail outputs against face boxes.

    ``loc`` ``[N, P, 4]`` offsets and ``conf`` ``[N, P, 2]`` logits (background, face) from a
    detector's tail; ``priors`` ``[P, 4]`` from its ``priors()``; ``targets`` one ``[K, 4]``
    tensor per image of xyxy boxes normalised to the input size (K may be 0). Both terms are
    divided by the number of positives in the batch (at least 1), as upstream.
    """
    if loc.dim() != 3 or loc.shape[2] != 4 or conf.shape[:2] != loc.shape[:2]:
        raise ConfigError(
            f"multibox_loss: loc must be [N, P, 4] and conf [N, P, C] with the same N, P; got "
            f"{tuple(loc.shape)} and {tuple(conf.shape)}"
        )
    if priors.shape != (loc.shape[1], 4):
        raise ConfigError(
            f"multibox_loss: {loc.shape[1]} predictions per image but priors {tuple(priors.shape)}"
        )
    if len(targets) != loc.shape[0]:
        raise ConfigError(f"multibox_loss: {len(targets)} target sets for {loc.shape[0]} images")
    for i, t in enumerate(targets):
        if t.dim() != 2 or t.shape[1] != 4:
            raise ConfigError(f"multibox_loss: targets[{i}] must be [K, 4], got {tuple(t.shape)}")

    with torch.no_grad():
        matches = [
            match_priors(t.to(priors), priors, variances, overlap_threshold) for t in targets
        ]
        positive = torch.stack([m.positive for m in matches])  # [N, P]
        loc_target = torch.stack([m.loc_target for m in matches])
        label = positive.long()

        # Hard negative mining: the negatives the model is most confidently wrong about.
        per_prior = torch.logsumexp(conf, dim=2) - conf.gather(2, label.unsqueeze(2)).squeeze(2)
        per_prior[positive] = 0.0
        order = per_prior.argsort(dim=1, descending=True, stable=True)
        rank = order.argsort(dim=1, stable=True)
        num_pos = positive.sum(dim=1, keepdim=True)
        num_neg = (neg_pos_ratio * num_pos).clamp(max=positive.shape[1] - 1)
        negative = rank < num_neg

    loss_l = F.smooth_l1_loss(loc[positive], loc_target[positive], reduction="sum")
    selected = positive | negative
    loss_c = F.cross_entropy(conf[selected], label[selected], reduction="sum")
    total_pos = int(num_pos.sum())
    n = max(total_pos, 1)
    loss_l, loss_c = loss_l / n, loss_c / n
    return MultiboxLoss(loss_l, loss_c, loc_weight * loss_l + loss_c, total_pos)

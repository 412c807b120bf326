"""The multibox loss: matching, hard negative mining, and agreement with upstream's code."""

from __future__ import annotations

import pytest
import torch

from tests.reference.multibox_original import multibox_loss_original
from veil.detectors.boxes import box_iou, decode_ssd
from veil.detectors.faceboxes import faceboxes_priors
from veil.detectors.multibox import match_priors, multibox_loss, priors_to_xyxy
from veil.errors import ConfigError

SIZE = 256
PRIORS = faceboxes_priors(SIZE, SIZE, torch.device("cpu"))  # 1366 priors
# Two faces, normalised xyxy: one exactly the 128-pixel prior of cell (3, 3) (48..176 px), one
# a small off-grid face.
FACES = torch.tensor([[0.1875, 0.1875, 0.6875, 0.6875], [0.05, 0.6, 0.2, 0.78]])


def perfect_prediction(truths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs that regress every matched prior onto its face and classify all correctly."""
    match = match_priors(truths, PRIORS)
    loc = match.loc_target.clone()
    conf = torch.full((PRIORS.shape[0], 2), -8.0)
    conf[:, 0] = 8.0
    conf[match.positive] = torch.tensor([-8.0, 8.0])
    return loc[None], conf[None]


def test_positives_are_the_priors_over_the_threshold_plus_each_face_s_best() -> None:
    match = match_priors(FACES, PRIORS, overlap_threshold=0.35)
    iou = box_iou(FACES, priors_to_xyxy(PRIORS))  # [2, P], computed independently
    expected = (iou >= 0.35).any(dim=0)
    expected[iou.argmax(dim=1)] = True
    assert torch.equal(match.positive, expected)
    # the 128-pixel prior centred on the first face coincides with it
    exact = ((priors_to_xyxy(PRIORS) - FACES[0]).abs().sum(dim=1) < 1e-6).nonzero().flatten()
    assert len(exact) == 1 and bool(match.positive[exact[0]])
    torch.testing.assert_close(match.loc_target[exact[0]], torch.zeros(4), atol=1e-5, rtol=0)
    # the small face is matched too (its best prior is forced even if below 0.35)
    assert bool(match.positive[iou[1].argmax()])
    assert int(match.positive.sum()) == int(expected.sum()) > 2


def test_the_right_prediction_has_a_lower_loss_than_wrong_ones() -> None:
    loc, conf = perfect_prediction(FACES)
    right = multibox_loss(loc, conf, PRIORS, [FACES])
    assert right.num_positives == int(match_priors(FACES, PRIORS).positive.sum())
    assert float(right.localization) == pytest.approx(0.0, abs=1e-6)
    assert float(right.confidence) < 1e-3
    swapped = multibox_loss(loc, conf.flip(-1), PRIORS, [FACES])  # faces called background
    shifted = multibox_loss(loc + 0.5, conf, PRIORS, [FACES])  # boxes off their faces
    assert float(swapped.confidence) > 10 and float(shifted.localization) > 0.1
    assert float(right.total) < float(shifted.total) < float(swapped.total)
    assert float(shifted.total) == pytest.approx(
        2.0 * float(shifted.localization) + float(shifted.confidence)
    )


def test_matches_upstream_multibox_loss_on_random_outputs() -> None:
    generator = torch.Generator().manual_seed(3)
    loc = torch.randn(2, PRIORS.shape[0], 4, generator=generator)
    conf = torch.randn(2, PRIORS.shape[0], 2, generator=generator) * 3
    targets = [FACES, torch.tensor([[0.4, 0.1, 0.55, 0.3]])]
    ours = multibox_loss(loc, conf, PRIORS, targets)
    ref_l, ref_c, ref_pos = multibox_loss_original(loc, conf, PRIORS, targets)
    assert ours.num_positives == ref_pos
    torch.testing.assert_close(ours.localization, ref_l, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.confidence, ref_c, atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_outputs_and_an_empty_image_adds_no_loss() -> None:
    loc, conf = perfect_prediction(FACES)
    loc = (loc + 0.3).requires_grad_(True)
    conf = (conf * 0.2).requires_grad_(True)
    single = multibox_loss(loc, conf, PRIORS, [FACES])
    loc_grad, conf_grad = torch.autograd.grad(single.total, [loc, conf])
    assert float(loc_grad.abs().sum()) > 0 and float(conf_grad.abs().sum()) > 0
    # an image without faces has no positives, hence no mined negatives: it adds nothing
    pair = multibox_loss(
        torch.cat([loc, loc]), torch.cat([conf, conf]), PRIORS, [FACES, torch.zeros(0, 4)]
    )
    assert pair.num_positives == single.num_positives
    torch.testing.assert_close(pair.total, single.total)
    alone = multibox_loss(loc, conf, PRIORS, [torch.zeros(0, 4)])
    assert alone.num_positives == 0 and alone.total.item() == 0.0


def test_tiny_faces_no_prior_overlaps_are_background() -> None:
    speck = torch.tensor([[0.5, 0.5, 0.502, 0.502]])  # best prior IoU far below 0.2
    assert not bool(match_priors(speck, PRIORS).positive.any())


def test_regression_targets_decode_back_to_the_matched_faces() -> None:
    match = match_priors(FACES, PRIORS)
    decoded = decode_ssd(match.loc_target[match.positive], PRIORS[match.positive], (0.1, 0.2))
    # every positive decodes exactly onto one of the two faces
    error = (decoded[:, None, :] - FACES[None]).abs().amax(dim=2).amin(dim=1)
    assert float(error.max()) < 1e-5


def test_bad_shapes_are_named() -> None:
    loc, conf = perfect_prediction(FACES)
    with pytest.raises(ConfigError, match="target sets"):
        multibox_loss(loc, conf, PRIORS, [FACES, FACES])
    with pytest.raises(ConfigError, match=r"targets\[0\] must be \[K, 4\]"):
        multibox_loss(loc, conf, PRIORS, [FACES[:, :3]])
    with pytest.raises(ConfigError, match="priors"):
        multibox_loss(loc, conf, PRIORS[:-1], [FACES])

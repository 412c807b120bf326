"""Measured privacy: how much of a frame an attacker rebuilds from what crosses the wire.

``privacy_report`` is the entry point; ``attacks`` holds the learned decoder and the
white-box rMLE optimisation; ``metrics`` holds SSIM, PSNR and face re-detection.
"""

from veil.privacy.attacks import (
    AttackerView,
    AttackSet,
    InversionDecoder,
    NoiseModel,
    RmleResult,
    TrainedDecoder,
    mean_image,
    prepare_attack_set,
    reconstruction_size,
    rmle_attack,
    train_decoder,
)
from veil.privacy.metrics import (
    face_crops,
    face_psnr,
    face_ssim,
    psnr,
    redetection_rate,
    ssim,
)
from veil.privacy.report import AttackScores, PrivacyReport, ReportRow, privacy_report

__all__ = [
    "AttackScores",
    "AttackSet",
    "AttackerView",
    "InversionDecoder",
    "NoiseModel",
    "PrivacyReport",
    "ReportRow",
    "RmleResult",
    "TrainedDecoder",
    "face_crops",
    "face_psnr",
    "face_ssim",
    "mean_image",
    "prepare_attack_set",
    "privacy_report",
    "psnr",
    "reconstruction_size",
    "redetection_rate",
    "rmle_attack",
    "ssim",
    "train_decoder",
]

"""Measured privacy: who an attacker can still recognise from what crosses the wire.

``privacy_report`` is the entry point; ``attacks`` holds the learned decoder and the
white-box rMLE optimisation, ``linkage`` the feature-linkage attack; ``identity`` the face
recogniser and the identification scores; ``metrics`` SSIM, PSNR and face re-detection.
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
from veil.privacy.report import PrivacyReport, ReportOptions, ReportRow, privacy_report
from veil.privacy.scores import AttackScores, strongest

__all__ = [
    "AttackScores",
    "AttackSet",
    "AttackerView",
    "InversionDecoder",
    "NoiseModel",
    "PrivacyReport",
    "ReportOptions",
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
    "strongest",
    "train_decoder",
]

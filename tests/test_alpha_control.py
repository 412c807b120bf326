"""The trusted zone's floor on live alpha: what it applies, refuses, and says about it."""

from __future__ import annotations

import pytest
import torch

from stream.wire import ControlMessage, decode_status, encode_status
from tests.tiny_detector import TinyDetector, constant_profile
from veil.config import StreamConfig
from veil.errors import ConfigError, ProfileError
from workers.trusted.control import AlphaControl
from workers.trusted.obfuscator import ProfileTable


def _table(*alphas: float) -> ProfileTable:
    det = TinyDetector()
    profiles = [constant_profile(det, a, 0.5, 0.0) for a in alphas]
    return ProfileTable(det, det.default_geometry, profiles, torch.device("cpu"))  # type: ignore[arg-type]


def test_requests_below_the_floor_clean_or_uncalibrated_are_refused_with_the_reason() -> None:
    table = _table(0.5, 0.8, 0.9)
    control = AlphaControl(
        [
            StreamConfig("lobby", "rtsp://x/1", alpha=0.8, min_alpha=0.8),
            StreamConfig("archive", "a.mp4", alpha=0.5),  # floor: the weakest profile, 0.5
        ],
        table,
    )
    started = {s.stream_id: s for s in control.started()}
    assert started["lobby"].available == (0.8, 0.9)  # only what the floor allows
    assert started["archive"].min_alpha == 0.5

    def ask(stream: str, alpha: float | None, at: float) -> tuple[str, str, float]:
        status = control.request(ControlMessage(stream, alpha, at))
        assert status is not None
        return status.outcome, status.reason, status.alpha

    assert ask("lobby", 0.5, 1.0)[:1] == ("refused",) and control.alphas["lobby"] == 0.8
    assert "below this stream's floor 0.8" in ask("lobby", 0.5, 1.0)[1]
    assert "clean (alpha 0) is not allowed" in ask("lobby", 0.0, 2.0)[1]
    assert "no calibrated profile for alpha 0.95" in ask("lobby", 0.95, 3.0)[1]
    assert ask("lobby", 0.9, 4.0) == ("applied", "applied from the next batch", 0.9)
    # A replayed older request changes nothing, even one that was legitimate once.
    outcome, reason, alpha = ask("lobby", 0.8, 3.5)
    assert (outcome, alpha) == ("refused", 0.9) and "replayed" in reason
    assert control.request(ControlMessage("not-mine", 0.9, 5.0)) is None
    # A tombstone returns the stream to its configured alpha.
    assert ask("lobby", None, 6.0) == ("applied", "applied from the next batch", 0.8)


def test_the_floor_is_checked_at_start_and_clean_needs_allow_clean() -> None:
    table = _table(0.5)
    with pytest.raises(ConfigError, match=r"streams.cam.alpha: clean .* not allowed"):
        AlphaControl([StreamConfig("cam", "c.mp4", alpha=0.0)], table)
    with pytest.raises(ConfigError, match=r"below this stream.s floor 0\.9"):
        AlphaControl([StreamConfig("cam", "c.mp4", alpha=0.5, min_alpha=0.9)], table)
    with pytest.raises(ProfileError, match="no calibrated profile and allow_clean is false"):
        AlphaControl([StreamConfig("cam", "c.mp4", alpha=0.5)], _table())
    clean = AlphaControl([StreamConfig("cam", "c.mp4", alpha=0.0, allow_clean=True)], _table())
    assert clean.started()[0].profile_id == "none"


def test_a_status_survives_the_wire() -> None:
    control = AlphaControl([StreamConfig("cam", "c.mp4", alpha=0.5)], _table(0.5, 0.9))
    status = control.request(ControlMessage("cam", 0.9, 12.5))
    assert status is not None
    assert decode_status(*encode_status(status)) == status

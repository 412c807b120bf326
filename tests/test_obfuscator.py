from __future__ import annotations

import numpy as np
import pytest
import torch

from stream.frames import Frame
from stream.wire import Envelope
from tests.tiny_detector import TinyDetector, constant_profile
from veil.errors import ProfileError
from veil.noise import noise_source
from veil.profiles import NoiseProfile
from workers.trusted.obfuscator import CLEAN_PROFILE_ID, Obfuscator, ProfileTable


def _weak_and_strong() -> tuple[TinyDetector, NoiseProfile, NoiseProfile, Obfuscator]:
    """A tiny detector's obfuscator with a weak (alpha 0.2: sigma 0.01, mu 0) and a strong
    profile (alpha 0.9: sigma 3, mu 5), its noise seeded."""
    det = TinyDetector()
    weak, strong = constant_profile(det, 0.2, 0.01, 0.0), constant_profile(det, 0.9, 3.0, 5.0)
    device = torch.device("cpu")
    table = ProfileTable(det, det.default_geometry, [strong, weak], device)  # type: ignore[list-item]
    obf = Obfuscator(det, det.default_geometry, table, device)
    obf.noise = noise_source("cpu", seed=0)  # a fixed seed: tests only
    return det, weak, strong, obf


def test_each_frame_of_a_mixed_batch_gets_its_own_streams_noise() -> None:
    det, weak, strong, obf = _weak_and_strong()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    frames = [Frame(Envelope(f"s{i}", i, None, 0.0), pixels) for i in range(3)]
    out = obf.run(frames, [0.0, 0.2, 0.9])
    clean = det.head(det.preprocess([pixels], det.default_geometry)[0])[0].numpy()
    assert [o.profile_id for o in out] == [
        CLEAN_PROFILE_ID,
        weak.profile_id,
        strong.profile_id,  # type: ignore[attr-defined]
    ]
    assert [o.alpha for o in out] == [0.0, 0.2, 0.9]
    np.testing.assert_allclose(out[0].activation, clean, atol=1e-6)  # alpha 0: no noise
    residual_weak = out[1].activation - clean
    residual_strong = out[2].activation - clean
    # 384 activation elements: bounds at about five standard errors of each estimate.
    n = residual_strong.size
    assert abs(residual_weak.std() - 0.01) < 5 * 0.01 / np.sqrt(2 * n)
    assert abs(residual_strong.mean() - 5.0) < 5 * 3.0 / np.sqrt(n)
    assert abs(residual_strong.std() - 3.0) < 5 * 3.0 / np.sqrt(2 * n)
    # Fresh noise for every frame, even for the same stream and pixels.
    again = obf.run(frames[2:], [0.9])[0]
    assert not np.allclose(again.activation, out[2].activation)


def test_a_batch_of_one_profile_gets_that_profiles_noise_for_every_frame() -> None:
    """The one-profile path (the row broadcast, the head's output noised in place)."""
    det, _, strong, obf = _weak_and_strong()
    pixels = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    frames = [Frame(Envelope("s", i, None, 0.0), pixels) for i in range(4)]
    out = obf.run(frames, [0.9] * 4)
    clean = det.head(det.preprocess([pixels], det.default_geometry)[0])[0].numpy()
    residuals = np.stack([o.activation - clean for o in out])
    n = residuals.size
    assert abs(residuals.mean() - 5.0) < 5 * 3.0 / np.sqrt(n)
    assert abs(residuals.std() - 3.0) < 5 * 3.0 / np.sqrt(2 * n)
    assert not np.allclose(residuals[0], residuals[1])  # each frame its own draw
    assert {o.profile_id for o in out} == {strong.profile_id}  # type: ignore[attr-defined]


def test_frames_of_any_size_are_letterboxed_and_mapped_back() -> None:
    det = TinyDetector()
    table = ProfileTable(det, det.default_geometry, [], torch.device("cpu"))
    obf = Obfuscator(det, det.default_geometry, table, torch.device("cpu"))
    sizes = [(1080, 1920), (720, 1280), (480, 640)]
    frames = [
        Frame(Envelope("s", i, None, 0.0), np.zeros((h, w, 3), np.uint8))
        for i, (h, w) in enumerate(sizes)
    ]
    out = obf.run(frames, [0.0] * 3)
    assert {o.activation.shape for o in out} == {det.activation_shape(det.default_geometry)}
    for o, (h, w) in zip(out, sizes, strict=True):
        assert (o.letterbox.frame_width, o.letterbox.frame_height) == (w, h)
        assert o.letterbox.scale == pytest.approx(min(64 / w, 48 / h))


def test_an_uncalibrated_alpha_is_refused_with_the_available_ones() -> None:
    det = TinyDetector()
    table = ProfileTable(
        det, det.default_geometry, [constant_profile(det, 0.5, 1, 0)], torch.device("cpu")
    )  # type: ignore[list-item]
    with pytest.raises(ProfileError, match=r"available alphas: \[0.5\]"):
        table.row(0.6)


def test_warm_up_runs_one_frame_and_a_full_batch_before_any_real_frame() -> None:
    *_, obf = _weak_and_strong()
    calls: list[int] = []
    real_head = obf.head

    def counting_head(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return real_head(x)

    obf.head = counting_head  # type: ignore[assignment]
    assert obf.warm_up(4) > 0
    assert calls == [1, 4]
    assert len(obf._inputs[0]) == 4 and len(obf._eps[0]) == 4  # kept for the real batches


def test_a_batch_is_cut_into_consecutive_lanes_as_even_as_they_go() -> None:
    from workers.trusted.obfuscator import _chunks

    assert _chunks(5, 2) == [range(0, 3), range(3, 5)]
    assert _chunks(8, 3) == [range(0, 3), range(3, 6), range(6, 8)]
    assert _chunks(1, 4) == [range(0, 1)]  # never an empty lane
    assert _chunks(4, 1) == [range(0, 4)]
    for n in range(1, 40):
        for lanes in range(1, 6):
            parts = _chunks(n, lanes)
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.tiny_detector import TinyDetector
from veil.calibrate import CalibrationConfig, calibrate, prepare, train_profile
from veil.detectors.base import Frame, InputGeometry
from veil.errors import ConfigError, ProfileError
from veil.noise import (
    CipherNormal,
    NoiseLayer,
    TorchNormal,
    entropy_generator,
    noise_source,
    normal_levels,
)
from veil.profiles import ProfileBank, ProfileMeta, profile_from_layer


def frames(n: int, seed: int = 0) -> list[Frame]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40 + 3 * i, 60, 3), dtype=np.uint8) for i in range(n)]


def test_sigma_follows_the_squashing_formula_and_bounds() -> None:
    layer = NoiseLayer((2, 3, 4), s_min=0.1, s_max=2.0)
    with torch.no_grad():
        layer.rho.copy_(torch.linspace(-30, 30, 24).view(2, 3, 4))
    sigma = layer.sigma()
    expected = 0.1 + 1.9 * (1 + torch.tanh(layer.rho)) / 2
    torch.testing.assert_close(sigma, expected)
    assert float(sigma.min()) == pytest.approx(0.1, abs=1e-6)
    assert float(sigma.max()) == pytest.approx(2.0, abs=1e-6)


def test_initial_sigma_is_honoured() -> None:
    layer = NoiseLayer((1, 2, 2), 0.0, 10.0, initial_sigma=0.5)
    torch.testing.assert_close(layer.sigma(), torch.full((1, 2, 2), 0.5), atol=1e-5, rtol=0)


def test_noise_is_fresh_per_call_and_has_the_learned_moments() -> None:
    layer = NoiseLayer((4, 8, 8), 0.0, 4.0, initial_sigma=1.5)
    with torch.no_grad():
        layer.mu.fill_(0.25)
    a = torch.zeros(512, 4, 8, 8)
    gen = torch.Generator().manual_seed(1)
    out1, out2 = layer(a, gen), layer(a, gen)
    assert not torch.equal(out1, out2)
    assert float(out1.mean()) == pytest.approx(0.25, abs=0.02)
    assert float(out1.std()) == pytest.approx(1.5, rel=0.02)


def test_entropy_generators_never_repeat_each_other() -> None:
    draws = {float(torch.randn(1, generator=entropy_generator())) for _ in range(20)}
    assert len(draws) == 20


def test_the_cipher_levels_are_a_unit_normal_quantised_into_equiprobable_bins() -> None:
    levels = normal_levels().double()
    assert levels.shape == (65536,) and bool((levels[1:] > levels[:-1]).all())
    torch.testing.assert_close(levels, -levels.flip(0))  # symmetric, mean 0
    assert float(levels.pow(2).mean()) == pytest.approx(1.0, abs=1e-9)
    assert float(levels.max()) == pytest.approx(4.325, abs=0.005)
    # the median level and the bin of the 97.5% quantile sit where the normal's CDF puts them
    assert float(levels[int(0.975 * 65536)]) == pytest.approx(1.96, abs=1e-3)


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / 2**0.5))


def test_cipher_draws_are_standard_normal_fresh_and_independent_of_each_other() -> None:
    source = CipherNormal()
    first, second = source.fill_(torch.empty(200_000)), source.fill_(torch.empty(200_000))
    assert not torch.equal(first, second)
    for draws in (first, second):
        assert abs(float(draws.mean())) < 0.01 and float(draws.std()) == pytest.approx(1, abs=0.01)
        ordered = draws.double().sort().values
        ranks = torch.arange(1, len(ordered) + 1, dtype=torch.float64) / len(ordered)
        assert float((_normal_cdf(ordered) - ranks).abs().max()) < 0.005  # Kolmogorov-Smirnov
    pairs = torch.stack([first[:-1], first[1:]])
    assert abs(float(torch.corrcoef(pairs)[0, 1])) < 0.01  # neighbours uncorrelated
    assert not torch.equal(
        CipherNormal().fill_(torch.empty(64)), CipherNormal().fill_(torch.empty(64))
    )


def test_a_seeded_cipher_repeats_and_fills_any_layout() -> None:
    a = CipherNormal(seed=7).fill_(torch.empty(3, 4, 5))
    torch.testing.assert_close(a, CipherNormal(seed=7).fill_(torch.empty(3, 4, 5)))
    assert not torch.equal(a, CipherNormal(seed=8).fill_(torch.empty(3, 4, 5)))
    strided = CipherNormal(seed=7).fill_(torch.empty(5, 4, 3).permute(2, 1, 0))
    assert strided.shape == (3, 4, 5) and bool(torch.isin(strided, normal_levels()).all())
    half = CipherNormal(seed=7).fill_(torch.empty(3, 4, 5, dtype=torch.float64))
    torch.testing.assert_close(half, a.double())
    with pytest.raises(ValueError, match="CPU tensors"):
        CipherNormal().fill_(torch.empty(2, device="meta"))


def test_serving_draws_from_the_cipher_on_a_cpu_and_a_noise_layer_takes_either_source() -> None:
    assert isinstance(noise_source("cpu"), CipherNormal)
    layer = NoiseLayer((4, 8, 8), 0.0, 4.0, initial_sigma=1.5)
    a = torch.zeros(256, 4, 8, 8)
    for source in (noise_source("cpu"), TorchNormal(torch.Generator().manual_seed(1))):
        out = layer(a, source)
        assert float(out.std()) == pytest.approx(1.5, rel=0.02)
    seeded = TorchNormal(torch.Generator().manual_seed(3))
    torch.testing.assert_close(layer(a, seeded), layer(a, torch.Generator().manual_seed(3)))


def test_wrong_activation_shape_is_named() -> None:
    with pytest.raises(ValueError, match=r"\(N, 2, 3, 4\)"):
        NoiseLayer((2, 3, 4), 0, 1)(torch.zeros(1, 2, 3, 5))


def _meta(alpha: float = 0.5, **kw: object) -> ProfileMeta:
    base = dict(
        model="tiny",
        weights_id="0" * 64,
        geometry="64x48",
        activation_shape=(8, 6, 8),
        alpha=alpha,
        s_min=0.0,
        s_max=3.0,
    )
    base.update(kw)
    return ProfileMeta(**base)  # type: ignore[arg-type]


def test_profile_round_trip_and_checks(tmp_path: Path) -> None:
    layer = NoiseLayer((8, 6, 8), 0.0, 3.0)
    with torch.no_grad():
        layer.mu.normal_()
    bank = ProfileBank(tmp_path)
    saved = profile_from_layer(layer, _meta(0.8))
    bank.save(saved)
    loaded = bank.get(0.8, "tiny", "0" * 64, InputGeometry(64, 48))
    assert loaded.profile_id == saved.profile_id and len(loaded.profile_id) == 16
    torch.testing.assert_close(loaded.layer().sigma(), layer.sigma())
    with pytest.raises(ProfileError, match=r"available alphas: \[0.8\]"):
        bank.get(0.4, "tiny", "0" * 64, InputGeometry(64, 48))
    with pytest.raises(ProfileError, match="weights"):
        bank.get(0.8, "tiny", "f" * 64, InputGeometry(64, 48))
    with pytest.raises(ProfileError, match="available alphas: none"):
        bank.get(0.8, "tiny", "0" * 64, InputGeometry(128, 96))
    with pytest.raises(ProfileError, match="alpha must be"):
        bank.get(1.5, "tiny", "0" * 64, InputGeometry(64, 48))


def test_corrupt_profile_is_a_clear_error(tmp_path: Path) -> None:
    bank = ProfileBank(tmp_path)
    path = bank.save(profile_from_layer(NoiseLayer((8, 6, 8), 0.0, 3.0), _meta()))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ProfileError, match="corrupt"):
        bank.profiles()


def test_calibration_learns_more_noise_for_higher_alpha_and_is_deterministic(
    tmp_path: Path,
) -> None:
    det = TinyDetector()
    config = CalibrationConfig(alphas=(0.1, 0.9), epochs=3, batch_size=4, lr=0.1, seed=7)
    images = frames(12)
    logs: list[str] = []
    first = calibrate(det, images, tmp_path / "a", config, progress=False, log=logs.append)
    low, high = (p.layer().sigma().mean().item() for p in first)
    assert high > low
    # The same seed gives bit-identical profiles in a fresh bank.
    second = calibrate(det, images, tmp_path / "b", config, progress=False, log=logs.append)
    assert [p.profile_id for p in first] == [p.profile_id for p in second]
    # Running again on a finished bank skips every alpha.
    calibrate(det, images, tmp_path / "a", config, progress=False, log=logs.append)
    assert sum("skipped" in line for line in logs) == 2
    meta = first[0].meta
    assert meta.training["epochs_run"] == 3 and len(meta.training["loss_curve"]) == 3


@pytest.mark.parametrize("adversary_weight", [0.0, 1.0])
def test_an_interrupted_alpha_resumes_to_the_same_result(
    tmp_path: Path, adversary_weight: float
) -> None:
    det = TinyDetector()
    data = prepare(det, frames(8), det.default_geometry, progress=False, pixels=True)
    meta = _meta(0.5, s_max=2.0, training={"initial_sigma": 0.3})
    settings: dict[str, Any] = {"alphas": (0.5,), "batch_size": 4, "seed": 3}
    settings["adversary_weight"] = adversary_weight
    full = CalibrationConfig(epochs=2, **settings)
    half = CalibrationConfig(epochs=1, **settings)
    ck = tmp_path / "partial.pt"
    straight = train_profile(det, data, 0.5, full, meta, None, progress=False)
    train_profile(det, data, 0.5, half, meta, ck, progress=False)  # "crash" after epoch 1
    resumed = train_profile(det, data, 0.5, full, meta, ck, progress=False)
    assert resumed.profile_id == straight.profile_id


def test_bad_calibration_settings_are_refused() -> None:
    with pytest.raises(ProfileError):
        CalibrationConfig(alphas=(1.2,))
    with pytest.raises(ConfigError):
        CalibrationConfig(epochs=0)
    with pytest.raises(ConfigError, match="needs labels"):
        calibrate(
            TinyDetector(), frames(2), Path("/nonexistent"), CalibrationConfig(task="multibox")
        )


def test_distillation_without_shifts_uses_the_prepared_teacher(tmp_path: Path) -> None:
    det = TinyDetector()
    config = CalibrationConfig(alphas=(0.5,), epochs=1, batch_size=4, augment_shifts=False)
    (profile,) = calibrate(det, frames(8), tmp_path, config, progress=False, log=lambda _: None)
    assert profile.meta.training["augment_shifts"] is False
    data = prepare(det, frames(8), det.default_geometry, progress=False, teacher=False)
    assert data.teacher == []
    meta = _meta(0.5, training={"initial_sigma": 0.3})
    with pytest.raises(ConfigError, match="teacher=True"):
        train_profile(det, data, 0.5, config, meta, None, progress=False)


def test_multibox_targets_are_boxes_as_fractions_of_the_letterboxed_input() -> None:
    from veil.detectors.base import letterbox_scale

    det = TinyDetector()
    images = frames(3)
    boxes = [
        np.array([[0, 0, 30, 20]], np.float32),
        np.zeros((0, 4), np.float32),
        np.array([[6, 3, 12, 9], [1, 1, 2, 2]], np.float32),
    ]
    data = prepare(det, images, det.default_geometry, boxes, batch_size=2, progress=False)
    assert data.targets is not None and [len(t) for t in data.targets] == [1, 0, 2]
    g = det.default_geometry
    scale = letterbox_scale(images[2].shape[1], images[2].shape[0], g)
    expected = torch.tensor([6, 3, 12, 9]) * scale / torch.tensor([g.width, g.height] * 2)
    torch.testing.assert_close(data.targets[2][0], expected.float())

"""The Python API (veil.api) on real frames of the demo clip, without the reference data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

import veil
from tests.test_noise_profiles import _meta
from veil.api import Bank, calibrate_bank, demo_frame, draw, open_bank, open_decoder, open_detector
from veil.detectors.base import InputGeometry, SplitDetector
from veil.errors import ConfigError, DatasetError, ProfileError
from veil.eval.metrics import box_iou
from veil.noise import NoiseLayer
from veil.profiles import ProfileBank, profile_from_layer


@pytest.fixture(scope="module")
def detector() -> SplitDetector:
    return open_detector()


@pytest.fixture(scope="module")
def bank(detector: SplitDetector, tmp_path_factory: pytest.TempPathFactory) -> Bank:
    """A small bank calibrated here: alpha 0.8 on 8 frames of the demo clip, one epoch."""
    frames = [demo_frame(i / 7) for i in range(8)]
    out = tmp_path_factory.mktemp("bank")
    return calibrate_bank(frames, out, detector, alphas=(0.8,), epochs=1, say=lambda _: None)


def _clean_face(detector: SplitDetector) -> npt.NDArray[np.float32]:
    (found,) = detector.detect([demo_frame()])
    assert len(found.above(0.5)) == 1  # the astronaut
    return found.above(0.5).xyxy


def test_import_veil_stays_light_and_reexports_the_api() -> None:
    code = "import sys, veil; print('torch' in sys.modules, veil.open_bank.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "veil.api"]
    assert veil.Bank is Bank
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = veil.nope  # type: ignore[attr-defined]


def test_calibrate_bank_writes_a_profile_for_each_alpha(bank: Bank) -> None:
    assert bank.alphas == [0.8]
    profile = bank.profile()
    assert profile.tail is not None  # the tuned tail
    assert profile.meta.trained_on["source"] == "8 frames given to veil.calibrate_bank"
    with pytest.raises(ProfileError, match=r"available alphas: \[0.8\]"):
        bank.profile(0.4)


def test_calibrate_bank_refuses_a_missing_video(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="file not found"):
        calibrate_bank(tmp_path / "none.mp4", tmp_path / "out")


def test_obfuscate_is_head_plus_noise_at_wire_precision(bank: Bank) -> None:
    frame = demo_frame()
    clean = bank.obfuscate(frame, alpha=0)
    x, _ = bank.detector.preprocess([frame], bank.geometry)
    head = bank.detector.head(x)[0].to(torch.float16).float()
    torch.testing.assert_close(clean.activation, head)
    assert clean.profile_id == "none" and clean.wire_bytes == 128 * 40 * 40 * 2
    noisy = bank.obfuscate(frame, alpha=0.8, seed=1)
    again = bank.obfuscate(frame, alpha=0.8, seed=1)
    fresh = bank.obfuscate(frame, alpha=0.8)
    torch.testing.assert_close(noisy.activation, again.activation)
    assert not torch.equal(noisy.activation, fresh.activation)
    assert noisy.profile_id == bank.profile().profile_id
    noise = (noisy.activation - clean.activation).std()
    assert float(noise) > 0.5 * float(bank.profile().sigma().mean())
    picture = noisy.picture(width=200)
    # The frame's 23 x 40 of the 40 x 40 activation (960x540 letterboxed into 640x640).
    assert picture.shape == (115, 200, 3) and picture.dtype == np.uint8


def test_tail_finds_the_face_through_the_noise(bank: Bank) -> None:
    face = _clean_face(bank.detector)
    found = bank.tail(bank.obfuscate(demo_frame(), alpha=0.8, seed=0))
    assert len(found) >= 1 and found.confidence[0] >= 0.5
    assert float(box_iou(found.xyxy[:1], face)[0, 0]) > 0.5
    assert len(bank.detect(demo_frame(), alpha=0)) == 1  # the clean tail through the same path
    drawn = draw(demo_frame(), found)
    assert drawn.shape == (540, 960, 3) and not np.array_equal(drawn, demo_frame())


def test_preview_reconstructs_the_frame_area(bank: Bank) -> None:
    sent = bank.obfuscate(demo_frame(), alpha=0.8, seed=0)
    seen = bank.preview(sent, steps=3, size=80)
    # 960x540 letterboxed into 640x640 fills 640x360; at 80 pixels that is 80x45.
    assert seen.image.shape == (45, 80, 3) and seen.image.dtype == np.uint8
    assert seen.method == "rmle" and seen.steps == 3 and seen.seconds > 0 and seen.match > 0
    visible = seen.visible()
    assert visible.shape == seen.image.shape and int(visible.max()) - int(visible.min()) > 100


def test_open_bank_by_folder(bank: Bank, tmp_path: Path) -> None:
    again = open_bank(bank.folder, bank.detector)
    assert again.alphas == [0.8]
    with pytest.raises(ConfigError, match="not a folder"):
        open_bank(tmp_path / "missing", bank.detector)


def test_decoder_decodes_but_refuses_to_run_a_head(detector: SplitDetector) -> None:
    decoder = open_decoder("retinaface")
    x = torch.zeros(1, 3, 640, 640)
    with pytest.raises(ConfigError, match="no weights of the head") as caught:
        decoder.head(x)
    assert "\n" not in str(caught.value)
    with torch.no_grad():
        raw = decoder.tail(detector.head(x))  # an activation from the trusted zone decodes
    assert decoder.decode(raw, [], 640, 640) == []
    assert open_decoder("retinaface") is not decoder


def test_profile_bank_get_needs_only_an_alpha(tmp_path: Path) -> None:
    bank = ProfileBank(tmp_path)
    bank.save(profile_from_layer(NoiseLayer((8, 6, 8), 0.0, 3.0), _meta(0.8)))
    assert bank.get(0.8).alpha == 0.8
    assert bank.get(0.8, geometry="64x48").meta.model == "tiny"
    other = _meta(0.8, geometry="32x24", activation_shape=(8, 3, 4))
    bank.save(profile_from_layer(NoiseLayer((8, 3, 4), 0.0, 3.0), other))
    with pytest.raises(ProfileError, match=r"2 profiles for alpha 0.8 .*pass model= and geo"):
        bank.get(0.8)
    assert bank.get(0.8, geometry=InputGeometry(32, 24)).meta.geometry == "32x24"
    with pytest.raises(ProfileError, match=r"alpha 0.5 \(any model, any geometry\)"):
        bank.get(0.5)

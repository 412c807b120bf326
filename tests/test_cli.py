from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_detector import TinyDetector
from veil.cli import main
from veil.noise import NoiseLayer
from veil.profiles import ProfileBank, ProfileMeta, profile_from_layer


def _bank(tmp_path: Path, alphas: tuple[float, ...]) -> Path:
    det = TinyDetector()
    shape = det.activation_shape(det.default_geometry)
    for alpha in alphas:
        meta = ProfileMeta("tiny", det.weights_id, "64x48", shape, alpha, 0.0, 1.0)
        ProfileBank(tmp_path).save(profile_from_layer(NoiseLayer(shape, 0.0, 1.0), meta))
    return tmp_path


def test_alpha_set_without_a_reachable_broker_is_one_clear_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Refusals of the trusted zone itself are end to end in test_pipeline.py.
    code = main(["alpha", "set", "cam-1", "0.7", "--bootstrap", "127.0.0.1:1", "--timeout", "2"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "on 127.0.0.1:1" in err[0] and "cannot" in err[0], err


def test_alpha_out_of_range_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["alpha", "set", "cam-1", "1.5", "--bootstrap", "127.0.0.1:1"]) == 2
    assert "alpha must be a number in [0, 1]" in capsys.readouterr().err


def test_a_missing_benchmark_folder_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"
    code = main(["eval", "fddb", "--dataset", str(missing), "--model", "retinaface"])
    assert code == 2
    assert str(missing) in capsys.readouterr().err


def test_faceboxes_without_weights_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--model", "faceboxes", "--out", "/tmp/x"]) == 2
    assert "needs weights" in capsys.readouterr().err

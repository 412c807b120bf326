"""The accuracy benchmark end to end on real data, small: calibrate -> FDDB through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from veil.cli import main
from veil.data import data_root

pytestmark = pytest.mark.data


def test_calibrate_then_fddb_on_a_few_images_per_fold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = data_root(required=False)
    if root is None:
        pytest.skip("reference data not found: set VEIL_DATA")
    model = [
        "--model",
        "faceboxes",
        "--weights",
        str(root / "faceboxes" / "FaceBoxesProd.pth"),
        "--geometry",
        "512x512",
    ]
    bank = tmp_path / "bank"
    assert (
        main(
            [
                "calibrate",
                *model,
                "--images",
                str(root / "widerface/WIDER_val/images"),
                "--max-images",
                "8",
                "--epochs",
                "1",
                "--alphas",
                "0.5",
                "--out",
                str(bank),
            ]
        )
        == 0
    )
    assert len(list(bank.glob("*.safetensors"))) == 1
    results = tmp_path / "fddb.json"
    assert (
        main(
            [
                "eval",
                "fddb",
                *model,
                "--dataset",
                str(root / "fddb"),
                "--bank",
                str(bank),
                "--all-alphas",
                "--max-images-per-fold",
                "2",
                "--draws",
                "2",
                "--json",
                str(results),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for line in (
        "FDDB-fold-1 Val AP:",
        "FDDB-fold-10 Val AP:",
        "FDDB Dataset Average AP:",
        "mAP:",
        "FDDB TPR@1000FP:",
        "68 of 2845 annotated images missing",
    ):
        assert line in out
    records = json.loads(results.read_text())
    clean, noisy = sorted(records, key=lambda r: r["alpha"])
    assert clean["alpha"] == 0.0 and noisy["alpha"] == 0.5 and noisy["noise_draws"] == 2
    assert clean["result"]["num_images"] == 20
    # FaceBoxes finds most of these faces even at 512x512; a broken split or decode would not.
    assert clean["result"]["mean_ap"] > 0.7
    assert 0.0 < noisy["result"]["mean_ap"] <= 1.0

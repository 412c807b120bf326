"""scripts/gpu_check.py, the GPU check prepared for a lent GPU machine, run here on the CPU
(RetinaFace, batch 1): the same steps, so that the script that will run there works."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_check_compares_and_times_every_setting_on_a_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.json"
    argv = ["--device", "cpu", "--detectors", "retinaface", "--batches", "1", "--repeats", "1"]
    assert _script().main([*argv, "--json", str(out)]) == 0
    figures = json.loads(out.read_text())["detectors"]["retinaface"]
    assert figures["geometry"] == "640x640" and "activation_std" in figures["agreement"]
    agreement = figures["agreement"]
    # The torch head (BN folded, channels_last) against the eager one, on the same CPU.
    assert agreement["float32"]["rms_over_std"] < 1e-4
    assert agreement["float16"]["rms_over_std"] < 0.02
    for precision in ("float32", "float16"):
        # 2 frames of 128x40x40 draws: the mean within 0.01 and the std within 0.01 of 1.
        assert abs(agreement[precision]["noise_mean"]) < 0.01
        assert abs(agreement[precision]["noise_std"] - 1.0) < 0.01
    settings = {(r["precision"], r["lanes"], r["batch"]) for r in figures["timings"]}
    assert settings == {(p, lanes, 1) for p in ("float32", "float16") for lanes in (1, 2)}
    assert all(
        r["run_ms_per_frame"] > 0 and r["head_noise_ms_per_frame"] > 0 for r in figures["timings"]
    )

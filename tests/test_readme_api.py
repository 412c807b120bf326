"""The README's "Python API" example, extracted by its marker and run as written."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2

README = Path(__file__).resolve().parents[1] / "README.md"
MARKED = re.compile(
    r"<!-- python-api-example -->\n```python\n(.*?)```\n<!-- /python-api-example -->", re.S
)


def readme_example() -> str:
    found = MARKED.findall(README.read_text())
    assert len(found) == 1, "README.md needs exactly one marked python-api-example block"
    return str(found[0])


def test_readme_python_api_example_runs(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run(
        [sys.executable, "-c", readme_example()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    faces = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert faces["scores"] and faces["scores"][0] >= 0.5, done.stdout
    for name in ("faces.png", "rebuilt.png"):
        image = cv2.imread(str(tmp_path / name))
        assert image is not None and image.size > 0, name

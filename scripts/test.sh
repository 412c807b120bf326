#!/usr/bin/env bash
# The test command of the README and of CI: set up, install the RTSP test server, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/install-test-deps.sh || echo "warning: RTSP test server not installed; its test will say so"
# Several torch processes share the cores in the service tests (Triton's Python stub, the test
# process); with OpenMP's default threads they spin against each other (measured: 10x slower).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export VEIL_DATA="${VEIL_DATA:-$(cd .. && pwd)/shared/data}"
.venv/bin/ruff check .
.venv/bin/mypy veil stream workers tests
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"

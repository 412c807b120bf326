#!/usr/bin/env bash
# The README's fault matrix, measured: every scenario of tests/test_faults.py (each role its own
# process on the embedded broker and Triton), then one table row per scenario.
#   ./scripts/fault_matrix.sh            # rows in runs/fault-matrix.jsonl, table on stdout
set -euo pipefail
cd "$(dirname "$0")/.."
out="${VEIL_FAULT_MATRIX:-runs/fault-matrix.jsonl}"
mkdir -p "$(dirname "$out")"
rm -f "$out"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
VEIL_FAULT_MATRIX="$out" .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_faults.py "$@"
.venv/bin/python - "$out" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("| scenario | frames in | detected | lost | duplicated | recovery s | note |")
print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
for r in rows:
    rec = "-" if r["recovery_s"] is None else f"{r['recovery_s']:.1f}"
    print(f"| {r['scenario']} | {r['frames_in']} | {r['detected']} | {r['lost']} | "
          f"{r['duplicated']} | {rec} | {r['note']} |")
PY

"""Print the README's result tables from the benchmark JSON files under runs/."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from veil.eval.table import fddb_table

RUNS = Path("runs")


def main() -> None:
    for name, command in (
        ("faceboxes", "see scripts/benchmarks.sh, step 2"),
        (
            "retinaface",
            "veil eval fddb --model retinaface --geometry 640x640 --dataset "
            "$VEIL_DATA/fddb --bank runs/bank-retinaface --all-alphas --draws 1 "
            "--json runs/fddb-retinaface.json",
        ),
    ):
        path = RUNS / f"fddb-{name}.json"
        if path.is_file():
            print(f"### FDDB, {name}\n")
            print(fddb_table(json.loads(path.read_text()), command))
            print()
    bench = RUNS / "bench-faceboxes.json"
    if bench.is_file():
        b = json.loads(bench.read_text())
        m, p = b["micro"], b["pipeline"]
        print(
            f"### veil bench ({b['device']}, {b['model']} at {b['geometry']}, {b['frame_size']})\n"
        )
        print("| figure | value |\n| --- | --- |")
        print(
            f"| head+noise per frame, median / p99 | {m['head_noise_ms_median']:.1f} / "
            f"{m['head_noise_ms_p99']:.1f} ms (seed: 5.07 ms on a V100) |"
        )
        print(
            f"| head alone, median / p99 | {m['head_ms_median']:.1f} / {m['head_ms_p99']:.1f} ms |"
        )
        print(f"| noise overhead (head+noise / head) | x{m['noise_overhead_ratio']:.3f} |")
        print(
            f"| pipeline fps with / without noise | {p['with_noise']['fps']:.2f} / "
            f"{p['without_noise']['fps']:.2f} (ratio {b['fps_ratio_noise_vs_clean']:.3f}) |"
        )
        print(
            f"| end-to-end latency p50 / p99 (with noise) | {p['with_noise']['latency_ms_p50']:.0f}"
            f" / {p['with_noise']['latency_ms_p99']:.0f} ms |"
        )
        print(f"| bytes per frame on the wire | {p['with_noise']['bytes_per_frame']:,.0f} |")
        print(
            f"| frames lost | {p['with_noise']['lost_frames']} with noise, "
            f"{p['without_noise']['lost_frames']} without |"
        )


if __name__ == "__main__":
    main()

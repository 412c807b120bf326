"""Markdown tables from the benchmarks' JSON records (what the README shows)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SEED_FDDB = {0.0: 0.934, 0.05: 0.903, 0.4: 0.907, 0.8: 0.884, 0.95: 0.846}


def fddb_table(records: Sequence[dict[str, Any]], command: str = "") -> str:
    """One row per alpha: mean AP (± std over noise draws), AP kept, TPR@1000FP."""
    rows = sorted(records, key=lambda r: r["alpha"])
    clean = next((r for r in rows if r["alpha"] == 0.0), None)
    clean_ap = clean["result"]["mean_ap"] if clean else None
    lines = [
        "| alpha | profile | mean AP | AP kept | TPR@1000FP | noise draws | seed (TR-4928) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        res = r["result"]
        ap, std = res["mean_ap"], res.get("mean_ap_std", 0.0)
        kept = f"{ap / clean_ap:.3f}" if clean_ap else "-"
        draws = r.get("noise_draws", 0)
        ap_text = f"{ap:.4f}" + (f" ± {std:.4f}" if draws > 1 else "")
        tpr = res["tpr_at_max_fp"]
        seed = SEED_FDDB.get(round(r["alpha"], 2))
        label = "clean" if r["alpha"] == 0.0 else f"{r['alpha']:.2f}"
        lines.append(
            f"| {label} | {r['profile_id'][:8]} | {ap_text} | {kept} | {tpr:.4f} | {draws} | "
            f"{seed if seed is not None else '-'} |"
        )
    if command:
        lines.append("")
        lines.append(f"Reproduce: `{command}`")
    return "\n".join(lines)

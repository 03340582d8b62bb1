"""Two ``bench_inference.py`` (or ``bench_host_stages.py``) results side by side: each end-to-end
configuration, the latencies and the host stages, old and new, and the ratio new / old. Both should come from the same call on the
same machine (scripts/gpu_compare.sh); the script says so when the machines differ.

    python benchmarks/compare_results.py OLD.json NEW.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _rows(result: dict) -> dict:
    rows = {}
    for row in result.get("end_to_end", []):
        label = ", ".join(f"{k}={row[k]}" for k in ("num_workers", "batch_size", "precision", "compile") if k in row)
        rows[f"end to end, {label} (structures/s)"] = row["structures_per_s"]
        if row.get("peak_gpu_memory_gib") is not None:
            rows[f"end to end, {label} (peak GPU memory, GiB)"] = row["peak_gpu_memory_gib"]
    for row in result.get("end_to_end_paper_F512_T4", []):
        label = f"end to end, paper F=512 T=4, num_workers={row['num_workers']}, {row.get('precision', 'float32')}"
        label += ", compiled" if row.get("compile") else ""
        rows[f"{label} (structures/s)"] = row["structures_per_s"]
        if row.get("peak_gpu_memory_gib") is not None:
            rows[f"{label} (peak GPU memory, GiB)"] = row["peak_gpu_memory_gib"]
    for stage, value in result.get("us_per_structure", {}).items():  # bench_host_stages.py
        rows[f"host stage {stage} (µs per structure)"] = value
    for key, label in (
        ("latency_single_s", "predict() of one structure (ms)"),
        ("latency_relax_s", "relax() of one structure (ms)"),
        ("latency_relax_first_s", "relax(), first call (ms)"),
        ("latency_relax_second_s", "relax(), second call (ms)"),
    ):
        if key in result:
            rows[label] = result[key] * 1e3
    return rows


def compare(old: dict, new: dict) -> list[tuple[str, float | None, float | None]]:
    """(label, old value, new value) for every figure either result has."""
    a, b = _rows(old), _rows(new)
    return [(label, a.get(label), b.get(label)) for label in list(a) + [k for k in b if k not in a]]


def main(argv=None) -> None:
    old_path, new_path = (argv or sys.argv[1:])[:2]
    old, new = json.loads(Path(old_path).read_text()), json.loads(Path(new_path).read_text())
    if old.get("device") != new.get("device") or old.get("cpu_count") != new.get("cpu_count"):
        print(f"note: different machines: {old.get('device')} / {old.get('cpu_count')} cores against {new.get('device')} / {new.get('cpu_count')}")
    print(f"old: {old.get('package')}\nnew: {new.get('package')}")
    print(f"{'figure':80s} {'old':>10s} {'new':>10s} {'new/old':>8s}")
    for label, a, b in compare(old, new):
        ratio = f"{b / a:8.2f}" if a and b else ""
        print(f"{label:80s} {a if a is not None else float('nan'):10.2f} {b if b is not None else float('nan'):10.2f} {ratio}")


if __name__ == "__main__":
    main()

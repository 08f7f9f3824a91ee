#!/usr/bin/env python3
"""Summarises a JMeter CSV results file (JTL): per sampler and in total,
samples, throughput, P50/P99 latency and error rate. JMeter 2.13 (Debian's)
has no HTML dashboard, so this is the summary report.

    python3 e2e/load/jtl_summary.py results.jtl [--max-error-rate 0] [--min-samples 1]

Exit code 1 when the error rate is above --max-error-rate (default 0: any
error fails) or fewer than --min-samples samples were taken. Failed samples
are listed with their response code and assertion message.
"""

from __future__ import annotations

import argparse
import csv
import sys


def percentile(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile of an ascending list (0 when empty)."""
    if not sorted_values:
        return 0
    rank = max(1, -(-len(sorted_values) * p // 100))  # ceil
    return sorted_values[int(rank) - 1]


def summarise(rows: list[dict]) -> dict:
    elapsed = sorted(int(r["elapsed"]) for r in rows)
    errors = [r for r in rows if r["success"].lower() != "true"]
    if rows:
        start = min(int(r["timeStamp"]) for r in rows)
        end = max(int(r["timeStamp"]) + int(r["elapsed"]) for r in rows)
        seconds = max((end - start) / 1000, 0.001)
    else:
        seconds = 0.0
    return {
        "samples": len(rows),
        "throughput": len(rows) / seconds if seconds else 0.0,
        "p50": percentile(elapsed, 50),
        "p99": percentile(elapsed, 99),
        "errors": len(errors),
        "error_rate": len(errors) / len(rows) if rows else 0.0,
        "failed": errors,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("jtl")
    ap.add_argument("--max-error-rate", type=float, default=0.0)
    ap.add_argument("--min-samples", type=int, default=1)
    args = ap.parse_args()
    with open(args.jtl, newline="") as f:
        rows = list(csv.DictReader(f))
    labels = sorted({r["label"] for r in rows})
    print(f"{'sampler':<45} {'samples':>8} {'req/s':>8} {'P50 ms':>7} {'P99 ms':>7} {'errors':>7}")
    for label in labels + ["TOTAL"]:
        s = summarise(rows if label == "TOTAL" else [r for r in rows if r["label"] == label])
        print(f"{label:<45} {s['samples']:>8} {s['throughput']:>8.1f} {s['p50']:>7} {s['p99']:>7} "
              f"{s['error_rate']:>7.2%}")
    total = summarise(rows)
    for r in total["failed"][:10]:
        message = " ".join((r.get("failureMessage") or "").split())[:200]
        print(f"FAILED {r['label']}: {r['responseCode']} {message}")
    ok = total["samples"] >= args.min_samples and total["error_rate"] <= args.max_error_rate
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

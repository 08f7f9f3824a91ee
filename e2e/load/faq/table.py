"""Prints the FAQ scenario's table from the files e2e/load/faq/run.sh writes
in its work directory: for every run `<tool>-<mode>.json` (the load tool's
summary) and `<tool>-<mode>.meta.json` (what the runner counted around the
run: upstream calls the mock saw, the forwarder's cache counters, CPU).

    python3 e2e/load/faq/table.py WORKDIR [--check]

--check exits 1 unless every run had zero errors and, for each tool, the
cache-on run made fewer upstream calls than the cache-off run. A load
generator that fell behind (k6's dropped iterations) is a NOTE: the
offered load was lower than asked, which is no error of the forwarder.
"""

from __future__ import annotations

import json
import math
import os
import sys


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def fmt(v, digits=1):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def runs(work):
    out = []
    for tool in ("locust", "k6"):
        for mode in ("off", "on"):
            s, m = f"{work}/{tool}-{mode}.json", f"{work}/{tool}-{mode}.meta.json"
            if os.path.exists(m):
                out.append((tool, mode, load(s) if os.path.exists(s) else None, load(m)))
    return out


def main(argv):
    work = argv[1]
    check = "--check" in argv[2:]
    rows, problems, notes = runs(work), [], []
    head = (f"{'tool':7} {'cache':5} {'requests':>8} {'req/s':>7} {'P50 ms':>8} {'P99 ms':>8} "
            f"{'errors':>7} {'upstream calls':>15} {'ideal':>6} {'HIT P50/P99 ms':>16} "
            f"{'MISS P50/P99 ms':>16} {'hit/miss/bypass':>17} {'store err':>9} {'fwd CPU/req':>11} {'redis CPU/req':>13}")
    print(head)
    for tool, mode, s, m in rows:
        if s is None:
            print(f"{tool:7} {mode:5} (no summary: the tool failed, exit {m.get('rc')})")
            problems.append(f"{tool} cache {mode}: no summary (exit {m.get('rc')})")
            continue
        n = s["n"]
        calls = m["upstream_calls"]
        unique = s["by_kind"].get("unique", {}).get("n", 0)
        # Cache off: every request goes upstream. On: the unique questions
        # plus one first miss per hot question (more when duplicates of a hot
        # question arrive while its first answer is still on its way).
        expected = n if mode == "off" else unique + m["hot_questions"]
        hit, miss = s["by_cache"].get("HIT"), s["by_cache"].get("MISS")
        hm = (f"{fmt(hit['p50_ms'])}/{fmt(hit['p99_ms'])}" if hit else "-")
        mm = (f"{fmt(miss['p50_ms'])}/{fmt(miss['p99_ms'])}" if miss else "-")
        cpu = m["forwarder_cpu_s"] * 1e6 / n if n else float("nan")
        rcpu = m["redis_cpu_s"] * 1e6 / n if n else float("nan")
        print(f"{tool:7} {mode:5} {n:>8} {fmt(s['rps']):>7} {fmt(s['p50_ms']):>8} {fmt(s['p99_ms']):>8} "
              f"{s['failures']:>7} {calls:>7} ({100 * calls / max(n, 1):4.1f}%) {expected:>6} "
              f"{hm:>16} {mm:>16} {m['hit']:>7}/{m['miss']}/{m['bypass']:<5} {m.get('store_errors', 0):>9} "
              f"{fmt(cpu, 0):>8} us {fmt(rcpu, 0):>10} us")
        if s["failures"] or m.get("rc"):
            problems.append(f"{tool} cache {mode}: {s['failures']} errors (exit {m.get('rc')})")
        if s.get("dropped_iterations"):
            notes.append(f"{tool} cache {mode}: k6 dropped {s['dropped_iterations']} iterations "
                            "(not enough VUs for the rate): the offered load was lower")
    for tool in ("locust", "k6"):
        by_mode = {mode: m for t, mode, s, m in rows if t == tool and s}
        if "off" in by_mode and "on" in by_mode:
            off, on = by_mode["off"]["upstream_calls"], by_mode["on"]["upstream_calls"]
            print(f"{tool}: upstream calls with the cache on = {100 * on / max(off, 1):.1f}% of those "
                  "with it off")
            if on >= off:
                problems.append(f"{tool}: {on} upstream calls with the cache on, not fewer than "
                                f"{off} with it off")
    for n in notes:
        print(f"NOTE: {n}")
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if check and problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

#!/usr/bin/env python3
"""Plots a chaos run (the CSVs forwarder/tests/chaos.rs writes to CHAOS_OUT)
as one SVG: requests sent and answered 2xx per second, failed tries per
second, and each replica's RSS, with every fault shaded. Standard library
only.

    python3 e2e/chaos/plot.py chaos-out > chaos.svg
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from xml.sax.saxutils import escape

W, PANEL_H, LEFT, RIGHT, TOP, GAP = 820, 180, 70, 20, 40, 60


def nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    mag = 10 ** (len(str(int(v))) - 1)
    for step in (1, 2, 2.5, 5, 10):
        if step * mag >= v:
            return step * mag
    return 10 * mag


def panel(rows, series, label, y0, t_max, faults):
    plot_w = W - LEFT - RIGHT
    y_max = nice_max(max((float(r[k]) * s for r in rows for k, s, _ in series), default=1) * 1.1)
    x = lambda t: LEFT + plot_w * t / max(t_max, 1)
    out = [f'<text x="{LEFT}" y="{y0 - 8}" font-size="13" font-weight="bold">{escape(label)}</text>']
    for f in faults:
        x0, x1 = x(float(f["from_s"])), x(max(float(f["to_s"]), float(f["from_s"]) + 1))
        out.append(f'<rect x="{x0:.1f}" y="{y0}" width="{x1 - x0:.1f}" height="{PANEL_H}" fill="#fdd"/>')
    out.append(f'<rect x="{LEFT}" y="{y0}" width="{plot_w}" height="{PANEL_H}" fill="none" stroke="#999"/>')
    for i in range(5):
        v = y_max * i / 4
        y = y0 + PANEL_H - PANEL_H * i / 4
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{v:g}</text>')
    for n, (key, scale, colour) in enumerate(series):
        pts = " ".join(
            f"{x(float(r['second'])):.1f},{y0 + PANEL_H - PANEL_H * float(r[key]) * scale / y_max:.1f}" for r in rows
        )
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.2"/>')
        out.append(f'<text x="{W - RIGHT - 10}" y="{y0 + 14 + 13 * n}" font-size="11" text-anchor="end" fill="{colour}">{escape(key)}</text>')
    return out


def main() -> None:
    d = Path(sys.argv[1])
    rows = list(csv.DictReader(open(d / "timeline.csv")))
    faults = list(csv.DictReader(open(d / "faults.csv")))
    t_max = max(float(r["second"]) for r in rows) if rows else 1
    h = TOP + 3 * (PANEL_H + GAP)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" font-family="sans-serif">',
           f'<rect width="{W}" height="{h}" fill="white"/>',
           f'<text x="{LEFT}" y="20" font-size="14">chaos run: {len(rows)} s; faults shaded</text>']
    out += panel(rows, [("sent", 1, "#555"), ("answered_2xx", 1, "#2a7")], "requests per second", TOP, t_max, faults)
    out += panel(rows, [("failed_tries", 1, "#c33")], "failed tries per second (retried by the client)", TOP + PANEL_H + GAP, t_max, faults)
    out += panel(rows, [(f"rss_{r}_kib", 1 / 1024, c) for r, c in zip("abc", ("#36c", "#c63", "#393"))],
                 "RSS per replica (MiB)", TOP + 2 * (PANEL_H + GAP), t_max, faults)
    y = h - 8
    out.append(f'<text x="{LEFT}" y="{y}" font-size="10">{escape("; ".join(f["fault"] + " @" + f["from_s"] + "s" for f in faults))[:160]}</text>')
    out.append("</svg>")
    print("\n".join(out))


if __name__ == "__main__":
    main()

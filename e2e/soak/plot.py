#!/usr/bin/env python3
"""Plots a soak run (the CSV soak.py writes) as one SVG: RSS (MiB) and P99
latency (ms) of non-streamed requests over time, one panel each, with open
fds and threads noted. Standard library only.

    python3 e2e/soak/plot.py soak.csv --title "1 h soak, 40 req/s" > soak.svg
"""

from __future__ import annotations

import argparse
import csv
import sys
from xml.sax.saxutils import escape

W, PANEL_H, LEFT, RIGHT, TOP, GAP = 760, 200, 70, 20, 40, 60


def nice_max(v: float) -> float:
    """A round axis maximum at or above v."""
    if v <= 0:
        return 1.0
    mag = 10 ** (len(str(int(v))) - 1)
    for step in (1, 2, 2.5, 5, 10):
        if step * mag >= v:
            return step * mag
    return 10 * mag


def panel(rows: list[dict], key: str, label: str, colour: str, y0: int, t_max: float) -> list[str]:
    values = [float(r[key]) for r in rows]
    y_max = nice_max(max(values) * 1.1)
    plot_w = W - LEFT - RIGHT
    out = [f'<rect x="{LEFT}" y="{y0}" width="{plot_w}" height="{PANEL_H}" fill="none" stroke="#999"/>',
           f'<text x="{LEFT}" y="{y0 - 8}" font-size="13" font-weight="bold">{escape(label)}</text>']
    for i in range(5):
        v = y_max * i / 4
        y = y0 + PANEL_H - PANEL_H * i / 4
        out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{v:g}</text>')
    for i in range(7):
        t = t_max * i / 6
        x = LEFT + plot_w * i / 6
        out.append(f'<text x="{x:.1f}" y="{y0 + PANEL_H + 15}" font-size="11" text-anchor="middle">{t / 60:.0f}</text>')
    pts = " ".join(
        f"{LEFT + plot_w * float(r['t_s']) / t_max:.1f},{y0 + PANEL_H - PANEL_H * v / y_max:.1f}"
        for r, v in zip(rows, values))
    out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>')
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--title", default="soak")
    args = ap.parse_args()
    with open(args.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        print("plot.py: no samples", file=sys.stderr)
        return 1
    t_max = max(float(r["t_s"]) for r in rows)
    height = TOP + 2 * PANEL_H + GAP + 60
    fds = [int(r["fds"]) for r in rows]
    threads = [int(r["threads"]) for r in rows]
    requests = sum(int(r["requests"]) for r in rows)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif">',
           f'<rect width="{W}" height="{height}" fill="white"/>',
           f'<text x="{LEFT}" y="20" font-size="15" font-weight="bold">{escape(args.title)}</text>']
    svg += panel(rows, "rss_mib", "forwarder RSS (MiB)", "#1f77b4", TOP + 15, t_max)
    y2 = TOP + 15 + PANEL_H + GAP
    svg += panel(rows, "p99_ms", "P99 latency, non-streamed requests, per sample (ms)", "#d62728", y2, t_max)
    svg.append(f'<text x="{LEFT + (W - LEFT - RIGHT) / 2}" y="{y2 + PANEL_H + 32}" font-size="11" '
               f'text-anchor="middle">minutes; {len(rows)} samples, {requests} requests; open fds '
               f'{min(fds)}-{max(fds)}, threads {min(threads)}-{max(threads)}</text>')
    svg.append("</svg>")
    print("\n".join(svg))
    return 0


if __name__ == "__main__":
    sys.exit(main())

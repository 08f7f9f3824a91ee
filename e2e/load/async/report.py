#!/usr/bin/env python3
"""Figures of the async load scenario (standard library only).

    report.py run --dir OUT/r1w10 --label r1w10 ... >> results.jsonl   # one run → one JSON line
    report.py table --results results.jsonl --lag-csv lag.csv           # the tables (Markdown)
    report.py plot --lag-csv lag.csv --title "..." > lag.svg            # queue lag over time
    report.py --self-test

End-to-end latency is submit → callback arrival per job: k6 puts the Unix
ms just before sending into the callback URL, the receiver stamps the
arrival. The forwarder POSTs the callback right after the job's result is
stored (and its offset acknowledged), so this is "result stored" plus one
loopback POST. Jobs not called back when the run ends are counted in the
percentiles as slower than the cut-off (censored), never dropped.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import sys
from collections import Counter
from xml.sax.saxutils import escape


def censored_pct(done_ms: list[float], total: int, p: float) -> float | None:
    """The p-th percentile of `total` latencies of which only `done_ms`
    (sorted) are known; the rest are larger than any of them. None when the
    percentile falls among the unknown ones."""
    if total <= 0:
        return None
    rank = max(1, math.ceil(p / 100 * total))
    return done_ms[rank - 1] if rank <= len(done_ms) else None


def pct(values: list[float], p: float) -> float | None:
    return censored_pct(values, len(values), p)


def rate_between(rows: list[dict], key: str, t_a: float, t_b: float) -> float | None:
    """Average per second of a counter column between two sample times."""
    inside = [r for r in rows if t_a <= r["t_s"] <= t_b]
    if len(inside) < 2:
        return None
    a, b = inside[0], inside[-1]
    return (b[key] - a[key]) / (b["t_s"] - a["t_s"]) if b["t_s"] > a["t_s"] else None


def duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for u in ("ms", "s", "m", "h"):
        if text.endswith(u):
            return float(text[: -len(u)]) * units[u]
    return float(text)


def log_warnings(paths: list[str]) -> dict:
    """WARN/ERROR lines of the forwarders' JSON logs, counted by message."""
    out: Counter = Counter()
    for p in paths:
        with open(p, errors="replace") as f:
            for line in f:
                try:
                    v = json.loads(line)
                except ValueError:
                    continue
                level = str(v.get("level", "")).upper()
                if level in ("WARN", "ERROR"):
                    msg = v.get("fields", {}).get("message") or v.get("message") or "?"
                    if msg.startswith("librdkafka: "):
                        # "librdkafka: REQTMOUT [thrd:…]: …": the code, not the details.
                        msg = " ".join(msg.split()[:2])
                    out[f"{level} {msg}"] += 1
    return dict(out)


def cmd_run(a) -> None:
    d = a.dir
    k6 = json.load(open(f"{d}/k6.json"))
    cpu = json.load(open(f"{d}/cpu.json"))
    obs = json.load(open(f"{d}/observer-stats.json"))
    offer_s = duration_s(k6["duration"])
    t0, t1, t2 = a.offer_start_ms, a.offer_end_ms, a.drain_end_ms
    lat, states, last_arrival = [], Counter(), None
    with open(f"{d}/e2e.csv") as f:
        for r in csv.DictReader(f):
            # Offered jobs (not the warm-up) called back by the cut-off (the
            # receiver may log a few more while the rig is torn down).
            if int(r["submit_ms"]) >= t0 and int(r["arrival_ms"]) <= t2:
                lat.append(int(r["arrival_ms"]) - int(r["submit_ms"]))
                states[r["status"]] += 1
                last_arrival = max(last_arrival or 0, int(r["arrival_ms"]))
    lat.sort()
    rows = []
    with open(f"{d}/samples.csv") as f:
        for r in csv.DictReader(f):
            rows.append({"t_s": (int(r["unix_ms"]) - t0) / 1000,
                         "depth": int(r["depth_total"]),
                         "accepted": int(r["accepted"]),
                         "callbacks": int(r["callbacks"]),
                         "backlog": int(r["accepted"]) - int(r["callbacks"]),
                         "scrape_errors": int(r["scrape_errors"])})
    accepted = k6["accepted"]
    cutoff_s = (t2 - t1) / 1000
    calls = json.load(open(f"{d}/mock-calls.json")).get("calls", {})
    started = sum(c.get("started", 0) for c in calls.values())
    hz, secs = cpu["hz"], cpu["seconds"]
    cores = {k: cpu[k] / hz / secs for k in ("forwarders", "tansu", "redis", "mock", "observer", "k6", "machine")}
    ours = sum(v for k, v in cores.items() if k != "machine")
    at = lambda t: min(rows, key=lambda r: abs(r["t_s"] - t)) if rows else {}  # noqa: E731
    result = {
        "label": a.label, "replicas": a.replicas, "workers": a.workers,
        "offer_start_ms": t0, "offer_end_ms": t1, "drain_end_ms": t2,
        "offer_s": offer_s, "offered": k6["iterations"], "dropped": k6["dropped_iterations"],
        "accepted": accepted, "accepted_per_s": accepted / offer_s,
        "submit_p50_ms": k6["submit_p50_ms"], "submit_p99_ms": k6["submit_p99_ms"],
        "submit_max_ms": k6["submit_max_ms"],
        "submit_errors": k6["errors"],
        "completed": len(lat), "unfinished": accepted - len(lat), "cutoff_s": cutoff_s,
        "job_states": dict(states),
        "e2e_p50_ms": censored_pct(lat, accepted, 50), "e2e_p99_ms": censored_pct(lat, accepted, 99),
        "e2e_done_p50_ms": pct(lat, 50), "e2e_done_p99_ms": pct(lat, 99),
        "e2e_max_ms": lat[-1] if lat else None,
        "completed_per_s_2nd_half": rate_between(rows, "callbacks", offer_s / 2, offer_s),
        "completed_per_s_drain": rate_between(rows, "callbacks", offer_s, offer_s + cutoff_s),
        "all_done_after_offer_s": (last_arrival - t1) / 1000 if last_arrival and len(lat) >= accepted else None,
        "depth_max": max((r["depth"] for r in rows), default=0),
        "depth_at_offer_end": at(offer_s).get("depth"), "backlog_at_offer_end": at(offer_s).get("backlog"),
        "depth_at_cutoff": rows[-1]["depth"] if rows else None,
        "backlog_at_cutoff": rows[-1]["backlog"] if rows else None,
        "scrape_errors": sum(r["scrape_errors"] for r in rows),
        "callbacks": obs, "warmup": a.warmup,
        "upstream_job_ids": len(calls) - a.warmup, "upstream_calls": started - a.warmup,
        "upstream_ids_called_twice": sum(1 for c in calls.values() if c.get("started", 0) > 1),
        "upstream_ids_answered_twice": sum(1 for c in calls.values() if c.get("answered", 0) > 1),
        "cpu_cores": {**{k: round(v, 2) for k, v in cores.items()},
                      "other": round(max(0.0, cores["machine"] - ours), 2)},
        "background_before": cpu["background_before"],
        "warnings": log_warnings(sorted(glob.glob(f"{d}/forwarder-*.log"))),
        "samples": [{k: r[k] for k in ("t_s", "depth", "backlog", "accepted", "callbacks")} for r in rows],
    }
    print(json.dumps(result))


def fmt_ms(v, cutoff=None) -> str:
    if v is None:
        return f"> {cutoff:.0f} s (not done)" if cutoff is not None else "n/a"
    return f"{v / 1000:.2f} s" if v >= 10_000 else f"{v:.0f} ms" if v >= 100 else f"{v:.1f} ms"


def fmt(v, spec=".0f") -> str:
    return "n/a" if v is None else format(v, spec)


def cmd_table(a) -> None:
    runs = [json.loads(line) for line in open(a.results) if line.strip()]
    p = print
    p(f"Offered: {a.rate} submissions/s for {a.offer} s from up to {a.vus} clients (k6 constant-arrival-rate); "
      f"mock upstream {a.latency}; drain wait at most {a.drain} s after the offering.\n")
    p("| run | replicas × workers | offered | accepted (202) | accepted/s | submit P50 | submit P99 | "
      "completed/s (2nd half of offering) | called back by cut-off | e2e P50 | e2e P99 | e2e P50 / P99 of the jobs done |")
    p("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        p(f"| {r['label']} | {r['replicas']} × {r['workers']} | {r['offered']:,} | {r['accepted']:,} | "
          f"{r['accepted_per_s']:.1f} | {fmt_ms(r['submit_p50_ms'])} | {fmt_ms(r['submit_p99_ms'])} | "
          f"{fmt(r['completed_per_s_2nd_half'], '.1f')} | {r['completed']:,} of {r['accepted']:,} "
          f"(cut-off {r['cutoff_s']:.0f} s after the offering) | "
          f"{fmt_ms(r['e2e_p50_ms'], r['cutoff_s'])} | {fmt_ms(r['e2e_p99_ms'], r['cutoff_s'])} | "
          f"{fmt_ms(r['e2e_done_p50_ms'])} / {fmt_ms(r['e2e_done_p99_ms'])} |")
    p("\nQueue lag (`forwarder_queue_depth`, summed over replicas; the true backlog is accepted − called back):\n")
    p("| run | depth max | depth at offering end | true backlog at offering end | depth at cut-off | "
      "true backlog at cut-off | completed/s while draining | all done after offering end |")
    p("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        done = r["all_done_after_offer_s"]
        p(f"| {r['label']} | {r['depth_max']:,} | {fmt(r['depth_at_offer_end'], ',')} | "
          f"{fmt(r['backlog_at_offer_end'], ',')} | {fmt(r['depth_at_cutoff'], ',')} | "
          f"{fmt(r['backlog_at_cutoff'], ',')} | {fmt(r['completed_per_s_drain'], '.1f')} | "
          f"{'%.1f s' % done if done is not None else 'not within the cut-off'} |")
    p("\nErrors by kind:\n")
    p("| run | not sent (k6 had no free client) | 429 | 503 | other 5xx | 4xx | timeouts | connect | "
      "jobs failed | duplicate callbacks | bad signatures | upstream: job ids / calls / ids called twice "
      "(warm-up excluded) | forwarder warnings and errors (log lines) |")
    p("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        e, cb = r["submit_errors"], r["callbacks"]
        warns = "; ".join(f"{k} ×{v}" for k, v in sorted(r["warnings"].items())) or "none"
        p(f"| {r['label']} | {r['dropped']} | {e['status_429']} | {e['status_503']} | {e['status_5xx']} | "
          f"{e['status_4xx']} | {e['timeout']} | {e['connect']} | {r['job_states'].get('failed', 0)} | "
          f"{cb['duplicates']} | {cb['bad_signature']} | {r['upstream_job_ids']:,} / {r['upstream_calls']:,} / "
          f"{r['upstream_ids_called_twice']} | {warns} |")
    p("\nCPU during the offering (cores, of the machine's 2):\n")
    p("| run | forwarder(s) | tansu | redis | mock | k6 | observer | other processes | machine busy | "
      "others before the run |")
    p("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        c = r["cpu_cores"]
        p(f"| {r['label']} | {c['forwarders']:.2f} | {c['tansu']:.2f} | {c['redis']:.2f} | {c['mock']:.2f} | "
          f"{c['k6']:.2f} | {c['observer']:.2f} | {c['other']:.2f} | {c['machine']:.2f} | {r['background_before']} |")
    base = [r for r in runs if r["workers"] == 10 and r["replicas"] == 1]
    if base and base[0]["completed_per_s_2nd_half"]:
        per = base[0]["completed_per_s_2nd_half"]
        p(f"\nReplicas at 10 workers for {a.rate}/s: measured {per:.1f} jobs/s per replica → "
          f"{math.ceil(a.rate / per)}; ideal (10 workers / {a.latency}) → "
          f"{math.ceil(a.rate / (10 / duration_s(a.latency)))}.")
    with open(a.lag_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "t_s", "queue_depth", "backlog", "accepted_per_s", "completed_per_s"])
        for r in runs:
            prev = None
            for s in r["samples"]:
                acc = comp = ""
                if prev and s["t_s"] > prev["t_s"]:
                    dt = s["t_s"] - prev["t_s"]
                    acc = f"{(s['accepted'] - prev['accepted']) / dt:.1f}"
                    comp = f"{(s['callbacks'] - prev['callbacks']) / dt:.1f}"
                w.writerow([r["label"], f"{s['t_s']:.1f}", s["depth"], s["backlog"], acc, comp])
                prev = s


COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
W, PANEL_H, LEFT, RIGHT, TOP, GAP = 760, 200, 70, 150, 40, 60


def nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(v))
    for step in (1, 2, 2.5, 5, 10):
        if step * mag >= v:
            return step * mag
    return 10 * mag


def panel(series: dict, label: str, y0: float, t_min: float, t_max: float, dashed: dict | None = None) -> list[str]:
    plot_w = W - LEFT - RIGHT
    values = [v for pts in list(series.values()) + list((dashed or {}).values()) for _, v in pts]
    y_max = nice_max(max(values, default=1) * 1.05)
    x = lambda t: LEFT + plot_w * (t - t_min) / (t_max - t_min)  # noqa: E731
    y = lambda v: y0 + PANEL_H - PANEL_H * v / y_max  # noqa: E731
    out = [f'<rect x="{LEFT}" y="{y0}" width="{plot_w}" height="{PANEL_H}" fill="none" stroke="#999"/>',
           f'<text x="{LEFT}" y="{y0 - 8}" font-size="13" font-weight="bold">{escape(label)}</text>']
    for i in range(5):
        v = y_max * i / 4
        out.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y(v) + 4:.1f}" font-size="11" text-anchor="end">{v:g}</text>')
    step = nice_max((t_max - t_min) / 8)
    t = math.ceil(t_min / step) * step
    while t <= t_max:
        out.append(f'<text x="{x(t):.1f}" y="{y0 + PANEL_H + 15}" font-size="11" text-anchor="middle">{t:g}</text>')
        t += step
    for i, (name, pts) in enumerate(series.items()):
        c = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in pts)
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{path}"/>')
        if dashed and name in dashed:
            path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in dashed[name])
            out.append(f'<polyline fill="none" stroke="{c}" stroke-width="1" stroke-dasharray="4 3" points="{path}"/>')
        out.append(f'<text x="{LEFT + plot_w + 10}" y="{y0 + 15 + 16 * i}" font-size="12" fill="{c}">{escape(name)}</text>')
    return out


def cmd_plot(a) -> None:
    with open(a.lag_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit("report.py plot: no samples")
    depth, backlog, comp = {}, {}, {}
    for r in rows:
        t = float(r["t_s"])
        depth.setdefault(r["run"], []).append((t, float(r["queue_depth"])))
        backlog.setdefault(r["run"], []).append((t, float(r["backlog"])))
        if r["completed_per_s"]:
            comp.setdefault(r["run"], []).append((t, float(r["completed_per_s"])))
    ts = [float(r["t_s"]) for r in rows]
    t_min, t_max = min(ts), max(ts)
    height = TOP + 2 * PANEL_H + GAP + 50
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif">',
           f'<rect width="{W}" height="{height}" fill="white"/>',
           f'<text x="{LEFT}" y="20" font-size="15" font-weight="bold">{escape(a.title)}</text>']
    svg += panel(depth, "forwarder_queue_depth (solid) and true backlog, accepted − called back (dashed)",
                 TOP + 15, t_min, t_max, dashed=backlog)
    y2 = TOP + 15 + PANEL_H + GAP
    svg += panel(comp, "jobs called back per second", y2, t_min, t_max)
    svg.append(f'<text x="{LEFT + (W - LEFT - RIGHT) / 2}" y="{y2 + PANEL_H + 32}" font-size="11" '
               f'text-anchor="middle">seconds since the offering started (one sample a second)</text>')
    svg.append("</svg>")
    print("\n".join(svg))


def self_test() -> None:
    assert censored_pct([1, 2, 3], 4, 50) == 2
    assert censored_pct([1, 2, 3], 4, 99) is None
    assert censored_pct([], 0, 50) is None
    assert pct([5, 7], 50) == 5 and pct([5, 7], 99) == 7
    rows = [{"t_s": 0, "c": 0}, {"t_s": 1, "c": 10}, {"t_s": 3, "c": 50}]
    assert rate_between(rows, "c", 1, 3) == 20
    assert duration_s("60s") == 60 and duration_s("200ms") == 0.2
    assert nice_max(37) == 50 and nice_max(0.3) == 0.5


def main() -> int:
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--self-test", action="store_true")
    sub = ap.add_subparsers(dest="cmd")
    r = sub.add_parser("run")
    for name in ("--label", "--dir"):
        r.add_argument(name, required=True)
    for name in ("--replicas", "--workers", "--offer-start-ms", "--offer-end-ms", "--drain-end-ms", "--warmup"):
        r.add_argument(name, type=int, required=True)
    t = sub.add_parser("table")
    t.add_argument("--results", required=True)
    t.add_argument("--lag-csv", required=True)
    t.add_argument("--rate", type=int, default=500)
    t.add_argument("--vus", type=int, default=800)
    t.add_argument("--offer", type=int, default=60)
    t.add_argument("--drain", type=int, default=60)
    t.add_argument("--latency", default="200ms")
    pl = sub.add_parser("plot")
    pl.add_argument("--lag-csv", required=True)
    pl.add_argument("--title", default="async load")
    a = ap.parse_args()
    if a.self_test:
        self_test()
        print("report.py self-test OK")
        return 0
    {"run": cmd_run, "table": cmd_table, "plot": cmd_plot}.get(a.cmd, lambda _: ap.print_help())(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())

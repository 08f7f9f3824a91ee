#!/usr/bin/env python3
"""Soak: steady mixed load on one forwarder for --duration seconds, sampling
its resources every --interval seconds, failing when one trends upward.

Load (paced to --rate requests per second by --concurrency workers):
  45% POST /v1/chat/completions (non-streamed)
  25% POST /v1/chat/completions streamed (SSE, read to `data: [DONE]`)
  15% POST /api/v1/message
  15% a WebSocket session: connect, one streamed and one non-streamed
      request, close (connection set-up and tear-down under load)
Faults: the mock answers a share of requests with an error (its
--error-rate, set by soak.sh) and, every interval, this script asks it
(POST /mock/fail-next) to reset two connections and hang one, so retries,
timeouts and cancelled upstream calls run all along. The statuses those
faults can surface (502, 503, 504) are counted as expected; any other
failure (another status, a malformed answer, a client-side error) is
unexpected and fails the run.

Each sample: RSS and threads (/proc/PID/status), open file descriptors
(/proc/PID/fd), P50/P99 latency of the non-streamed requests completed in
the interval, stream P99, requests and errors. The forwarder exposes no
task count, so threads stand in for it (a leaked task that holds a socket
shows in the fds).

Verdict (the bounds, documented in docs/load-testing.md): the first
--warmup samples are dropped; of the rest, the median of the last third is
compared with the median of the first third:
  RSS      may grow by at most max(--rss-growth-pct % of the first third, --rss-growth-mib MiB)
  fds      by at most --fd-growth
  threads  by at most --thread-growth
  P99      may reach at most --p99-factor x the first third's + --p99-slack-ms
and the unexpected-error count must be 0. Exit code 1 otherwise.

    python3 e2e/soak/soak.py --base-url http://127.0.0.1:8080 --pid 1234 \
        --mock-url http://127.0.0.1:8081 --duration 3600 --interval 60 --csv soak.csv
    python3 e2e/soak/soak.py --self-test
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import statistics
import sys
import time
import uuid

SAMPLE_FIELDS = ["t_s", "rss_mib", "fds", "threads", "p50_ms", "p99_ms", "stream_p99_ms",
                 "requests", "expected_errors", "unexpected_errors"]
FAULT_STATUSES = {502, 503, 504}


# ---- decisions (pure) -------------------------------------------------------

def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    rank = max(1, -(-len(s) * p // 100))
    return s[int(rank) - 1]


def verdict(samples: list[dict], warmup: int, bounds: dict) -> list[str]:
    """The bounds a run broke (empty: it passed). `samples` as SAMPLE_FIELDS."""
    problems = []
    unexpected = sum(s["unexpected_errors"] for s in samples)
    if unexpected:
        problems.append(f"{unexpected} unexpected error(s)")
    steady = samples[warmup:]
    if len(steady) < 3:
        return problems + [f"too few samples after warm-up ({len(steady)}; need 3)"]
    third = max(1, len(steady) // 3)
    first, last = steady[:third], steady[-third:]

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    rss0, rss1 = med(first, "rss_mib"), med(last, "rss_mib")
    rss_allow = max(rss0 * bounds["rss_growth_pct"] / 100, bounds["rss_growth_mib"])
    if rss1 - rss0 > rss_allow:
        problems.append(f"RSS grew {rss0:.1f} -> {rss1:.1f} MiB (allowed +{rss_allow:.1f})")
    for key, allow in (("fds", bounds["fd_growth"]), ("threads", bounds["thread_growth"])):
        a, b = med(first, key), med(last, key)
        if b - a > allow:
            problems.append(f"{key} grew {a:g} -> {b:g} (allowed +{allow})")
    p0, p1 = med(first, "p99_ms"), med(last, "p99_ms")
    p_allow = p0 * bounds["p99_factor"] + bounds["p99_slack_ms"]
    if p1 > p_allow:
        problems.append(f"P99 rose {p0:.0f} -> {p1:.0f} ms (allowed {p_allow:.0f})")
    return problems


def self_test() -> None:
    b = {"rss_growth_pct": 10, "rss_growth_mib": 8, "fd_growth": 16, "thread_growth": 4,
         "p99_factor": 1.5, "p99_slack_ms": 20}

    def run(rss, fds=None, p99=None, errors=0):
        n = len(rss)
        return [dict(t_s=i, rss_mib=rss[i], fds=(fds or [50] * n)[i], threads=10,
                     p50_ms=5, p99_ms=(p99 or [30] * n)[i], stream_p99_ms=50, requests=100,
                     expected_errors=1, unexpected_errors=errors if i == n - 1 else 0)
                for i in range(n)]
    flat = [40, 60, 41, 42, 41, 43, 42, 41, 42, 43]
    assert verdict(run(flat), 1, b) == [], verdict(run(flat), 1, b)
    leak = [40 + 5 * i for i in range(10)]
    assert any("RSS" in p for p in verdict(run(leak), 1, b))
    assert any("fds" in p for p in verdict(run(flat, fds=[50 + 10 * i for i in range(10)]), 1, b))
    assert any("P99" in p for p in verdict(run(flat, p99=[30] * 5 + [200] * 5), 1, b))
    assert any("unexpected" in p for p in verdict(run(flat, errors=2), 1, b))
    assert any("too few" in p for p in verdict(run(flat[:3]), 1, b))
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile([], 99) == 0
    print("soak.py self-test: ok")


# ---- process sampling -------------------------------------------------------

def proc_stats(pid: int) -> tuple[float, int, int]:
    """RSS (MiB), open fds, threads of a live process."""
    rss_kib = threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss_kib / 1024, fds, threads


# ---- load -------------------------------------------------------------------

class Window:
    """What completed since the last sample."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.stream_latencies: list[float] = []
        self.requests = self.expected = self.unexpected = 0
        self.reasons: dict[str, int] = {}

    def fail(self, reason: str, status: int | None = None) -> None:
        if status in FAULT_STATUSES:
            self.expected += 1
        else:
            self.unexpected += 1
            self.reasons[reason] = self.reasons.get(reason, 0) + 1


class Load:
    def __init__(self, args) -> None:
        import httpx
        self.args = args
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.http = httpx.AsyncClient(base_url=args.base_url, headers=self.headers,
                                      timeout=args.request_timeout,
                                      limits=httpx.Limits(max_connections=args.concurrency * 2))
        self.window = Window()
        self.total_unexpected: dict[str, int] = {}

    def body(self, stream: bool) -> dict:
        words = random.randint(3, 40)
        prompt = " ".join(random.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(words))
        return {"model": self.args.model, "stream": stream,
                "messages": [{"role": "user", "content": prompt}]}

    async def chat(self) -> None:
        t = time.monotonic()
        r = await self.http.post("/v1/chat/completions", json=self.body(False))
        if r.status_code != 200:
            return self.window.fail(f"chat {r.status_code}", r.status_code)
        if r.json().get("object") != "chat.completion":
            return self.window.fail("chat: not a chat.completion")
        self.window.latencies.append((time.monotonic() - t) * 1000)

    async def simple(self) -> None:
        t = time.monotonic()
        b = self.body(False)
        r = await self.http.post("/api/v1/message", json={"model_id": b["model"],
                                                          "prompt": b["messages"][0]["content"]})
        if r.status_code != 200:
            return self.window.fail(f"simple {r.status_code}", r.status_code)
        if "reply" not in r.json():
            return self.window.fail("simple: no reply")
        self.window.latencies.append((time.monotonic() - t) * 1000)

    async def stream(self) -> None:
        t = time.monotonic()
        async with self.http.stream("POST", "/v1/chat/completions", json=self.body(True)) as r:
            if r.status_code != 200:
                await r.aread()
                return self.window.fail(f"stream {r.status_code}", r.status_code)
            last = ""
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    last = line[6:]
                    if last.startswith("{") and '"error"' in last:
                        # A fault after the stream began: an in-band error event.
                        status = json.loads(last).get("error", {}).get("code")
                        return self.window.fail(f"stream error event {status}", 502)
        if last != "[DONE]":
            return self.window.fail("stream: no [DONE]")
        self.window.stream_latencies.append((time.monotonic() - t) * 1000)

    async def websocket(self) -> None:
        import websockets
        url = self.args.base_url.replace("http://", "ws://", 1) + "/api/v1/ws"
        t = time.monotonic()
        async with websockets.connect(url, additional_headers=self.headers,
                                      open_timeout=self.args.request_timeout) as ws:
            for stream in (True, False):
                rid = uuid.uuid4().hex[:12]
                b = self.body(stream)
                await ws.send(json.dumps({"type": "request", "id": rid, "model": b["model"],
                                          "messages": b["messages"], "stream": stream}))
                while True:
                    msg = json.loads(await asyncio.wait_for(ws.recv(), self.args.request_timeout))
                    if msg.get("type") == "done" and msg.get("id") == rid:
                        break
                    if msg.get("type") == "error":
                        return self.window.fail(f"ws error {msg.get('status')}", msg.get("status"))
        self.window.stream_latencies.append((time.monotonic() - t) * 1000)

    async def one(self) -> None:
        kind = random.choices([self.chat, self.stream, self.simple, self.websocket],
                              weights=[45, 25, 15, 15])[0]
        self.window.requests += 1
        try:
            await kind()
        except Exception as e:  # a client-side failure is a finding, never a crash
            self.window.fail(f"{kind.__name__}: {type(e).__name__}")

    async def worker(self, stop_at: float) -> None:
        gap = self.args.concurrency / self.args.rate
        await asyncio.sleep(random.random() * gap)
        while time.monotonic() < stop_at:
            started = time.monotonic()
            await self.one()
            await asyncio.sleep(max(0.0, gap - (time.monotonic() - started)))

    async def inject_faults(self) -> None:
        if not self.args.mock_url:
            return
        import httpx
        async with httpx.AsyncClient(base_url=self.args.mock_url, timeout=5) as mock:
            for fault, count in (("reset", 2), ("hang", 1)):
                try:
                    await mock.post("/mock/fail-next", json={"count": count, "fault": fault})
                except httpx.HTTPError as e:
                    print(f"soak: could not reach the mock's fault API: {e}", file=sys.stderr)


def metric_sum(text: str, name: str, exclude: str | None = None) -> float:
    """The sum of a Prometheus counter's samples, optionally skipping those
    whose labels contain `exclude`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if exclude and exclude in line.split("}")[0]:
                continue
            total += float(line.rsplit(" ", 1)[1])
    return total


async def fault_evidence(http) -> tuple[float, float]:
    """Retries and failed upstream attempts, from the forwarder's metrics:
    the injected faults, mostly hidden from clients by retries."""
    try:
        text = (await http.get("/metrics")).text
    except Exception:
        return 0.0, 0.0
    return (metric_sum(text, "forwarder_retries_total"),
            metric_sum(text, "forwarder_upstream_requests_total", exclude='outcome="success"'))


async def run(args) -> int:
    load = Load(args)
    bounds = {k: getattr(args, k) for k in ("rss_growth_pct", "rss_growth_mib", "fd_growth",
                                           "thread_growth", "p99_factor", "p99_slack_ms")}
    started = time.monotonic()
    stop_at = started + args.duration
    workers = [asyncio.create_task(load.worker(stop_at)) for _ in range(args.concurrency)]
    samples: list[dict] = []
    out = open(args.csv, "w", newline="") if args.csv else None
    writer = csv.DictWriter(out, SAMPLE_FIELDS) if out else None
    if writer:
        writer.writeheader()
    print(" ".join(f"{f:>17}" for f in SAMPLE_FIELDS), flush=True)
    alive = True
    while time.monotonic() < stop_at:
        await load.inject_faults()
        await asyncio.sleep(min(args.interval, max(0.0, stop_at - time.monotonic())))
        w, load.window = load.window, Window()
        try:
            rss, fds, threads = proc_stats(args.pid)
        except (FileNotFoundError, ProcessLookupError):
            alive = False
            break
        s = dict(t_s=round(time.monotonic() - started, 1), rss_mib=round(rss, 2), fds=fds,
                 threads=threads, p50_ms=round(percentile(w.latencies, 50), 1),
                 p99_ms=round(percentile(w.latencies, 99), 1),
                 stream_p99_ms=round(percentile(w.stream_latencies, 99), 1),
                 requests=w.requests, expected_errors=w.expected, unexpected_errors=w.unexpected)
        for k, v in w.reasons.items():
            load.total_unexpected[k] = load.total_unexpected.get(k, 0) + v
        samples.append(s)
        if writer:
            writer.writerow(s)
            out.flush()
        print(" ".join(f"{s[f]:>17}" for f in SAMPLE_FIELDS), flush=True)
    for t in workers:
        t.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    retries, upstream_failures = await fault_evidence(load.http)
    await load.http.aclose()
    if out:
        out.close()
    problems = [] if alive else ["the forwarder died"]
    problems += verdict(samples, args.warmup, bounds)
    total = sum(s["requests"] for s in samples)
    expected = sum(s["expected_errors"] for s in samples)
    print(f"soak: {len(samples)} samples, {total} requests, {expected} fault-induced errors "
          f"(502/503/504), unexpected: {load.total_unexpected or 0}; the faults at the mock: "
          f"{upstream_failures:g} failed upstream attempts, {retries:g} retries")
    if problems:
        print("soak: FAIL: " + "; ".join(problems))
        return 1
    print("soak: OK (no upward trend beyond the bounds)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--self-test", action="store_true")
    ap.add_argument("--base-url")
    ap.add_argument("--pid", type=int, help="the forwarder's process id (sampled in /proc)")
    ap.add_argument("--mock-url", help="mock-llm base URL for fault injection")
    ap.add_argument("--api-key", default=os.environ.get("MF_API_KEY", ""))
    ap.add_argument("--model", default="mock")
    ap.add_argument("--duration", type=float, default=3600)
    ap.add_argument("--interval", type=float, default=60)
    ap.add_argument("--rate", type=float, default=40, help="requests per second, all kinds")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--request-timeout", type=float, default=30)
    ap.add_argument("--warmup", type=int, default=1, help="samples dropped before the trend check")
    ap.add_argument("--csv")
    ap.add_argument("--rss-growth-pct", type=float, default=10)
    ap.add_argument("--rss-growth-mib", type=float, default=8)
    ap.add_argument("--fd-growth", type=int, default=16)
    ap.add_argument("--thread-growth", type=int, default=4)
    ap.add_argument("--p99-factor", type=float, default=2.0)
    ap.add_argument("--p99-slack-ms", type=float, default=100)
    args = ap.parse_args()
    if args.self_test:
        self_test()
        return 0
    if not (args.base_url and args.pid):
        ap.error("--base-url and --pid are required")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())

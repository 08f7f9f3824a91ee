#!/usr/bin/env python3
"""The async load scenario's observer (standard library only), one process:

* a callback receiver: every POST /cb?t=<submit Unix ms> is a finished job's
  Standard Webhooks event; its signature is checked (HMAC-SHA256 over
  "id.timestamp.body" with the whsec_ secret), and submit → arrival is
  recorded per job (first delivery of each webhook-id; repeats are counted
  as duplicates). Answered 204 at once.
* a sampler: every second, each forwarder's /metrics
  (forwarder_queue_depth, forwarder_jobs_total) and the receiver's own
  counts go to a CSV row.

    observer.py --port 0 --secret-file whsec --metrics http://127.0.0.1:8080/metrics \\
        --samples samples.csv --latencies e2e.csv --port-file port

GET /stats answers the counts as JSON; GET /flush writes everything out.
Loopback only; it stops on SIGTERM/SIGINT (after flushing).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import re
import signal
import sys
import time
from urllib.parse import parse_qs, urlsplit

METRIC_RE = re.compile(r'^(forwarder_queue_depth|forwarder_jobs_total)(\{state="(\w+)"\})? ([0-9.eE+-]+)$')


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def parse_metrics(text: str) -> dict:
    """forwarder_queue_depth and forwarder_jobs_total{state} from a scrape."""
    out: dict = {"depth": 0, "jobs": {}}
    for line in text.splitlines():
        m = METRIC_RE.match(line)
        if not m:
            continue
        value = int(float(m.group(4)))
        if m.group(1) == "forwarder_queue_depth":
            out["depth"] = value
        else:
            out["jobs"][m.group(3)] = value
    return out


def verify(secret: bytes, msg_id: str, ts: str, body: bytes, header: str) -> bool:
    """Standard Webhooks: any v1 entry of the header matches."""
    mac = hmac.new(secret, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    want = base64.b64encode(mac).decode()
    for part in header.split():
        version, _, sig = part.partition(",")
        if version == "v1" and hmac.compare_digest(sig, want):
            return True
    return False


class Observer:
    def __init__(self, secret: bytes, metrics: list[str], samples: str, latencies: str):
        self.secret = secret
        self.metrics = metrics
        self.seen: set[str] = set()
        self.counts = {"received": 0, "unique": 0, "succeeded": 0, "failed": 0, "other_state": 0,
                       "duplicates": 0, "bad_signature": 0, "bad_request": 0}
        self.pending_rows: list[str] = []
        self.samples = open(samples, "w", buffering=1)
        self.samples.write("unix_ms,depth_total," + ",".join(f"depth_r{i}" for i in range(len(metrics)))
                           + ",accepted,succeeded,failed,scrape_errors,callbacks\n")
        self.lat = open(latencies, "w")
        self.lat.write("webhook_id,submit_ms,arrival_ms,status\n")

    def on_callback(self, target: str, headers: dict, body: bytes) -> int:
        self.counts["received"] += 1
        arrival = now_ms()
        q = parse_qs(urlsplit(target).query)
        msg_id = headers.get("webhook-id", "")
        try:
            t = int(q["t"][0])
        except (KeyError, ValueError, IndexError):
            self.counts["bad_request"] += 1
            return 400
        if not verify(self.secret, msg_id, headers.get("webhook-timestamp", ""), body,
                      headers.get("webhook-signature", "")):
            self.counts["bad_signature"] += 1
            return 401
        if msg_id in self.seen:
            self.counts["duplicates"] += 1
            return 204
        self.seen.add(msg_id)
        self.counts["unique"] += 1
        try:
            status = json.loads(body)["data"]["status"]
        except (ValueError, KeyError, TypeError):
            status = "unreadable"
        key = status if status in ("succeeded", "failed") else "other_state"
        self.counts[key] += 1
        self.pending_rows.append(f"{msg_id},{t},{arrival},{status}\n")
        return 204

    def flush(self) -> None:
        if self.pending_rows:
            self.lat.write("".join(self.pending_rows))
            self.pending_rows.clear()
        self.lat.flush()
        self.samples.flush()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                payload = b""
                if method == "POST" and target.startswith("/cb"):
                    code = self.on_callback(target, headers, body)
                elif method == "GET" and target == "/stats":
                    code, payload = 200, json.dumps(self.counts).encode()
                elif method == "GET" and target == "/flush":
                    self.flush()
                    code = 204
                else:
                    code = 404
                reason = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
                          404: "Not Found"}[code]
                writer.write(f"HTTP/1.1 {code} {reason}\r\ncontent-length: {len(payload)}\r\n"
                             f"content-type: application/json\r\n\r\n".encode() + payload)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def scrape(self, url: str) -> dict | None:
        u = urlsplit(url)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(u.hostname, u.port), 1.0)
            writer.write(f"GET {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), 2.0)
            writer.close()
        except (OSError, asyncio.TimeoutError):
            return None
        head, _, body = raw.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            return None
        if b"transfer-encoding: chunked" in head.lower():
            body = dechunk(body)
        return parse_metrics(body.decode("utf-8", "replace"))

    async def sample_forever(self) -> None:
        next_at = time.monotonic()
        while True:
            next_at += 1.0
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            t = now_ms()
            results = await asyncio.gather(*(self.scrape(u) for u in self.metrics))
            depths = [r["depth"] if r else "" for r in results]
            ok = [r for r in results if r]
            total = lambda state: sum(r["jobs"].get(state, 0) for r in ok)  # noqa: E731
            row = [t, sum(r["depth"] for r in ok), *depths, total("queued"), total("succeeded"),
                   total("failed"), len(results) - len(ok), self.counts["unique"]]
            self.samples.write(",".join(str(v) for v in row) + "\n")
            self.flush()


def dechunk(body: bytes) -> bytes:
    out, rest = [], body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2:]
    return b"".join(out)


def self_test() -> None:
    m = parse_metrics('# HELP x\nforwarder_queue_depth 12\nforwarder_jobs_total{state="queued"} 40\n'
                      'forwarder_jobs_total{state="succeeded"} 3e1\n')
    assert m == {"depth": 12, "jobs": {"queued": 40, "succeeded": 30}}, m
    secret = b"k" * 24
    sig = base64.b64encode(hmac.new(secret, b"msg_1.5.{}", hashlib.sha256).digest()).decode()
    assert verify(secret, "msg_1", "5", b"{}", f"v1,bad v1,{sig}")
    assert not verify(secret, "msg_1", "6", b"{}", f"v1,{sig}")
    assert dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n") == b"abcde"


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file")
    ap.add_argument("--secret-file")
    ap.add_argument("--metrics", default="", help="comma-separated /metrics URLs")
    ap.add_argument("--samples", default="samples.csv")
    ap.add_argument("--latencies", default="e2e.csv")
    ap.add_argument("--self-test", action="store_true")
    args = ap.parse_args()
    if args.self_test:
        self_test()
        print("observer.py self-test OK")
        return 0
    line = next(ln for ln in open(args.secret_file).read().splitlines() if ln.startswith("whsec_"))
    secret = base64.b64decode(line.removeprefix("whsec_"))
    urls = [u for u in args.metrics.split(",") if u]
    for u in urls:
        if urlsplit(u).hostname not in ("127.0.0.1", "localhost"):
            raise SystemExit(f"observer.py: only loopback metrics URLs: {u}")
    obs = Observer(secret, urls, args.samples, args.latencies)
    server = await asyncio.start_server(obs.handle, "127.0.0.1", args.port, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(f"{port}\n")
        import os
        os.replace(args.port_file + ".tmp", args.port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    sampler = asyncio.create_task(obs.sample_forever())
    await stop.wait()
    sampler.cancel()
    obs.flush()
    server.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

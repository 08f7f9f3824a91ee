"""The seed's FAQ case as a Locust scenario: a support bot whose users ask
mostly the same questions.

    locust -f e2e/load/faq/locustfile.py --headless --host http://127.0.0.1:8080 \
        -u 100 -r 100 -t 60s --rate 100 --summary-json faq.json

Every request is a deterministic chat completion (``temperature: 0``, so the
forwarder's cache may answer it): with probability --hot-share (0.8) one of
the 20 hot questions of questions.json, otherwise a question never asked
before. The load is open-ended in effect: each of the -u users sends at most
--rate / users requests per second (``constant_throughput``), so a cache
that answers faster does not change the offered load, and runs with the cache
off and on are comparable. Users must be enough to cover the slowest answer
(200 ms upstream: rate / users <= ~4 per second each).

At the end it prints a summary and, with --summary-json, writes it as JSON
for e2e/load/faq/run.sh: requests, failures, req/s, P50/P99 over all, per
kind (hot, unique) and per X-Cache answer (HIT, MISS, BYPASS, none), with
percentiles computed from every response time recorded (not Locust's rounded
buckets). Exit code 1 when the error rate is above --max-error-rate (0).
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import time
import uuid
from collections import defaultdict

from locust import FastHttpUser, constant_throughput, events, task
from locust.runners import WorkerRunner

_HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(_HERE, "questions.json"), encoding="utf-8") as f:
    _Q = json.load(f)
HOT = _Q["hot"]
SYSTEM = _Q["system"]

# (kind, x-cache, ms, failed, end time) of every request: at most rate x
# duration entries (6,000 for the default minute at 100 req/s).
_samples: list[tuple[str, str, float, bool, float]] = []


@events.init_command_line_parser.add_listener
def _args(parser):
    env = os.environ.get
    parser.add_argument("--model", default=env("MF_MODEL", "mock"))
    parser.add_argument("--rate", type=float, default=float(env("MF_FAQ_RATE", "100")),
                        help="requests per second offered in all (split over the users)")
    parser.add_argument("--hot-share", type=float, default=float(env("MF_FAQ_HOT_SHARE", "0.8")),
                        help="fraction of requests asking one of the hot questions")
    parser.add_argument("--summary-json", default=env("MF_FAQ_SUMMARY", ""),
                        help="write the summary as JSON to this file")
    parser.add_argument("--max-error-rate", type=float,
                        default=float(env("MF_MAX_ERROR_RATE", "0")))


def unique_question() -> str:
    # About as long as a hot question; never asked before.
    return f"Where is my order {uuid.uuid4().hex[:12]}?"


class FaqUser(FastHttpUser):
    wait_time = constant_throughput(1.0)  # replaced in on_start from --rate
    network_timeout = 30.0
    connection_timeout = 5.0

    def on_start(self):
        o = self.environment.parsed_options
        users = max(1, self.environment.runner.target_user_count or 1)
        # constant_throughput() returns a function of the user: bind it.
        self.wait_time = functools.partial(constant_throughput(o.rate / users), self)
        self.hot_share = o.hot_share
        self.model = o.model

    @task
    def ask(self):
        hot = random.random() < self.hot_share
        question = random.choice(HOT) if hot else unique_question()
        kind = "hot" if hot else "unique"
        body = {"model": self.model, "temperature": 0,
                "messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": question}]}
        with self.client.post("/v1/chat/completions", data=json.dumps(body), name=kind,
                              headers={"Content-Type": "application/json"},
                              catch_response=True) as r:
            failed = False
            if r.status_code != 200:
                failed = True
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
            else:
                try:
                    reply = r.json()["choices"][0]["message"]["content"]
                    if not reply:
                        raise ValueError("empty reply")
                except Exception as e:  # noqa: BLE001 - any malformed answer is a failure
                    failed = True
                    r.failure(f"malformed answer: {e}")
            xc = (r.headers or {}).get("X-Cache") or "none"
            # Locust measures the request in the context manager; its
            # response_time is set by now.
            ms = r.request_meta["response_time"]
            _samples.append((kind, xc, ms, failed, time.monotonic()))


def _pct(values: list[float], p: float) -> float:
    """The p-th percentile, nearest rank (as wrk and k6 round)."""
    if not values:
        return float("nan")
    s = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(s)))
    return s[rank - 1]


def _group(rows) -> dict:
    ms = [r[2] for r in rows]
    return {"n": len(rows), "failures": sum(1 for r in rows if r[3]),
            "p50_ms": _pct(ms, 50), "p99_ms": _pct(ms, 99)}


def summarize(samples, seconds: float) -> dict:
    by_kind, by_cache = defaultdict(list), defaultdict(list)
    for s in samples:
        by_kind[s[0]].append(s)
        by_cache[s[1]].append(s)
    total = _group(samples)
    total["rps"] = len(samples) / seconds if seconds > 0 else 0.0
    total["duration_s"] = seconds
    total["error_rate"] = total["failures"] / total["n"] if total["n"] else 0.0
    total["by_kind"] = {k: _group(v) for k, v in sorted(by_kind.items())}
    total["by_cache"] = {k: _group(v) for k, v in sorted(by_cache.items())}
    return total


@events.quitting.add_listener
def _summary(environment, **_):
    if isinstance(environment.runner, WorkerRunner):
        return
    o = environment.parsed_options
    # From the first request's start to the last one's end.
    seconds = (max(s[4] for s in _samples) - min(s[4] - s[2] / 1000 for s in _samples)
               if _samples else 0.0)
    s = summarize(_samples, seconds)
    s["tool"] = "locust"
    caches = ", ".join(f"{k} {v['n']} (P50 {v['p50_ms']:.1f} / P99 {v['p99_ms']:.1f} ms)"
                       for k, v in s["by_cache"].items())
    print(f"\n=== FAQ (locust) host={environment.host} rate={o.rate}/s "
          f"hot={o.hot_share:.0%}\nrequests={s['n']} failures={s['failures']} "
          f"duration={seconds:.1f}s QPS={s['rps']:.1f} P50={s['p50_ms']:.1f}ms "
          f"P99={s['p99_ms']:.1f}ms error_rate={s['error_rate']:.4%}\nX-Cache: {caches}",
          flush=True)
    for e in environment.stats.errors.values():
        print(f"  error x{e.occurrences}: {e.method} {e.name}: {e.error}", flush=True)
    if o.summary_json:
        with open(o.summary_json, "w", encoding="utf-8") as f:
            json.dump(s, f, indent=1)
    if s["n"] == 0:
        print("FAIL: no request was made", flush=True)
        environment.process_exit_code = 1
    elif s["error_rate"] > o.max_error_rate:
        print(f"FAIL: error rate above {o.max_error_rate:.4%}", flush=True)
        environment.process_exit_code = 1
    else:
        print("OK", flush=True)

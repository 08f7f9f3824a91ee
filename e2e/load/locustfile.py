"""Load scenarios for a ModelForwarder, runnable against any forwarder URL.

    locust -f e2e/load/locustfile.py --headless --host http://127.0.0.1:8080 --scenario step

Scenarios (``--scenario`` or MF_SCENARIO):

  baseline  1 user, every answer checked in depth (shape, model, usage,
            request id, stream framing, idempotent replay); for correctness
            before load, and the latency floor.
  step      users in steps (--step-users, default 100,500,1000), each held
            --step-seconds (default 120): where P99 and errors start to bend.
  soak      --soak-users (default 200) for --soak-seconds (default 4 h),
            sampling the forwarder's RSS (from --forwarder-pid or the
            process_resident_memory_bytes metric when exported) and the error
            rate every --soak-sample-seconds (60): leaks show as a climbing line.
  mixed     80% short prompts (non-streamed), 20% long prompts streamed as
            Server-Sent Events; users as in step's last stage, for
            --mixed-seconds (default 600).

Every run ends with one summary block: QPS, P50/P99 (ms) per request kind,
error rate, and the exit code is 1 when the error rate is above
--max-error-rate (default 0: any error fails).

Authentication: --api-key (or MF_API_KEY) is sent as a Bearer token.
Model: --model (default mock). Both run against a forwarder whose upstream is
``forwarder mock-llm`` so no tokens are spent; see docs/load-testing.md.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid

import gevent
from locust import FastHttpUser, LoadTestShape, between, events, task
from locust.runners import WorkerRunner

SHORT_PROMPTS = [
    "What is the capital of France?",
    "Summarise: the order shipped on Monday.",
    "Translate 'thank you' into German.",
    "Is 17 a prime number?",
]
LONG_PROMPT_WORDS = 400  # the mock echoes the prompt: a long, streamed reply


@events.init_command_line_parser.add_listener
def _args(parser):
    env = os.environ.get
    parser.add_argument("--scenario", choices=["baseline", "step", "soak", "mixed"],
                        default=env("MF_SCENARIO", "baseline"), help="load scenario")
    parser.add_argument("--model", default=env("MF_MODEL", "mock"), help="model to request")
    parser.add_argument("--api-key", default=env("MF_API_KEY", ""), help="client API key (Bearer)",
                        is_secret=True)
    parser.add_argument("--step-users", default=env("MF_STEP_USERS", "100,500,1000"),
                        help="comma-separated user counts of the step scenario")
    parser.add_argument("--step-seconds", type=float, default=float(env("MF_STEP_SECONDS", "120")),
                        help="how long each step holds")
    parser.add_argument("--ramp-rate", type=float, default=float(env("MF_RAMP_RATE", "50")),
                        help="users started per second when stepping up")
    parser.add_argument("--soak-users", type=int, default=int(env("MF_SOAK_USERS", "200")))
    parser.add_argument("--soak-seconds", type=float, default=float(env("MF_SOAK_SECONDS", "14400")))
    parser.add_argument("--soak-sample-seconds", type=float,
                        default=float(env("MF_SOAK_SAMPLE_SECONDS", "60")),
                        help="how often the soak samples RSS and the error rate")
    parser.add_argument("--mixed-seconds", type=float, default=float(env("MF_MIXED_SECONDS", "600")))
    parser.add_argument("--baseline-seconds", type=float,
                        default=float(env("MF_BASELINE_SECONDS", "30")))
    parser.add_argument("--think-time", type=float, default=float(env("MF_THINK_TIME", "1.0")),
                        help="mean pause between a user's requests, seconds (0: closed loop)")
    parser.add_argument("--long-share", type=float, default=float(env("MF_LONG_SHARE", "-1")),
                        help="fraction of long streamed requests (default: 0.2 in mixed, else 0)")
    parser.add_argument("--forwarder-pid", type=int, default=int(env("MF_FORWARDER_PID", "0")),
                        help="local forwarder pid whose RSS the soak samples")
    parser.add_argument("--max-error-rate", type=float,
                        default=float(env("MF_MAX_ERROR_RATE", "0")),
                        help="exit 1 when the error rate is above this fraction")


def _opts(env):
    return env.parsed_options


class ForwarderUser(FastHttpUser):
    """A client of the forwarder's OpenAI-compatible API."""

    # Overridden per run in on_start from --think-time.
    wait_time = between(0.5, 1.5)
    # Long streams and slow upstreams: generous, the forwarder has its own deadline.
    network_timeout = 180.0
    connection_timeout = 10.0

    def on_start(self):
        o = _opts(self.environment)
        self.scenario = o.scenario
        self.model = o.model
        self.headers = {"Content-Type": "application/json"}
        if o.api_key:
            self.headers["Authorization"] = f"Bearer {o.api_key}"
        t = o.think_time
        self.wait_time = (lambda: 0) if t <= 0 else (lambda: random.uniform(0.5 * t, 1.5 * t))
        default_share = 0.2 if self.scenario == "mixed" else 0.0
        self.long_share = o.long_share if o.long_share >= 0 else default_share

    # One task choosing by scenario keeps the 80/20 split exact in expectation
    # regardless of response times.
    @task
    def request(self):
        if self.scenario == "baseline":
            self.baseline_round()
        elif random.random() < self.long_share:
            self.long_streamed()
        else:
            self.short()

    def _chat(self, body, name, extra_headers=None):
        headers = dict(self.headers, **(extra_headers or {}))
        return self.client.post("/v1/chat/completions", data=json.dumps(body), headers=headers,
                                name=name, catch_response=True)

    def short(self):
        body = {"model": self.model,
                "messages": [{"role": "user", "content": random.choice(SHORT_PROMPTS)}]}
        with self._chat(body, "short") as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            try:
                reply = r.json()["choices"][0]["message"]["content"]
            except Exception as e:  # noqa: BLE001 - any malformed answer is a failure
                r.failure(f"malformed answer: {e}")
                return
            if not reply:
                r.failure("empty reply")

    def long_streamed(self):
        words = " ".join(f"w{i}" for i in range(LONG_PROMPT_WORDS))
        body = {"model": self.model, "stream": True,
                "messages": [{"role": "user", "content": f"Rewrite this: {words}"}]}
        with self._chat(body, "long-stream") as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            text = r.text or ""
            events_ = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
            if not events_ or events_[-1] != "[DONE]":
                r.failure("stream did not end with data: [DONE]")
                return
            chunks = 0
            for e in events_[:-1]:
                obj = json.loads(e)
                if "error" in obj:
                    r.failure(f"stream error: {obj['error']}")
                    return
                chunks += 1
            if chunks < 2:
                r.failure(f"only {chunks} chunks in a long stream")

    def baseline_round(self):
        """Correctness in depth, one request of each kind."""
        rid = f"baseline-{uuid.uuid4()}"
        body = {"model": self.model, "messages": [{"role": "user", "content": "hello"}]}
        with self._chat(body, "baseline: chat", {"X-Request-Id": rid}) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
            elif r.headers.get("X-Request-Id") != rid:
                r.failure("X-Request-Id not echoed")
            else:
                j = r.json()
                if j.get("model") != self.model or not j.get("usage"):
                    r.failure(f"unexpected answer: {j}")
                elif not j["choices"][0]["message"]["content"]:
                    r.failure("empty reply")
        key = str(uuid.uuid4())
        replies = []
        for attempt in ("first", "replay"):
            with self._chat(body, f"baseline: idempotent {attempt}", {"Idempotency-Key": key}) as r:
                if r.status_code != 200:
                    r.failure(f"HTTP {r.status_code}")
                    return
                replies.append(r.json())
                if attempt == "replay" and r.headers.get("Idempotent-Replayed") != "true":
                    r.failure("repeat of an Idempotency-Key was not replayed")
        if len(replies) == 2 and replies[0] != replies[1]:
            events.request.fire(request_type="CHECK", name="baseline: replay identical",
                                response_time=0, response_length=0,
                                exception=AssertionError("replayed answer differs"))
        with self.client.post("/api/v1/message", name="baseline: simple API", catch_response=True,
                              data=json.dumps({"model_id": self.model, "prompt": "hi"}),
                              headers=self.headers) as r:
            if r.status_code != 200 or not r.json().get("reply"):
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
        self.long_streamed()
        with self.client.post("/v1/chat/completions", name="baseline: unknown model is 404",
                              catch_response=True, headers=self.headers,
                              data=json.dumps({"model": "no-such-model",
                                               "messages": [{"role": "user", "content": "x"}]})) as r:
            if r.status_code == 404 and r.json().get("error", {}).get("code"):
                r.success()
            else:
                r.failure(f"expected a 404 error object, got {r.status_code}")


class ScenarioShape(LoadTestShape):
    """Users over time for the chosen scenario; None ends the run."""

    def tick(self):
        o = _opts(self.runner.environment)
        t = self.get_run_time()
        if o.scenario == "baseline":
            return (1, 1) if t < o.baseline_seconds else None
        if o.scenario == "step":
            steps = [int(u) for u in o.step_users.split(",") if u.strip()]
            i = int(t // o.step_seconds)
            return (steps[i], o.ramp_rate) if i < len(steps) else None
        if o.scenario == "soak":
            return (o.soak_users, o.ramp_rate) if t < o.soak_seconds else None
        if o.scenario == "mixed":
            users = int(o.step_users.split(",")[-1])
            return (users, o.ramp_rate) if t < o.mixed_seconds else None
        return None


# --- soak sampling -----------------------------------------------------------

def _rss_bytes(environment):
    o = _opts(environment)
    if o.forwarder_pid:
        try:
            with open(f"/proc/{o.forwarder_pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    try:
        import urllib.request
        with urllib.request.urlopen(environment.host.rstrip("/") + "/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("process_resident_memory_bytes"):
                    return int(float(line.split()[-1]))
    except Exception:  # noqa: BLE001 - sampling is best effort
        return None
    return None


def _sampler(environment):
    samples = []
    environment.mf_rss_samples = samples
    last = (0, 0)
    every = _opts(environment).soak_sample_seconds
    while True:
        gevent.sleep(every)
        total = environment.stats.total
        req, fail = total.num_requests, total.num_failures
        d_req, d_fail = req - last[0], fail - last[1]
        last = (req, fail)
        rss = _rss_bytes(environment)
        samples.append((time.time(), rss))
        rate = d_fail / d_req if d_req else 0.0
        rss_txt = f"{rss / 2**20:.1f} MiB" if rss else "n/a"
        print(f"[soak] rss={rss_txt} requests={d_req} ({d_req / every:.0f}/s) "
              f"error_rate={rate:.4%}", flush=True)


@events.test_start.add_listener
def _on_start(environment, **_):
    if isinstance(environment.runner, WorkerRunner):
        return
    if _opts(environment).scenario == "soak":
        gevent.spawn(_sampler, environment)


# --- summary -----------------------------------------------------------------

def _ms(entry, q):
    return entry.get_response_time_percentile(q) if entry.num_requests else 0


@events.quitting.add_listener
def _summary(environment, **_):
    if isinstance(environment.runner, WorkerRunner):
        return
    stats = environment.stats
    total = stats.total
    duration = max(1e-9, (total.last_request_timestamp or time.time()) - total.start_time)
    qps = total.num_requests / duration if total.num_requests else 0.0
    err = total.num_failures / total.num_requests if total.num_requests else 0.0
    o = _opts(environment)
    lines = [
        "",
        f"=== ModelForwarder load: scenario={o.scenario} host={environment.host}",
        f"requests={total.num_requests} failures={total.num_failures} "
        f"duration={duration:.1f}s",
        f"QPS={qps:.1f}  P50={_ms(total, 0.5):.0f}ms  P99={_ms(total, 0.99):.0f}ms  "
        f"error_rate={err:.4%}",
    ]
    for key in sorted(stats.entries):
        e = stats.entries[key]
        lines.append(f"  {e.method:6} {e.name:32} n={e.num_requests:<8} "
                     f"P50={_ms(e, 0.5):.0f}ms P99={_ms(e, 0.99):.0f}ms failures={e.num_failures}")
    for e in stats.errors.values():
        lines.append(f"  error x{e.occurrences}: {e.method} {e.name}: {e.error}")
    samples = getattr(environment, "mf_rss_samples", [])
    rss = [s for _, s in samples if s]
    if rss:
        lines.append(f"RSS first={rss[0] / 2**20:.1f}MiB last={rss[-1] / 2**20:.1f}MiB "
                     f"max={max(rss) / 2**20:.1f}MiB over {len(rss)} samples")
    if total.num_requests == 0:
        lines.append("FAIL: no request was made")
        environment.process_exit_code = 1
    elif err > o.max_error_rate:
        lines.append(f"FAIL: error rate {err:.4%} above --max-error-rate {o.max_error_rate:.4%}")
        environment.process_exit_code = 1
    else:
        lines.append("OK")
    print("\n".join(lines), flush=True)


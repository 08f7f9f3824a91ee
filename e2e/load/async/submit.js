// Async submissions at a fixed arrival rate (open loop), for k6: the seed's
// case study offers 500 messages/s from up to 800 concurrent clients.
// Each iteration POSTs one chat completion to /v1/async/chat/completions
// and expects 202. The callback URL carries the submission time (Unix ms,
// taken just before the request is sent), so the receiver (observer.py)
// measures submit → result delivered without matching ids across processes.
//
//   k6 run -e BASE_URLS=http://127.0.0.1:8080 -e CALLBACK_URL=http://127.0.0.1:9000/cb \
//          -e RATE=500 -e DURATION=60s -e VUS=800 -e SUMMARY=out/k6.json e2e/load/async/submit.js
//
// Environment (-e NAME=value):
//   BASE_URLS      forwarder URLs, comma-separated; iterations alternate between them
//   CALLBACK_URL   where results are POSTed (omit: no callback asked for)
//   RATE           submissions started per second (default 500)
//   DURATION       how long they are offered (default 60s)
//   VUS            pre-allocated and maximum virtual users = concurrent clients (default 800)
//   MODEL          model (default mock)
//   TIMEOUT        one submission's timeout (default 10s)
//   SUMMARY        file the JSON summary is written to (default: none)
//
// Only loopback URLs are accepted: this is a load test for a local rig.

import http from 'k6/http';
import { Counter, Trend } from 'k6/metrics';

const BASE_URLS = (__ENV.BASE_URLS || 'http://127.0.0.1:8080').split(',').map((u) => u.replace(/\/$/, ''));
const CALLBACK_URL = __ENV.CALLBACK_URL || '';
const RATE = parseInt(__ENV.RATE || '500', 10);
const DURATION = __ENV.DURATION || '60s';
const VUS = parseInt(__ENV.VUS || '800', 10);
const MODEL = __ENV.MODEL || 'mock';
const TIMEOUT = __ENV.TIMEOUT || '10s';

for (const u of BASE_URLS.concat(CALLBACK_URL ? [CALLBACK_URL] : [])) {
  if (!/^http:\/\/(127\.0\.0\.1|localhost)(:\d+)?(\/|$)/.test(u)) {
    throw new Error(`only loopback URLs: ${u}`);
  }
}

// Errors by kind, each its own counter (k6's summary has no tag breakdown).
const KINDS = ['status_429', 'status_503', 'status_4xx', 'status_5xx', 'timeout', 'connect', 'other'];
const errors = {};
for (const k of KINDS) errors[k] = new Counter(`mf_error_${k}`);
const accepted = new Counter('mf_accepted');
const submitLatency = new Trend('mf_submit_duration', true);

export const options = {
  discardResponseBodies: false,
  summaryTrendStats: ['avg', 'min', 'med', 'p(50)', 'p(90)', 'p(99)', 'max'],
  scenarios: {
    submit: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: VUS,
      maxVUs: VUS,
      gracefulStop: '15s',
    },
  },
};

const BODY = JSON.stringify({ model: MODEL, messages: [{ role: 'user', content: 'hello' }] });

function kind(res) {
  if (res.status === 0) {
    // k6 error codes: 1050 request timeout, 1210-1212 connection refused/reset family.
    if (res.error_code === 1050) return 'timeout';
    if (res.error_code >= 1200 && res.error_code < 1300) return 'connect';
    return 'other';
  }
  if (res.status === 429) return 'status_429';
  if (res.status === 503) return 'status_503';
  if (res.status >= 500) return 'status_5xx';
  return 'status_4xx';
}

export default function () {
  const base = BASE_URLS[(__VU + __ITER) % BASE_URLS.length];
  const headers = { 'Content-Type': 'application/json' };
  const t = Date.now();
  if (CALLBACK_URL) headers['X-Callback-Url'] = `${CALLBACK_URL}?t=${t}`;
  const res = http.post(`${base}/v1/async/chat/completions`, BODY, { headers, timeout: TIMEOUT });
  if (res.status === 202) {
    accepted.add(1);
    submitLatency.add(res.timings.duration);
  } else {
    errors[kind(res)].add(1);
  }
}

function count(m, name) {
  return m[name] ? m[name].values.count : 0;
}

export function handleSummary(data) {
  const m = data.metrics;
  const d = m.mf_submit_duration ? m.mf_submit_duration.values : {};
  const out = {
    rate: RATE,
    duration: DURATION,
    vus: VUS,
    targets: BASE_URLS.length,
    iterations: count(m, 'iterations'),
    dropped_iterations: count(m, 'dropped_iterations'),
    accepted: count(m, 'mf_accepted'),
    submit_p50_ms: d['p(50)'],
    submit_p99_ms: d['p(99)'],
    submit_max_ms: d.max,
    vus_max_seen: m.vus_max ? m.vus_max.values.max : null,
    errors: {},
  };
  for (const k of KINDS) out.errors[k] = count(m, `mf_error_${k}`);
  const res = { stdout: `k6: ${JSON.stringify(out)}\n` };
  if (__ENV.SUMMARY) res[__ENV.SUMMARY] = JSON.stringify(out, null, 1);
  return res;
}

// The seed's FAQ case for k6: the same load as e2e/load/faq/locustfile.py.
//
//   k6 run -e BASE_URL=http://127.0.0.1:8080 -e RATE=100 -e DURATION=60s e2e/load/faq/k6.js
//
// Every request is a deterministic chat completion (temperature 0, so the
// forwarder's cache may answer it): with probability HOT_SHARE (0.8) one of
// the 20 hot questions of questions.json, otherwise a question never asked
// before. Open model: a constant arrival rate of RATE requests per second
// for DURATION (k6 adds virtual users as answers slow down), so the offered
// load is the same with the cache off and on.
//
// Environment (-e NAME=value): BASE_URL, MODEL (mock), RATE (100),
// DURATION (60s), HOT_SHARE (0.8), MAX_VUS (400), MAX_ERROR_RATE (0: k6
// exits 99 above it), SUMMARY_JSON (write the summary as JSON to this file,
// for e2e/load/faq/run.sh).
//
// The summary: requests, req/s, P50/P99 (ms) over all, per kind (hot,
// unique) and per X-Cache answer (HIT, MISS, BYPASS, none), error rate.

import http from 'k6/http';
import { check } from 'k6';
import { Counter, Rate, Trend } from 'k6/metrics';

const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8080').replace(/\/$/, '');
const MODEL = __ENV.MODEL || 'mock';
const RATE = parseInt(__ENV.RATE || '100', 10);
const DURATION = __ENV.DURATION || '60s';
const HOT_SHARE = parseFloat(__ENV.HOT_SHARE || '0.8');
const MAX_ERROR_RATE = parseFloat(__ENV.MAX_ERROR_RATE || '0');
const Q = JSON.parse(open('./questions.json'));

const KINDS = ['hot', 'unique'];
const CACHES = ['HIT', 'MISS', 'BYPASS', 'none'];
const errors = new Rate('faq_errors');
const requests = new Counter('faq_requests');
const all = new Trend('faq_duration', true);
const byKind = Object.fromEntries(KINDS.map((k) => [k, new Trend(`faq_${k}_duration`, true)]));
const byCache = Object.fromEntries(CACHES.map((c) => [c, new Trend(`faq_cache_${c}_duration`, true)]));
const failuresByKind = Object.fromEntries(KINDS.map((k) => [k, new Counter(`faq_${k}_failures`)]));

export const options = {
  scenarios: {
    faq: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: DURATION,
      // One VU per request/s: enough for answers up to 1 s without k6
      // having to add VUs mid-run (which it may not do in time on a busy box).
      preAllocatedVUs: Math.max(10, RATE),
      maxVUs: parseInt(__ENV.MAX_VUS || '400', 10),
    },
  },
  summaryTrendStats: ['avg', 'med', 'p(50)', 'p(99)', 'max', 'count'],
  thresholds: {
    faq_errors: [{ threshold: `rate<=${MAX_ERROR_RATE}`, abortOnFail: false }],
  },
};

function uniqueQuestion() {
  // About as long as a hot question; never asked before.
  const id = `${__VU.toString(16)}${__ITER.toString(16)}${Math.random().toString(16).slice(2)}`.slice(0, 12);
  return `Where is my order ${id}?`;
}

export default function () {
  const hot = Math.random() < HOT_SHARE;
  const kind = hot ? 'hot' : 'unique';
  const question = hot ? Q.hot[Math.floor(Math.random() * Q.hot.length)] : uniqueQuestion();
  const body = {
    model: MODEL,
    temperature: 0,
    messages: [
      { role: 'system', content: Q.system },
      { role: 'user', content: question },
    ],
  };
  const res = http.post(`${BASE_URL}/v1/chat/completions`, JSON.stringify(body), {
    headers: { 'Content-Type': 'application/json' },
    tags: { kind },
    timeout: '30s',
  });
  const ok = check(res, {
    '200': (r) => r.status === 200,
    'has a reply': (r) => {
      try {
        return r.json('choices.0.message.content').length > 0;
      } catch (_) {
        return false;
      }
    },
  });
  const xc = CACHES.includes(res.headers['X-Cache']) ? res.headers['X-Cache'] : 'none';
  requests.add(1);
  errors.add(!ok);
  if (!ok) failuresByKind[kind].add(1);
  all.add(res.timings.duration);
  byKind[kind].add(res.timings.duration);
  byCache[xc].add(res.timings.duration);
}

function group(m, failures) {
  if (!m || !m.values.count) return null;
  return { n: m.values.count, failures: failures || 0, p50_ms: m.values['p(50)'], p99_ms: m.values['p(99)'] };
}

export function handleSummary(data) {
  const m = data.metrics;
  const n = m.faq_requests ? m.faq_requests.values.count : 0;
  const err = m.faq_errors ? m.faq_errors.values.rate : 0;
  const fails = (k) => (m[`faq_${k}_failures`] ? m[`faq_${k}_failures`].values.count : 0);
  const seconds = data.state.testRunDurationMs / 1000;
  const s = {
    tool: 'k6',
    n,
    failures: KINDS.reduce((a, k) => a + fails(k), 0),
    rps: n / seconds,
    duration_s: seconds,
    error_rate: err,
    p50_ms: m.faq_duration ? m.faq_duration.values['p(50)'] : null,
    p99_ms: m.faq_duration ? m.faq_duration.values['p(99)'] : null,
    by_kind: {},
    by_cache: {},
    dropped_iterations: m.dropped_iterations ? m.dropped_iterations.values.count : 0,
  };
  for (const k of KINDS) {
    const g = group(m[`faq_${k}_duration`], fails(k));
    if (g) s.by_kind[k] = g;
  }
  for (const c of CACHES) {
    const g = group(m[`faq_cache_${c}_duration`], 0);
    if (g) s.by_cache[c] = g;
  }
  const f = (v) => (v === null || v === undefined ? 'n/a' : v.toFixed(1));
  const caches = Object.entries(s.by_cache).map(([c, g]) => `${c} ${g.n} (P50 ${f(g.p50_ms)} / P99 ${f(g.p99_ms)} ms)`).join(', ');
  const lines = [
    '',
    `=== FAQ (k6) url=${BASE_URL} rate=${RATE}/s hot=${Math.round(HOT_SHARE * 100)}%`,
    `requests=${n} failures=${s.failures} duration=${seconds.toFixed(1)}s QPS=${s.rps.toFixed(1)} P50=${f(s.p50_ms)}ms P99=${f(s.p99_ms)}ms error_rate=${(err * 100).toFixed(4)}% dropped_iterations=${s.dropped_iterations}`,
    `X-Cache: ${caches}`,
    n === 0 ? 'FAIL: no request was made' : err > MAX_ERROR_RATE ? `FAIL: error rate above ${MAX_ERROR_RATE}` : 'OK',
    '',
  ];
  const out = { stdout: lines.join('\n') };
  if (__ENV.SUMMARY_JSON) out[__ENV.SUMMARY_JSON] = JSON.stringify(s, null, 1);
  return out;
}

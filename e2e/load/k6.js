// Load scenarios for a ModelForwarder, for k6 (https://k6.io): the same four
// as e2e/load/locustfile.py, runnable against any forwarder URL.
//
//   k6 run -e BASE_URL=http://127.0.0.1:8080 -e SCENARIO=step e2e/load/k6.js
//
// Environment (-e NAME=value):
//   BASE_URL        forwarder URL (default http://127.0.0.1:8080)
//   SCENARIO        baseline | step | soak | mixed (default baseline)
//   MODEL           model to request (default mock)
//   API_KEY         client key, sent as a Bearer token (default: none)
//   STEP_USERS      step scenario's virtual users per stage (default 100,500,1000)
//   STEP_SECONDS    how long each stage holds (default 120)
//   SOAK_USERS      soak scenario's users (default 200)
//   SOAK_DURATION   soak scenario's length (default 4h)
//   MIXED_DURATION  mixed scenario's length (default 10m)
//   THINK_TIME      mean pause between a user's requests, seconds (default 1; 0: closed loop)
//   MAX_ERROR_RATE  fail (exit 99) when the error rate is above it (default 0)
//
// k6 reads a streamed answer whole (no incremental SSE parsing): the long
// streamed requests check the framing (chunks, final [DONE]) and time the
// full stream, not the time to first token.
//
// The summary printed at the end: QPS, P50/P99 (ms) overall and per request
// kind, error rate. The soak scenario's RSS is not visible to k6: watch it
// with the forwarder's metrics or `ps` (docs/load-testing.md).

import http from 'k6/http';
import { check, sleep } from 'k6';
import { Rate, Trend, Counter } from 'k6/metrics';

const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8080').replace(/\/$/, '');
const SCENARIO = __ENV.SCENARIO || 'baseline';
const MODEL = __ENV.MODEL || 'mock';
const API_KEY = __ENV.API_KEY || '';
const THINK = parseFloat(__ENV.THINK_TIME || '1');
const MAX_ERROR_RATE = parseFloat(__ENV.MAX_ERROR_RATE || '0');
const STEP_USERS = (__ENV.STEP_USERS || '100,500,1000').split(',').map((u) => parseInt(u, 10));
const STEP_SECONDS = parseInt(__ENV.STEP_SECONDS || '120', 10);

const errors = new Rate('mf_errors');
const shortLatency = new Trend('mf_short_duration', true);
const longLatency = new Trend('mf_long_stream_duration', true);
const requests = new Counter('mf_requests');

function stepStages() {
  const stages = [];
  for (const users of STEP_USERS) {
    stages.push({ duration: '10s', target: users }); // ramp
    stages.push({ duration: `${STEP_SECONDS}s`, target: users }); // hold
  }
  return stages;
}

const scenarios = {
  baseline: {
    baseline: { executor: 'constant-vus', vus: 1, duration: __ENV.BASELINE_DURATION || '30s', exec: 'baseline' },
  },
  step: {
    step: { executor: 'ramping-vus', startVUs: 0, stages: stepStages(), gracefulRampDown: '30s', exec: 'short' },
  },
  soak: {
    soak: {
      executor: 'constant-vus',
      vus: parseInt(__ENV.SOAK_USERS || '200', 10),
      duration: __ENV.SOAK_DURATION || '4h',
      exec: 'short',
    },
  },
  // 80% of the users send short prompts, 20% long streamed ones.
  mixed: (() => {
    const users = STEP_USERS[STEP_USERS.length - 1];
    const long = Math.max(1, Math.round(users * 0.2));
    const duration = __ENV.MIXED_DURATION || '10m';
    return {
      short: { executor: 'constant-vus', vus: users - long, duration, exec: 'short' },
      long: { executor: 'constant-vus', vus: long, duration, exec: 'longStreamed' },
    };
  })(),
};

if (!scenarios[SCENARIO]) {
  throw new Error(`unknown SCENARIO ${SCENARIO}: baseline | step | soak | mixed`);
}

export const options = {
  scenarios: scenarios[SCENARIO],
  summaryTrendStats: ['avg', 'min', 'med', 'p(50)', 'p(90)', 'p(99)', 'max'],
  thresholds: {
    mf_errors: [{ threshold: `rate<=${MAX_ERROR_RATE}`, abortOnFail: false }],
  },
};

const HEADERS = Object.assign(
  { 'Content-Type': 'application/json' },
  API_KEY ? { Authorization: `Bearer ${API_KEY}` } : {},
);
const SHORT_PROMPTS = [
  'What is the capital of France?',
  'Summarise: the order shipped on Monday.',
  "Translate 'thank you' into German.",
  'Is 17 a prime number?',
];
const LONG_PROMPT = 'Rewrite this: ' + Array.from({ length: 400 }, (_, i) => `w${i}`).join(' ');

function think() {
  if (THINK > 0) sleep(THINK * (0.5 + Math.random()));
}

function chat(body, tag, extraHeaders) {
  return http.post(`${BASE_URL}/v1/chat/completions`, JSON.stringify(body), {
    headers: Object.assign({}, HEADERS, extraHeaders || {}),
    tags: { kind: tag },
    timeout: '180s',
  });
}

function record(ok, res, trend) {
  requests.add(1);
  errors.add(!ok);
  if (trend && res) trend.add(res.timings.duration);
}

export function short() {
  const res = chat({ model: MODEL, messages: [{ role: 'user', content: SHORT_PROMPTS[Math.floor(Math.random() * SHORT_PROMPTS.length)] }] }, 'short');
  const ok = check(res, {
    'short: 200': (r) => r.status === 200,
    'short: has a reply': (r) => {
      try {
        return r.json('choices.0.message.content').length > 0;
      } catch (_) {
        return false;
      }
    },
  });
  record(ok, res, shortLatency);
  think();
}

export function longStreamed() {
  const res = chat({ model: MODEL, stream: true, messages: [{ role: 'user', content: LONG_PROMPT }] }, 'long-stream');
  const ok = check(res, {
    'stream: 200': (r) => r.status === 200,
    'stream: ends with [DONE], no error event': (r) => {
      const events = (r.body || '').split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trim());
      return events.length > 2 && events[events.length - 1] === '[DONE]' && !events.some((e) => e.includes('"error"'));
    },
  });
  record(ok, res, longLatency);
  think();
}

export function baseline() {
  const rid = `baseline-${Date.now()}-${Math.random().toString(16).slice(2)}`;
  const body = { model: MODEL, messages: [{ role: 'user', content: 'hello' }] };
  let res = chat(body, 'baseline', { 'X-Request-Id': rid });
  record(check(res, {
    'baseline: 200': (r) => r.status === 200,
    'baseline: request id echoed': (r) => r.headers['X-Request-Id'] === rid,
    'baseline: model and usage': (r) => r.json('model') === MODEL && r.json('usage') !== null,
  }), res, shortLatency);

  const key = `k6-${rid}`;
  const first = chat(body, 'baseline', { 'Idempotency-Key': key });
  const replay = chat(body, 'baseline', { 'Idempotency-Key': key });
  record(check(replay, {
    'baseline: idempotent replay': (r) => r.status === 200 && r.headers['Idempotent-Replayed'] === 'true' && r.body === first.body,
  }), replay, null);

  res = http.post(`${BASE_URL}/api/v1/message`, JSON.stringify({ model_id: MODEL, prompt: 'hi' }), { headers: HEADERS, tags: { kind: 'baseline' } });
  record(check(res, { 'baseline: simple API': (r) => r.status === 200 && r.json('reply').length > 0 }), res, null);

  res = chat({ model: 'no-such-model', messages: [{ role: 'user', content: 'x' }] }, 'baseline-404');
  // An expected 404 is not an error of the run.
  record(check(res, { 'baseline: unknown model is 404': (r) => r.status === 404 && r.json('error.code') !== null }), null, null);
  longStreamed();
}

function ms(metric, stat) {
  return metric && metric.values[stat] !== undefined ? `${metric.values[stat].toFixed(0)}ms` : 'n/a';
}

export function handleSummary(data) {
  const m = data.metrics;
  const total = m.mf_requests ? m.mf_requests.values.count : 0;
  const rate = m.mf_requests ? m.mf_requests.values.rate : 0;
  const err = m.mf_errors ? m.mf_errors.values.rate : 0;
  const lines = [
    '',
    `=== ModelForwarder load: scenario=${SCENARIO} url=${BASE_URL}`,
    `requests=${total} QPS=${rate.toFixed(1)} P50=${ms(m.http_req_duration, 'p(50)')} P99=${ms(m.http_req_duration, 'p(99)')} error_rate=${(err * 100).toFixed(4)}%`,
    `  short        P50=${ms(m.mf_short_duration, 'p(50)')} P99=${ms(m.mf_short_duration, 'p(99)')}`,
    `  long-stream  P50=${ms(m.mf_long_stream_duration, 'p(50)')} P99=${ms(m.mf_long_stream_duration, 'p(99)')}`,
    total === 0 ? 'FAIL: no request was made' : err > MAX_ERROR_RATE ? `FAIL: error rate above ${MAX_ERROR_RATE}` : 'OK',
    '',
  ];
  return { stdout: lines.join('\n') };
}

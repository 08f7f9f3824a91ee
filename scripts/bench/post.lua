-- wrk script: POST an OpenAI chat completion as fast as the connection allows.
-- done() prints one machine-readable "BENCH ..." line that scripts/bench.sh
-- parses (latency values in microseconds, from wrk's per-microsecond histogram).
wrk.method = "POST"
wrk.body = '{"model":"mock","messages":[{"role":"user","content":"hello"}]}'
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d " ..
    "p50=%d p90=%d p99=%d p999=%d max=%d mean=%.1f\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end

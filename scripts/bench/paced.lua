-- wrk script: same POST as post.lua, but every connection waits a fixed delay
-- before each request (closed loop), so -c20 with a 20 ms delay offers about
-- 20 / (0.020 s + latency) ≈ 1,000 requests/s. wrk starts a request's clock
-- when the request is written, so the delay is not counted as latency.
-- The delay in ms is the first script argument: wrk ... -s paced.lua URL -- 20
wrk.method = "POST"
wrk.body = '{"model":"mock","messages":[{"role":"user","content":"hello"}]}'
wrk.headers["Content-Type"] = "application/json"

local delay_ms = 20

init = function(args)
  if args[1] then delay_ms = tonumber(args[1]) end
end

delay = function()
  return delay_ms
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d " ..
    "p50=%d p90=%d p99=%d p999=%d max=%d mean=%.1f\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end

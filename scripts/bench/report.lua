-- Shared done() for the wrk scripts of scripts/bench.sh (loaded with dofile).
-- Prints two machine-readable lines that bench.sh parses:
--   BENCH requests=… duration_us=… bytes=… <socket/status errors> p50=… p99=… (µs)
--   HIST <latency_us>:<count> …  the whole latency histogram (wrk keeps one
--        bucket per microsecond), so runs split into rounds can be pooled and
--        their percentiles computed exactly.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d bytes=%d connect=%d read=%d write=%d status=%d timeout=%d " ..
    "p50=%d p90=%d p99=%d p999=%d max=%d mean=%.1f\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
  local parts = {}
  for i = 1, #latency do
    local value, count = latency(i)
    parts[#parts + 1] = string.format("%d:%d", value, count)
  end
  io.write("HIST " .. table.concat(parts, " ") .. "\n")
end

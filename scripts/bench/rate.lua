-- wrk script: the same POST as post.lua at a fixed rate.
--   wrk -t T -c C … -s rate.lua URL -- <requests/s in all> <T>
-- wrk is closed-loop (a connection sends its next request only after the
-- previous answer), so pacing is done in delay(), which wrk calls before every
-- request: each thread keeps a schedule of send slots, one every T/rate
-- seconds, and a connection that becomes free takes the next slot. As long as
-- C connections are enough to cover the latency, the achieved rate is the
-- asked one, whatever the latency (bench.sh prints it). The schedule never
-- catches up after a stall (no bursts); wrk starts a request's clock when it
-- writes it, so the wait for the slot is not counted as latency. wrk's timers
-- have 1 ms resolution, so sends are rounded to the millisecond.
local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clock_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local CLOCK_MONOTONIC = 1
local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

wrk.method = "POST"
wrk.body = '{"model":"mock","messages":[{"role":"user","content":"hello"}]}'
wrk.headers["Content-Type"] = "application/json"

local interval_ms = 5
local next_ms = nil

init = function(args)
  local rate = tonumber(args[1] or "200")
  local threads = tonumber(args[2] or "1")
  interval_ms = 1000 * threads / rate
end

delay = function()
  local now = now_ms()
  if next_ms == nil or next_ms < now then next_ms = now end
  local wait = next_ms - now
  next_ms = next_ms + interval_ms
  return math.floor(wait + 0.5)
end

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")

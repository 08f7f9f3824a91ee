-- wrk script for scripts/bench-cache.sh: a cacheable chat completion
-- (temperature 0), either the same one every time (a cache hit once stored)
-- or a new prompt every request (always a miss), as fast as the connection
-- allows or at a fixed rate (rate.lua's pacing).
--   wrk … -s cache.lua URL -- <same|unique> [<requests/s in all> <threads>]
-- Both modes send bodies of the same length, so the mock's answers (which
-- echo the prompt) are the same size too. "same" sends one static request
-- (wrk builds it once); "unique" builds each request in Lua, which costs wrk
-- a little CPU, not the forwarder.
local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } cache_bench_timespec;
  int clock_gettime(int clock_id, cache_bench_timespec *tp);
]]
local ts = ffi.new("cache_bench_timespec")
local function now_ms(clock)
  ffi.C.clock_gettime(clock, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local function body(content)
  return '{"model":"mock","temperature":0,"messages":[{"role":"user","content":"' .. content .. '"}]}'
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
-- 26 characters, as the unique prompts below.
wrk.body = body("what is the return policy?")

-- setup() runs in wrk's main Lua state, once per thread; thread:set makes
-- the number a global of that thread's own state, read by init().
local threads_made = 0
setup = function(thread)
  threads_made = threads_made + 1
  thread:set("thread_no", threads_made)
end

init = function(args)
  local mode = args[1] or "same"
  if mode == "unique" then
    -- Unique across threads (thread_no) and across runs against the same
    -- forwarder (the wall clock in ms when the thread started).
    local prefix = string.format("q%02d%013d", _G.thread_no or 0, math.floor(now_ms(0)))
    local n = 0
    request = function()
      n = n + 1
      return wrk.format(nil, nil, nil, body(string.format("%s%010d", prefix, n)))
    end
  elseif mode ~= "same" then
    error("cache.lua: mode must be same or unique, not " .. mode)
  end
  local rate = tonumber(args[2] or "0")
  if rate > 0 then
    local interval_ms = 1000 * tonumber(args[3] or "1") / rate
    local next_ms = nil
    delay = function()
      local now = now_ms(1)
      if next_ms == nil or next_ms < now then next_ms = now end
      local wait = next_ms - now
      next_ms = next_ms + interval_ms
      return math.floor(wait + 0.5)
    end
  end
end

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")

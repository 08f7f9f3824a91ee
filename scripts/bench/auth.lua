-- wrk script: the POST of post.lua, with an `Authorization: Bearer …` header
-- read from a file of credentials, one per line (JWTs or an API key).
--   wrk … -s auth.lua URL -- FILE          every request the first credential
--   wrk -tN … -s auth.lua URL -- FILE rotate N [START]
--                                          each request the next one; thread i
--                                          of N takes lines i, i+N, i+2N, … so
--                                          no two threads send the same one,
--                                          from its START-th (default 1), so a
--                                          later run can go on with fresh ones
-- The rotating form pre-formats every request in init(), so sending costs wrk
-- no more than a static request does. done() is report.lua's.
local body = '{"model":"mock","messages":[{"role":"user","content":"hello"}]}'
wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"

-- setup() runs for each thread just before its init(): number the threads.
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
end

local reqs, n, i = nil, 0, 0
function init(args)
  local file, mode, nthreads = args[1], args[2], tonumber(args[3]) or 1
  local start = tonumber(args[4]) or 1
  assert(file, "auth.lua: give the credentials file after --")
  -- One credential, or this thread's share of them (lines id, id+N, ...).
  local mine, k, step = {}, 0, 1
  if mode == "rotate" then step = nthreads end
  local first = (mode == "rotate") and (id or 1) or 1
  for line in io.lines(file) do
    if #line > 0 then
      k = k + 1
      if k >= first and (k - first) % step == 0 then mine[#mine + 1] = line end
      if mode ~= "rotate" and #mine == 1 then break end
    end
  end
  assert(#mine > 0, "auth.lua: no credentials in " .. file)
  if mode ~= "rotate" then
    wrk.headers["Authorization"] = "Bearer " .. mine[1]
    return
  end
  reqs = {}
  local headers = {["Content-Type"] = "application/json"}
  for j = 1, #mine do
    headers["Authorization"] = "Bearer " .. mine[j]
    reqs[j] = wrk.format("POST", nil, headers, body)
    mine[j] = nil
  end
  n = #reqs
  i = (start - 1) % n
  request = function()
    i = i % n + 1
    return reqs[i]
  end
end

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")

-- wrk script: POST an OpenAI chat completion as fast as the connection allows.
-- done() (report.lua) prints the "BENCH …" and "HIST …" lines bench.sh parses
-- (latencies in microseconds, from wrk's per-microsecond histogram).
wrk.method = "POST"
wrk.body = '{"model":"mock","messages":[{"role":"user","content":"hello"}]}'
wrk.headers["Content-Type"] = "application/json"

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")

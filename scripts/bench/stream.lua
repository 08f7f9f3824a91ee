-- wrk script: POST a streamed chat completion ("stream": true) as fast as the
-- connection allows. wrk reads the SSE answer to its end (the last chunk of
-- the chunked body) and discards it; summary.bytes tells how much was read.
-- With `mock-llm --reply-words N` every answer is a role event, N+3 word
-- events (for this prompt), a finish event and [DONE].
wrk.method = "POST"
wrk.body = '{"model":"mock","stream":true,"messages":[{"role":"user","content":"hello"}]}'
wrk.headers["Content-Type"] = "application/json"

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")

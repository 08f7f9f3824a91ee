"""Budgets seen through the official openai and anthropic SDKs: a stream
without include_usage yields no usage chunk (the forwarder asked for it and
held it back), GET /v1/budget shows the caller's own figures, and a spent
budget raises each SDK's RateLimitError naming the budget. Exits non-zero
on any mismatch."""
import json
import os
import urllib.request

import anthropic
import openai

base = os.environ["FORWARDER_BASE"]
key = os.environ["FORWARDER_API_KEY"]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=10)
claude = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=10)


def budget():
    req = urllib.request.Request(base + "/v1/budget", headers={"Authorization": "Bearer " + key})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def settled(want):
    import time

    for _ in range(100):
        b = budget()
        if b["daily"]["tokens"]["used"] == want:
            return b
        time.sleep(0.02)
    raise AssertionError(f"budget never read {want}: {b}")


msgs = [{"role": "user", "content": "stream me"}]
with_usage = list(
    client.chat.completions.create(
        model="m", messages=msgs, stream=True, max_tokens=5,
        stream_options={"include_usage": True},
    )
)
assert with_usage[-1].usage is not None and not with_usage[-1].choices, with_usage[-1]
per_stream = with_usage[-1].usage.total_tokens
settled(per_stream)

chunks = list(client.chat.completions.create(model="m", messages=msgs, stream=True, max_tokens=5))
assert all(c.usage is None for c in chunks), [c for c in chunks if c.usage]
assert all(c.choices for c in chunks), "a chunk without choices reached the client"
text = "".join(c.choices[0].delta.content or "" for c in chunks)
assert text.startswith("mock reply: stream me"), text
b = settled(2 * per_stream)
assert b["client"] == "key:sdk", b
assert b["daily"]["tokens"]["limit"] == 200, b

try:
    for _ in range(100):
        client.chat.completions.create(model="m", messages=msgs, max_tokens=5)
    raise AssertionError("the budget never ran out")
except openai.RateLimitError as e:
    assert e.code == "budget_exceeded", e.body
    assert "daily token budget" in e.message, e.message
    assert int(e.response.headers["retry-after"]) > 0

try:
    claude.messages.create(model="claude", max_tokens=5, messages=msgs)
    raise AssertionError("anthropic: not refused")
except anthropic.RateLimitError as e:
    assert e.body["error"]["type"] == "rate_limit_error", e.body
    assert "daily token budget" in e.body["error"]["message"], e.body

print("ALL OK")

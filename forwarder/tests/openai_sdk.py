"""Drives the forwarder with the official openai SDK; exits non-zero on any mismatch."""
import os

import openai

base_url = os.environ["FORWARDER_BASE_URL"]
key = os.environ["FORWARDER_API_KEY"]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=10)

models = [m.id for m in client.models.list()]
assert models == ["mock"], models

resp = client.chat.completions.create(
    model="mock", messages=[{"role": "user", "content": "hello sdk"}]
)
assert resp.choices[0].message.content == "mock reply: hello sdk", resp
assert resp.usage.completion_tokens == 4, resp.usage
assert resp.choices[0].finish_reason == "stop"

stream = client.chat.completions.create(
    model="mock", messages=[{"role": "user", "content": "stream me"}], stream=True
)
text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
assert text == "mock reply: stream me", text

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.status_code == 404 and e.code == "model_not_found", e

bad = openai.OpenAI(base_url=base_url, api_key="sk-wrong", max_retries=0, timeout=10)
try:
    bad.chat.completions.create(model="mock", messages=[{"role": "user", "content": "x"}])
    raise SystemExit("expected AuthenticationError")
except openai.AuthenticationError as e:
    assert e.status_code == 401, e

print("ALL OK")

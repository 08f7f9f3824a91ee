"""Embeddings and the Responses API through the forwarder with the official
openai SDK; exits non-zero on any mismatch. `mock` is the forwarder's
built-in mock; `gpt` is a mock-llm server behind it, whose faults are set
through MOCK_ADMIN_URL; `claude` is the same server as a `provider:
anthropic` upstream (chat completions translated to Messages and back)."""
import json
import os
import urllib.request

import openai

base_url = os.environ["FORWARDER_BASE_URL"]
key = os.environ["FORWARDER_API_KEY"]
admin = os.environ["MOCK_ADMIN_URL"]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=10)


def fail_next(fault):
    req = urllib.request.Request(
        f"{admin}/mock/fail-next",
        data=json.dumps({"count": 1, "fault": fault}).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(req, timeout=5).read()


# Embeddings: the SDK asks for base64 and decodes it; vectors depend on
# the input alone and are unit length.
e = client.embeddings.create(model="mock", input=["hello world", "other", "hello world"])
assert [d.index for d in e.data] == [0, 1, 2], e
v0, v1, v2 = (d.embedding for d in e.data)
assert len(v0) == 16 and v0 == v2 and v0 != v1, e
assert abs(sum(x * x for x in v0) ** 0.5 - 1) < 1e-4, v0
assert e.usage.prompt_tokens == 5 and e.usage.total_tokens == 5, e.usage
f = client.embeddings.create(model="gpt", input="hello world", encoding_format="float", dimensions=4)
assert len(f.data[0].embedding) == 4, f
# Another model, same input: the same vector (the mock derives it from the input).
g = client.embeddings.create(model="gpt", input="hello world", encoding_format="float")
assert all(abs(a - b) < 1e-6 for a, b in zip(g.data[0].embedding, v0)), (g, v0)

# Responses, whole.
r = client.responses.create(model="mock", input="hello sdk")
assert r.status == "completed" and r.output_text == "mock reply: hello sdk", r
assert r.usage.input_tokens == 2 and r.usage.output_tokens == 4 and r.usage.total_tokens == 6, r.usage
r = client.responses.create(
    model="gpt", input=[{"role": "user", "content": [{"type": "input_text", "text": "a b c d"}]}],
    max_output_tokens=3,
)
assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens", r
assert r.output_text == "mock reply: a", r

# Responses, streamed: the raw events, then the SDK's own stream helper.
events = list(client.responses.create(model="mock", input="stream me", stream=True))
types = [ev.type for ev in events]
assert types[0] == "response.created" and types[-1] == "response.completed", types
assert [ev.sequence_number for ev in events] == list(range(len(events))), types
text = "".join(ev.delta for ev in events if ev.type == "response.output_text.delta")
assert text == "mock reply: stream me" == events[-1].response.output_text, (text, events[-1])
with client.responses.stream(model="gpt", input="helper") as s:
    deltas = [ev.delta for ev in s if ev.type == "response.output_text.delta"]
    final = s.get_final_response()
assert "".join(deltas) == "mock reply: helper" == final.output_text, (deltas, final)

# A stream that fails upstream ends with an error event, never a silent
# end and never response.completed.
for fault in ["stream_error", "cut"]:
    fail_next(fault)
    events = list(client.responses.create(model="gpt", input="x y z", stream=True))
    types = [ev.type for ev in events]
    assert types[-1] == "error" and "response.completed" not in types, (fault, types)

# Chat completions for `claude`, a model behind a `provider: anthropic`
# upstream: translated to Messages and back, whole and streamed.
c = client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "hello claude"}])
assert c.choices[0].message.content == "mock reply: hello claude", c
assert c.choices[0].finish_reason == "stop" and c.usage.completion_tokens == 4, c
chunks = list(client.chat.completions.create(
    model="claude", messages=[{"role": "user", "content": "stream claude"}], stream=True,
    stream_options={"include_usage": True},
))
text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
assert text == "mock reply: stream claude", chunks
assert chunks[-1].usage.completion_tokens == 4, chunks[-1]

# Typed errors.
try:
    client.embeddings.create(model="no-such-model", input="x")
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError as err:
    assert err.code == "model_not_found", err
try:
    client.responses.create(model="mock", input="x", stream=True, extra_body={"stream": "yes"})
    raise SystemExit("expected BadRequestError")
except openai.BadRequestError as err:
    assert err.status_code == 400, err
try:
    client.embeddings.create(model="mock", input=[])
    raise SystemExit("expected BadRequestError")
except openai.BadRequestError as err:
    assert "input" in err.message, err
try:
    openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).embeddings.create(model="mock", input="x")
    raise SystemExit("expected AuthenticationError")
except openai.AuthenticationError:
    pass

print("ALL OK")

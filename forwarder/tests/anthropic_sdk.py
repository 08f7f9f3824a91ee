"""Anthropic's Messages API through the forwarder with the official
anthropic SDK; exits non-zero on any mismatch. `mock` is the forwarder's
built-in mock; `claude` is a mock-llm server behind it as a
`provider: anthropic` upstream, whose faults are set through
MOCK_ADMIN_URL; `gpt` is the same server as an OpenAI-compatible upstream
(Messages translated to chat completions and back)."""
import json
import os
import urllib.request

import anthropic

base_url = os.environ["FORWARDER_BASE_URL"]  # without /v1: the SDK adds it
key = os.environ["FORWARDER_API_KEY"]
admin = os.environ["MOCK_ADMIN_URL"]
client = anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0, timeout=10)
user = lambda text: [{"role": "user", "content": text}]


def fail_next(fault):
    req = urllib.request.Request(
        f"{admin}/mock/fail-next",
        data=json.dumps({"count": 1, "fault": fault}).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(req, timeout=5).read()


# Whole, on both upstreams; x-api-key and a bearer token both authenticate.
for model in ["mock", "claude"]:
    m = client.messages.create(model=model, max_tokens=50, messages=user("hello claude"))
    assert m.type == "message" and m.role == "assistant", m
    assert m.content[0].type == "text" and m.content[0].text == "mock reply: hello claude", m
    assert m.stop_reason == "end_turn", m
    assert m.usage.input_tokens == 2 and m.usage.output_tokens == 4, m.usage
bearer = anthropic.Anthropic(base_url=base_url, auth_token=key, max_retries=0, timeout=10)
cut = bearer.messages.create(model="mock", max_tokens=2, messages=user("x y"))
assert cut.stop_reason == "max_tokens" and cut.content[0].text == "mock reply:", cut

# `gpt` is served by an OpenAI-compatible upstream: translated both ways.
m = client.messages.create(model="gpt", max_tokens=50, system="be brief", messages=user("hello gpt"))
assert m.content[0].text == "mock reply: hello gpt" and m.stop_reason == "end_turn", m
assert m.usage.output_tokens == 4, m.usage
with client.messages.stream(model="gpt", max_tokens=50, messages=user("stream gpt")) as s:
    assert "".join(s.text_stream) == "mock reply: stream gpt"
    assert s.get_final_message().stop_reason == "end_turn"
try:
    client.messages.count_tokens(model="gpt", messages=user("x"))
    raise SystemExit("expected BadRequestError")
except anthropic.BadRequestError as err:
    assert "translation" in err.body["error"]["message"], err.body

# Streamed: the SDK's helper assembles the events; the raw events keep
# Anthropic's types and end at message_stop.
with client.messages.stream(model="claude", max_tokens=50, messages=user("stream me")) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
assert text == "mock reply: stream me" == final.content[0].text, (text, final)
assert final.stop_reason == "end_turn" and final.usage.output_tokens == 4, final
types = [ev.type for ev in client.messages.create(model="mock", max_tokens=50, messages=user("a"), stream=True)]
assert types[:2] == ["message_start", "content_block_start"], types
assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"], types
assert set(types[2:-3]) == {"content_block_delta"}, types

# Tools: a tool_use block (whole and streamed), then the tool's result.
tools = [{"name": "lookup", "description": "Looks things up.",
          "input_schema": {"type": "object", "properties": {"prompt": {"type": "string"}}}}]
m = client.messages.create(model="claude", max_tokens=50, tools=tools, messages=user("find it"))
call = m.content[0]
assert m.stop_reason == "tool_use" and call.type == "tool_use", m
assert call.name == "lookup" and call.input == {"prompt": "find it"}, call
with client.messages.stream(model="mock", max_tokens=50, tools=tools, messages=user("find it")) as s:
    streamed = s.get_final_message()
assert streamed.content[0].input == {"prompt": "find it"} and streamed.stop_reason == "tool_use", streamed
answer = client.messages.create(
    model="claude", max_tokens=50, tools=tools,
    messages=user("find it") + [
        {"role": "assistant", "content": m.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "42"}]},
    ],
)
assert answer.content[0].text == "mock reply: 42" and answer.stop_reason == "end_turn", answer

# count_tokens, passed through.
c = client.messages.count_tokens(model="claude", system="be brief", messages=user("one two three"))
assert c.input_tokens == 5, c

# Beta headers cross (the upstream accepts them; the Rust tests check the bytes).
b = client.beta.messages.create(model="claude", max_tokens=20, messages=user("beta"), betas=["some-beta-2025-01-01"])
assert b.content[0].text == "mock reply: beta", b

# A stream that fails upstream raises; it never just stops.
for fault in ["stream_error", "cut"]:
    fail_next(fault)
    try:
        with client.messages.stream(model="claude", max_tokens=50, messages=user("a b c")) as s:
            for _ in s:
                pass
        raise SystemExit(f"expected the {fault} stream to raise")
    except anthropic.APIStatusError as err:
        assert isinstance(err.body, dict) and err.body["type"] == "error", err.body

# Typed errors, in Anthropic's shape.
cases = [
    (lambda: client.messages.create(model="no-such-model", max_tokens=5, messages=user("x")), anthropic.NotFoundError, "not_found_error"),
    (lambda: client.messages.create(model="mock", max_tokens=5, messages=[]), anthropic.BadRequestError, "invalid_request_error"),
    (lambda: client.messages.create(model="claude", max_tokens=5, messages=[{"role": "user"}]), anthropic.BadRequestError, "invalid_request_error"),
    (lambda: anthropic.Anthropic(base_url=base_url, api_key="wrong", max_retries=0).messages.create(
        model="mock", max_tokens=5, messages=user("x")), anthropic.AuthenticationError, "authentication_error"),
    (lambda: client.messages.count_tokens(model="no-such-model", messages=user("x")), anthropic.NotFoundError, "not_found_error"),
]
for call_it, kind, error_type in cases:
    try:
        call_it()
        raise SystemExit(f"expected {kind.__name__}")
    except kind as err:
        assert err.body["type"] == "error" and err.body["error"]["type"] == error_type, err.body
# One upstream 503 is retried by the forwarder: the client sees the answer.
fail_next("error")
m = client.messages.create(model="claude", max_tokens=50, messages=user("retried"))
assert m.content[0].text == "mock reply: retried", m

print("ALL OK")

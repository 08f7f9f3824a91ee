"""Drives the forwarder with the official openai SDK; exits non-zero on any mismatch."""
import os

import openai

base_url = os.environ["FORWARDER_BASE_URL"]
key = os.environ["FORWARDER_API_KEY"]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=10)

models = sorted(m.id for m in client.models.list())
assert models == ["full", "mock", "reject"], models
assert client.models.retrieve("mock").id == "mock"

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

# include_usage: the last chunk carries usage and no choices.
chunks = list(
    client.chat.completions.create(
        model="mock",
        messages=[{"role": "user", "content": "count me"}],
        stream=True,
        stream_options={"include_usage": True},
    )
)
assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4, chunks[-1]
assert all(c.usage is None for c in chunks[:-1])

# Tools, usage details, annotations, service tier and vendor fields
# survive the forwarder (the "full" upstream sends every field).
tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
resp = client.chat.completions.create(
    model="full", messages=[{"role": "user", "content": "policy?"}], tools=tools
)
call = resp.choices[0].message.tool_calls[0]
assert call.function.name == "lookup" and call.function.arguments == '{"q":"return policy"}', call
assert resp.choices[0].finish_reason == "tool_calls"
assert resp.choices[0].logprobs.content[0].token == "Hello"
assert resp.choices[0].message.annotations[0].type == "url_citation"
assert resp.usage.prompt_tokens_details.cached_tokens == 4, resp.usage
assert resp.usage.completion_tokens_details.reasoning_tokens == 2, resp.usage
assert resp.service_tier == "default"
assert resp.model_extra["x_vendor"] == {"region": "eu", "cost": 1.5e-3}, resp.model_extra

# A streamed tool call, assembled from its deltas, with a usage chunk.
name, args, usage = "", "", None
for chunk in client.chat.completions.create(
    model="full", messages=[{"role": "user", "content": "x"}], tools=tools, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage:
        usage = chunk.usage
    for choice in chunk.choices:
        for tc in choice.delta.tool_calls or []:
            name += tc.function.name or ""
            args += tc.function.arguments or ""
assert (name, args) == ("lookup", '{"q":"x"}'), (name, args)
assert usage.prompt_tokens_details.cached_tokens == 4, usage

# An upstream 4xx keeps its code and param, which clients branch on.
try:
    client.chat.completions.create(model="reject", messages=[{"role": "user", "content": "x" * 10}])
    raise SystemExit("expected BadRequestError")
except openai.BadRequestError as e:
    assert e.status_code == 400 and e.code == "context_length_exceeded" and e.param == "messages", e

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

"""Runs a batch end to end with the official openai SDK; exits non-zero on any mismatch."""
import io
import json
import os
import time

import openai

base_url = os.environ["FORWARDER_BASE_URL"]
key = os.environ["FORWARDER_API_KEY"]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=10)

N = 25
lines = [
    {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "mock", "messages": [{"role": "user", "content": f"question number {i}"}]},
    }
    for i in range(N)
]
# One request for a model no upstream serves: it must land in the error file.
lines.append(
    {
        "custom_id": "req-bad-model",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
    }
)
data = "\n".join(json.dumps(l) for l in lines).encode()

f = client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")
assert f.id.startswith("file-") and f.purpose == "batch" and f.bytes == len(data), f
assert client.files.retrieve(f.id).id == f.id

b = client.batches.create(
    input_file_id=f.id,
    endpoint="/v1/chat/completions",
    completion_window="24h",
    metadata={"purpose": "sdk test"},
)
assert b.status in ("validating", "in_progress"), b
assert b.metadata == {"purpose": "sdk test"}, b

deadline = time.time() + 30
while True:
    b = client.batches.retrieve(b.id)
    if b.status in ("completed", "failed", "expired", "cancelled"):
        break
    assert time.time() < deadline, f"batch not done: {b}"
    time.sleep(0.1)
assert b.status == "completed", b
assert b.request_counts.total == N + 1, b.request_counts
assert b.request_counts.completed == N, b.request_counts
assert b.request_counts.failed == 1, b.request_counts
assert b.completed_at and b.in_progress_at and b.finalizing_at, b

out = [json.loads(l) for l in client.files.content(b.output_file_id).text.splitlines() if l]
assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(N)), out
for o in out:
    i = int(o["custom_id"].split("-")[1])
    assert o["error"] is None, o
    assert o["id"].startswith("batch_req_"), o
    assert o["response"]["status_code"] == 200, o
    assert o["response"]["request_id"], o
    body = o["response"]["body"]
    assert body["object"] == "chat.completion", body
    assert body["choices"][0]["message"]["content"] == f"mock reply: question number {i}", (i, body)

errs = [json.loads(l) for l in client.files.content(b.error_file_id).text.splitlines() if l]
assert [e["custom_id"] for e in errs] == ["req-bad-model"], errs
assert errs[0]["response"]["status_code"] == 404, errs

listed = client.batches.list(limit=10)
assert b.id in [x.id for x in listed.data], listed
print("ALL OK")

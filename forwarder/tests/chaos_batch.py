"""One batch of the chaos run, through the official openai SDK.

Every call moves on to the next replica when one is down (a client behind
a Service retries), for at most 240 s. Prints a JSON summary as its last
line; exits non-zero only when the SDK itself misbehaves.
"""
import io
import json
import os
import sys
import time

import openai

bases = os.environ["CHAOS_BASES"].split(",")
tag = os.environ["CHAOS_TAG"]
n = int(os.environ.get("CHAOS_LINES", "30"))
clients = [openai.OpenAI(base_url=b, api_key="unused", max_retries=0, timeout=10) for b in bases]
deadline = time.time() + 240


def call(fn):
    """fn(client) on each replica in turn until one answers."""
    k = 0
    while True:
        try:
            return fn(clients[k % len(clients)])
        except (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError, openai.RateLimitError) as e:
            if time.time() > deadline:
                raise
            k += 1
            time.sleep(0.3)


lines = [
    {
        "custom_id": f"{tag}-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "mock", "messages": [{"role": "user", "content": f"<<m:{tag}-{i}>> line"}]},
    }
    for i in range(n)
]
# The line made to fail: a model no upstream serves.
lines.append(
    {
        "custom_id": f"{tag}-bad",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
    }
)
data = "\n".join(json.dumps(l) for l in lines).encode()
f = call(lambda c: c.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch"))
b = call(lambda c: c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"))
while b.status not in ("completed", "failed", "expired", "cancelled"):
    if time.time() > deadline:
        break
    time.sleep(1)
    b = call(lambda c: c.batches.retrieve(b.id))

summary = {"tag": tag, "id": b.id, "status": b.status, "output_unique": 0, "errors": 0, "ok": False}
if b.status == "completed":
    out = [json.loads(l) for l in call(lambda c: c.files.content(b.output_file_id)).text.splitlines() if l]
    errs = [json.loads(l) for l in call(lambda c: c.files.content(b.error_file_id)).text.splitlines() if l]
    ids = [o["custom_id"] for o in out]
    good = all(o["response"]["status_code"] == 200 and f"<<m:{o['custom_id']}>>" in o["response"]["body"]["choices"][0]["message"]["content"] for o in out)
    summary["output_unique"] = len(set(ids))
    summary["errors"] = len(errs)
    summary["ok"] = (
        good
        and sorted(ids) == sorted(f"{tag}-{i}" for i in range(n))
        and [e["custom_id"] for e in errs] == [f"{tag}-bad"]
        and b.request_counts.completed == n
        and b.request_counts.failed == 1
    )
print(json.dumps(summary))
sys.stdout.flush()

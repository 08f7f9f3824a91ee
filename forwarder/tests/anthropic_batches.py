"""Anthropic's Message Batches API through the forwarder with the official
anthropic SDK: create, retrieve until ended, results, list (both ways),
cancel, delete; a
request for a model not served ends `errored`, the rest `succeeded`
(`claude` passed to an Anthropic upstream, `gpt` translated to chat
completions and back); another client sees none of it. Exits non-zero on
any mismatch."""
import os
import time

import anthropic

base_url = os.environ["FORWARDER_BASE_URL"]
client = anthropic.Anthropic(base_url=base_url, api_key=os.environ["FORWARDER_API_KEY"], max_retries=0, timeout=10)
other = anthropic.Anthropic(base_url=base_url, api_key=os.environ["OTHER_API_KEY"], max_retries=0, timeout=10)


def ask(model, text):
    return {"model": model, "max_tokens": 20, "messages": [{"role": "user", "content": text}]}


batch = client.messages.batches.create(
    requests=[
        {"custom_id": "native", "params": ask("claude", "one")},
        {"custom_id": "translated", "params": ask("gpt", "two")},
        {"custom_id": "unknown-model", "params": ask("no-such-model", "three")},
    ]
)
assert batch.id.startswith("msgbatch_"), batch
assert batch.type == "message_batch", batch
assert batch.processing_status == "in_progress", batch
assert batch.results_url is None, batch

deadline = time.time() + 30
while batch.processing_status != "ended":
    assert time.time() < deadline, batch
    time.sleep(0.1)
    batch = client.messages.batches.retrieve(batch.id)
counts = batch.request_counts
assert (counts.succeeded, counts.errored, counts.processing, counts.canceled, counts.expired) == (2, 1, 0, 0, 0), counts
assert batch.ended_at is not None and batch.results_url, batch

results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
assert set(results) == {"native", "translated", "unknown-model"}, results
assert results["native"].type == "succeeded", results
assert results["native"].message.content[0].text == "mock reply: one", results["native"]
assert results["translated"].type == "succeeded", results
assert results["translated"].message.content[0].text == "mock reply: two", results["translated"]
assert results["unknown-model"].type == "errored", results
assert results["unknown-model"].error.error.type == "not_found_error", results["unknown-model"]

listed = [b.id for b in client.messages.batches.list(limit=10)]
assert batch.id in listed, listed
# Cancelling an ended batch shows it as it is.
assert client.messages.batches.cancel(batch.id).processing_status == "ended"

# Another client: as if it did not exist.
for call_it in (
    lambda: other.messages.batches.retrieve(batch.id),
    lambda: list(other.messages.batches.results(batch.id)),
    lambda: other.messages.batches.cancel(batch.id),
    lambda: other.messages.batches.delete(batch.id),
):
    try:
        call_it()
        raise SystemExit("another client reached the batch")
    except anthropic.NotFoundError as err:
        assert err.body["type"] == "error" and err.body["error"]["type"] == "not_found_error", err.body
assert batch.id not in [b.id for b in other.messages.batches.list()]

# Refused requests, in Anthropic's shape.
for requests, says in (([], "at least one"), ([{"custom_id": "bad id", "params": ask("claude", "x")}], "custom_id")):
    try:
        client.messages.batches.create(requests=requests)
        raise SystemExit(f"expected a 400 for {requests}")
    except anthropic.BadRequestError as err:
        assert says in err.body["error"]["message"], err.body

# A newer batch is on the page before the first one.
newer = client.messages.batches.create(requests=[{"custom_id": "n", "params": ask("claude", "four")}])
page = client.messages.batches.list(before_id=batch.id, limit=5)
assert [b.id for b in page.data] == [newer.id], page
assert [b.id for b in client.messages.batches.list(after_id=newer.id, limit=1).data] == [batch.id]

# An ended batch is deleted, with its results; then it is unknown.
deleted = client.messages.batches.delete(batch.id)
assert deleted.id == batch.id and deleted.type == "message_batch_deleted", deleted
for call_it in (
    lambda: client.messages.batches.retrieve(batch.id),
    lambda: list(client.messages.batches.results(batch.id)),
    lambda: client.messages.batches.delete(batch.id),
):
    try:
        call_it()
        raise SystemExit("a deleted batch is still there")
    except anthropic.NotFoundError:
        pass
assert batch.id not in [b.id for b in client.messages.batches.list(limit=100)]

print("ALL OK")

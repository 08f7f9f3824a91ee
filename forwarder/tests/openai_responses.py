"""GET (whole or streamed) and DELETE /v1/responses/{id}, its input_items and cancel, through
the forwarder with the official openai SDK: `gpt` is served by two mock-llm servers, each keeping the
responses it created, so a retrieve that reached the wrong one would be
a 404. Another client never sees the first client's responses. Exits
non-zero on any mismatch."""
import os

import openai

base_url = os.environ["FORWARDER_BASE_URL"]
alice = openai.OpenAI(base_url=base_url, api_key=os.environ["ALICE_KEY"], max_retries=0, timeout=10)
bob = openai.OpenAI(base_url=base_url, api_key=os.environ["BOB_KEY"], max_retries=0, timeout=10)

created = [alice.responses.create(model="gpt", input=f"question {i}") for i in range(8)]
for r in created:
    got = alice.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text, (got, r)

# Another client: as if the response did not exist.
try:
    bob.responses.retrieve(created[0].id)
    raise SystemExit("bob read alice's response")
except openai.NotFoundError:
    pass
try:
    bob.responses.delete(created[0].id)
    raise SystemExit("bob deleted alice's response")
except openai.NotFoundError:
    pass

# Deleted at the upstream that holds it; then gone.
for r in created[:4]:
    alice.responses.delete(r.id)
    try:
        alice.responses.retrieve(r.id)
        raise SystemExit(f"{r.id} still there after delete")
    except openai.NotFoundError:
        pass
for r in created[4:]:
    assert alice.responses.retrieve(r.id).id == r.id

# Retrieved as a stream: the SDK's typed events, relayed from the upstream
# that holds the response, from after `starting_after` when given.
r = created[4]
events = list(alice.responses.retrieve(r.id, stream=True))
assert events[0].type == "response.created", events[0]
assert events[-1].type == "response.completed", events[-1]
assert events[-1].response.id == r.id, events[-1]
text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
assert text == r.output_text, (text, r.output_text)
later = list(alice.responses.retrieve(r.id, stream=True, starting_after=1))
assert [e.sequence_number for e in later] == [e.sequence_number for e in events[2:]], later
try:
    list(bob.responses.retrieve(r.id, stream=True))
    raise SystemExit("bob streamed alice's response")
except openai.NotFoundError:
    pass

# Input items, listed by the upstream that made the response, the query
# (order, limit, after) passed through as sent.
for i, r in enumerate(created[4:], start=4):
    items = alice.responses.input_items.list(r.id)
    assert [c.text for c in items.data[0].content] == [f"question {i}"], items
multi = alice.responses.create(
    model="gpt",
    input=[{"role": "user", "content": "first"}, {"role": "user", "content": "second"}],
)
page = alice.responses.input_items.list(multi.id, limit=1, order="asc")
assert len(page.data) == 1 and page.has_more, page
assert page.data[0].content[0].text == "first", page
rest = alice.responses.input_items.list(multi.id, after=page.data[0].id, order="asc")
assert [x.content[0].text for x in rest.data] == ["second"] and not rest.has_more, rest
newest = alice.responses.input_items.list(multi.id, limit=1)
assert newest.data[0].content[0].text == "second", newest
try:
    bob.responses.input_items.list(multi.id)
    raise SystemExit("bob listed alice's input items")
except openai.NotFoundError:
    pass

# Cancel: the upstream that holds the response answers. One made without
# `background` cannot be cancelled (its 400 passes through; the wrong
# upstream would have said 404); a background one is.
try:
    alice.responses.cancel(multi.id)
    raise SystemExit("a foreground response was cancelled")
except openai.BadRequestError as e:
    assert "background" in str(e), e
bg = alice.responses.create(model="gpt", input="later", background=True)
try:
    bob.responses.cancel(bg.id)
    raise SystemExit("bob cancelled alice's response")
except openai.NotFoundError:
    pass
assert alice.responses.cancel(bg.id).status == "cancelled"

# An id the forwarder never saw.
try:
    alice.responses.retrieve("resp_never_created")
    raise SystemExit("an unknown id was found")
except openai.NotFoundError:
    pass
for call in (alice.responses.cancel, alice.responses.input_items.list):
    try:
        call("resp_never_created")
        raise SystemExit(f"{call} found an unknown id")
    except openai.NotFoundError:
        pass
print("ALL OK")

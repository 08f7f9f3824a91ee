"""GET and DELETE /v1/responses/{id} through the forwarder with the official
openai SDK: `gpt` is served by two mock-llm servers, each keeping the
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

# An id the forwarder never saw.
try:
    alice.responses.retrieve("resp_never_created")
    raise SystemExit("an unknown id was found")
except openai.NotFoundError:
    pass
print("ALL OK")

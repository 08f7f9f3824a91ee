"""Drives the forwarder's TLS listeners with third-party clients: the
`openai` SDK over HTTPS with a custom CA, `websockets` over WSS, `grpcio`
with TLS, mTLS accepted and refused, and a certificate rotated on disk while
a stream is open. Exits non-zero on any mismatch; prints ALL OK."""
import asyncio
import json
import os
import shutil
import socket
import ssl
import sys
import tempfile
import time
from urllib.parse import urlparse

import grpc
import httpx
import openai
from grpc_tools import protoc
from websockets.asyncio.client import connect

E = os.environ
CA = E["TLS_CA"]
MESSAGES = [{"role": "user", "content": "tls"}]


def context(cert=None, key=None):
    ctx = ssl.create_default_context(cafile=CA)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def sdk(url, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                         http_client=httpx.Client(**kw))


def https_checks():
    r = sdk(E["HTTPS_URL"], verify=context()).chat.completions.create(model="mock", messages=MESSAGES)
    assert r.choices[0].message.content.startswith("mock reply: tls"), r
    # Without our CA the certificate does not verify.
    try:
        sdk(E["HTTPS_URL"]).chat.completions.create(model="mock", messages=MESSAGES)
        raise AssertionError("an unverified certificate was accepted")
    except openai.APIConnectionError:
        pass
    # Plain HTTP on the TLS port gets nowhere.
    try:
        httpx.get(E["HTTPS_URL"].replace("https:", "http:") + "/healthz", timeout=5)
        raise AssertionError("plain HTTP was served on the TLS port")
    except httpx.HTTPError:
        pass
    print("https ok")


async def wss_checks():
    async with connect(E["WSS_URL"], ssl=context()) as ws:
        await ws.send(json.dumps({"type": "request", "id": "1", "model": "mock", "prompt": "wss"}))
        frame = json.loads(await ws.recv())
        assert frame["type"] == "done" and frame["reply"].startswith("mock reply: wss"), frame
    print("wss ok")


def stubs():
    out = tempfile.mkdtemp()
    rc = protoc.main(["protoc", f"-I{E['PROTO_DIR']}", f"--python_out={out}", f"--grpc_python_out={out}",
                      os.path.join(E["PROTO_DIR"], "modelforwarder/v1/forwarder.proto")])
    assert rc == 0, rc
    sys.path.insert(0, out)
    from modelforwarder.v1 import forwarder_pb2, forwarder_pb2_grpc
    return forwarder_pb2, forwarder_pb2_grpc


def grpc_call(addr, pb, pb_grpc, cert=None, key=None):
    creds = grpc.ssl_channel_credentials(
        root_certificates=open(CA, "rb").read(),
        private_key=open(key, "rb").read() if key else None,
        certificate_chain=open(cert, "rb").read() if cert else None)
    with grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        stub = pb_grpc.ForwarderStub(ch)
        return stub.Forward(pb.ForwardRequest(model_id="mock", prompt="grpc tls"), timeout=10)


def grpc_checks(pb, pb_grpc):
    resp = grpc_call(E["GRPC_TLS_ADDR"], pb, pb_grpc)
    assert resp.reply.startswith("mock reply: grpc tls"), resp
    print("grpc tls ok")


def mtls_checks(pb, pb_grpc):
    url = E["MTLS_URL"] + "/v1/chat/completions"
    body = {"model": "mock", "messages": MESSAGES}
    # A certificate from the trusted CA names the client: no API key needed.
    r = httpx.post(url, json=body, verify=context(E["TLS_CLIENT_CERT"], E["TLS_CLIENT_KEY"]), timeout=10)
    assert r.status_code == 200, (r.status_code, r.text)
    # The certificate alone also owns stored objects: an async job it
    # submitted is read back, and the Batch API lists its batches.
    client = httpx.Client(base_url=E["MTLS_URL"], verify=context(E["TLS_CLIENT_CERT"], E["TLS_CLIENT_KEY"]), timeout=10)
    r = client.post("/v1/async/chat/completions", json=body)
    assert r.status_code == 202, (r.status_code, r.text)
    r = client.get(f"/v1/async/jobs/{r.json()['id']}")
    assert r.status_code == 200, (r.status_code, r.text)
    r = client.get("/v1/batches")
    assert r.status_code == 200, (r.status_code, r.text)
    client.close()
    resp = grpc_call(E["MTLS_GRPC_ADDR"], pb, pb_grpc, E["TLS_CLIENT_CERT"], E["TLS_CLIENT_KEY"])
    assert resp.reply.startswith("mock reply: grpc tls"), resp
    # No certificate, or one from a CA the server does not trust: refused.
    for name, ctx in [("none", context()), ("untrusted", context(E["TLS_BAD_CERT"], E["TLS_BAD_KEY"]))]:
        try:
            r = httpx.post(url, json=body, verify=ctx, timeout=10)
            raise AssertionError(f"client certificate {name}: answered {r.status_code}")
        except (httpx.HTTPError, ssl.SSLError):
            pass
    try:
        grpc_call(E["MTLS_GRPC_ADDR"], pb, pb_grpc)
        raise AssertionError("gRPC without a client certificate was served")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e
    print("mtls ok")


def served_cert(url):
    """The DER certificate a new connection is given."""
    u = urlparse(url)
    ctx = context()
    with socket.create_connection((u.hostname, u.port), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            return t.getpeercert(binary_form=True)


def der_of(path):
    return ssl.PEM_cert_to_DER_cert(open(path).read())


def rotation_check():
    before = served_cert(E["HTTPS_URL"])
    assert before == der_of(E["TLS_CERT"])
    client = sdk(E["HTTPS_URL"], verify=context())
    stream = client.chat.completions.create(model="mock", messages=MESSAGES, stream=True)
    text, finish = "", None
    chunks = iter(stream)
    first = next(chunks)
    text += first.choices[0].delta.content or ""
    # Rotate as cert-manager would: new key and certificate in place.
    for src, dst in [(E["TLS_NEXT_KEY"], E["TLS_KEY"]), (E["TLS_NEXT_CERT"], E["TLS_CERT"])]:
        shutil.copy(src, dst + ".tmp")
        os.replace(dst + ".tmp", dst)
    deadline = time.time() + 5
    while served_cert(E["HTTPS_URL"]) != der_of(E["TLS_NEXT_CERT"]):
        assert time.time() < deadline, "new connections still get the old certificate"
        time.sleep(0.05)
    rotated_at = time.time()
    for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop", finish
    assert text.startswith("mock reply: tls") and len(text.split()) >= 40, text
    # The stream was still running when the rotation took effect.
    assert time.time() - rotated_at > 0.1, "the stream ended before the rotation; it proves nothing"
    print("rotation ok")


https_checks()
asyncio.run(wss_checks())
pb, pb_grpc = stubs()
grpc_checks(pb, pb_grpc)
mtls_checks(pb, pb_grpc)
rotation_check()
print("ALL OK")

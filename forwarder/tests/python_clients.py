"""Drives the WebSocket and gRPC front ends with third-party Python clients
(`websockets`, `grpcio`); exits non-zero on any mismatch."""
import asyncio
import json
import os
import sys
import tempfile

import grpc
import websockets
from grpc_tools import protoc
from websockets.asyncio.client import connect

WS_URL = os.environ["FORWARDER_WS_URL"]
GRPC_ADDR = os.environ["FORWARDER_GRPC_ADDR"]
KEY = os.environ["FORWARDER_API_KEY"]
PROTO_DIR = os.environ["FORWARDER_PROTO_DIR"]


async def websocket_checks():
    async with connect(WS_URL, additional_headers={"x-api-key": KEY}) as ws:
        await ws.send(json.dumps({"type": "request", "id": "s", "model": "mock", "prompt": "py stream", "stream": True}))
        await ws.send(json.dumps({"type": "request", "id": "u", "model": "mock", "prompt": "py unary"}))
        text, done = "", {}
        while len(done) < 2:
            frame = json.loads(await ws.recv())
            if frame["type"] == "delta":
                assert frame["id"] == "s", frame
                text += frame["delta"]
            elif frame["type"] == "done":
                done[frame["id"]] = frame
            else:
                raise AssertionError(frame)
        assert text == "mock reply: py stream", text
        assert done["u"]["reply"] == "mock reply: py unary", done
        assert done["s"]["usage"]["completion_tokens"] == 4, done
    # The subprotocol form browsers use, and a rejected key.
    async with connect(WS_URL, subprotocols=["modelforwarder.v1", "bearer." + KEY]) as ws:
        assert ws.subprotocol == "modelforwarder.v1", ws.subprotocol
    try:
        async with connect(WS_URL, additional_headers={"x-api-key": "wrong"}):
            raise AssertionError("a bad key was accepted")
    except websockets.exceptions.InvalidStatus as e:
        assert e.response.status_code == 401, e


def grpc_checks():
    out = tempfile.mkdtemp()
    rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={out}", f"--grpc_python_out={out}",
                      os.path.join(PROTO_DIR, "modelforwarder/v1/forwarder.proto")])
    assert rc == 0, rc
    sys.path.insert(0, out)
    from modelforwarder.v1 import forwarder_pb2 as pb
    from modelforwarder.v1 import forwarder_pb2_grpc as pb_grpc

    with grpc.insecure_channel(GRPC_ADDR) as channel:
        stub = pb_grpc.ForwarderStub(channel)
        md = [("x-api-key", KEY)]
        resp = stub.Forward(pb.ForwardRequest(model_id="mock", prompt="py grpc"), metadata=md, timeout=10)
        assert resp.reply == "mock reply: py grpc", resp
        chunks = list(stub.ForwardStream(pb.ForwardRequest(model_id="mock", prompt="a b"), metadata=md, timeout=10))
        assert "".join(c.delta for c in chunks) == "mock reply: a b", chunks
        assert chunks[-1].finish_reason == "stop"
        try:
            stub.Forward(pb.ForwardRequest(model_id="nope", prompt="x"), metadata=md, timeout=10)
            raise AssertionError("unknown model accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND, e
            trailers = dict(e.trailing_metadata())
            assert trailers.get("x-http-status") == "404", trailers
        try:
            stub.Forward(pb.ForwardRequest(model_id="mock", prompt="x"), timeout=10)
            raise AssertionError("missing key accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e


asyncio.run(websocket_checks())
grpc_checks()
print("ALL OK")

"""JWT material minted by an independent implementation (PyJWT with
`cryptography`) for the forwarder's JWT tests.

  jwt_tokens.py keys DIR   writes keys, DIR/jwks.json, DIR/jwks-rotated.json
                           (without the key `rs-old`) and DIR/hs.secret
  jwt_tokens.py negative DIR
                           prints a JSON list of {case, token, reason,
                           target}: tokens the forwarder must refuse
  jwt_tokens.py mint DIR   prints a JSON map kid -> valid token
  jwt_tokens.py clients DIR
                           mints a token per algorithm and uses each over
                           HTTP (openai SDK), WebSocket (websockets) and gRPC
                           (grpcio); prints ALL OK
"""
import asyncio
import base64
import hashlib
import hmac
import json
import os
import sys
import tempfile
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

ISSUER = "https://issuer.test"
AUDIENCE = "modelforwarder"
# (kid, algorithm, key type); every asymmetric algorithm the forwarder
# accepts, plus an HMAC key published as an `oct` JWK.
ASYMMETRIC = [
    ("rs", "RS256", "rsa"),
    ("rs384", "RS384", "rsa"),
    ("rs512", "RS512", "rsa"),
    ("ps", "PS256", "rsa"),
    ("ps384", "PS384", "rsa"),
    ("ps512", "PS512", "rsa"),
    ("es", "ES256", "p256"),
    ("es384", "ES384", "p384"),
    ("ed", "EdDSA", "ed25519"),
    ("rs-old", "RS256", "rsa"),
]
OCT = [("oct", "HS384")]
HS_ALGS = ["HS256", "HS384", "HS512"]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def generate(kind):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    return ed25519.Ed25519PrivateKey.generate()


def pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_jwk(key, kid, alg):
    algo = jwt.get_algorithm_by_name(alg)
    d = json.loads(algo.to_jwk(key.public_key()))
    d.update({"kid": kid, "use": "sig", "alg": alg})
    return d


def keys(out):
    jwks, private = [], {}
    for kid, alg, kind in ASYMMETRIC:
        key = generate(kind)
        private[kid] = pem(key).decode()
        jwks.append(public_jwk(key, kid, alg))
    for kid, alg in OCT:
        secret = os.urandom(48)
        private[kid] = b64(secret)
        jwks.append({"kty": "oct", "kid": kid, "alg": alg, "k": b64(secret)})
    with open(os.path.join(out, "jwks.json"), "w") as f:
        json.dump({"keys": jwks}, f)
    with open(os.path.join(out, "jwks-rotated.json"), "w") as f:
        json.dump({"keys": [k for k in jwks if k["kid"] != "rs-old"]}, f)
    with open(os.path.join(out, "private.json"), "w") as f:
        json.dump(private, f)
    with open(os.path.join(out, "hs.secret"), "w") as f:
        f.write(b64(os.urandom(32)) + "\n")


def load(out):
    with open(os.path.join(out, "private.json")) as f:
        private = json.load(f)
    with open(os.path.join(out, "hs.secret")) as f:
        secret = f.read().strip().encode()
    return private, secret


def claims(sub="py-client", **extra):
    now = int(time.time())
    c = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300}
    c.update(extra)
    return {k: v for k, v in c.items() if v is not None}


def sign(private, kid, alg, payload, headers=None):
    if alg.startswith("HS"):
        key = base64.urlsafe_b64decode(private[kid] + "==")
    else:
        key = private[kid]
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid, **(headers or {})})


def forged(header, payload, signature_key: bytes, digest=hashlib.sha256):
    """A token assembled by hand (PyJWT refuses to build these)."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    sig = hmac.new(signature_key, signing_input.encode(), digest).digest() if signature_key else b""
    return signing_input + "." + b64(sig)


def negative(out):
    private, secret = load(out)
    now = int(time.time())
    good = sign(private, "es", "ES256", claims())
    h, p, s = good.split(".")
    tampered_payload = h + "." + b64(json.dumps(claims(sub="admin")).encode()) + "." + s
    sig = bytearray(base64.urlsafe_b64decode(s + "=="))
    sig[0] ^= 1
    tampered_signature = h + "." + p + "." + b64(bytes(sig))
    with open(os.path.join(out, "jwks.json")) as f:
        rs_public = [k for k in json.load(f)["keys"] if k["kid"] == "rs"][0]
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers
    n = int.from_bytes(base64.urlsafe_b64decode(rs_public["n"] + "=="), "big")
    e = int.from_bytes(base64.urlsafe_b64decode(rs_public["e"] + "=="), "big")
    rsa_pub_pem = RSAPublicNumbers(e, n).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    cases = [
        ("expired", sign(private, "es", "ES256", claims(iat=now - 600, exp=now - 300)), "expired", "jwks"),
        ("not yet valid", sign(private, "es", "ES256", claims(nbf=now + 600)), "not_yet_valid", "jwks"),
        ("wrong issuer", sign(private, "es", "ES256", claims(iss="https://evil.test")), "wrong_issuer", "jwks"),
        ("wrong audience", sign(private, "es", "ES256", claims(aud="someone-else")), "wrong_audience", "jwks"),
        ("alg none", forged({"alg": "none", "typ": "JWT"}, claims(), b""), "alg_none", "jwks"),
        ("HS256 signed with the RSA public key",
         forged({"alg": "HS256", "kid": "rs", "typ": "JWT"}, claims(), rsa_pub_pem), "alg_not_allowed", "jwks"),
        ("unknown kid", sign(private, "es", "ES256", claims(), headers={"kid": "nobody"}), "unknown_kid", "jwks"),
        ("tampered payload", tampered_payload, "bad_signature", "jwks"),
        ("tampered signature", tampered_signature, "bad_signature", "jwks"),
        ("oversize", sign(private, "es", "ES256", claims(pad="x" * 9000)), "oversize", "jwks"),
        ("malformed base64", "eyJ!!!." + p + "." + s, "malformed", "jwks"),
        ("missing exp", sign(private, "es", "ES256", claims(exp=None)), "missing_claim", "jwks"),
        ("no principal", sign(private, "es", "ES256", claims(sub=None)), "no_principal", "jwks"),
        ("HS256 with the wrong secret",
         jwt.encode(claims(), b"not-the-secret-" * 3, algorithm="HS256"), "bad_signature", "secret"),
        ("RS256 against an HMAC secret", sign(private, "rs", "RS256", claims()), "alg_not_allowed", "secret"),
    ]
    print(json.dumps([{"case": c, "token": t, "reason": r, "target": g} for c, t, r, g in cases]))


async def ws_check(url, token, label):
    from websockets.asyncio.client import connect
    async with connect(url, additional_headers={"authorization": "Bearer " + token}) as ws:
        await ws.send(json.dumps({"type": "request", "id": "1", "model": "mock", "prompt": label}))
        frame = json.loads(await ws.recv())
        assert frame["type"] == "done" and frame["reply"] == "mock reply: " + label, frame


def grpc_stub(addr):
    import grpc
    from grpc_tools import protoc
    out = tempfile.mkdtemp()
    proto_dir = os.environ["FORWARDER_PROTO_DIR"]
    rc = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}",
                      os.path.join(proto_dir, "modelforwarder/v1/forwarder.proto")])
    assert rc == 0, rc
    sys.path.insert(0, out)
    from modelforwarder.v1 import forwarder_pb2 as pb
    from modelforwarder.v1 import forwarder_pb2_grpc as pb_grpc
    channel = grpc.insecure_channel(addr)
    return pb, pb_grpc.ForwarderStub(channel)


def clients(out):
    import openai
    private, secret = load(out)
    tokens = []
    for kid, alg, _ in ASYMMETRIC:
        if kid != "rs-old":
            tokens.append(("jwks", alg, sign(private, kid, alg, claims(sub="py-" + alg))))
    for kid, alg in OCT:
        tokens.append(("jwks", "oct-" + alg, sign(private, kid, alg, claims(sub="py-oct"))))
    for alg in HS_ALGS:
        tokens.append(("secret", alg, jwt.encode(claims(sub="py-" + alg), secret, algorithm=alg)))
    targets = {
        "jwks": (os.environ["JWKS_HTTP"], os.environ["JWKS_WS"], os.environ["JWKS_GRPC"]),
        "secret": (os.environ["SECRET_HTTP"], os.environ["SECRET_WS"], os.environ["SECRET_GRPC"]),
    }
    stubs = {name: grpc_stub(t[2]) for name, t in targets.items()}
    for target, alg, token in tokens:
        http, ws, _ = targets[target]
        c = openai.OpenAI(base_url=http + "/v1", api_key=token, max_retries=0)
        r = c.chat.completions.create(model="mock", messages=[{"role": "user", "content": "http " + alg}])
        assert r.choices[0].message.content == "mock reply: http " + alg, r
        asyncio.run(ws_check(ws, token, "ws " + alg))
        pb, stub = stubs[target]
        resp = stub.Forward(pb.ForwardRequest(model_id="mock", prompt="grpc " + alg),
                            metadata=[("authorization", "Bearer " + token)], timeout=10)
        assert resp.reply == "mock reply: grpc " + alg, resp
        print("accepted", target, alg)
    # A token restricted to other models cannot use `mock`.
    limited = sign(private, "es", "ES256", claims(models=["other"]))
    c = openai.OpenAI(base_url=targets["jwks"][0] + "/v1", api_key=limited, max_retries=0)
    try:
        c.chat.completions.create(model="mock", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("a model outside the token's list was served")
    except openai.NotFoundError:
        pass
    # One token's header and signature over another's claims.
    h, _, sig = tokens[0][2].split(".")
    spliced = ".".join([h, tokens[1][2].split(".")[1], sig])
    try:
        openai.OpenAI(base_url=targets["jwks"][0] + "/v1", api_key=spliced, max_retries=0) \
            .chat.completions.create(model="mock", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("a tampered token was accepted")
    except openai.AuthenticationError:
        pass
    print("ALL OK")


def mint(out):
    """A valid token per JWKS key, as a JSON map kid -> token."""
    private, _ = load(out)
    print(json.dumps({kid: sign(private, kid, alg, claims(sub="py-" + kid)) for kid, alg, _ in ASYMMETRIC}))


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    {"keys": keys, "negative": negative, "clients": clients, "mint": mint}[mode](out)

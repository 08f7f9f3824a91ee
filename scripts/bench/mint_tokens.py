"""Mints JWTs for scripts/bench-security.sh with PyJWT (an implementation
independent of the forwarder's): one token per line, each with its own `sub`
and `jti`, all valid for an hour.

    python mint_tokens.py HS256 SECRET_FILE COUNT OUT ISSUER AUDIENCE
    python mint_tokens.py ES256 PRIVATE_KEY_PEM COUNT OUT ISSUER AUDIENCE
    python mint_tokens.py jwks PRIVATE_KEY_PEM OUT   the public key as a JWKS
"""

import json
import sys
import time

import jwt
from cryptography.hazmat.primitives import serialization


def jwks(key_file: str, out: str) -> None:
    with open(key_file, "rb") as f:
        public = serialization.load_pem_private_key(f.read(), password=None).public_key()
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    jwk.update({"alg": "ES256", "use": "sig", "kid": "bench-es256"})
    with open(out, "w") as f:
        json.dump({"keys": [jwk]}, f)


def main() -> None:
    if sys.argv[1] == "jwks":
        jwks(sys.argv[2], sys.argv[3])
        return
    alg, key_file, count, out, issuer, audience = sys.argv[1:7]
    with open(key_file, "rb") as f:
        raw = f.read()
    if alg == "HS256":
        key = raw.strip()
    elif alg == "ES256":
        key = serialization.load_pem_private_key(raw, password=None)
    else:
        sys.exit(f"unsupported algorithm {alg}")
    now = int(time.time())
    with open(out, "w") as f:
        for i in range(int(count)):
            claims = {
                "sub": f"bench-client-{i}",
                "jti": str(i),
                "iss": issuer,
                "aud": audience,
                "iat": now,
                "exp": now + 3600,
            }
            headers = {"kid": "bench-es256"} if alg == "ES256" else None
            f.write(jwt.encode(claims, key, algorithm=alg, headers=headers) + "\n")


if __name__ == "__main__":
    main()

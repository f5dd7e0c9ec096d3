#!/usr/bin/env python3
"""A small stand-in for a registry token service (what Docker Hub's auth.docker.io or
Harbor's token endpoint do), for distribution's `auth.token` in the tests: no token service
is packaged for Debian. It implements the distribution token spec's two flows:

    GET /token?service=S&scope=repository:NAME:pull   (Basic credentials; Docker, skopeo)
    POST /token  grant_type=password&username=U&password=P&service=S&scope=...  (containerd)

It grants every requested repository scope (the actions asked, e.g. pull,push) to
USER:PASSWORD and refuses anyone else with 401. Tokens are RS256 JWTs signed with KEY (via the openssl CLI, so nothing beyond
the standard library is needed) and carry the certificate CERT in their `x5c` header, which
distribution checks against its `rootcertbundle`. Every request is logged on stdout.

usage: token_server.py LISTEN_IP PORT ISSUER USER PASSWORD KEY CERT
"""

import base64
import json
import subprocess
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

IP, PORT, ISSUER, USER, PASSWORD, KEY, CERT = sys.argv[1:8]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def cert_der_b64() -> str:
    pem = open(CERT).read()
    body = "".join(l for l in pem.splitlines() if l and not l.startswith("-----"))
    return body  # x5c holds standard (not URL-safe) base64 DER


def sign(payload: bytes) -> bytes:
    return subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", KEY], input=payload, capture_output=True, check=True
    ).stdout


def token_for(service: str, scopes: list) -> str:
    access = []
    for scope in (s for value in scopes for s in value.split()):
        parts = scope.split(":")
        if len(parts) == 3 and parts[0] == "repository":
            access.append({"type": "repository", "name": parts[1], "actions": parts[2].split(",")})
    now = int(time.time())
    header = {"typ": "JWT", "alg": "RS256", "x5c": [cert_der_b64()]}
    claims = {
        "iss": ISSUER,
        "sub": USER,
        "aud": service,
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now,
        "jti": str(uuid.uuid4()),
        "access": access,
    }
    signing_input = (b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())).encode()
    return signing_input.decode() + "." + b64url(sign(signing_input))


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        url = urlparse(self.path)
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        self.answer(url.path, parse_qs(url.query), self.headers.get("Authorization") == expected)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        ok = (
            form.get("grant_type") == ["password"]
            and form.get("username") == [USER]
            and form.get("password") == [PASSWORD]
        )
        self.answer(urlparse(self.path).path, form, ok)

    def answer(self, path, query, ok):
        url = urlparse(path)
        print(f"token request {self.command} path={url.path} scope={query.get('scope')} granted={ok}", flush=True)
        if url.path != "/token" or not ok:
            body = b'{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        token = token_for(query.get("service", [""])[0], query.get("scope", []))
        body = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer((IP, int(PORT)), Handler).serve_forever()

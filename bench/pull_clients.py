#!/usr/bin/env python3
"""N clients at once pull one image from a registry over HTTP: each GETs the manifest, then
every blob it names, and checks each blob hashes to its digest. Prints one JSON line: clients,
errors (with the first few reasons), bytes received, seconds.

usage: pull_clients.py HOST:PORT NAME TAG N [QUERY]   (QUERY: appended to every path, e.g. ?ns=HOST)
"""
import hashlib
import http.client
import json
import sys
import threading
import time

addr, name, tag, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
query = sys.argv[5] if len(sys.argv) > 5 else ""
host, port = addr.rsplit(":", 1)
ACCEPT = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"
errors, received = [], [0]
lock = threading.Lock()


def get(conn, path, headers=None):
    conn.request("GET", path, headers=headers or {})
    return conn.getresponse()


def client():
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=600)
        r = get(conn, f"/v2/{name}/manifests/{tag}{query}", {"Accept": ACCEPT})
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"manifest: {r.status} {body[:200]!r}")
        m = json.loads(body)
        total = 0
        for d in [m["config"]["digest"]] + [l["digest"] for l in m["layers"]]:
            r = get(conn, f"/v2/{name}/blobs/{d}{query}")
            if r.status != 200:
                raise RuntimeError(f"blob {d}: {r.status} {r.read()[:200]!r}")
            h = hashlib.sha256()
            while True:
                chunk = r.read(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
                total += len(chunk)
            if "sha256:" + h.hexdigest() != d:
                raise RuntimeError(f"blob {d}: wrong bytes")
        with lock:
            received[0] += total
    except Exception as e:  # every failure counts, whatever it is
        with lock:
            errors.append(str(e))


start = time.time()
threads = [threading.Thread(target=client) for _ in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"clients": n, "errors": len(errors), "first_errors": errors[:3],
                  "bytes": received[0], "seconds": round(time.time() - start, 2)}))

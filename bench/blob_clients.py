#!/usr/bin/env python3
"""N clients at once GET one blob over HTTP/1.1, each on its own connection, and check that
every copy hashes to the blob's digest. Prints one JSON line: clients, errors (with the first
few reasons), bytes received, seconds.

usage: blob_clients.py HOST:PORT REPO DIGEST N [QUERY]
"""
import hashlib
import http.client
import json
import sys
import threading
import time

addr, repo, digest, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
query = sys.argv[5] if len(sys.argv) > 5 else ""
host, port = addr.rsplit(":", 1)
errors, received = [], [0]
lock = threading.Lock()
# Every client connects before any asks, so that all N streams are served at once.
ready = threading.Barrier(n)


def client():
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=600)
        conn.connect()
        ready.wait()
        conn.request("GET", f"/v2/{repo}/blobs/{digest}{query}")
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"{r.status} {r.read()[:200]!r}")
        h, total = hashlib.sha256(), 0
        while True:
            chunk = r.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
            total += len(chunk)
        if "sha256:" + h.hexdigest() != digest:
            raise RuntimeError("wrong bytes")
        with lock:
            received[0] += total
    except Exception as e:  # every failure counts, whatever it is
        with lock:
            errors.append(str(e))


threading.stack_size(256 * 1024)
start = time.time()
threads = [threading.Thread(target=client) for _ in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"clients": n, "errors": len(errors), "first_errors": errors[:3],
                  "bytes": received[0], "seconds": round(time.time() - start, 2)}))

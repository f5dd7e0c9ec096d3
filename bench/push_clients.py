#!/usr/bin/env python3
"""N pushers at once, each pushing an image of its own (a config and LAYERS random layers of
KIB KiB, monolithic uploads, then the manifest) to a registry over HTTP; afterwards every
blob of every image is read back and hash-checked. Prints one JSON line: pushers, push
errors, verify errors (first few reasons), bytes pushed, seconds.

usage: push_clients.py HOST:PORT N [LAYERS] [KIB]
"""
import hashlib
import http.client
import json
import os
import sys
import threading
import time

addr, n = sys.argv[1], int(sys.argv[2])
layers = int(sys.argv[3]) if len(sys.argv) > 3 else 3
kib = int(sys.argv[4]) if len(sys.argv) > 4 else 1024
host, port = addr.rsplit(":", 1)
errors, verify_errors, pushed = [], [], [0]
images = {}
lock = threading.Lock()
run = os.urandom(4).hex()


def request(conn, method, path, body=None, headers=None):
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    return r.status, r.read()


def pusher(i):
    name = f"stress/{run}/img{i}"
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=600)
        blobs = [os.urandom(kib * 1024) for _ in range(layers)]
        config = json.dumps({"architecture": "amd64", "os": "linux", "n": i}).encode()
        descs = []
        for data in [config] + blobs:
            d = "sha256:" + hashlib.sha256(data).hexdigest()
            conn.request("POST", f"/v2/{name}/blobs/uploads/?digest={d}", body=data,
                         headers={"Content-Type": "application/octet-stream"})
            r = conn.getresponse()
            body, status, location = r.read(), r.status, r.getheader("Location", "")
            if status == 202:
                # A registry without one-request uploads (distribution) opens a session: PUT it.
                path = location.split("://", 1)[-1]
                path = path[path.index("/"):] if "://" in location else location
                sep = "&" if "?" in path else "?"
                status, body = request(conn, "PUT", f"{path}{sep}digest={d}", data,
                                       {"Content-Type": "application/octet-stream"})
            if status != 201:
                raise RuntimeError(f"blob {d}: {status} {body[:200]!r}")
            descs.append({"digest": d, "size": len(data)})
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **descs[0]},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **d} for d in descs[1:]],
        }).encode()
        status, body = request(conn, "PUT", f"/v2/{name}/manifests/v1", manifest,
                               {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        if status != 201:
            raise RuntimeError(f"manifest: {status} {body[:200]!r}")
        with lock:
            pushed[0] += sum(d["size"] for d in descs)
            images[name] = [d["digest"] for d in descs]
    except Exception as e:  # every failure counts
        with lock:
            errors.append(str(e))


start = time.time()
threads = [threading.Thread(target=pusher, args=(i,)) for i in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
seconds = time.time() - start
conn = http.client.HTTPConnection(host, int(port), timeout=600)
for name, digests in images.items():
    for d in digests:
        status, body = request(conn, "GET", f"/v2/{name}/blobs/{d}")
        if status != 200 or "sha256:" + hashlib.sha256(body).hexdigest() != d:
            verify_errors.append(f"{name}@{d}: {status}")
print(json.dumps({"pushers": n, "errors": len(errors), "first_errors": errors[:3],
                  "verify_errors": len(verify_errors), "first_verify_errors": verify_errors[:3],
                  "images": len(images), "bytes": pushed[0], "seconds": round(seconds, 2)}))

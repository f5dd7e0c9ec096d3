#!/usr/bin/env python3
"""Hostile clients for the limits tests and the load bench: holds N connections to HOST:PORT,
each either idle (connected, sending nothing) or a slowloris (a request's headers, one byte
every few seconds, never finished), for SECONDS. Prints one JSON line: how many connected,
and how many the server had closed by the end.

usage: slow_clients.py HOST PORT IDLE SLOW SECONDS
"""
import json
import selectors
import socket
import sys
import time

host, port, idle, slow, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
head = b"GET /v2/ HTTP/1.1\r\nHost: ferry\r\nX-Slow: " + b"a" * 4096
conns = []
for i in range(idle + slow):
    try:
        s = socket.create_connection((host, port), timeout=5)
    except OSError:
        continue
    s.setblocking(False)
    conns.append((s, i >= idle, [0]))  # socket, is slowloris, bytes of `head` sent

sel = selectors.DefaultSelector()
for c in conns:
    sel.register(c[0], selectors.EVENT_READ, c)
closed = set()
end = time.time() + seconds
next_drip = 0.0
while time.time() < end:
    for key, _ in sel.select(timeout=0.2):
        s = key.fileobj
        try:
            data = s.recv(65536)
        except OSError:
            data = b""
        if not data:
            closed.add(s.fileno())
            sel.unregister(s)
    if time.time() >= next_drip:
        next_drip = time.time() + 2
        for s, is_slow, sent in conns:
            if is_slow and s.fileno() not in closed and sent[0] < len(head):
                try:
                    s.send(head[sent[0]:sent[0] + 1])
                    sent[0] += 1
                except OSError:
                    pass
print(json.dumps({"connected": len(conns), "closed_by_server": len(closed)}))

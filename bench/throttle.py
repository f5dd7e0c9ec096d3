#!/usr/bin/env python3
"""A TCP forwarder on loopback that caps each connection's download rate, to stand in for a
registry reached over a real network in benchmarks.

Usage: throttle.py LISTEN_PORT TARGET_PORT MBYTES_PER_SECOND
"""
import asyncio
import sys
import time

LISTEN, TARGET, RATE = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) * 1024 * 1024
CHUNK = 64 * 1024


async def pipe(reader, writer, limit):
    # When the next chunk may go: idle time earns no credit, so a kept-alive connection
    # cannot burst.
    next_send = time.monotonic()
    try:
        while data := await reader.read(CHUNK):
            if limit:
                next_send = max(next_send, time.monotonic()) + len(data) / RATE
                wait = next_send - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def handle(client_reader, client_writer):
    try:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", TARGET)
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(pipe(client_reader, up_writer, False), pipe(up_reader, client_writer, True))


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", LISTEN)
    async with server:
        await server.serve_forever()


asyncio.run(main())

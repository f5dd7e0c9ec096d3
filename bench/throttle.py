#!/usr/bin/env python3
"""A TCP forwarder on loopback that caps the download rate, to stand in for a registry reached
over a real network in benchmarks. Like a network link, the rate is shared: all connections
together get MBYTES_PER_SECOND, however many a client opens.

Usage: throttle.py LISTEN_PORT TARGET_PORT MBYTES_PER_SECOND
"""
import asyncio
import sys
import time

LISTEN, TARGET, RATE = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) * 1024 * 1024
CHUNK = 64 * 1024
# When the link is free again: each chunk sent downstream takes its turn on it. Idle time
# earns no credit, so the link cannot burst.
link_free = time.monotonic()


async def pipe(reader, writer, limit):
    global link_free
    try:
        while data := await reader.read(CHUNK):
            if limit:
                link_free = max(link_free, time.monotonic()) + len(data) / RATE
                wait = link_free - time.monotonic()
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

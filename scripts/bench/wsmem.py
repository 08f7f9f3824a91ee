"""Idle WebSocket memory: the forwarder's VmRSS before and after N idle
connections, per connection (docs/benchmarks.md). Each connection is
upgraded and, unless MODE is "quiet", sends one request and reads its
answer first. Loopback only; the connections close at the end.

Usage: wsmem.py PID URL N [quiet|busy]"""
import asyncio
import sys

import websockets

pid, url, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
send = len(sys.argv) < 5 or sys.argv[4] != "quiet"

def rss_kib():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

async def main():
    before = rss_kib()
    conns = []
    for i in range(n):
        ws = await websockets.connect(url, max_size=None, ping_interval=None, subprotocols=["modelforwarder.v1"])
        if send:
            await ws.send('{"type":"request","id":"r","model":"mock","prompt":"hi"}')
            await ws.recv()
        conns.append(ws)
    await asyncio.sleep(2)
    after = rss_kib()
    print(f"{n} idle connections: RSS {before} KiB -> {after} KiB, {(after - before) / n:.2f} KiB each")
    for ws in conns:
        await ws.close()

asyncio.run(main())

"""Memory of connections waiting for their request heads: the forwarder's
VmRSS before and after N connections that each sent part of a head and
then nothing (docs/benchmarks.md). Run the forwarder with a header_timeout
longer than the run. Loopback only; the connections close at the end.

Usage: pending.py PID PORT N"""
import resource
import socket
import sys
import time

pid, port, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_kib():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])


time.sleep(0.5)
before = rss_kib()
conns = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    conns.append(s)
time.sleep(2)
after = rss_kib()
print(f"{n} connections waiting for their heads: VmRSS {before} -> {after} KiB, "
      f"{(after - before) / n:.2f} KiB each")
for s in conns:
    s.close()

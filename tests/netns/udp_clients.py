"""Many client flows for the stranded-client tests, run in the client namespace.

`udp_clients.py HOST PORT FIRST_SRC_PORT COUNT INTERVAL`: COUNT sockets bound to
consecutive source ports, each sending a datagram to HOST:PORT every INTERVAL
seconds until SIGTERM: COUNT conntrack flows that keep being refreshed, as
WireGuard clients retrying their handshakes do."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import time


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    first, count, interval = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    socks = []
    for i in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", first + i))
        socks.append(sock)
    print("ready", flush=True)
    while True:
        for sock in socks:
            # no route for a moment: the next round sends again
            with contextlib.suppress(OSError):
                sock.sendto(b"natfail-stranded-client", (host, port))
        time.sleep(interval)


if __name__ == "__main__":
    main()

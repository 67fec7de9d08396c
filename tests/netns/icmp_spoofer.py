"""A spoofer of ICMP port-unreachable errors, for the probe tests. Run in a
backend namespace; it sees every UDP datagram to HOST:PORT (a raw socket)
and answers each handshake initiation with three forged ICMP errors "from"
HOST, then sends SIGCONT to PID (the paused wireguard-go there), so that the
forged errors certainly arrive before the real response:

    python -m tests.netns.icmp_spoofer HOST PORT MODE PID

MODE "wrong": the errors quote no payload (only the UDP header, all that
RFC 792 asks), a random one, and the initiation with another sender index.
MODE "right": all three quote the initiation exactly, as a real one would.
It prints "ready", then "spoofed" after each initiation. IPv4 only.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

from scapy.layers.inet import ICMP, IP
from scapy.packet import Raw


def _quotes(mode: str, header: bytes, payload: bytes) -> list[bytes]:
    if mode == "right":
        return [header + payload] * 3
    other_index = payload[:4] + bytes(b ^ 0xFF for b in payload[4:8]) + payload[8:]
    return [header, header + payload[:4] + os.urandom(len(payload) - 4), header + other_index]


def main() -> None:
    host, port, mode, pid = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    listen = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    send = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    print("ready", flush=True)
    while True:
        packet, _ = listen.recvfrom(65535)
        ihl = (packet[0] & 0x0F) * 4
        udp, payload = packet[ihl : ihl + 8], packet[ihl + 8 :]
        if socket.inet_ntoa(packet[16:20]) != host or int.from_bytes(udp[2:4], "big") != port:
            continue
        if len(payload) != 148 or payload[0] != 1:
            continue
        source = socket.inet_ntoa(packet[12:16])
        for quote in _quotes(mode, packet[:ihl] + udp, payload):
            error = IP(src=host, dst=source) / ICMP(type=3, code=3) / Raw(quote)
            send.sendto(bytes(error), (source, 0))
        # The errors are delivered within microseconds; this is ample.
        time.sleep(0.2)
        os.kill(pid, signal.SIGCONT)
        print("spoofed", flush=True)


if __name__ == "__main__":
    main()

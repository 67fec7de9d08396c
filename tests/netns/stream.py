"""A numbered UDP stream for the fault tests, run inside lab namespaces.

`stream.py send HOST PORT SRC_PORT INTERVAL SECONDS`: one fixed source port
(one conntrack flow, as a WireGuard client has), datagrams b"NFSEQ" + seq;
prints "seq monotonic_send_time" lines at the end.
`stream.py record`: prints the seq of every such datagram this namespace
receives (AF_PACKET, so it sees them even though wireguard-go owns the
port), until SIGTERM. CLOCK_MONOTONIC is one clock for every namespace."""

from __future__ import annotations

import signal
import socket
import struct
import sys
import time

MAGIC = b"NFSEQ"


def send(host: str, port: int, src_port: int, interval: float, seconds: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", src_port))
    sent: list[tuple[int, float]] = []
    end = time.monotonic() + seconds
    seq = 0
    while time.monotonic() < end:
        stamp = time.monotonic()
        try:
            sock.sendto(MAGIC + struct.pack("!Q", seq), (host, port))
            sent.append((seq, stamp))
        except OSError:
            pass  # an ICMP error from an earlier datagram; the stream goes on
        seq += 1
        time.sleep(interval)
    print("\n".join(f"{s} {t:.6f}" for s, t in sent), flush=True)


def record() -> None:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
    sock.settimeout(0.2)
    seqs: list[int] = []
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)
    while not stop:
        try:
            packet = sock.recv(2048)
        except (TimeoutError, InterruptedError):
            continue
        ihl = (packet[0] & 0x0F) * 4
        if packet[9] != socket.IPPROTO_UDP:
            continue
        payload = packet[ihl + 8 :]
        if payload.startswith(MAGIC) and len(payload) >= len(MAGIC) + 8:
            seqs.append(struct.unpack("!Q", payload[len(MAGIC) : len(MAGIC) + 8])[0])
    print("\n".join(map(str, seqs)), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(
            sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
        )
    else:
        record()

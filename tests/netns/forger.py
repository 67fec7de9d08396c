"""A fake WireGuard server for the probe tests: it answers every initiation
with a response that is right in every public part (type, indices, mac1
keyed by the initiator's public key, which anyone can compute) but was made
without the server's private key. Run it in a backend namespace:

    python -m tests.netns.forger HOST PORT PROBE_PUBLIC_KEY_B64
"""

from __future__ import annotations

import base64
import os
import socket
import sys

from tests.unit.wg_responder import Rejected, Responder


def main() -> None:
    host, port, probe_public = sys.argv[1], int(sys.argv[2]), base64.b64decode(sys.argv[3])
    impostor = Responder(os.urandom(32))
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    print("ready", flush=True)
    while True:
        data, addr = sock.recvfrom(2048)
        try:
            consumed = impostor.consume_initiation(data, impostor=probe_public)
        except Rejected:
            continue
        sock.sendto(impostor.create_response(consumed), addr)


if __name__ == "__main__":
    main()

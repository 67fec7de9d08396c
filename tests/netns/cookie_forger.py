"""A fake WireGuard server that knows only the server's PUBLIC key: it
answers every initiation with a valid cookie reply (the cookie key derives
from the public key, so anyone can make one) and never with a response.
Run it in a backend namespace:

    python -m tests.netns.cookie_forger HOST PORT SERVER_PUBLIC_KEY_B64

It prints "ready", then one line per initiation: "initiation mac2=none",
"mac2=valid" (made with the cookie it sent to that address and port) or
"mac2=invalid".
"""

from __future__ import annotations

import base64
import os
import socket
import sys

from tests.unit.wg_responder import MAC, forge_cookie_reply


def main() -> None:
    host, port, server_public = sys.argv[1], int(sys.argv[2]), base64.b64decode(sys.argv[3])
    secret = os.urandom(32)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    print("ready", flush=True)
    while True:
        data, addr = sock.recvfrom(2048)
        if len(data) != 148 or data[0] != 1:
            continue
        # Bound to the source address and port, as WireGuard's cookies are.
        cookie = MAC(secret, repr(addr[:2]).encode())
        if data[132:] == bytes(16):
            mac2 = "none"
        elif data[132:] == MAC(cookie, data[:132]):
            mac2 = "valid"
        else:
            mac2 = "invalid"
        print(f"initiation mac2={mac2}", flush=True)
        sock.sendto(forge_cookie_reply(server_public, data, cookie), addr)


if __name__ == "__main__":
    main()

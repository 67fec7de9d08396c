"""Puts a real wireguard-go under load, then probes it: run in the gateway
namespace by the probe tests.

    python -m tests.netns.cookie_load HOST PORT SERVER_PUBLIC_B64 PROBE_KEY_FILE WG_PID [PSK_FILE]

wireguard-go is "under load" for a second after it sees 128 handshake
messages queued (QueueHandshakeSize / 8; UnderLoadAfterTime): then it
answers initiations without a valid mac2 with a cookie reply. A burst of
initiations from unknown peers (valid mac1, so each costs it a DH) does
that deterministically: stopped (SIGSTOP), wireguard-go lets them pile up
in its socket, and on SIGCONT it reads them faster than it can handle them.
The probe follows at once. Should the machine stall past that second, the
probe is plainly answered ("ok") and the whole is tried again.

Prints one line per probe: "REASON up|down".
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import signal
import socket
import sys
from pathlib import Path

from natfail import config as cfg
from natfail.core import noise, tai64n
from natfail.io.probe_transport import UP, UdpProbeTransport
from natfail.io.timestamps import TimestampClock

BURST = 400
ATTEMPTS = 5


def _burst(server_public: bytes) -> list[bytes]:
    stamp = tai64n.tai64n(0)
    return [
        noise.new_initiation(noise.Keys(os.urandom(32), server_public), timestamp=stamp)[0]
        for _ in range(BURST)
    ]


async def main() -> None:
    host, port, server_b64, key_file, pid = sys.argv[1:6]
    server_public = base64.b64decode(server_b64)
    psk = cfg.load_key_file(Path(sys.argv[6])) if len(sys.argv) > 6 else bytes(32)
    keys = noise.Keys(cfg.load_key_file(Path(key_file)), server_public, psk)
    target = cfg.Endpoint(ipaddress.ip_address(host), int(port))
    transport = UdpProbeTransport(TimestampClock(None))
    flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flood.connect((host, int(port)))
    for _ in range(ATTEMPTS):
        # Two bursts: the first one also warms wireguard-go's buffer pools,
        # which on a fresh process makes it read slowly enough to keep up.
        for burst in (_burst(server_public), _burst(server_public)):
            os.kill(int(pid), signal.SIGSTOP)
            try:
                for message in burst:
                    flood.send(message)
            finally:
                os.kill(int(pid), signal.SIGCONT)
            await asyncio.sleep(0.05)
        result = await transport.probe(keys, target, 3.0)
        print(result.reason, "up" if result.up else "down", flush=True)
        if result.reason != UP:
            return


if __name__ == "__main__":
    asyncio.run(main())

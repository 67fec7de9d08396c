"""CPU cost of one probe: build_initiation + consume_response of a valid response.

Responses are made ahead of time by the test responder (tests/unit/wg_responder.py),
outside the measured loop. build_initiation is deterministic in its inputs
(ephemeral key, sender index, timestamp), so the measured loop rebuilds each
initiation from the same inputs and gets the handshake that matches its
response. Every measured consume must be Accepted, or the run fails.

Writes bench/results/probe.json. Usage: .venv/bin/python bench/bench_probe.py [-n PROBES]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "unit"), str(ROOT / "bench")]

from common import cpu_model, write_results  # noqa: E402
from common import machine as machine_info  # noqa: E402
from wg_responder import Responder  # type: ignore[import-not-found,unused-ignore]  # noqa: E402

from natfail import exitcodes  # noqa: E402
from natfail.core import noise, tai64n  # noqa: E402

TARGET_US = 150.0
RESULTS = ROOT / "bench" / "results" / "probe.json"


def per_call_us(fn: Callable[[], object], number: int, repeat: int = 5) -> tuple[float, float]:
    """(best, median) CPU microseconds per call over ``repeat`` rounds."""
    rounds = []
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(number):
            fn()
        rounds.append((time.process_time() - start) / number * 1e6)
    return min(rounds), statistics.median(rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--probes", type=int, default=1000, help="probes per round")
    parser.add_argument("-r", "--rounds", type=int, default=9)
    args = parser.parse_args()
    n: int = args.probes

    server_private = os.urandom(32)
    keys = noise.Keys(os.urandom(32), noise.public_key(server_private), os.urandom(32))
    responder = Responder(server_private)
    responder.add_peer(keys.public_key, keys.preshared_key)

    # Inputs, initiations and responses, all ahead of time.
    stamp = tai64n.next_timestamp(time.time_ns(), None)
    inputs = []
    for i in range(n):
        inputs.append((i + 1, stamp, os.urandom(32)))
        stamp = tai64n.successor(stamp)
    responses = []
    for index, timestamp, ephemeral in inputs:
        message, _ = noise.build_initiation(
            keys, sender_index=index, timestamp=timestamp, ephemeral_private=ephemeral
        )
        responses.append(responder.respond(message))
    handshakes = [
        noise.build_initiation(keys, sender_index=i, timestamp=t, ephemeral_private=e)[1]
        for i, t, e in inputs
    ]

    def measure(body: Callable[[], int]) -> tuple[float, float]:
        rounds = []
        for _ in range(args.rounds):
            start = time.process_time()
            accepted = body()
            rounds.append((time.process_time() - start) / n * 1e6)
            if accepted != n:
                raise SystemExit(f"only {accepted} of {n} responses accepted")
        return min(rounds), statistics.median(rounds)

    def probes() -> int:
        accepted = 0
        build, consume = noise.build_initiation, noise.consume_response
        accepted_type = noise.Accepted
        for (index, timestamp, ephemeral), response in zip(inputs, responses, strict=True):
            _, handshake = build(
                keys, sender_index=index, timestamp=timestamp, ephemeral_private=ephemeral
            )
            if type(consume(handshake, keys, response)) is accepted_type:
                accepted += 1
        return accepted

    def builds() -> int:
        build = noise.build_initiation
        for index, timestamp, ephemeral in inputs:
            build(keys, sender_index=index, timestamp=timestamp, ephemeral_private=ephemeral)
        return n

    def consumes() -> int:
        consume, accepted_type = noise.consume_response, noise.Accepted
        accepted = 0
        for h, r in zip(handshakes, responses, strict=True):
            accepted += type(consume(h, keys, r)) is accepted_type
        return accepted

    probe_best, probe_median = measure(probes)
    build_best, _ = measure(builds)
    consume_best, _ = measure(consumes)

    # What the daemon adds per probe: OS randomness and the timestamp.
    last = [stamp]

    def fresh_build() -> None:
        last[0] = tai64n.next_timestamp(time.time_ns(), last[0])
        noise.new_initiation(keys, timestamp=last[0])

    fresh_best, _ = per_call_us(fresh_build, n, args.rounds)

    # Where the time goes: the primitives, per call. All cryptography is
    # libsodium's (PyNaCl's nacl.bindings) and hashlib's BLAKE2s.
    raw = os.urandom(32)
    peer_raw = noise.public_key(os.urandom(32))
    key = os.urandom(32)
    sealed_empty = noise.aead_seal(key, 0, b"", raw)
    primitives = {
        "x25519_base_libsodium": per_call_us(lambda: noise.public_key(raw), n)[0],
        "x25519_dh_libsodium": per_call_us(lambda: noise.dh(raw, peer_raw), n)[0],
        "chacha20poly1305_seal_32B_libsodium": per_call_us(
            lambda: noise.aead_seal(key, 0, raw, key), n
        )[0],
        "chacha20poly1305_open_0B_libsodium": per_call_us(
            lambda: noise.aead_open(key, 0, sealed_empty, raw), n
        )[0],
        "hmac_blake2s": per_call_us(lambda: noise.hmac(key, raw), n)[0],
        "kdf2": per_call_us(lambda: noise.kdf2(key, raw), n)[0],
    }
    x25519_floor = primitives["x25519_base_libsodium"] + 3 * primitives["x25519_dh_libsodium"]

    result = {
        "probe_us": round(probe_best, 1),
        "probe_us_median": round(probe_median, 1),
        "build_initiation_us": round(build_best, 1),
        "consume_response_us": round(consume_best, 1),
        "build_with_urandom_and_timestamp_us": round(fresh_best, 1),
        "backends_per_core_at_1hz": int(1e6 / probe_best),
        "target_us": TARGET_US,
        "meets_target": probe_best <= TARGET_US,
        "over_target_us": round(max(0.0, probe_best - TARGET_US), 1),
        "x25519_share_us": round(x25519_floor, 1),
        "primitives_us": {k: round(v, 2) for k, v in primitives.items()},
        "probes_per_round": n,
        "rounds": args.rounds,
        "clock": "time.process_time, best of rounds",
        "python": platform.python_version(),
        "machine": machine_info(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
    }
    write_results(RESULTS, result)

    print(
        f"probe (build + consume): {probe_best:.1f} us best, {probe_median:.1f} us median"
        f" (build {build_best:.1f}, consume {consume_best:.1f})"
    )
    print(f"  with os.urandom + next_timestamp: build {fresh_best:.1f} us")
    print(f"  one core probes {int(1e6 / probe_best)} backends at 1 Hz")
    print(
        f"  X25519 alone (base + 3 DH, libsodium): {x25519_floor:.1f} us;"
        f" target {TARGET_US:.0f} us: "
        + (
            "met"
            if probe_best <= TARGET_US
            else f"missed by {probe_best - TARGET_US:.1f} us "
            f"({(probe_best / TARGET_US - 1) * 100:.0f}%)"
        )
    )
    for name, us in primitives.items():
        print(f"  {name}: {us:.2f} us")
    print(f"written to {RESULTS.relative_to(ROOT)}")
    return exitcodes.OK


if __name__ == "__main__":
    raise SystemExit(main())

"""Removing one backend's conntrack entries: natfail (kernel-side filtered flushes, a
constant number of netlink requests) against the shell way
(``conntrack -D -p udp --orig-port-dst 51820``, one delete per entry), at 1k, 10k and
100k flows, side by side in one run.

Flows are created fast: ctnetlink IPCTNL_MSG_CT_NEW messages built from one encoded
template (ports patched in), many per sendmsg, no acks. Each flow looks like a client
flow DNATed to the old backend: orig client:port -> public:51820, reply
backend:51820 -> client:port, with the backend's mark; plus as many unrelated flows
that must survive. Runs in a fresh network namespace. Writes bench/results/conntrack.json.
Usage: .venv/bin/python bench/bench_conntrack.py [--sizes 1000,10000,100000]
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import machine as machine_info  # noqa: E402
from common import write_results  # noqa: E402
from nsrun import reexec_in_fresh_netns  # noqa: E402
from pyroute2.netlink import NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST  # noqa: E402
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK  # noqa: E402
from pyroute2.netlink.nfnetlink.nfctsocket import (  # noqa: E402
    IPCTNL_MSG_CT_NEW,
    NFCTAttrTuple,
    nfct_msg,
)

from natfail import exitcodes  # noqa: E402
from natfail.config import Endpoint  # noqa: E402
from natfail.core.ruleset import backend_mark  # noqa: E402
from natfail.io.conntrack import NetlinkConntrack  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "conntrack.json"
NETLINK_NETFILTER = 12
OLD = Endpoint.parse("10.0.0.2:51820")
MARK = backend_mark("wg0", "a")
MAGIC = 0xBEEF


def _template(client: str, dst: str, reply_src: str, mark: int, dport: int) -> bytes:
    msg = nfct_msg.create_from(
        tuple_orig=NFCTAttrTuple(saddr=client, daddr=dst, proto=17, sport=MAGIC, dport=dport),
        tuple_reply=NFCTAttrTuple(
            saddr=reply_src, daddr=client, proto=17, sport=dport, dport=MAGIC
        ),
        timeout=600,
        mark=mark or None,
    )
    msg["header"]["type"] = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL
    msg["nfgen_family"] = socket.AF_INET
    msg.encode()
    return bytes(msg.data)


def create_flows(n: int, client_base: int, mark: int, reply_src: str, dport: int) -> None:
    """n UDP entries from 100.64.x.y (ports 1024..), in batches of one sendmsg each."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.bind((0, 0))
    tpl = bytearray(_template("100.64.0.1", "203.0.113.10", reply_src, mark, dport))
    magic = struct.pack("!H", MAGIC)
    ports = [i for i in range(len(tpl) - 1) if tpl[i : i + 2] == magic]
    ip = socket.inet_aton("100.64.0.1")
    ips = [i for i in range(len(tpl) - 3) if tpl[i : i + 4] == ip]
    batch = bytearray()
    for k in range(n):
        idx = client_base + k
        host = socket.inet_aton(f"100.{64 + (idx >> 16) % 64}.{(idx >> 8) & 255}.{idx & 255}")
        for off in ports:
            tpl[off : off + 2] = struct.pack("!H", 1024 + (idx % 60000))
        for off in ips:
            tpl[off : off + 4] = host
        tpl[8:12] = struct.pack("=I", k + 1)  # sequence
        batch += tpl
        if len(batch) > 60000:
            s.send(batch)
            batch.clear()
    if batch:
        s.send(batch)
    s.close()


def count(mark: int | None = None) -> int:
    out = subprocess.run(["conntrack", "-C"], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def wait_count(expected: int) -> int:
    for _ in range(200):
        c = count()
        if c >= expected:
            return c
        time.sleep(0.02)
    return count()


def run_size(n: int, ct: NetlinkConntrack) -> dict[str, object]:
    out: dict[str, object] = {"flows": n}
    for way in ("natfail", "shell"):
        subprocess.run(["conntrack", "-F"], capture_output=True, check=False)
        # the old backend's flows, plus the same number of another backend's (must stay)
        create_flows(n, 0, MARK, "10.0.0.2", 51820)
        create_flows(n, 1 << 20, backend_mark("wg0", "b"), "10.0.0.3", 51821)
        total = wait_count(2 * n)
        if total != 2 * n:
            raise SystemExit(f"created {total} entries, wanted {2 * n}")
        t = time.perf_counter()
        if way == "natfail":
            res = ct.remove_backend(MARK, OLD)
            extra = {"netlink_requests": res.requests, "passes": res.passes}
        else:
            subprocess.run(
                ["conntrack", "-D", "-p", "udp", "--orig-port-dst", "51820"],
                capture_output=True,
                check=False,
            )
            extra = {}
        dt = time.perf_counter() - t
        left = count()
        if left != n:
            raise SystemExit(f"{way}: {left} entries left, wanted {n} (the other backend's)")
        out[way] = {"seconds": round(dt, 4), **extra}
    nat = out["natfail"]["seconds"]  # type: ignore[index]
    sh = out["shell"]["seconds"]  # type: ignore[index]
    out["ratio_natfail_to_shell"] = round(nat / sh, 4) if sh else None
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000,100000")
    args = parser.parse_args()
    reexec_in_fresh_netns()
    ct = NetlinkConntrack()
    rows = [run_size(int(s), ct) for s in args.sizes.split(",")]
    subprocess.run(["conntrack", "-F"], capture_output=True, check=False)
    last = rows[-1]
    result = {
        "what": "remove one backend's UDP flows; as many flows of another backend stay",
        "machine": machine_info(),
        "shell_way": "conntrack -D -p udp --orig-port-dst 51820",
        "rows": rows,
        "target": "100k flows: natfail at most 0.2 of the shell way's time",
        "meets_target": last["flows"] != 100000
        or (last["ratio_natfail_to_shell"] is not None and last["ratio_natfail_to_shell"] <= 0.2),  # type: ignore[operator]
    }
    write_results(RESULTS, result)
    print(json.dumps(result, indent=2))
    return exitcodes.OK


if __name__ == "__main__":
    raise SystemExit(main())

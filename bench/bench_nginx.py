"""natfail against NGINX's stream module as a UDP proxy, in one lab and one run.

Throughput of the WireGuard tunnel (iperf3, TCP, client -> server at 10.99.0.1 in the
backend's namespace) three ways:

* direct: the client's endpoint is backend a itself (10.0.0.2:51820), reached through
  the gateway by plain routing (a route to 10.0.0.0/24 in the client namespace only for
  this case; no firewall rule, no NAT in the gateway);
* natfail: the daemon running, the client's endpoint the public address, kernel DNAT;
* NGINX: the daemon stopped and natfail's tables removed; nginx (Debian's, with
  libnginx-mod-stream) in the gateway namespace listens on the public address:51820/udp
  and proxies to an upstream of backend a (primary, max_fails=1 fail_timeout=10s) and
  b (backup), proxy_timeout 10s, responses unlimited, `listen ... udp reuseport` so
  that one client always reaches the same worker (without it, a client's packets
  spread over the workers, each with its own session and upstream state).

Then the client's outage when the backend carrying the tunnel hangs (SIGSTOP: nothing
answers, no ICMP error) and when it dies (wireguard-go killed: ICMP port unreachable),
under natfail and under NGINX, with the same method as bench_failover.py: ping every
50 ms through the tunnel, time from the fault to the first reply after it. The wait is
capped (60 s); a capped outage is recorded as ">= 60 s". Before the NGINX part both
backends restart, so that no WireGuard state of the natfail part carries over.

Writes bench/results/nginx.json. Usage (root): .venv/bin/python bench/bench_nginx.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_failover import EXTRA, PROBE  # noqa: E402
from common import RESULTS_DIR, Daemon, Pinger, machine, write_results  # noqa: E402

from natfail import exitcodes  # noqa: E402
from natfail.lab import (  # noqa: E402
    GATEWAY_WAN_V4,
    PUBLIC_PORT,
    PUBLIC_V4,
    SERVER_TUNNEL_V4,
    Lab,
    LabBackend,
    wait_until,
)

RESULTS = RESULTS_DIR / "nginx.json"
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
OUTAGE_CAP = 60.0
NGINX_SETTINGS = {
    "primary": "server 10.0.0.2:51820 max_fails=1 fail_timeout=10s",
    "backup": "server 10.0.0.3:51820 backup",
    "proxy_timeout": "10s",
    "proxy_responses": "unset (unlimited)",
    "worker_processes": "auto",
    "listen": "udp reuseport (one client always reaches the same worker)",
}


def nginx_conf(directory: Path, a: LabBackend, b: LabBackend) -> str:
    load = f"load_module {STREAM_MODULE};\n" if STREAM_MODULE.exists() else ""
    return f"""{load}daemon off;
worker_processes {NGINX_SETTINGS["worker_processes"]};
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 1024; }}
stream {{
    upstream wireguard {{
        server {a.address} max_fails=1 fail_timeout=10s;
        server {b.address} backup;
    }}
    server {{
        listen {PUBLIC_V4}:{PUBLIC_PORT} udp reuseport;
        proxy_pass wireguard;
        proxy_timeout {NGINX_SETTINGS["proxy_timeout"]};
    }}
}}
"""


def iperf(lab: Lab, seconds: int) -> dict[str, Any]:
    cp = lab.exec(
        lab.client,
        ["iperf3", "-c", SERVER_TUNNEL_V4, "-t", str(seconds), "-O", "1", "-J"],
        timeout=seconds + 30,
        check=False,
    )
    data = json.loads(cp.stdout)
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    end = data["end"]
    return {
        "mbit_s": round(end["sum_received"]["bits_per_second"] / 1e6, 1),
        "sent_mbit_s": round(end["sum_sent"]["bits_per_second"] / 1e6, 1),
        "retransmits": end["sum_sent"].get("retransmits"),
        "seconds": seconds,
    }


def ns_cpu_seconds(lab: Lab, comm: str) -> float:
    """User + system CPU seconds of every process called ``comm`` in the gateway ns."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = lab.exec(lab.gateway, ["ip", "netns", "pids", lab.gateway.ns], check=False).stdout
    for pid in pids.split():
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat[stat.find("(") + 1 : stat.rfind(")")] != comm:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def carrying(lab: Lab, seconds: float = 1.0) -> list[str]:
    before = lab.transfers()
    lab.client_ping(count=3, interval=0.1, timeout=5)
    time.sleep(seconds / 10)
    return lab.carrying_backends(before)


def outage(lab: Lab, victim: LabBackend, how: str) -> dict[str, Any]:
    """The client's outage when ``victim`` (the backend carrying the tunnel) dies
    (``kill``: wireguard-go killed, the port answers ICMP unreachable) or hangs
    (``hang``: SIGSTOP, nothing answers, no ICMP error). A hung victim is resumed
    after the measurement."""
    pinger = Pinger(lab, 0.05)
    try:
        if pinger.first_reply_after(time.time(), 20.0) is None:
            raise RuntimeError(f"{how}: no pings through the tunnel before it")
        time.sleep(1.0)
        killed = time.time()
        if how == "kill":
            victim.stop()
        else:
            victim.pause()
        back = pinger.first_reply_after(time.time(), OUTAGE_CAP)
    finally:
        pinger.stop()
        if how == "hang":
            victim.resume()
    return {
        "victim": victim.name,
        "how": how,
        "client_endpoint_after": lab.client_endpoint(),
        "outage_ms": round((back - killed) * 1000, 1) if back else None,
        "capped": back is None,
        "cap_s": OUTAGE_CAP,
        "shown": f"{(back - killed):.1f} s" if back else f">= {OUTAGE_CAP:g} s",
    }


def carrier(lab: Lab) -> LabBackend:
    names = carrying(lab)
    if len(names) != 1:
        raise RuntimeError(f"the tunnel is carried by {names}, not by one backend")
    return lab.backend(names[0])


def remove_natfail_tables(lab: Lab) -> list[str]:
    tables = lab.exec(lab.gateway, ["nft", "list", "tables"]).stdout.splitlines()
    removed = [t.strip() for t in tables if "natfail" in t]
    for t in removed:
        lab.exec(lab.gateway, ["nft", "delete", "table", *t.split()[1:]])
    lab.flush_conntrack()
    return removed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-t", "--seconds", type=int, default=10, help="per iperf3 run")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_nginx: run as root", file=sys.stderr)
        return exitcodes.USAGE
    if shutil.which("nginx") is None or shutil.which("iperf3") is None:
        print(
            "bench_nginx: needs nginx, libnginx-mod-stream and iperf3 (scripts/bench "
            "installs them)",
            file=sys.stderr,
        )
        return exitcodes.USAGE
    result: dict[str, Any] = {
        "what": "WireGuard through natfail's DNAT vs through NGINX stream (UDP proxy): "
        "iperf3 TCP throughput in the tunnel, and the client's outage when the "
        "primary dies",
        "machine": machine(),
        "nginx_version": subprocess.run(
            ["nginx", "-v"], capture_output=True, text=True, check=False
        ).stderr.strip(),
        "iperf3_version": subprocess.run(
            ["iperf3", "-v"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[0],
        "nginx": NGINX_SETTINGS,
        "natfail_probe": PROBE,
        "direct_means": "client endpoint = backend a, routed by the gateway without NAT or "
        "firewall rules",
    }
    nginx_dir = Path(tempfile.mkdtemp(prefix="natfail-bench-nginx-"))
    nginx: subprocess.Popen[str] | None = None
    daemon: Daemon | None = None
    try:
        with Lab(backends=2, ipv6=False) as lab:
            a, b = lab.backends[0], lab.backends[1]
            servers = [
                lab.popen(
                    x,
                    ["iperf3", "-s", "-B", SERVER_TUNNEL_V4],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for x in (a, b)
            ]
            try:
                time.sleep(0.5)
                throughput: dict[str, Any] = {}

                # 1. direct, routed through the gateway, no NAT
                cl = lab.client
                lab.exec(cl, ["ip", "route", "add", "10.0.0.0/24", "via", GATEWAY_WAN_V4])
                lab.client_rehandshake()
                lab.exec(
                    cl,
                    [
                        "wg",
                        "set",
                        cl.wg_if,
                        "peer",
                        lab.server_key.public_b64,
                        "endpoint",
                        a.address,
                    ],
                )
                if not lab.client_ping(count=3, interval=0.1, timeout=8):
                    raise RuntimeError("direct: no pings through the tunnel")
                throughput["direct"] = iperf(lab, args.seconds)
                print(f"direct:  {throughput['direct']['mbit_s']} Mbit/s", flush=True)
                lab.exec(cl, ["ip", "route", "del", "10.0.0.0/24"])
                lab.client_rehandshake()

                # 2. natfail
                config = lab.write_config(extra_service=EXTRA)
                daemon = Daemon(lab, config, lab.dir / "natfail.log")
                if not daemon.wait_active("a", 20):
                    raise RuntimeError("natfail did not select backend a")
                if not lab.client_ping(count=3, interval=0.1, timeout=8):
                    raise RuntimeError("natfail: no pings through the tunnel")
                throughput["natfail"] = iperf(lab, args.seconds)
                throughput["natfail"]["carried_by"] = carrying(lab)
                print(f"natfail: {throughput['natfail']['mbit_s']} Mbit/s", flush=True)
                out_natfail = {"hang": outage(lab, carrier(lab), "hang")}
                print(f"natfail outage, hung backend: {out_natfail['hang']['shown']}", flush=True)
                out_natfail["kill"] = outage(lab, carrier(lab), "kill")
                print(f"natfail outage, killed backend: {out_natfail['kill']['shown']}", flush=True)
                daemon.stop()
                result["natfail_tables_removed"] = remove_natfail_tables(lab)

                # 3. NGINX. The backends start afresh: b still holds the session
                # natfail's failover gave it, and with natfail's SNAT gone its next
                # keepalive or handshake would reach the client from 10.0.0.3 and
                # make the client roam there (measured: the tunnel never came back).
                for x in (a, b):
                    x.stop()
                    x.start()
                conf = nginx_dir / "nginx.conf"
                conf.write_text(nginx_conf(nginx_dir, a, b))
                lab.exec(
                    lab.gateway,
                    [
                        "nginx",
                        "-t",
                        "-p",
                        str(nginx_dir),
                        "-e",
                        str(nginx_dir / "error.log"),
                        "-c",
                        str(conf),
                    ],
                )
                nginx = lab.popen(
                    lab.gateway,
                    [
                        "nginx",
                        "-p",
                        str(nginx_dir),
                        "-e",
                        str(nginx_dir / "error.log"),
                        "-c",
                        str(conf),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                if not wait_until(lambda: (nginx_dir / "nginx.pid").exists(), 5):
                    raise RuntimeError(
                        "nginx did not start: " + (nginx_dir / "error.log").read_text()[-500:]
                    )
                time.sleep(0.3)
                lab.client_rehandshake()
                if not lab.client_ping(count=3, interval=0.1, timeout=8):
                    raise RuntimeError("nginx: no pings through the tunnel")
                cpu0 = ns_cpu_seconds(lab, "nginx")
                throughput["nginx"] = iperf(lab, args.seconds)
                cpu1 = ns_cpu_seconds(lab, "nginx")
                throughput["nginx"]["nginx_cpu_s"] = round(cpu1 - cpu0, 2)
                throughput["nginx"]["carried_by"] = carrying(lab)
                print(
                    f"nginx:   {throughput['nginx']['mbit_s']} Mbit/s "
                    f"(nginx used {cpu1 - cpu0:.1f} CPU s)",
                    flush=True,
                )
                out_nginx = {"hang": outage(lab, carrier(lab), "hang")}
                print(f"nginx outage, hung backend: {out_nginx['hang']['shown']}", flush=True)
                out_nginx["kill"] = outage(lab, carrier(lab), "kill")
                print(f"nginx outage, killed backend: {out_nginx['kill']['shown']}", flush=True)
                result["nginx_error_log_tail"] = (
                    (nginx_dir / "error.log").read_text().splitlines()[-40:]
                )
            finally:
                for s in servers:
                    s.kill()
                    s.wait(5)
                if nginx is not None and nginx.poll() is None:
                    nginx.terminate()
                    try:
                        nginx.wait(5)
                    except subprocess.TimeoutExpired:
                        nginx.kill()
                        nginx.wait(5)
                if daemon is not None:
                    daemon.stop()
    finally:
        shutil.rmtree(nginx_dir, ignore_errors=True)

    nat = throughput["natfail"]["mbit_s"]
    result["throughput"] = throughput
    result["throughput_ratio_nginx_to_natfail"] = round(throughput["nginx"]["mbit_s"] / nat, 3)
    result["throughput_ratio_natfail_to_direct"] = round(nat / throughput["direct"]["mbit_s"], 3)
    result["outage"] = {"natfail": out_natfail, "nginx": out_nginx}
    write_results(RESULTS, result)
    print(json.dumps({k: result[k] for k in ("throughput", "outage")}, indent=2))
    return exitcodes.OK


if __name__ == "__main__":
    raise SystemExit(main())

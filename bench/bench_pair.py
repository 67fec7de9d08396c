"""The gateway pair: the client's outage when the master gateway dies, and how fast the
follower's DNAT follows the decider's switches.

One pair lab (natfail.lab.pair.PairLab): the client, two gateways under keepalived
(VRRPv3, advert_int 0.2 s, ``nopreempt``, priorities 150 and 100), two wireguard-go
backends with `natfail agent`, natfail with ``[daemon] pair = true`` on both gateways
(probe every 0.3 s, timeout 0.2 s, rise 1, fall 2). IPv4 only.

Two parts:

* ``takeover``: the client pings through the tunnel every 20 ms; the master gateway is
  crashed (``kill_gateway``: every process in its namespace SIGKILLed, its links down).
  The outage is the longest silence of the client's replies across the kill (the last
  reply before it to the first one after it). Also: when the other gateway was seen
  holding the VIPs (polled every 10 ms), when its natfail said ``role decide``, the
  backend before and after, whether the client re-handshook (the carrying backend's
  latest handshake with the client changed) and which backend carried the pings after.
  Then the dead gateway comes back as a rebooted machine (links up without the VIPs,
  no conntrack, keepalived started, natfail started with no nft table and no
  state.json/clients.json) and follows the new master. Two scenarios:

  - ``plain``: the service on backend a (the preferred one);
  - ``rebooted-backup``: the master is switched to backend b first, then the backup is
    rebooted as above (stopped, its table and state deleted, started again), and once
    it follows b the master is crashed. A natfail deciding alone would have chosen a
    (by priority) on the rebooted backup, and the client would have waited for a new
    handshake after the takeover.

  Target: outage ≤ the VRRP master-down interval of the backup + 0.1 s (3 * advert_int
  + skew, (256 - 100) * 0.2 / 256 = 0.12 s for gw2 and 0.08 s for gw1: 0.72 s + 0.1 s
  = 0.82 s taken for both), with no client re-handshake.

* ``follow``: ``natfailctl switch wg0 X`` on the master, X the backend that is not
  active (so alternating); from the command's return until (1) the follower's
  ``status`` shows X active and (2) the follower's nftables DNAT map (``nft -j list
  map inet natfail dnat4`` in its namespace) sends the public endpoint to X. Both are
  polled in turn; one turn (an ``nft`` process and a status call) is the resolution,
  recorded as ``poll_turn_ms``. Target: ≤ one probe interval (0.3 s): in a pair the
  follower polls the agents every probe interval.

The machine's load average is recorded before and after each part (CI and other
benchmarks may share the machine).

Writes bench/results/pair.json and, with matplotlib, docs/images/pair.png.
Usage (root): .venv/bin/python bench/bench_pair.py [-n TAKEOVERS] [--reboot-n N]
[--switches N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import RESULTS_DIR, Pinger, machine, stats, write_results  # noqa: E402

from natfail import exitcodes  # noqa: E402
from natfail.lab import DaemonRunner, probe_table, wait_until  # noqa: E402
from natfail.lab.pair import PairAgents, PairGateway, PairLab  # noqa: E402

RESULTS = RESULTS_DIR / "pair.json"
IMAGE = ROOT / "docs" / "images" / "pair.png"
ADVERT_INT = 0.2
INTERVAL, TIMEOUT, RISE, FALL = 0.3, 0.2, 1, 2
PROBE = {"interval": INTERVAL, "timeout": TIMEOUT, "rise": RISE, "fall": FALL}
PING_INTERVAL = 0.02
RECOVERY_LIMIT = 30.0
FOLLOW_LIMIT = 5.0
MASTER_DOWN_S = round(3 * ADVERT_INT + (256 - 100) * ADVERT_INT / 256, 3)
"""The master-down interval of the lower-priority gateway (the longer of the two)."""
TARGETS = {
    "takeover_outage_max_s": round(MASTER_DOWN_S + 0.1, 3),
    "follow_max_s": INTERVAL,
}


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def say(text: str) -> None:
    print(f"[pair] {text}", flush=True)


class Bed:
    """The pair lab, its agents and both gateways' daemons."""

    def __init__(self, lab: PairLab, agents: PairAgents) -> None:
        self.lab = lab
        self.agents = agents
        self.runners: dict[str, DaemonRunner] = {}
        for g in lab.gateways:
            config = lab.write_config(
                gw=g,
                agents=True,
                pair=True,
                extra_service=probe_table(INTERVAL, TIMEOUT, RISE, FALL),
            )
            self.runners[g.name] = DaemonRunner(lab, config, ns=g)

    def runner(self, gw: PairGateway) -> DaemonRunner:
        return self.runners[gw.name]

    def service(self, gw: PairGateway) -> dict[str, Any]:
        with contextlib.suppress(Exception):
            return self.runner(gw).service()
        return {}

    def logs(self) -> str:
        parts = []
        for g in self.lab.gateways:
            parts.append(f"--- natfail {g.name}\n{self.runner(g).logs()[-3000:]}")
            parts.append(f"--- keepalived {g.name}\n{self.lab.keepalived_log(g)[-1500:]}")
        return "\n".join(parts)

    def start(self, gw: PairGateway, *, fresh: bool) -> None:
        """``fresh``: a rebooted machine, no rules and no state."""
        if fresh:
            self.lab.exec(gw, ["nft", "delete", "table", "inet", "natfail"], check=False)
            state = self.lab.gateway_dir(gw) / "state"
            for name in ("state.json", "clients.json"):
                (state / name).unlink(missing_ok=True)
        runner = self.runner(gw)
        runner.start()
        if not runner.wait_ready(15):
            raise RuntimeError(f"natfail on {gw.name} did not start: {self.logs()}")

    def reboot(self, gw: PairGateway) -> None:
        """A crashed gateway comes back as a rebooted machine and follows."""
        lab = self.lab
        if not lab.gateway_up(gw):
            lab.revive_gateway(gw)
        if not lab.keepalived_running(gw):
            lab.start_keepalived(gw)
        runner = self.runner(gw)
        if runner.running:
            runner.stop()
        self.start(gw, fresh=True)

    def settled(self, timeout: float = 20.0) -> PairGateway:
        """The master decides, the backup follows, both on one backend; returns the
        master."""
        master = self.lab.wait_master(timeout)
        if master is None:
            raise RuntimeError(f"no master: {self.logs()}")
        backup = self.lab.other(master)

        def agreed() -> bool:
            m, b = self.service(master), self.service(backup)
            return (
                m.get("role") == "decide"
                and b.get("role") == "follow"
                and m.get("active") is not None
                and m.get("active") == b.get("active")
            )

        if not wait_until(agreed, timeout, 0.1):
            raise RuntimeError(f"the gateways do not agree: {self.logs()}")
        return master

    def switch(self, master: PairGateway, backend: str) -> None:
        proc = self.runner(master).ctl("switch", "wg0", backend)
        if proc.returncode != 0:
            raise RuntimeError(f"natfailctl switch wg0 {backend}: {proc.stderr.strip()}")

    def stop(self) -> None:
        for runner in self.runners.values():
            with contextlib.suppress(Exception):
                runner.stop()


def dnat_targets(lab: PairLab, gw: PairGateway) -> list[str]:
    """The backends the gateway's nftables DNAT map sends the public endpoint to."""
    cp = lab.exec(gw, ["nft", "-j", "list", "map", "inet", "natfail", "dnat4"], check=False)
    if cp.returncode != 0:
        return []
    by_ip = {b.v4: b.name for b in lab.backends}
    for item in json.loads(cp.stdout).get("nftables", []):
        if "map" in item:
            return [
                by_ip.get(str(target), str(target)) for _k, target in item["map"].get("elem", [])
            ]
    return []


# -- takeovers ------------------------------------------------------------------------------


def client_fresh(bed: Bed) -> None:
    """A fresh session from the client (no natural rekey during the measure)."""
    lab = bed.lab
    for _ in range(3):
        lab.client_rehandshake()
        if lab.client_ping(count=2, interval=0.05, timeout=3):
            return
    raise RuntimeError(f"no pings through the tunnel before the takeover: {bed.logs()}")


def takeover(bed: Bed, scenario: str, index: int) -> dict[str, Any]:
    lab = bed.lab
    master = bed.settled()
    backup = lab.other(master)
    if scenario == "rebooted-backup":
        if bed.service(master).get("active") != "b":
            bed.switch(master, "b")
            if not wait_until(lambda: bed.service(backup).get("active") == "b", 5, 0.05):
                raise RuntimeError(f"the backup did not follow the switch to b: {bed.logs()}")
        bed.runner(backup).stop()
        bed.start(backup, fresh=True)
        if not wait_until(lambda: bed.service(backup).get("active") == "b", 10, 0.05):
            raise RuntimeError(f"the rebooted backup did not follow b: {bed.logs()}")
        master = bed.settled()
    before = bed.service(master).get("active")
    if not isinstance(before, str):
        raise RuntimeError("no active backend")
    carrier = lab.backend(before)
    client_fresh(bed)
    handshake = lab.latest_handshake(carrier)
    endpoint = lab.client_endpoint()
    row: dict[str, Any] = {
        "scenario": scenario,
        "n": index,
        "master": master.name,
        "to": backup.name,
        "before": before,
        "load_before": load(),
    }
    pinger = Pinger(lab, PING_INTERVAL)
    try:
        if pinger.first_reply_after(time.time(), 5.0) is None:
            raise RuntimeError("no ping replies before the kill")
        time.sleep(1.0)
        killed = lab.kill_gateway(master)
        moved = lab.wait_master(10.0, gw=backup, interval=0.01)
        vip_seen = time.time()
        runner = bed.runner(backup)
        decided = wait_until(lambda: bed.service(backup).get("role") == "decide", 10.0, 0.02)
        decide_seen = time.time()
        reply = pinger.first_reply_after(killed + 0.1, RECOVERY_LIMIT)
        last = pinger.last_reply_before(killed + 0.1)
        time.sleep(0.5)
    finally:
        pinger.stop()
    if moved is None:
        raise RuntimeError(f"{backup.name} did not take the VIPs: {bed.logs()}")
    after = bed.service(backup).get("active")
    transfers = lab.transfers()
    lab.client_ping(count=2, interval=0.05, timeout=3)
    row.update(
        {
            "vips_seen_ms": ms(vip_seen - killed),
            "decide_seen_ms": ms(decide_seen - killed) if decided else None,
            "last_reply_before_kill_ms": ms(last - killed) if last is not None else None,
            "first_reply_ms": ms(reply - killed) if reply is not None else None,
            "outage_ms": ms(reply - last) if reply is not None and last is not None else None,
            "after": after,
            "same_backend": after == before,
            "rehandshake": lab.latest_handshake(carrier) != handshake,
            "carried_by": lab.carrying_backends(transfers),
            "endpoint_unchanged": lab.client_endpoint() == endpoint,
            "switches_on_new_master": len(runner.switches(after=killed)),
        }
    )
    say(
        f"{scenario} {index:2d}: {master.name} killed, outage {row['outage_ms']} ms, VIPs seen "
        f"{row['vips_seen_ms']} ms, decide {row['decide_seen_ms']} ms, {before} -> {after}, "
        f"re-handshake {row['rehandshake']}, carried by {','.join(row['carried_by']) or '-'}, "
        f"load {row['load_before'][0]}"
    )
    bed.reboot(master)
    bed.settled()
    return row


# -- following ------------------------------------------------------------------------------


def follow(bed: Bed, index: int) -> dict[str, Any]:
    """One switch on the master, to the backend that is not active."""
    lab = bed.lab
    master = bed.settled()
    backup = lab.other(master)
    target = "a" if bed.service(master).get("active") == "b" else "b"
    runner = bed.runner(master)
    t0 = time.time()
    bed.switch(master, target)
    returned = time.time()
    status_at: float | None = None
    nft_at: float | None = None
    deadline = returned + FOLLOW_LIMIT
    turns = 0
    while (status_at is None or nft_at is None) and time.time() < deadline:
        turns += 1
        if status_at is None and bed.service(backup).get("active") == target:
            status_at = time.time()
        if nft_at is None and dnat_targets(lab, backup) == [target]:
            nft_at = time.time()
        time.sleep(0.005)
    polled = time.time() - returned
    record = runner.switches(active=target, after=t0)
    swapped = float(record[0]["unix_time"]) if record else None
    activation = None
    for entry in bed.service(master).get("backends", []):
        agent = entry.get("agent")
        if entry.get("name") == target and isinstance(agent, dict):
            last = agent.get("last_activation")
            if isinstance(last, dict) and float(last.get("at") or 0) >= t0:
                activation = float(last["at"])
    row = {
        "n": index,
        "master": master.name,
        "to": target,
        "command_ms": ms(returned - t0),
        "master_swapped_before_return_ms": ms(returned - swapped) if swapped else None,
        "activation_sent_ms": ms(activation - returned) if activation else None,
        "status_ms": ms(status_at - returned) if status_at else None,
        "nft_ms": ms(nft_at - returned) if nft_at else None,
        "nft_from_master_swap_ms": ms(nft_at - swapped) if nft_at and swapped else None,
        "poll_turn_ms": ms(polled / turns) if turns else None,
        "load": load(),
    }
    say(
        f"switch {index:2d} -> {target}: follower status {row['status_ms']} ms, nft "
        f"{row['nft_ms']} ms after the command returned (swap on the master "
        f"{row['master_swapped_before_return_ms']} ms before it returned)"
    )
    return row


# -- results --------------------------------------------------------------------------------


def takeover_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    outages = [float(r["outage_ms"]) for r in rows if r.get("outage_ms") is not None]
    out: dict[str, Any] = {
        "runs": len(rows),
        "recovered": len(outages),
        "same_backend": sum(1 for r in rows if r.get("same_backend")),
        "rehandshakes": sum(1 for r in rows if r.get("rehandshake")),
        "carried_by_same_backend": sum(1 for r in rows if r.get("carried_by") == [r["before"]]),
        "outage_ms": stats(outages),
        "outage_samples_ms": outages,
    }
    for key in ("vips_seen_ms", "decide_seen_ms"):
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        out[key] = stats(values)
    return out


def follow_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"switches": len(rows)}
    for key in ("status_ms", "nft_ms", "nft_from_master_swap_ms", "command_ms", "poll_turn_ms"):
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        out[key] = stats(values)
        out[key.removesuffix("_ms") + "_samples_ms"] = values
    out["missed"] = sum(1 for r in rows if r.get("nft_ms") is None)
    return out


def targets(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = dict(TARGETS)
    out["master_down_interval_s"] = MASTER_DOWN_S
    limit = TARGETS["takeover_outage_max_s"] * 1000
    for scenario, part in result["takeover"].items():
        o = part.get("outage_ms") or {}
        if not o:
            continue
        out[f"{scenario}_met"] = (
            o["max"] <= limit
            and part["rehandshakes"] == 0
            and part["same_backend"] == part["runs"]
            and part["recovered"] == part["runs"]
        )
        out[f"{scenario}_median_met"] = o["median"] <= limit
    f = result.get("follow") or {}
    nft = f.get("nft_ms") or {}
    if nft:
        out["follow_met"] = nft["max"] <= INTERVAL * 1000 and f["missed"] == 0
        out["follow_median_met"] = nft["median"] <= INTERVAL * 1000
    return out


def plot(result: dict[str, Any]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is missing: no plot"
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.4), width_ratios=(1, 1.3))
    scenarios = [
        ("plain", "master killed\n(service on a)", "#2ca02c"),
        ("rebooted-backup", "master killed after\na rebooted backup (on b)", "#1f77b4"),
    ]
    for x, (name, _, colour) in enumerate(scenarios):
        part = result["takeover"].get(name)
        if not part:
            continue
        secs = [v / 1000 for v in part["outage_samples_ms"]]
        xs = [x + 0.25 * ((i * 0.618) % 1 - 0.5) for i in range(len(secs))]
        left.scatter(xs, secs, s=16, color=colour, alpha=0.75, zorder=3)
        o = part["outage_ms"]
        left.hlines(o["median"] / 1000, x - 0.3, x + 0.3, color="black", lw=1.5, zorder=4)
        left.text(
            x + 0.33,
            o["median"] / 1000,
            f"median {o['median'] / 1000:.2f}\np90 {o['p90'] / 1000:.2f}\n"
            f"max {o['max'] / 1000:.2f}\n{part['rehandshakes']} re-handshakes",
            fontsize=7,
            va="center",
        )
    limit = result["targets"]["takeover_outage_max_s"]
    left.axhline(limit, color="red", ls="--", lw=0.8, label=f"target {limit:.2f} s")
    left.axhline(
        MASTER_DOWN_S, color="grey", ls=":", lw=0.8, label=f"VRRP master-down {MASTER_DOWN_S} s"
    )
    counts = [
        f"{label}\n({(result['takeover'].get(name) or {}).get('runs', 0)} runs)"
        for name, label, _ in scenarios
    ]
    left.set_xticks(range(len(scenarios)), counts, fontsize=8)
    left.set_xlim(-0.5, len(scenarios) - 0.1)
    left.set_ylim(0, max(1.2, limit * 1.3))
    left.set_ylabel("client's longest silence, s (ping every 20 ms)")
    left.set_title(f"Client's outage when the master dies (advert_int {ADVERT_INT} s)", fontsize=9)
    left.legend(fontsize=7, loc="lower right")
    left.grid(True, axis="y", alpha=0.25)
    f = result["follow"]
    n = list(range(1, len(f["nft_samples_ms"]) + 1))
    right.plot(
        list(range(1, len(f["status_samples_ms"]) + 1)),
        [v / 1000 for v in f["status_samples_ms"]],
        "o",
        ms=4,
        color="#ff7f0e",
        label="follower's status shows it",
    )
    right.plot(
        n,
        [v / 1000 for v in f["nft_samples_ms"]],
        "x",
        ms=5,
        color="#1f77b4",
        label="follower's nftables DNAT sends to it",
    )
    right.axhline(
        INTERVAL, color="red", ls="--", lw=0.8, label=f"target: probe interval {INTERVAL} s"
    )
    right.set_xticks(n[::2] if len(n) > 10 else n)
    right.set_xlabel("natfailctl switch on the master (alternating between a and b)")
    right.set_ylabel("s after the command returned")
    right.set_ylim(0, max(0.5, max(f["nft_samples_ms"] or [0]) / 1000 * 1.2))
    right.set_title("The follower follows the decider's switch", fontsize=9)
    right.legend(fontsize=7, loc="upper right")
    right.grid(True, alpha=0.25)
    m = result["machine"]
    fig.text(
        0.99,
        0.01,
        f"{m.get('cpu')}, {m.get('cores')} cores, Linux {m.get('kernel')}; load "
        f"{result['load']['start'][0]} to {result['load']['end'][0]}",
        ha="right",
        va="bottom",
        fontsize=7,
        color="grey",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    IMAGE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMAGE, dpi=110)
    plt.close(fig)
    return f"wrote {IMAGE.relative_to(ROOT)}"


def versions() -> dict[str, str]:
    out = {}
    for name, argv in (("keepalived", ["keepalived", "--version"]), ("nft", ["nft", "--version"])):
        with contextlib.suppress(OSError):
            cp = subprocess.run(argv, capture_output=True, text=True, check=False)
            out[name] = (cp.stdout + cp.stderr).strip().splitlines()[0]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10, help="takeovers with the service on a")
    parser.add_argument(
        "--reboot-n", type=int, default=5, help="takeovers after a rebooted backup (on b)"
    )
    parser.add_argument("--switches", type=int, default=20, help="switches for the follow part")
    parser.add_argument("-o", "--output", type=Path, default=RESULTS, help="the results file")
    parser.add_argument("--no-plot", action="store_true", help="do not draw docs/images/pair.png")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_pair: run as root", file=sys.stderr)
        return exitcodes.USAGE
    started = time.time()
    result: dict[str, Any] = {
        "what": "natfail gateway pair under keepalived: the client's outage when the master "
        "dies, and the follower's DNAT following the decider's switches",
        "machine": machine(),
        "versions": versions(),
        "probe": PROBE,
        "advert_int_s": ADVERT_INT,
        "ping_interval_s": PING_INTERVAL,
        "load": {"start": load()},
        "outage_means": "the longest silence of the client's ping replies across the kill "
        "(first reply after it minus the last one before it)",
        "follow_means": "from the return of natfailctl switch on the master to the follower's "
        "status showing the backend (status) and to its nftables dnat4 map sending to it (nft); "
        "both polled in turn (poll_turn_ms: the resolution)",
    }
    rows: list[dict[str, Any]] = []
    follows: list[dict[str, Any]] = []
    failed = ""
    with PairLab(backends=2, ipv6=False, advert_int=ADVERT_INT, prefix="nfb") as lab:
        agents = lab.agents()
        agents.start_all()
        bed = Bed(lab, agents)
        try:
            for g in lab.gateways:
                bed.start(g, fresh=True)
            bed.settled()
            for i in range(args.n):
                rows.append(takeover(bed, "plain", i + 1))
            for i in range(args.reboot_n):
                rows.append(takeover(bed, "rebooted-backup", i + 1))
            result["load"]["after_takeovers"] = load()
            for i in range(args.switches):
                # spread the switches over the follower's poll phase
                time.sleep(0.4 + 0.3 * ((i * 0.618) % 1))
                follows.append(follow(bed, i + 1))
        except Exception as exc:  # keep what was measured
            failed = str(exc)[-3000:]
            print(f"bench_pair: failed: {failed}", file=sys.stderr)
        finally:
            bed.stop()
            agents.stop_all()
    result["load"]["end"] = load()
    result["takeover"] = {
        s: takeover_summary([r for r in rows if r["scenario"] == s])
        for s in ("plain", "rebooted-backup")
        if any(r["scenario"] == s for r in rows)
    }
    result["follow"] = follow_summary(follows) if follows else {}
    result["targets"] = targets(result)
    result["seconds"] = round(time.time() - started, 1)
    result["failed"] = failed
    result["rows"] = {"takeover": rows, "follow": follows}
    write_results(args.output, result)
    brief = {
        "takeover": {s: p["outage_ms"] for s, p in result["takeover"].items()},
        "rehandshakes": {s: p["rehandshakes"] for s, p in result["takeover"].items()},
        "follow_nft_ms": (result["follow"] or {}).get("nft_ms"),
        "follow_status_ms": (result["follow"] or {}).get("status_ms"),
        "targets": result["targets"],
        "load": result["load"],
    }
    print(json.dumps(brief, indent=2))
    if not args.no_plot and result["takeover"] and result["follow"]:
        print(plot(result))
    print(f"bench_pair: {time.time() - started:.0f} s, wrote {args.output}")
    return exitcodes.FAILED if failed else exitcodes.OK


if __name__ == "__main__":
    raise SystemExit(main())

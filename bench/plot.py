"""Draws the plots of docs/images/ from bench/results/*.json (matplotlib, Agg backend).

Usage: .venv/bin/python bench/plot.py [NAME...]   (a missing results file skips its plot;
NAMEs, e.g. ``hitless``, draw only those)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
IMAGES = ROOT / "docs" / "images"
DPI = 110


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        print(f"plot: {path.relative_to(ROOT)} missing, skipped", file=sys.stderr)
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def machine_line(data: dict[str, Any]) -> str:
    m = data.get("machine")
    if isinstance(m, dict):
        return f"{m.get('cpu')}, {m.get('cores')} cores, Linux {m.get('kernel')}"
    return ""


def save(fig: Any, name: str, data: dict[str, Any]) -> None:
    fig.text(0.99, 0.01, machine_line(data), ha="right", va="bottom", fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    IMAGES.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMAGES / name, dpi=DPI)
    plt.close(fig)
    print(f"wrote docs/images/{name}")


def failover(data: dict[str, Any]) -> None:
    keys = ("outage_ms", "detected_ms", "swapped_ms", "swap_ms", "conntrack_cleanup_ms")
    rows = [r for r in data["rows"] if all(r.get(k) is not None for k in keys)]
    kills = [r["kill"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), height_ratios=(1, 1))
    det = [r["detected_ms"] / 1000 for r in rows]
    swp = [(r["swapped_ms"] - r["detected_ms"]) / 1000 for r in rows]
    rest = [(r["outage_ms"] - r["swapped_ms"]) / 1000 for r in rows]
    top.bar(kills, det, color="#d62728", label="kill → failure detected (probes)")
    top.bar(
        kills,
        swp,
        bottom=det,
        color="#ff7f0e",
        label="detected → rules swapped + conntrack cleaned",
    )
    top.bar(
        kills,
        rest,
        bottom=[d + s for d, s in zip(det, swp, strict=True)],
        color="#1f77b4",
        alpha=0.55,
        label="swapped → client's tunnel back (WireGuard)",
    )
    top.set_ylabel("seconds after the kill")
    top.set_xlabel("kill (alternating a and b)")
    top.set_xticks(kills)
    p = data["probe"]
    top.set_title(
        f"Failover timeline over {len(rows)} kills (probe every {p['interval']} s, "
        f"timeout {p['timeout']} s, rise {p['rise']}, fall {p['fall']}; "
        "client pings every 50 ms)",
        fontsize=9,
    )
    top.set_ylim(0, max(r["outage_ms"] for r in rows) / 1000 * 1.4)
    top.legend(fontsize=8, loc="upper center", ncol=2)
    bottom.plot(
        kills,
        [r["detected_ms"] for r in rows],
        "o-",
        color="#d62728",
        label="failure detected (ms after kill)",
    )
    bottom.plot(
        kills,
        [r["swapped_ms"] for r in rows],
        "s-",
        color="#ff7f0e",
        label="swap done (ms after kill)",
    )
    bottom.set_ylabel("ms after the kill")
    bottom.set_xlabel("kill")
    bottom.set_xticks(kills)
    ax2 = bottom.twinx()
    ax2.plot(
        kills,
        [r["swap_ms"] for r in rows],
        "^--",
        color="#2ca02c",
        label="swap transaction (ms, right)",
    )
    ax2.plot(
        kills,
        [r["conntrack_cleanup_ms"] for r in rows],
        "v--",
        color="#9467bd",
        label="conntrack cleanup (ms, right)",
    )
    ax2.set_ylabel("duration, ms")
    ax2.set_ylim(0, max(max(r["swap_ms"], r["conntrack_cleanup_ms"]) for r in rows) * 1.7)
    bottom.set_ylim(0, max(r["swapped_ms"] for r in rows) * 1.7)
    lines = bottom.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    bottom.legend(
        lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper center", ncol=2
    )
    bottom.set_title("The daemon's part, zoomed in", fontsize=9)
    save(fig, "failover-timeline.png", data)


def conntrack(data: dict[str, Any]) -> None:
    rows = data["rows"]
    flows = [r["flows"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    nat = [r["natfail"]["seconds"] * 1000 for r in rows]
    sh = [r["shell"]["seconds"] * 1000 for r in rows]
    ax.plot(flows, nat, "o-", label="natfail (filtered netlink flush)")
    ax.plot(flows, sh, "s-", label=f"shell: {data.get('shell_way', 'conntrack -D')}")
    for x, y in zip(flows, nat, strict=True):
        ax.annotate(
            f"{y:.0f} ms",
            (x, y),
            textcoords="offset points",
            xytext=(0, -14),
            ha="center",
            fontsize=8,
        )
    for x, y in zip(flows, sh, strict=True):
        ax.annotate(
            f"{y:.0f} ms",
            (x, y),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(min(nat + sh) / 2.5, max(nat + sh) * 2.5)
    ax.set_xlim(min(flows) / 1.6, max(flows) * 1.6)
    ax.set_xlabel("flows of the dead backend (as many other flows stay)")
    ax.set_ylabel("time to remove them, ms")
    ax.set_title("Conntrack removal of one backend's flows")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    save(fig, "conntrack-removal.png", data)


def swap(data: dict[str, Any]) -> None:
    names = [n for n in ("nftables", "iptables") if n in data]
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = [("median_ms", "median"), ("p99_ms", "p99"), ("max_ms", "max")]
    width = 0.25
    for i, (key, label) in enumerate(keys):
        xs = [j + (i - 1) * width for j in range(len(names))]
        vals = [data[n][key] for n in names]
        bars = ax.bar(xs, vals, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{n}\n({data[n]['swaps']} swaps)" for n in names])
    ax.set_yscale("log")
    ax.set_ylim(0.1, max(data[n]["max_ms"] for n in names) * 3)
    ax.set_ylabel("ms per swap (log scale)")
    ax.set_title(f"Swap latency per dataplane: {data.get('what', '')}", fontsize=9)
    ax.legend(fontsize=8)
    save(fig, "swap-latency.png", data)


def probe(data: dict[str, Any]) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4), width_ratios=(1.4, 1))
    parts = [
        ("build_initiation_us", "build initiation"),
        ("consume_response_us", "consume response"),
        ("probe_us", "whole probe"),
    ]
    vals = [data[k] for k, _ in parts]
    bars = left.barh([label for _, label in parts], vals, color=["#1f77b4", "#ff7f0e", "#2ca02c"])
    left.bar_label(bars, fmt="%.0f µs", fontsize=8)
    left.axvline(
        data["target_us"], color="red", ls="--", lw=1, label=f"target {data['target_us']:.0f} µs"
    )
    left.set_xlabel("CPU µs (best of rounds)")
    left.set_title("CPU cost of one probe", fontsize=10)
    left.legend(fontsize=8, loc="lower right")
    left.set_xlim(0, max(vals) * 1.3)
    per_core = data["backends_per_core_at_1hz"]
    intervals = [0.5, 1.0, 2.0]
    bars = right.bar(
        [f"every {i:g} s" for i in intervals], [per_core * i for i in intervals], color="#9467bd"
    )
    right.bar_label(bars, fmt="%.0f", fontsize=8)
    right.set_ylabel("backends one core can probe")
    right.set_title("Backends per core (probe interval)", fontsize=10)
    save(fig, "probe-cost.png", data)


def nginx(data: dict[str, Any]) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 4.2))
    t = data["throughput"]
    modes = [
        ("direct", "direct\n(routed, no NAT)"),
        ("natfail", "natfail\n(kernel DNAT)"),
        ("nginx", "NGINX stream\n(UDP proxy)"),
    ]
    vals = [t[m]["mbit_s"] for m, _ in modes]
    bars = left.bar([label for _, label in modes], vals, color=["grey", "#2ca02c", "#d62728"])
    left.bar_label(bars, fmt="%.0f Mbit/s", fontsize=8)
    left.set_ylabel("iperf3 TCP through the WireGuard tunnel, Mbit/s")
    left.set_title("Throughput", fontsize=10)
    o = data["outage"]
    faults = [
        ("hang", "backend hangs\n(SIGSTOP, no ICMP)"),
        ("kill", "backend dies\n(killed, ICMP unreachable)"),
    ]
    width = 0.38
    top = 0.0
    for i, (name, label, colour) in enumerate(
        (("natfail", "natfail", "#2ca02c"), ("nginx", "NGINX stream", "#d62728"))
    ):
        runs = [o[name][f] for f, _ in faults]
        secs = [r["cap_s"] if r["capped"] else r["outage_ms"] / 1000 for r in runs]
        top = max(top, *secs)
        bars = right.bar(
            [x + (i - 0.5) * width for x in range(len(faults))],
            secs,
            width,
            color=colour,
            label=label,
            hatch=["//" if r["capped"] else "" for r in runs],
        )
        right.bar_label(bars, labels=[r["shown"] for r in runs], fontsize=8)
    right.set_xticks(range(len(faults)), [label for _, label in faults], fontsize=8)
    right.set_ylabel("seconds from the fault to the first ping reply")
    right.set_title("Client's outage when the active backend fails", fontsize=10)
    right.set_ylim(0, top * 1.25)
    right.legend(fontsize=8, loc="upper right")
    save(fig, "nginx-vs-natfail.png", data)


def soak(data: dict[str, Any]) -> None:
    samples = data["samples"]
    minutes = [x["t"] / 60 for x in samples]
    fig, (top, mid, low) = plt.subplots(
        3, 1, figsize=(9, 5.6), sharex=True, height_ratios=(2, 1, 1)
    )
    top.plot(minutes, [x["rss_kib"] / 1024 for x in samples], color="#1f77b4", lw=1)
    top.set_ylabel("daemon RSS, MiB")
    top.set_ylim(0, max(x["rss_kib"] for x in samples) / 1024 * 1.2)
    top.set_title(
        f"Soak: {data['kills']} kills and {data['restarts']} restarts of 3 backends "
        f"in {data['minutes']:g} min, with traffic; {data['missed_failovers']} missed "
        "failovers",
        fontsize=10,
    )
    mid.plot(minutes, [x["stale_entries"] for x in samples], color="#d62728", lw=1)
    mid.set_ylabel("stale entries")
    mid.set_ylim(-0.5, max(1, data["max_stale_entries"]) + 0.5)
    low.step(minutes, [x["active"] for x in samples], where="post", color="#2ca02c", lw=0.8)
    low.set_ylabel("active backend")
    low.set_yticks([0, 1, 2, 3], ["none", "a", "b", "c"])
    low.set_xlabel("minutes")
    save(fig, "soak.png", data)


def scale(data: dict[str, Any]) -> None:
    rows = [r for r in data["rows"] if r.get("cpu_per_probe_us") is not None]
    ns = [r["services"] for r in rows]
    target = data["targets"]["cpu_per_probe_us"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 4))
    per_probe = [r["cpu_per_probe_us"] for r in rows]
    left.plot(ns, per_probe, "o-", color="#1f77b4", label="daemon + children, per probe due")
    for x, y in zip(ns, per_probe, strict=True):
        left.annotate(
            f"{y:.0f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8
        )
    left.axhline(target, color="red", ls="--", lw=1, label=f"target {target:g} µs")
    left.set_ylim(0, max([*per_probe, target]) * 1.3)
    left.set_xlabel("services (x 3 backends, probed at 1 Hz)")
    left.set_ylabel("CPU µs per probe, all-in")
    left.set_title("CPU per probe", fontsize=10)
    left.legend(fontsize=8, loc="lower right")
    total = [r["daemon_core_percent"] for r in rows]
    right.plot(ns, total, "s-", color="#2ca02c", label="daemon + children")
    backends = [r.get("backends_core_percent") for r in rows]
    if all(b is not None for b in backends):
        right.plot(ns, backends, "^--", color="grey", label="the backends (not counted)")
    budget = sorted({*ns, 10, 100, 300, 1000})
    right.plot(
        budget,
        [3 * n * target / 1e4 for n in budget],
        ":",
        color="red",
        lw=1,
        label=f"{target:g} µs per probe",
    )
    right.axhline(100, color="black", lw=0.8, alpha=0.5, label="one core")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(budget, [str(n) for n in budget])
        ax.minorticks_off()
        ax.set_xlim(budget[0] / 1.5, budget[-1] * 1.5)
    right.set_xlabel("services (x 3 backends, probed at 1 Hz)")
    right.set_ylabel("% of one core")
    fast = data.get("hz20")
    extra = f"; 1 service x 2 at 20 Hz: {fast['core_percent']:.1f} %" if fast else ""
    right.set_title(f"Total CPU{extra}", fontsize=10)
    right.legend(fontsize=8, loc="upper left")
    save(fig, "scale.png", data)


HITLESS_SETUPS = (
    ("agents", "natfail\nwith agents", "#2ca02c"),
    ("no-agent", "natfail\nwithout agents", "#1f77b4"),
    ("nginx", "NGINX stream", "#d62728"),
)


def hitless(data: dict[str, Any]) -> None:
    setups = data["setups"]
    targets = data.get("targets", {})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    panels = (
        ("crash", "Active backend killed: kill → first ping reply"),
        ("switch", "Planned switch (natfailctl switch): swap → first ping reply"),
    )
    for ax, (kind, title) in zip(axes, panels, strict=True):
        for x, (name, _, colour) in enumerate(HITLESS_SETUPS):
            part = (setups.get(name) or {}).get(kind)
            if not part:
                ax.text(
                    x, 0.3, "not measured\n(crashes only)", ha="center", fontsize=8, color="grey"
                )
                continue
            secs = [v / 1000 for v in part["outage_samples_ms"]]
            xs = [x + 0.25 * ((i * 0.618) % 1 - 0.5) for i in range(len(secs))]
            ax.scatter(xs, secs, s=14, color=colour, alpha=0.7, zorder=3)
            o = part["outage_ms"]
            ax.hlines(o["median"] / 1000, x - 0.3, x + 0.3, color="black", lw=1.5, zorder=4)
            ax.text(
                x,
                max(secs) * 1.35,
                f"median {o['median'] / 1000:.2f} s\np90 {o['p90'] / 1000:.2f} s\n"
                f"max {o['max'] / 1000:.2f} s",
                fontsize=7,
                ha="center",
                va="bottom",
            )
            detected = part.get("detected_samples_ms")
            if kind == "crash" and detected:
                ax.scatter(
                    [x - 0.27 + 0.06 * ((i * 0.618) % 1 - 0.5) for i in range(len(detected))],
                    [v / 1000 for v in detected],
                    s=12,
                    marker="x",
                    color="grey",
                    lw=0.8,
                    zorder=3,
                    label="failure detected (probes)" if x == 0 else None,
                )
        t = targets.get(f"{kind}_outage_median_s")
        if kind == "crash":
            det = (setups.get("agents") or {}).get("crash", {}).get("detected_ms")
            t = targets.get("crash_outage_minus_detection_median_s")
            t = det["median"] / 1000 + t if det and t is not None else None
        if t is not None:
            what = "median detection + 0.2 s = " if kind == "crash" else ""
            ax.hlines(
                t,
                -0.4,
                0.4,
                color="red",
                ls="--",
                lw=0.8,
                zorder=5,
                label=f"target: {what}{t:.2f} s",
            )
        counts = []
        for name, label, _ in HITLESS_SETUPS:
            part = (setups.get(name) or {}).get(kind)
            counts.append(f"{label}\n({part['events']} runs)" if part else label)
        ax.set_xticks(range(len(HITLESS_SETUPS)), counts, fontsize=8)
        ax.set_xlim(-0.5, len(HITLESS_SETUPS) - 0.2)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="y", which="both", alpha=0.25)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylim(0.01, 100)
    axes[0].set_ylabel("client's outage, s (log scale)")
    p = data["probe"]
    fig.suptitle(
        f"Client's outage on a failover (probe every {p['interval']} s, timeout "
        f"{p['timeout']} s, fall {p['fall']}; ping every {data['ping_interval_s'] * 1000:.0f} ms)",
        fontsize=10,
    )
    save(fig, "hitless.png", data)


def activation(data: dict[str, Any]) -> None:
    sizes = data["sizes"]
    peers = [r["peers"] for r in sizes]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    # (key, style, colour, label, where its figures go: offset and alignment, or None)
    lines = (
        ("median_ms", "o-", "#2ca02c", "standby: every peer kicked in place", ((8, -12), "left")),
        (
            "again_median_ms",
            "s-",
            "#1f77b4",
            "again at once: every peer re-added",
            ((-8, 4), "right"),
        ),
        (
            "wireguard_go_kick_only_ms",
            "^:",
            "grey",
            "wireguard-go's floor: the initiations alone",
            None,
        ),
    )
    highest = 0.0
    for key, style, colour, label, place in lines:
        ys = [r.get(key) for r in sizes]
        if any(y is None for y in ys):
            continue
        highest = max(highest, *ys)
        ax.plot(peers, ys, style, color=colour, label=label)
        if place is not None:
            offset, align = place
            for x, y in zip(peers, ys, strict=True):
                ax.annotate(
                    f"{y:g} ms",
                    (x, y),
                    textcoords="offset points",
                    xytext=offset,
                    ha=align,
                    fontsize=8,
                    color=colour,
                )
    for r in sizes:
        if r.get("target_ms") is not None:
            ax.scatter(
                [r["peers"]],
                [r["target_ms"]],
                marker="_",
                s=400,
                color="red",
                zorder=5,
                label=f"target: {r['peers']} peers in {r['target_ms']:g} ms",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(peers, [str(n) for n in peers])
    ax.minorticks_off()
    ax.set_xlim(peers[0] / 1.6, peers[-1] * 2.2)
    ax.set_ylim(top=highest * 3)
    ax.set_xlabel("peers activated (one agent, one wireguard-go interface)")
    ax.set_ylabel("ms from the call to the last answer (median)")
    ax.set_title(
        f"Agent activation on {data.get('wireguard_go', 'wireguard-go')}, "
        f"{sizes[0]['rounds']} rounds",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper left")
    save(fig, "activation.png", data)


def main() -> int:
    plots = [
        ("failover", failover),
        ("conntrack", conntrack),
        ("dataplane", swap),
        ("probe", probe),
        ("nginx", nginx),
        ("soak", soak),
        ("scale", scale),
        ("hitless", hitless),
        ("activation", activation),
    ]
    wanted = sys.argv[1:]
    failed = 0
    for name, draw in plots:
        if wanted and name not in wanted:
            continue
        data = load(name)
        if data is None:
            failed += 1
            continue
        try:
            draw(data)
        except (KeyError, TypeError, ZeroDivisionError) as e:
            print(f"plot: {name}: {e!r}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

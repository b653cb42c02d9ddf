#!/usr/bin/env python3
"""What the scale-out shapes of docs/scale-out.md cost per APDU.

Builds the doc's tier in a network namespace of its own (tests/tier_rig.py:
the doc's configurations and command lines; the fronts get one more plain
line listener, ``--listen tcp:4003``, for clients that bypass HAProxy) and
drives it with bench/loadgen.py (closed loop, every answer checked):

* floor: clients straight to one owner (no balancer, no hop);
* 1, 2 and 3 fronts with the clients spread over them directly (the hop
  without HAProxy; one load generator thread per front);
* front tier through HAProxy with 1, 2 and 3 fronts in rotation (the
  others set to maintenance on HAProxy's admin socket);
* route by reader through HAProxy straight to the owners (no hop).

For each: APDUs/s, latency, and CPU per APDU of every process of the tier
(owners, fronts in use, HAProxy: utime+stime deltas from /proc/PID/stat over
the measured window), with the share of each kind.  The load generator
runs on the same machine (its CPU is not counted), so APDUs/s is a floor of
what the tier does.  Bounded: ``--warmup`` + ``--duration`` seconds per row (8 rows).
Prints a markdown table (``--json``: the raw results too).

    .venv/bin/python bench/tier.py [--clients 50] [--duration 4] [--warmup 1]

Needs root (unshare --net), HAProxy and the proxy's venv; re-executes
itself inside the namespace.
"""

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)

import tier_rig as rig  # noqa: E402
from bench import loadgen  # noqa: E402

OWNERS = {"rack1": "127.0.0.31", "rack2": "127.0.0.32"}
FRONTS = {"front1": "127.0.0.21", "front2": "127.0.0.22", "front3": "127.0.0.23"}
PLAIN_PORT = 4003
CARDS_PER_OWNER = 10  # cards the load spreads over, per owner


def haproxy_cmd(admin, command):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(2)
    s.connect(admin)
    s.sendall(command.encode() + b"\n")
    out = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        out += chunk
    s.close()
    return out.decode(errors="replace")


def measure(targets, readers, pids, args):
    """loadgen over ``readers`` at ``targets`` ([(host, port)]: the clients
    split evenly, one load generator thread each, started together); CPU
    per APDU of ``pids`` ({name: pid}, over the first generator's measured
    window) summed by kind (the name before its digits)."""
    results = [None] * len(targets)

    def one(i, host, port):
        results[i] = loadgen.run(host, port, clients=args.clients // len(targets), k=1, duration=args.duration,
                                 warmup=args.warmup, readers=readers, watch=pids if i == 0 else None, drain=5.0)
    threads = [threading.Thread(target=one, args=(i, h, p)) for i, (h, p) in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.warmup + args.duration + 60)
    util = results[0].get("watch_cpu_util", {})
    rate = sum(r["apdus_per_s"] for r in results)
    kinds = {}
    for name, u in util.items():
        kind = name.rstrip("0123456789")
        kinds[kind] = kinds.get(kind, 0.0) + u
    return {"apdus_per_s": rate, "p50": max(r["latency_ms"]["p50"] for r in results),
            "p99": max(r["latency_ms"]["p99"] for r in results),
            "errors": sum(r["errors"] for r in results), "error_samples": results[0]["error_samples"],
            "cpu_us_per_apdu": sum(util.values()) / rate * 1e6 if rate else None,
            "by_kind_us": {k: v / rate * 1e6 for k, v in kinds.items()} if rate else {},
            "cpu_util": {k: round(v, 3) for k, v in util.items()}}


def tier_names(owners):
    return [f"{o}/Emulated {i:02d}" for i in range(CARDS_PER_OWNER) for o in owners]


def inside(args):
    workdir = tempfile.mkdtemp(prefix="bench-tier-")
    tier = rig.Tier(workdir, args.doc)
    rows = []
    try:
        for owner, addr in OWNERS.items():
            tier.proxy(owner, addr, config="owner.toml")
        for owner in OWNERS:
            tier.procs[owner].wait_listening()
        for front, addr in FRONTS.items():
            tier.proxy(front, addr, config="front.toml", extra=["--listen", f"tcp:{PLAIN_PORT}:interface={addr}"])
        for front in FRONTS:
            p = tier.procs[front]
            p.wait_listening()
            rig.wait_for(lambda: len(rig.readers(p.address, PLAIN_PORT)) >= 2 * 50, 40, f"{front} listing 100 readers",
                         proc=p, interval=0.3)
        lb = tier.haproxy("haproxy-front-tier.cfg")
        rig.wait_for(lambda: all(s.startswith("UP") for s in rig.haproxy_servers(lb.admin).values())
                     and len(rig.haproxy_servers(lb.admin)) == 3, 30, "HAProxy: fronts UP", proc=lb)
        owner_pids = {f"owner{i + 1}": tier.procs[o].pid for i, o in enumerate(OWNERS)}
        front_pids = {f"front{i + 1}": tier.procs[f].pid for i, f in enumerate(FRONTS)}

        def row(label, hops, result):
            result.update(label=label, hops=hops)
            rows.append(result)
            print(f"  {label}: {result['apdus_per_s']:,.0f} APDUs/s, {result['cpu_us_per_apdu'] or 0:.1f} us/APDU",
                  file=sys.stderr, flush=True)

        row("floor: clients straight to one owner", "client → owner",
            measure([(OWNERS["rack1"], rig.LINE_PORT)], [f"Emulated {i:02d}" for i in range(2 * CARDS_PER_OWNER)],
                    {"owner1": owner_pids["owner1"]}, args))
        for n in (1, 2, 3):
            used = list(FRONTS)[:n]
            pids = dict(owner_pids, **{f"front{i + 1}": front_pids[f"front{i + 1}"] for i in range(n)})
            row(f"{n} front{'s' if n > 1 else ''}, clients directly", "client → front → owners",
                measure([(FRONTS[f], PLAIN_PORT) for f in used], tier_names(OWNERS), pids, args))
        for n in (1, 2, 3):
            for i, front in enumerate(FRONTS):
                haproxy_cmd(lb.admin, f"set server fronts/{front} state {'ready' if i < n else 'maint'}")
            time.sleep(0.5)
            pids = dict(owner_pids, haproxy=lb.pid)
            pids.update({f"front{i + 1}": front_pids[f"front{i + 1}"] for i in range(n)})
            row(f"front tier, {n} front{'s' if n > 1 else ''}, through HAProxy", "client → HAProxy → front → owners",
                measure([(rig.LB, rig.TIER_PORT)], tier_names(OWNERS), pids, args))
        # route by reader: the doc's owners for it replace the tier
        for name in list(FRONTS) + list(OWNERS) + ["haproxy"]:
            tier.procs[name].stop()
        for owner, addr in OWNERS.items():
            tier.proxy("route-" + owner, addr, config="owner.toml", route=True)
        rlb = tier.haproxy("haproxy-route-by-reader.cfg", name="haproxy-route")
        for owner in OWNERS:
            tier.procs["route-" + owner].wait_listening()
        rig.wait_for(lambda: all(s.startswith("UP") for s in rig.haproxy_servers(rlb.admin).values())
                     and len(rig.haproxy_servers(rlb.admin)) == 2, 20, "route HAProxy: owners UP", proc=rlb)
        pids = {"owner1": tier.procs["route-rack1"].pid, "owner2": tier.procs["route-rack2"].pid, "haproxy": rlb.pid}
        row("route by reader, through HAProxy", "client → HAProxy → owner",
            measure([(rig.LB, rig.ROUTE_PORT)], [f"{o} {i:02d}" for i in range(CARDS_PER_OWNER) for o in OWNERS],
                    pids, args))
    finally:
        tier.stop_all()
    return rows


def fmt(v, digits=1):
    return "—" if v is None else f"{v:,.{digits}f}"


def table(rows, args):
    floor = rows[0]["cpu_us_per_apdu"] if rows else None
    out = [f"{args.clients} persistent clients, one SELECT per request (K=1), {2 * CARDS_PER_OWNER} cards over "
           f"two owners, {args.warmup:g} s warm-up + {args.duration:g} s measured per row; CPU per APDU is the "
           "sum over the tier's processes (owners, fronts in use, HAProxy).", "",
           "| shape | path | APDUs/s | p50 ms | p99 ms | tier CPU µs/APDU | × floor | owners | fronts | HAProxy | errors |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = r["by_kind_us"]
        ratio = r["cpu_us_per_apdu"] / floor if floor and r["cpu_us_per_apdu"] else None
        out.append(f"| {r['label']} | {r['hops']} | {fmt(r['apdus_per_s'], 0)} | {fmt(r['p50'], 2)} | {fmt(r['p99'], 2)} "
                   f"| {fmt(r['cpu_us_per_apdu'])} | {fmt(ratio, 2)} | {fmt(k.get('owner'))} | {fmt(k.get('front'))} "
                   f"| {fmt(k.get('haproxy'))} | {r['errors']} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--doc", default=rig.DOC, help="the doc whose configurations are run (default docs/scale-out.md)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--inside", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inside:
        with open(args.inside, "w") as f:
            json.dump(inside(args), f)
        return 0
    why = rig.can_namespace()
    if why:
        sys.exit(f"bench/tier.py: {why}")
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, os.path.abspath(__file__), "--inside", out.name, "--clients", str(args.clients),
               "--duration", str(args.duration), "--warmup", str(args.warmup), "--doc", args.doc]
        t0, load = time.time(), os.getloadavg()[0]
        run = rig.in_namespace(cmd, timeout=300 + 8 * (args.duration + args.warmup))
        sys.stderr.write(run.stderr)
        if run.returncode != 0:
            sys.exit(f"bench/tier.py: the run failed ({run.returncode})")
        rows = json.load(open(out.name))
    print(f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime(t0))} UTC by `python bench/tier.py` in "
          f"{time.time() - t0:.0f} s on {os.cpu_count()} CPUs, load average before {load:.2f}.\n")
    print(table(rows, args))
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Proxy CPU per APDU of the line protocol on emulated cards, for several
proxy builds taking turns, and the machine's floor for the same load.

An option is ``LABEL=SRC``: the ``src`` directory of a tree of this project
put first on the proxy's PYTHONPATH (e.g. an older commit exported with
``git archive COMMIT src | tar -x -C DIR``); ``LABEL=.`` is this checkout.
Each round runs every build once (a fresh ``twistd foxyproxy`` on 4
emulated cards, ``--clients`` persistent clients, K=1, every answer
checked) and, with ``--floor``, ``bench/trivial_responder.py`` under the
same load: the least CPU any Python server spends per request on this
machine at that many clients (an ``epoll`` loop answering each line).
Builds and the floor take turns so that a change in the machine's load hits
each alike; the median of the rounds and every round are printed.

    .venv/bin/python bench/line_builds.py before=/tmp/before/src now=. [--clients 1] [--floor] [--rounds 3]
"""

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from bench import loadgen  # noqa: E402
from bench.helpers import HOST, trivial_responder  # noqa: E402
from bench.run import wait_readers  # noqa: E402
from support import ProxyProcess  # noqa: E402

FLOOR = "trivial responder (floor)"


def proxy_load(src, clients, duration):
    env = None if src == "." else {"PYTHONPATH": os.path.abspath(src)}
    p = ProxyProcess("--no-signing", env=env).start()
    try:
        names = wait_readers(p.port, 4)
        return loadgen.run(HOST, p.port, clients=clients, k=1, duration=duration, warmup=1.0,
                           readers=names[:4], pid=p.proc.pid)
    finally:
        p.stop()


def floor_load(clients, duration):
    with trivial_responder() as t:
        return loadgen.run(HOST, t.port, clients=clients, k=1, duration=duration, warmup=1.0,
                           readers=["Any"], pid=t.pid)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("builds", nargs="+", metavar="LABEL=SRC")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--floor", action="store_true", help="also measure bench/trivial_responder.py")
    args = ap.parse_args(argv)
    builds = [b.split("=", 1) for b in args.builds]
    if any(len(b) != 2 for b in builds):
        ap.error("each build is LABEL=SRC")
    clients = max(1, min(args.clients, 500))
    duration = max(0.5, min(args.duration, 60.0))
    runs = {label: [] for label, _ in builds}
    if args.floor:
        runs[FLOOR] = []
    for n in range(max(1, min(args.rounds, 10))):
        for label, src in builds + ([(FLOOR, None)] if args.floor else []):
            r = floor_load(clients, duration) if src is None else proxy_load(src, clients, duration)
            runs[label].append(r)
            print(f"round {n + 1} {label}: {r['apdus_per_s']:,.0f} APDUs/s, "
                  f"{r.get('proxy_cpu_us_per_apdu') or 0:.1f} us/APDU, errors {r['errors']}", flush=True)
    print(f"\n| build | proxy CPU µs/APDU at {clients} clients, K=1 (median; rounds) | APDUs/s (median) | errors |")
    print("|---|---|---|---|")
    for label, rs in runs.items():
        cpu = [r.get("proxy_cpu_us_per_apdu") or 0.0 for r in rs]
        print(f"| {label} | {statistics.median(cpu):.1f} ({', '.join(f'{c:.1f}' for c in cpu)}) | "
              f"{statistics.median(r['apdus_per_s'] for r in rs):,.0f} | {sum(r['errors'] for r in rs)} |")
    return 1 if any(r["errors"] for rs in runs.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())

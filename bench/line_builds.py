#!/usr/bin/env python3
"""Proxy CPU per APDU of the line protocol on emulated cards, for several
proxy builds taking turns, and floors for the same load in the same run.

An option is ``LABEL=SRC``: the ``src`` directory of a tree of this project
put first on the proxy's PYTHONPATH (e.g. an older commit exported with
``git archive COMMIT src | tar -x -C DIR``); ``LABEL=.`` is this checkout.
Each round runs, for every K of ``--k`` (APDUs per request), every build
once (a fresh ``twistd foxyproxy`` on 4 emulated cards, ``--clients``
persistent clients, every answer checked by bench/loadgen.py) and the
floors of ``--floor`` under the same load:

* ``twisted``: ``bench/twisted_responder.py``, a bare Twisted
  ``Protocol`` framing the same lines on the default (epoll) reactor, one
  ``transport.write`` per read: what Twisted itself costs per request;
* ``epoll``: ``bench/trivial_responder.py``, an ``epoll`` loop in plain
  Python: the least CPU any Python server spends per request here.

Builds and floors take turns so that a change in the machine's load hits
each alike.  Prints ``| path | ours | floor | ratio |`` (medians of the
rounds, every round in brackets; a ratio is ours / floor of the same
round), then throughput and errors.  Exit status 1 if any answer was wrong.

    .venv/bin/python bench/line_builds.py now=. --floor both --k 1,4 --rounds 5 --duration 4
    .venv/bin/python bench/line_builds.py before=/tmp/before/src now=. [--clients 1] [--floor twisted] [--rounds 3]
"""

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from bench import loadgen  # noqa: E402
from bench.helpers import HOST, Helper, trivial_responder  # noqa: E402
from bench.run import wait_readers  # noqa: E402
from support import ProxyProcess  # noqa: E402

FLOORS = {"twisted": "bare Twisted responder", "epoll": "plain-Python epoll responder"}


def twisted_responder():
    return Helper(os.path.join(HERE, "twisted_responder.py"), "--port", "0", "--stop-after", "900")


def proxy_load(src, clients, duration, k=1):
    env = None if src == "." else {"PYTHONPATH": os.path.abspath(src)}
    p = ProxyProcess("--no-signing", env=env).start()
    try:
        names = wait_readers(p.port, 4)
        return loadgen.run(HOST, p.port, clients=clients, k=k, duration=duration, warmup=1.0,
                           readers=names[:4], pid=p.proc.pid)
    finally:
        p.stop()


def floor_load(clients, duration, k=1, kind="epoll"):
    """The load on a floor server (``kind``: ``epoll`` or ``twisted``)."""
    with (trivial_responder() if kind == "epoll" else twisted_responder()) as t:
        return loadgen.run(HOST, t.port, clients=clients, k=k, duration=duration, warmup=1.0,
                           readers=["Any"], pid=t.pid)


def _cpu(r):
    return r.get("proxy_cpu_us_per_apdu") or 0.0


def _cell(values, digits=1):
    return f"{statistics.median(values):.{digits}f} ({', '.join(f'{v:.{digits}f}' for v in values)})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("builds", nargs="+", metavar="LABEL=SRC")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--k", default="1", help="APDUs per request, e.g. 1 or 1,4 (each 1..256)")
    ap.add_argument("--floor", nargs="?", const="both", default=None, choices=("twisted", "epoll", "both"),
                    help="also measure a floor: twisted, epoll or both (--floor alone: both)")
    args = ap.parse_args(argv)
    builds = [b.split("=", 1) for b in args.builds]
    if any(len(b) != 2 for b in builds):
        ap.error("each build is LABEL=SRC")
    try:
        ks = [int(k) for k in args.k.split(",")]
    except ValueError:
        ap.error("--k is a comma-separated list of integers")
    if not ks or any(not 1 <= k <= 256 for k in ks):
        ap.error("--k: each K is 1..256")
    floors = [] if args.floor is None else (["twisted", "epoll"] if args.floor == "both" else [args.floor])
    clients = max(1, min(args.clients, 500))
    duration = max(0.5, min(args.duration, 60.0))
    runs = {}
    for n in range(max(1, min(args.rounds, 10))):
        for k in ks:
            for label, src in builds + [(f, None) for f in floors]:
                r = floor_load(clients, duration, k, label) if src is None else proxy_load(src, clients, duration, k)
                runs.setdefault((k, label), []).append(r)
                name = FLOORS.get(label, label) if src is None else label
                print(f"round {n + 1} K={k} {name}: {r['apdus_per_s']:,.0f} APDUs/s, "
                      f"{_cpu(r):.1f} us/APDU, errors {r['errors']}", flush=True)
    print(f"\n| path | ours | floor | ratio |")
    print("|---|---|---|---|")
    for k in ks:
        for label, _ in builds:
            ours = [_cpu(r) for r in runs[(k, label)]]
            if not floors:
                print(f"| {label}, emulated, K={k}, {clients} clients: proxy CPU µs/APDU | {_cell(ours)} | — | — |")
            for f in floors:
                floor = [_cpu(r) for r in runs[(k, f)]]
                ratio = [o / fl if fl else 0.0 for o, fl in zip(ours, floor)]
                print(f"| {label}, emulated, K={k}, {clients} clients: proxy CPU µs/APDU vs {FLOORS[f]} | "
                      f"{_cell(ours)} | {_cell(floor)} | {_cell(ratio, 2)} |")
    print("\n| run | APDUs/s (median) | errors |")
    print("|---|---|---|")
    for (k, label), rs in runs.items():
        print(f"| K={k} {FLOORS.get(label, label)} | {statistics.median(r['apdus_per_s'] for r in rs):,.0f} | "
              f"{sum(r['errors'] for r in rs)} |")
    return 1 if any(r["errors"] for rs in runs.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())

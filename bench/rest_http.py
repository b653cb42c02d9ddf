#!/usr/bin/env python3
"""Proxy CPU per APDU of the REST backend, beside the same build's line
path on emulated cards, for one or more proxy builds taking turns.

The load of ``bench/run.py``'s ``rest`` scenario (120 cards on the fake
CloudFoxy server, 50 persistent line-protocol clients, K=1, every answer
checked), run against one proxy build per option.  An option is
``LABEL=SRC``: the ``src`` directory of a tree of this project put first on
the proxy's PYTHONPATH (e.g. an older commit exported with ``git archive``,
or a copy with another HTTP client wired in); ``LABEL=.`` is this checkout.

The reference of each build is the same load on the same build with
``--backend emulated:?cards=120`` (the "line path": front end, parser,
dispatcher and a card answering at once, no upstream).  A bare HTTP
*server* is no floor for an HTTP *client*; the REST backend's own cost is
the delta, REST minus line path, each round's pair measured back to back.
The fake server's CPU per request over the same window is printed as
context (what one HTTP exchange costs the other side, in Python asyncio).
Builds and paths take turns, ``--rounds`` times, so that a change in the
load of the machine hits each alike; medians of the rounds, every round in
brackets.

    .venv/bin/python bench/rest_http.py now=. [before=/tmp/before/src] [--rounds 5] [--duration 4] [--write]

Bounded: about ``rounds x builds x 2 x (duration + 4)`` seconds; the proxies
and the fake server are this script's own processes, stopped by PID.
``--write`` puts the table into docs/performance.md (its own section, which
``bench/run.py`` keeps when it rewrites the file).
"""

import argparse
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from bench import loadgen  # noqa: E402
from bench.helpers import HOST, fake_cloudfoxy, rest_args  # noqa: E402
from bench.run import KEEP_MARK, wait_readers  # noqa: E402
from support import ProxyProcess  # noqa: E402


def one(src, fake, duration, backend=None):
    """The load on a fresh proxy of build ``src``: the REST backend on the
    fake server (``backend`` None) or ``backend``; the loadgen result."""
    if backend is None:
        args, env = rest_args(fake.port)
    else:
        args, env = ["--backend", backend], {}
    if src != ".":
        env = dict(env, PYTHONPATH=os.path.abspath(src))
    p = ProxyProcess(*args, "--no-signing", env=env).start()
    try:
        names = wait_readers(p.port, 120)
        return loadgen.run(HOST, p.port, clients=50, k=1, duration=duration, warmup=1.0,
                           readers=names[:120], pid=p.proc.pid, watch={"fake": fake.pid})
    finally:
        p.stop()


LINE = "emulated:?cards=120"  #: the line path: the same load, cards in the proxy


def cpu(r):
    return r.get("proxy_cpu_us_per_apdu") or 0.0


def fake_cpu(r):
    """The fake server's CPU µs per HTTP request (one per APDU at K=1)."""
    util = (r.get("watch_cpu_util") or {}).get("fake")
    return util / r["apdus_per_s"] * 1e6 if util is not None and r["apdus_per_s"] else 0.0


def cell(values):
    return f"{statistics.median(values):.1f} ({', '.join(f'{v:.1f}' for v in values)})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("options", nargs="+", metavar="LABEL=SRC")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--write", action="store_true", help="put the table into docs/performance.md")
    args = ap.parse_args(argv)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    options = [o.split("=", 1) for o in args.options]
    if any(len(o) != 2 for o in options):
        ap.error("each option is LABEL=SRC")
    duration = max(0.5, min(args.duration, 60.0))
    rest = {label: [] for label, _ in options}
    line = {label: [] for label, _ in options}
    with fake_cloudfoxy(cards=120) as fake:
        for n in range(max(1, min(args.rounds, 10))):
            for label, src in options:
                for runs, backend, what in ((rest, None, "REST"), (line, LINE, "line")):
                    r = one(src, fake, duration, backend)
                    runs[label].append(r)
                    print(f"round {n + 1} {label} {what}: {r['apdus_per_s']:,.0f} APDUs/s, "
                          f"{cpu(r):.1f} us/APDU, p99 {r['latency_ms']['p99']} ms, "
                          f"errors {r['errors']}", flush=True)
    lines = ["| path | ours: proxy CPU µs/APDU (median; rounds) | reference: line path, same build | "
             "delta (REST minus line, per round) | APDUs/s REST / line | errors |",
             "|---|---|---|---|---|---|"]
    for label, _ in options:
        rs, ls = rest[label], line[label]
        lines.append(f"| REST backend, {label} | {cell([cpu(r) for r in rs])} | {cell([cpu(r) for r in ls])} | "
                     f"{cell([cpu(r) - cpu(q) for r, q in zip(rs, ls)])} | "
                     f"{statistics.median(r['apdus_per_s'] for r in rs):,.0f} / "
                     f"{statistics.median(r['apdus_per_s'] for r in ls):,.0f} | "
                     f"{sum(r['errors'] for r in rs + ls)} |")
    fakes = [fake_cpu(r) for label, _ in options for r in rest[label]]
    lines.append(f"| context: the fake CloudFoxy server's CPU per request (asyncio) | {cell(fakes)} | | | | |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.write:
        write(table, args, load)
    return 0


def write(table, args, load):
    """Replace the section of docs/performance.md after KEEP_MARK."""
    path = os.path.join(os.path.dirname(HERE), "docs", "performance.md")
    with open(path) as f:
        text = f.read()
    if KEEP_MARK in text:
        text = text[:text.index(KEEP_MARK)]
    cmd = "python bench/rest_http.py " + " ".join(sys.argv[1:])
    section = (f"{KEEP_MARK}\n## REST backend: beside the line path\n\n"
               f"Measured {time.strftime('%Y-%m-%d %H:%M')} by `{cmd}` on {os.cpu_count()} CPUs, "
               f"Python {platform.python_version()}; load average before the run {load}. "
               f"The load of the `rest` scenario above (120 cards on the fake CloudFoxy server, 50 "
               f"persistent clients, K=1, every answer checked), {args.duration:g} s measured a load, "
               f"each build also under the same load on `emulated:?cards=120` (the line path), builds and "
               f"paths taking turns {args.rounds} times; the median of the rounds, every round in "
               f"brackets.\n\n"
               f"{table}\n\n{NOTES}\n")
    with open(path, "w") as f:
        f.write(text.rstrip("\n") + "\n\n" + section)
    print(f"wrote {path}")


NOTES = """* **httptools**: `backends/httpclient.py` as shipped, a thin Twisted protocol over llhttp.
* **http11-handwritten**: the hand-written HTTP/1.1 parser this replaced (removed; measured from the
  tree before the change, `git archive c0daa84 src | tar -x -C DIR`).
* **treq-agent**: card commands through treq and twisted.web's Agent with a persistent pool (a copy
  of this tree whose `rest.from_url` passes `client=None`, so `RestBackend.basic` goes through treq).
* **h11**: a copy of this tree whose `httpclient._Connection` drives h11 instead of llhttp (a
  bench-only variant, not kept).

httptools was chosen: the least CPU of the library-backed options, and no hand-written HTTP parsing."""


if __name__ == "__main__":
    sys.exit(main())

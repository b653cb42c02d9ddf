#!/usr/bin/env python3
"""Proxy CPU per APDU of the REST backend's HTTP client options, side by side.

The load of ``bench/run.py``'s ``rest`` scenario (120 cards on the fake
CloudFoxy server, 50 persistent line-protocol clients, K=1, every answer
checked), run against one proxy build per option.  An option is
``LABEL=SRC``: the ``src`` directory of a tree of this project put first on
the proxy's PYTHONPATH (e.g. an older commit exported with ``git archive``,
or a copy with another HTTP client wired in); ``LABEL=.`` is this checkout.
Options take turns, ``--rounds`` times, so that a change in the load of the
machine hits each alike; the median of the rounds is reported.

    .venv/bin/python bench/rest_http.py httptools=. treq=/tmp/treq/src [--rounds 3] [--duration 5]
"""

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from bench import loadgen  # noqa: E402
from bench.helpers import HOST, fake_cloudfoxy, rest_args  # noqa: E402
from bench.run import wait_readers  # noqa: E402
from support import ProxyProcess  # noqa: E402


def one(src, fake_port, duration):
    args, env = rest_args(fake_port)
    if src != ".":
        env = dict(env, PYTHONPATH=os.path.abspath(src))
    p = ProxyProcess(*args, "--no-signing", env=env).start()
    try:
        names = wait_readers(p.port, 120)
        return loadgen.run(HOST, p.port, clients=50, k=1, duration=duration, warmup=1.0,
                           readers=names[:120], pid=p.proc.pid)
    finally:
        p.stop()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("options", nargs="+", metavar="LABEL=SRC")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    args = ap.parse_args(argv)
    options = [o.split("=", 1) for o in args.options]
    runs = {label: [] for label, _ in options}
    with fake_cloudfoxy(cards=120) as fake:
        for n in range(max(1, min(args.rounds, 10))):
            for label, src in options:
                r = one(src, fake.port, args.duration)
                runs[label].append(r)
                print(f"round {n + 1} {label}: {r['apdus_per_s']:,.0f} APDUs/s, "
                      f"{r.get('proxy_cpu_us_per_apdu') or 0:.1f} us/APDU, p99 {r['latency_ms']['p99']} ms, "
                      f"errors {r['errors']}", flush=True)
    print("\n| HTTP client | proxy CPU µs/APDU (median; all rounds) | APDUs/s (median) | p99 ms (median) | errors |")
    print("|---|---|---|---|---|")
    for label, _ in options:
        rs = runs[label]
        cpu = [r.get("proxy_cpu_us_per_apdu") or 0.0 for r in rs]
        print(f"| {label} | {statistics.median(cpu):.1f} ({', '.join(f'{c:.1f}' for c in cpu)}) | "
              f"{statistics.median(r['apdus_per_s'] for r in rs):,.0f} | "
              f"{statistics.median(r['latency_ms']['p99'] for r in rs):.2f} | {sum(r['errors'] for r in rs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

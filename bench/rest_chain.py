#!/usr/bin/env python3
"""The REST path end to end: client -> B -> A, next to FoxyProxy 2.10.

Starts proxy A (``emulated:?cards=N`` and ``--rest``), proxy B
(``--backend cloudfoxy+http://A``) and the original FoxyProxy 2.10
(``-s http://A``, from ``.venv-foxyproxy``, installed when missing), all on
loopback, and drives each with bench/loadgen.py at 1, 10 and 50 clients:
SELECT MF on N cards round robin, every answer checked.  FoxyProxy closes
the connection after every answer, so its clients connect per request.
Bounded: ``--duration`` seconds a load; everything is stopped by PID.

    .venv/bin/python bench/rest_chain.py [--cards 50] [--duration 5] [--clients 1,10,50]
"""

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)

import loadgen  # noqa: E402
from support import HOST, FoxyProxy, ProxyProcess  # noqa: E402

TOKEN = "bench-rest-chain-token"


def measure(port, clients, duration, readers, pid, persistent=True):
    gen = loadgen.LoadGenerator(HOST, port, clients=clients, duration=duration, warmup=1.0,
                                persistent=persistent, readers=readers, pid=pid, linger_reset=False)
    return gen.run()


def row(path, clients, r):
    return (f"| {path} | {clients} | {r['apdus_per_s']:,.0f} | {r['latency_ms']['p50']:.2f} | {r['latency_ms']['p99']:.2f} | "
            f"{r['errors']} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cards", type=int, default=50)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--clients", default="1,10,50")
    ap.add_argument("--no-foxyproxy", action="store_true")
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    env = {"FOXYPROXY_REST_TOKEN": TOKEN, "FOXYPROXY_TOKEN": TOKEN}
    a = ProxyProcess("--backend", f"emulated:?cards={args.cards}", "--rest", f"tcp:0:interface={HOST}",
                     listeners=2, env=env).start()
    rest = f"http://{HOST}:{a.ports['Site'][0]}"
    b = fp = None
    home = tempfile.mkdtemp(prefix="rest-chain-")
    rows = []
    try:
        b = ProxyProcess("--backend", f"cloudfoxy+{rest}", env=env).start()
        a_readers = [f"Emulated {i:02d}" for i in range(args.cards)]
        b_readers = [f"CloudFoxy {n}" for n in a_readers]
        for n in counts:
            rows.append(row("client → A (line protocol, no hop)", n,
                            measure(a.port, n, args.duration, a_readers, a.proc.pid)))
            rows.append(row("client → B → A (REST)", n,
                            measure(b.port, n, args.duration, b_readers, b.proc.pid)))
        if not args.no_foxyproxy:
            fp = FoxyProxy(rest, TOKEN, home)
            fp.wait_ready()
            fp_readers = [f"Foxy USB /{n}" for n in a_readers]
            for n in counts:
                rows.append(row("client → FoxyProxy 2.10 → A (REST)", n,
                                measure(fp.port, n, args.duration, fp_readers, None, persistent=False)))
    finally:
        if fp is not None:
            fp.stop()
        if b is not None:
            b.stop()
        a.stop()
    print(f"SELECT MF on {args.cards} cards round robin, {args.duration:g} s a load, every answer checked\n")
    print("| path | clients | APDUs/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|")
    print("\n".join(sorted(rows, key=lambda r: (r.split("|")[1], int(r.split("|")[2])))))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What access control (docs/security.md) costs on the hot path.

1. In process: the CPU time of a K=1 APDU request through
   ``Dispatcher.execute`` on an emulated card, for the dispatcher of
   ``--base`` (a git commit before access control) and for this tree: with
   no credentials (a loopback client in protected mode), and with
   ``--credentials`` identities (a reader pattern to match, the client's
   secret on every request's reader line as a new string each time, as the
   parser makes it: compared with the connection's cached secret, no
   hashing).
2. Real processes: emulated cards, 50 persistent clients, K=1 (the budget
   load of docs/performance.md): the proxy's CPU per APDU of ``--base``
   (its src/ first on PYTHONPATH), of this tree without credentials, and of
   this tree with ``--credentials`` (every request carries the secret),
   alternating ``--rounds`` times so drift on a shared machine hits all.

Every load is bounded in time; every process is started here and stopped
by its PID.  Usage::

    .venv/bin/python bench/access_overhead.py [--rounds 3] [--duration 5] [--base d7c4918]
"""

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)

from support import HOST, ProxyProcess  # noqa: E402

from bench import loadgen  # noqa: E402
from bench.metrics_overhead import base_tree, execute_cost_of  # noqa: E402

SECRET = "bench-secret-0123456789abcdef0123456789"


def execute_cost(variant, n=20000):
    """Seconds of CPU per K=1 APDU request through Dispatcher.execute (best
    of 25 runs of ``n``); ``variant`` ``base``/``open``: no credentials,
    ``identities``: an identity with a reader pattern, its secret on every
    request (a new str each time)."""
    from twisted.internet.task import Clock

    from cloudfoxy_proxy.backends.emulated import from_url
    from cloudfoxy_proxy.dispatch import Dispatcher, Session
    from cloudfoxy_proxy.parser import Request, make_command
    from cloudfoxy_proxy.registry import ReaderRegistry

    clock = Clock()
    registry = ReaderRegistry()
    backend = from_url("emulated:?cards=1", {})(clock)
    backend.start(registry)
    kw = {}
    password = None
    if variant == "identities":
        from cloudfoxy_proxy.access import Access, Identity

        kw["access"] = Access(by_hash={hashlib.sha256(SECRET.encode()).digest(): Identity(
            "bench", readers=["Emulated 0*"])})
        password = SECRET
    dispatcher = Dispatcher(registry, clock, **kw)
    commands = [make_command(["1", "APDU", "00A4000C023F00"])]
    session = Session("127.0.0.1:1")
    try:
        session.host = "127.0.0.1"
    except AttributeError:
        pass  # the base tree's Session
    execute = dispatcher.execute
    fresh = password is not None
    requests = [Request("Emulated 00", (password + " ")[:-1] if fresh else None, commands)
                for _ in range(n)]  # built outside the timed loop, distinct secret strings
    assert execute(requests[0], session) == [("1", "9000")]
    best = None
    for _ in range(25):
        t0 = time.process_time()
        for request in requests:
            execute(request, session)
        cost = (time.process_time() - t0) / n
        best = cost if best is None else min(best, cost)
    return best


def one(variant, duration, base_src, tmp):
    args, env, readers = ["--no-signing"], {}, None
    if variant == "base":
        env["PYTHONPATH"] = base_src
    elif variant == "identities":
        path = os.path.join(tmp, "credentials.toml")
        with open(path, "w") as f:
            f.write(f'[[client]]\nname = "bench"\nsecret_sha256 = "{hashlib.sha256(SECRET.encode()).hexdigest()}"\n'
                    'readers = ["Emulated 0*"]\n')
        args += ["--credentials", path]
        readers = [f"Emulated 0{i}:{SECRET}" for i in range(4)]
    p = ProxyProcess(*args, env=env).start()
    try:
        r = loadgen.run(HOST, p.port, clients=50, k=1, duration=duration, warmup=1.0, pid=p.proc.pid,
                        readers=readers)
        assert r["errors"] == 0, r["error_samples"]
        return r
    finally:
        p.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--base", default="d7c4918", help="git commit before access control")
    a = ap.parse_args()
    here = os.path.join(REPO, "src")
    variants = ("base", "open", "identities")
    with tempfile.TemporaryDirectory() as tmp:
        old = base_tree(a.base, tmp)
        runs = [[execute_cost_of(old if v == "base" else here, v, "bench.access_overhead") for v in variants] for _ in range(5)]
        best = {v: min(r[i] for r in runs) * 1e6 for i, v in enumerate(variants)}
        print(f"Dispatcher.execute, K=1 APDU on an emulated card, CPU per request (best of 5 x 25 x 20,000): "
              f"{a.base} {best['base']:.2f} us; this tree, no credentials {best['open']:.2f} us "
              f"({best['open'] - best['base']:+.2f}); identities + secret on every request "
              f"{best['identities']:.2f} us ({best['identities'] - best['base']:+.2f})")
        cpu = {v: [] for v in variants}
        for i in range(a.rounds):
            for v in variants:
                r = one(v, a.duration, old, tmp)
                cpu[v].append(r["proxy_cpu_us_per_apdu"])
                print(f"round {i + 1} {v:10}: {r['proxy_cpu_us_per_apdu']:.1f} us/APDU, "
                      f"{r['apdus_per_s']:,.0f} APDUs/s, p99 {r['latency_ms']['p99']} ms")
        if a.rounds:
            print("median proxy CPU per APDU, real processes, 50 clients, K=1: " + ", ".join(
                f"{v} {statistics.median(cpu[v]):.1f} us" for v in variants))


if __name__ == "__main__":
    main()

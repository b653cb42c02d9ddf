#!/usr/bin/env python3
"""What ``--trace`` costs per APDU (docs/performance.md "Tracing").

1. In process: one K=1 line-protocol request through
   ``LineProtocol.dataReceived`` on an emulated card (as
   bench/line_inprocess.py), without a tracer and with one writing JSON
   lines / pcapng to a file: the service's round (``TraceService.flush``:
   format on the reactor thread, then write) every 1000 requests, in the
   same thread, so ``time.process_time`` has the formatting and writing
   in the figure.  Each in its own child process, taking turns.
2. Real processes: emulated, 4 cards, 50 persistent clients, K=1 (the
   budget load), the proxy's CPU per APDU without ``--trace``, with
   ``--trace FILE.jsonl`` and with ``--trace FILE.pcapng``, and the
   machine's floor (bench/trivial_responder.py), taking turns ``--rounds``
   times so drift on a shared machine hits all alike.

Prints ``| load | off | jsonl | pcapng | overhead % |``: medians, every
round in brackets, the overhead of each format against "off" of the same
run (and the machine's floor for the real-process load), and the median
of each round's own ratio to the "off" run just before it (steadier than
the ratio of medians while other work shares the machine).  Every load is
bounded in time; every process is started here and stopped by its PID.
Usage::

    .venv/bin/python bench/trace_overhead.py [--rounds 5] [--duration 4]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from bench import loadgen  # noqa: E402
from bench.helpers import HOST  # noqa: E402
from bench.line_builds import floor_load  # noqa: E402
from bench.run import wait_readers  # noqa: E402
from support import ProxyProcess  # noqa: E402

CHILD = r"""
import json, sys, time
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from cloudfoxy_proxy.backends.emulated import EmulatedBackend
from cloudfoxy_proxy.cards.iso7816 import Iso7816Card
from cloudfoxy_proxy.dispatch import Dispatcher
from cloudfoxy_proxy.frontends.line import LineFactory
from cloudfoxy_proxy.registry import ReaderRegistry

n, path = int(sys.argv[1]), sys.argv[2]
clock = Clock()
registry = ReaderRegistry()
EmulatedBackend(clock=clock, cards=[Iso7816Card(serial=0)]).start(registry)
dispatcher = Dispatcher(registry, clock)
service = None
if path != "-":
    from cloudfoxy_proxy.trace import Tracer, TraceService, trace_file
    dispatcher.trace = Tracer()
    service = TraceService(dispatcher.trace, [trace_file(path)], clock)
    dispatcher.trace.files += 1  # as startService does; its rounds are called here, no reactor
factory = LineFactory(dispatcher)
protocol = factory.buildProtocol(None)
transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
protocol.makeConnection(transport)
request = b">Emulated 00|\n>1:APDU:00A4000C023F00|\n\n"
feed = protocol.dataReceived
best = None
for _ in range(5):
    transport.clear()
    start = time.process_time()
    for i in range(n):
        feed(request)
        if i % 1000 == 999 and service is not None:  # the service's round (every 50 ms in a proxy)
            service.flush()
    if service is not None:
        service.flush()
    took = (time.process_time() - start) / n
    assert transport.value().count(b">1:9000\n@@\n") == n
    best = took if best is None else min(best, took)
print(json.dumps(best * 1e6))
"""


def inprocess(path, requests):
    out = subprocess.run([sys.executable, "-c", CHILD, str(requests), path], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, PYTHONPATH=os.path.join(REPO, "src")))
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def proxy_load(args, clients, duration):
    p = ProxyProcess("--no-signing", *args).start()
    try:
        names = wait_readers(p.port, 4)
        return loadgen.run(HOST, p.port, clients=clients, k=1, duration=duration, warmup=1.0,
                           readers=names[:4], pid=p.proc.pid)
    finally:
        p.stop()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--no-processes", action="store_true", help="only the in-process figure")
    args = ap.parse_args(argv)
    rounds = max(1, min(args.rounds, 10))
    duration = max(0.5, min(args.duration, 30.0))
    kinds = ("off", "jsonl", "pcapng")
    with tempfile.TemporaryDirectory() as tmp:
        inproc = {k: [] for k in kinds}
        for n in range(rounds):
            for kind in kinds:
                inproc[kind].append(inprocess("-" if kind == "off" else os.path.join(tmp, f"in{n}.{kind}"),
                                              args.requests))
            print(f"in process round {n + 1}: " + ", ".join(f"{k} {inproc[k][-1]:.2f} us" for k in kinds),
                  flush=True)
        real = {k: [] for k in kinds + ("floor",)}
        if not args.no_processes:
            for n in range(rounds):
                for kind in real:
                    if kind == "floor":
                        r = floor_load(args.clients, duration)
                    elif kind == "off":
                        r = proxy_load([], args.clients, duration)
                    else:
                        r = proxy_load(["--trace", os.path.join(tmp, f"r{n}.{kind}")], args.clients, duration)
                    assert r["errors"] == 0, r.get("error_samples")
                    real[kind].append(r["proxy_cpu_us_per_apdu"])
                    print(f"round {n + 1} {kind}: {r['proxy_cpu_us_per_apdu']:.1f} us/APDU, "
                          f"{r['apdus_per_s']:,.0f} APDUs/s", flush=True)

    def cell(values):
        return f"{statistics.median(values):.2f} ({', '.join(f'{v:.2f}' for v in values)})"

    def overhead(runs):
        off = statistics.median(runs["off"])
        return " / ".join(
            f"{k} {(statistics.median(runs[k]) - off) / off * 100:+.1f} % "
            f"({statistics.median(runs[k]) - off:+.2f} µs; per round {statistics.median(on / o - 1 for on, o in zip(runs[k], runs['off'])) * 100:+.1f} %)"
            for k in ("jsonl", "pcapng"))

    print("\n| load | off | jsonl | pcapng | overhead % |")
    print("|---|---|---|---|---|")
    print(f"| in process, one K=1 request, CPU µs (all threads) | {cell(inproc['off'])} | {cell(inproc['jsonl'])} "
          f"| {cell(inproc['pcapng'])} | {overhead(inproc)} |")
    if not args.no_processes:
        print(f"| real processes, emulated, 4 cards, {args.clients} clients, K=1, proxy CPU µs/APDU "
              f"(floor: trivial responder {cell(real['floor'])}) | {cell(real['off'])} | {cell(real['jsonl'])} "
              f"| {cell(real['pcapng'])} | {overhead(real)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

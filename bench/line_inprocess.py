#!/usr/bin/env python3
"""In process, the CPU time of one line-protocol request of K APDUs: the
bytes of ``>Emulated 00|`` / K lines ``>N:APDU:00A4000C023F00|`` / a blank
line into ``LineProtocol.dataReceived`` (framer, parser, dispatcher, an
emulated card, the answer written to a StringTransport; with ``--guard``
through the connection guard every listener has, ``limits._Guard``), for
several builds taking turns, each in its own process (``LABEL=SRC``: SRC's
``src`` first on PYTHONPATH).  No sockets and no reactor: the front end's and core's Python
alone, so a change that costs a fraction of a microsecond shows above the
noise of a shared machine.  Prints the median of ``--rounds`` rounds (each
the best of 5 batches of ``--requests`` requests) per build.

    .venv/bin/python bench/line_inprocess.py before=/tmp/old/src now=src --rounds 5 [--k 4] [--guard]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from cloudfoxy_proxy.backends.emulated import EmulatedBackend
from cloudfoxy_proxy.cards.iso7816 import Iso7816Card
from cloudfoxy_proxy.dispatch import Dispatcher
from cloudfoxy_proxy.frontends.line import LineFactory
from cloudfoxy_proxy.limits import ConnectionLimits
from cloudfoxy_proxy.registry import ReaderRegistry

n, k, guard = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "guard"
clock = Clock()
registry = ReaderRegistry()
EmulatedBackend(clock=clock, cards=[Iso7816Card(serial=0)]).start(registry)
factory = LineFactory(Dispatcher(registry, clock))
if guard:
    factory = ConnectionLimits(clock, nofile=0).wrap(factory)
protocol = factory.buildProtocol(None)
transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
protocol.makeConnection(transport)
request = b">Emulated 00|\n" + b"".join(b">%d:APDU:00A4000C023F00|\n" % i for i in range(k)) + b"\n"
answer = b"".join(b">%d:9000\n" % i for i in range(k)) + b"@@\n"
feed = protocol.dataReceived
best = None
for _ in range(5):
    transport.clear()
    start = time.process_time()
    for _ in range(n):
        feed(request)
    took = (time.process_time() - start) / n
    assert transport.value().count(answer) == n, transport.value()[:200]
    best = took if best is None else min(best, took)
print(json.dumps(best * 1e6))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("builds", nargs="+", metavar="LABEL=SRC")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--k", type=int, default=1, help="APDUs per request (1..256)")
    parser.add_argument("--guard", action="store_true", help="through limits._Guard, as every listener is")
    args = parser.parse_args()
    builds = [b.split("=", 1) for b in args.builds]
    results = {label: [] for label, _ in builds}
    for _ in range(args.rounds):
        for label, src in builds:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(src))
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.requests), str(max(1, min(args.k, 256))),
                                  "guard" if args.guard else "bare"], env=env, check=True,
                                 capture_output=True, text=True, timeout=300).stdout
            results[label].append(json.loads(out))
    print(f"| build | CPU µs per K={args.k} request in process{' through the guard' if args.guard else ''} "
          "(median; rounds) |")
    print("|---|---|")
    for label, values in results.items():
        print(f"| {label} | {statistics.median(values):.2f} ({', '.join(f'{v:.2f}' for v in values)}) |")


if __name__ == "__main__":
    main()

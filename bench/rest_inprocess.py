#!/usr/bin/env python3
"""In process, the CPU time of one K=1 line-protocol request on the REST
backend, beside the same request on an emulated card: the REST backend's
own Python cost per APDU, without sockets, system calls or reactor.

Both run the line front end, parser and dispatcher on a StringTransport.
The REST one (``cloudfoxy+http://``'s ``RestBackend`` with its
``httpclient.HTTPPool``) writes its GET to an in-memory connection; the
bench then feeds that connection the answer the fake CloudFoxy server
(bench/fake_cloudfoxy.py) sends, so the request completes asynchronously
as on a real socket (the dispatcher's and the front end's asynchronous
path included).  One other command is kept pending, as under load, so the
dispatcher's timeout timer stays armed.  Each build (``LABEL=SRC``: SRC's
``src`` first on PYTHONPATH) runs in its own process, builds take turns;
the median of ``--rounds`` rounds (each the best of 5 batches of
``--requests`` requests) is printed, with the delta REST minus emulated.

    .venv/bin/python bench/rest_inprocess.py now=src [before=/tmp/old/src] [--rounds 5]
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
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from cloudfoxy_proxy.backends import ReaderUpdates
from cloudfoxy_proxy.backends.emulated import EmulatedBackend
from cloudfoxy_proxy.backends.httpclient import HTTPPool
from cloudfoxy_proxy.backends.rest import RestBackend
from cloudfoxy_proxy.cards.iso7816 import Iso7816Card
from cloudfoxy_proxy.dispatch import Dispatcher
from cloudfoxy_proxy.frontends.line import LineFactory
from cloudfoxy_proxy.registry import ReaderRegistry

ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
          b"Content-Length: 5\r\n\r\n9000\n")  # what bench/fake_cloudfoxy.py sends
written = []


class Upstream(StringTransport):
    def write(self, data):
        written.append((self.protocol, data))


class Endpoint:
    def connect(self, factory):
        protocol = factory.buildProtocol(None)
        transport = Upstream()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return succeed(protocol)


mode, n = sys.argv[1], int(sys.argv[2])
clock = Clock()
registry = ReaderRegistry()
if mode == "emulated":
    EmulatedBackend(clock=clock, cards=[Iso7816Card(serial=0)]).start(registry)
    request = b">Emulated 00|\n>1:APDU:00A4000C023F00|\n\n"
else:
    client = HTTPPool(clock, Endpoint(), "127.0.0.1:8081", 1 << 20)
    backend = RestBackend(base_url="http://127.0.0.1:8081", token="bench-token", clock=clock,
                          http=None, client=client)
    backend._registry = registry
    backend._updates = ReaderUpdates(registry, backend, clock)
    backend._inventory(b"/127.0.0.1@0 3B8F8001804F0CA000000306030001000000006A\n")
    request = b">CloudFoxy 127.0.0.1@0|\n>1:APDU:00A4000C023F00|\n\n"
dispatcher = Dispatcher(registry, clock)
dispatcher.deadlines.watch(Deferred())  # another command in flight, as under load
factory = LineFactory(dispatcher)
protocol = factory.buildProtocol(None)
transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
protocol.makeConnection(transport)
feed = protocol.dataReceived


def answer():
    upstream, data = written.pop()
    assert data.startswith(b"GET /api/v1/basic?terminal=/127.0.0.1@0&reset=0&apdu=00A4000C023F00 "), data
    upstream.dataReceived(ANSWER)


feed(request)
if mode != "emulated":
    answer()
assert transport.value().endswith(b">1:9000\n@@\n"), transport.value()
best = None
for _ in range(5):
    transport.clear()
    if mode == "emulated":
        start = time.process_time()
        for _ in range(n):
            feed(request)
    else:
        pop = written.pop
        start = time.process_time()
        for _ in range(n):
            feed(request)
            upstream, _data = pop()
            upstream.dataReceived(ANSWER)
    took = (time.process_time() - start) / n
    assert transport.value().count(b">1:9000\n@@\n") == n, transport.value()[:200]
    best = took if best is None else min(best, took)
if mode != "emulated":
    feed(request)
    answer()  # the request line checked once more, outside the timing
print(json.dumps(best * 1e6))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("builds", nargs="+", metavar="LABEL=SRC")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    builds = [b.split("=", 1) for b in args.builds]
    if any(len(b) != 2 for b in builds):
        parser.error("each build is LABEL=SRC")
    results = {(label, mode): [] for label, _ in builds for mode in ("rest", "emulated")}
    for _ in range(max(1, min(args.rounds, 20))):
        for label, src in builds:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(src))
            for mode in ("rest", "emulated"):
                out = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.requests)], env=env,
                                     check=True, capture_output=True, text=True, timeout=300).stdout
                results[label, mode].append(json.loads(out))

    def cell(values):
        return f"{statistics.median(values):.2f} ({', '.join(f'{v:.2f}' for v in values)})"

    print("| build | REST: CPU µs per K=1 request in process (median; rounds) | emulated, same build | "
          "delta (REST minus emulated) |")
    print("|---|---|---|---|")
    for label, _ in builds:
        rest, emulated = results[label, "rest"], results[label, "emulated"]
        print(f"| {label} | {cell(rest)} | {cell(emulated)} | "
              f"{cell([r - e for r, e in zip(rest, emulated)])} |")


if __name__ == "__main__":
    main()

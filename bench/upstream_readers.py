#!/usr/bin/env python3
"""How long a huge upstream reader list blocks the reactor (issue 12 point 2).

In one process, on the real reactor: a LoopingCall ticks every 2 ms and
records the longest gap between ticks while

1. a ``tcp://`` backend reads a READERS answer of ``--names`` names (fed to
   its connection in 64 KiB reads, as the kernel would deliver them) and
   hands the first ``readers_max`` to the registry;
2. a ``cloudfoxy+http://`` backend takes an inventory of ``--names`` cards;

with the REST front end's inventory listening to the registry, as with
``--rest``.  The stall is the longest gap minus the 2 ms tick.  Bounded:
each scenario runs at most ``--seconds`` seconds.  Usage::

    .venv/bin/python bench/upstream_readers.py [--names 200000] [--json]
"""

import argparse
import base64
import json
import time

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.testing import StringTransport

from cloudfoxy_proxy.backends import rest, tcp, tcp_upstream
from cloudfoxy_proxy.registry import ReaderRegistry
from cloudfoxy_proxy.frontends.rest import Inventory

TICK = 0.002


class Gaps:
    def __init__(self):
        self.last = time.perf_counter()
        self.worst = 0.0
        self.loop = task.LoopingCall(self.tick)

    def tick(self):
        now = time.perf_counter()
        self.worst = max(self.worst, now - self.last)
        self.last = now


def sleep(seconds):
    d = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@inlineCallbacks
def measure(name, feed, registry, seconds):
    gaps = Gaps()
    gaps.loop.start(TICK)
    yield sleep(0.1)
    gaps.worst = 0.0
    started = time.perf_counter()
    yield feed()
    while len(registry.readers) < 2 and time.perf_counter() - started < seconds:
        yield sleep(0.05)
    yield sleep(0.3)  # chunked updates finish
    gaps.loop.stop()
    return {"scenario": name, "readers": len(registry.readers),
            "worst_stall_ms": round(max(0.0, gaps.worst - TICK) * 1000, 1)}


def tcp_scenario(names, seconds):
    registry = ReaderRegistry()
    Inventory(registry, reactor)
    backend = tcp.TcpBackend(endpoint=None, clock=reactor, where="tcp://bench")
    backend._registry = registry
    backend._updates = tcp.ReaderUpdates(registry, backend, reactor)
    backend._running = True
    proto = tcp_upstream._UpstreamProtocol(backend, False)
    proto.makeConnection(StringTransport())
    listing = "|".join(base64.b64encode(b"N%d" % i).decode() for i in range(names)).encode()
    data = b">1:" + listing + b"\n@@\n"

    @inlineCallbacks
    def feed():
        call = tcp_upstream._Call(backend, [b"1"], None, b"", readers=True)
        call.d.addCallback(backend._got_readers)
        proto.send(call)
        for i in range(0, len(data), 65536):
            proto.dataReceived(data[i:i + 65536])
            yield sleep(0)

    return measure(f"tcp:// READERS of {names} names", feed, registry, seconds)


def rest_scenario(names, seconds):
    registry = ReaderRegistry()
    Inventory(registry, reactor)
    backend = rest.RestBackend(base_url="http://bench", token="t", clock=reactor, http=None)
    backend._registry = registry
    backend._updates = rest.ReaderUpdates(registry, backend, reactor)
    limit = backend.readers_max * rest.INVENTORY_BYTES_PER_CARD + 4096
    body = b"".join(b"/10.0.%d.%d@%d 3B00\n" % (i >> 16 & 255, i >> 8 & 255, i) for i in range(names))
    body = body[:limit]  # what read_body lets through

    def feed():
        backend._inventory(body)
        return sleep(0)

    lines = body.count(b"\n")
    return measure(f"REST inventory of {lines} cards ({len(body)} bytes)", feed, registry, seconds)


@inlineCallbacks
def main(args):
    results = [(yield tcp_scenario(args.names, args.seconds)),
               (yield rest_scenario(args.names, args.seconds))]
    reactor.stop()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['scenario']}: {r['readers']} readers kept, "
                  f"longest reactor stall {r['worst_stall_ms']} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=200000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    reactor.callWhenRunning(main, args)
    reactor.run()

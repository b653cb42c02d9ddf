#!/usr/bin/env python3
"""A small scripted CloudFoxy RESTful server (docs/rest.md) on
twisted.web, for failure-injection tests of the ``cloudfoxy+http`` backend.

Cards ``/127.0.0.1@N`` are emulated ISO 7816 cards.  Besides the CloudFoxy
API (``/api/v1/basic``, ``/inventory``, ``/hello``; ``X-Auth-Token``
required), ``GET /_stub/control?...`` changes the behaviour of
``/api/v1/basic`` (no token needed; loopback only):

* ``status=500``: answer every command with that HTTP status (``status=200``: normal);
* ``slow=SECONDS``: send the headers and half the body at once, the rest later;
* ``hw=N``: the next N commands answer ``C000`` (CloudFoxy hardware error);
* ``restart=1&cards=1,2,5``: uptime starts again from 0 with these cards;
* ``down=SECONDS``: stop listening and drop every connection for that long
  (clients get "connection refused"), then listen again on the same port.

``GET /_stub/stats`` answers JSON counters: ``basic`` (commands received),
``aborted`` (requests whose client hung up before the answer was complete),
``connections``.

Run: ``python tests/cloudfoxy_stub.py --port 0 --cards 4 --token T``; it
prints ``port N`` when listening and stops after ``--stop-after`` seconds.
"""

import argparse
import json
import sys
import time

from twisted.internet import reactor
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from cloudfoxy_proxy.cards.iso7816 import Iso7816Card


class Stub(Resource):
    isLeaf = True

    def __init__(self, cards, token, ip="127.0.0.1"):
        super().__init__()
        self.ip = ip
        self.token = token.encode() if token else None
        self.cards = {}
        self.set_cards(range(1, cards + 1))
        self.started = time.monotonic()
        self.status = 200
        self.slow = 0.0
        self.hw = 0
        self.basic_count = 0
        self.aborted = 0
        self.site = None
        self.port = None
        self.port_number = None

    def set_cards(self, numbers):
        self.cards = {f"/{self.ip}@{n}": Iso7816Card(serial=n) for n in numbers}

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        path = request.path
        if path == b"/_stub/control":
            return self.control(request)
        if path == b"/_stub/stats":
            return json.dumps({"basic": self.basic_count, "aborted": self.aborted,
                               "connections": len(self.site.channels)}).encode()
        if self.token is not None and request.getHeader(b"x-auth-token") != self.token:
            request.setResponseCode(401)
            return b"unauthorized\n"
        if path == b"/api/v1/hello":
            up = int(time.monotonic() - self.started)
            return f"CloudFoxy stub\nuptime {up} seconds\ncards {len(self.cards)}\n".encode()
        if path == b"/api/v1/inventory":
            return "".join(f"{name} {card.atr.hex().upper()}\n" for name, card in self.cards.items()).encode()
        if path == b"/api/v1/basic":
            return self.basic(request)
        request.setResponseCode(404)
        return b"not found\n"

    def arg(self, request, name, default=None):
        values = request.args.get(name.encode())
        return values[0].decode() if values else default

    def control(self, request):
        if self.arg(request, "status"):
            self.status = int(self.arg(request, "status"))
        if self.arg(request, "slow"):
            self.slow = float(self.arg(request, "slow"))
        if self.arg(request, "hw"):
            self.hw = int(self.arg(request, "hw"))
        if self.arg(request, "restart"):
            self.started = time.monotonic()
            cards = self.arg(request, "cards")
            if cards is not None:
                self.set_cards(int(n) for n in cards.split(",") if n)
        if self.arg(request, "down"):
            reactor.callLater(0.05, self.go_down, float(self.arg(request, "down")))
        return b"OK\n"

    def go_down(self, seconds):
        self.port.stopListening()
        for channel in list(self.site.channels):
            channel.transport.abortConnection()
        reactor.callLater(seconds, self.listen)

    def listen(self):
        self.port = reactor.listenTCP(self.port_number or 0, self.site, interface="127.0.0.1")
        self.port_number = self.port.getHost().port

    def basic(self, request):
        self.basic_count += 1
        if self.status != 200:
            request.setResponseCode(self.status)
            return b"stub failure\n"
        card = self.cards.get(self.arg(request, "terminal", ""))
        if card is None:
            request.setResponseCode(404)
            return b"unknown terminal\n"
        if self.hw:
            self.hw -= 1
            body = b"C000\n"
        else:
            reset = self.arg(request, "reset", "0") == "1"
            apdu = self.arg(request, "apdu")
            out = card.reset() if reset else None
            if apdu is not None:
                out = card.transmit(bytes.fromhex(apdu))
            body = b"null\n" + out.hex().upper().encode() + b"\n\n"
        if not self.slow:
            return body
        request.setHeader(b"content-length", str(len(body)).encode())
        half = len(body) // 2
        request.write(body[:half])
        call = reactor.callLater(self.slow, self.finish, request, body[half:])

        def gone(_):
            self.aborted += 1
            if call.active():
                call.cancel()

        request.notifyFinish().addErrback(gone)
        return NOT_DONE_YET

    @staticmethod
    def finish(request, rest):
        request.write(rest)
        request.finish()


class _Channel(HTTPChannel):
    def connectionMade(self):
        super().connectionMade()
        self.site.channels.add(self)

    def connectionLost(self, reason):
        self.site.channels.discard(self)
        super().connectionLost(reason)


class StubSite(Site):
    protocol = _Channel
    noisy = False

    def __init__(self, resource):
        super().__init__(resource)
        self.channels = set()

    def log(self, request):
        pass


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cards", type=int, default=4)
    p.add_argument("--token", default="stub-token")
    p.add_argument("--stop-after", type=float, default=300.0)
    a = p.parse_args(argv)
    stub = Stub(a.cards, a.token)
    stub.site = StubSite(stub)
    stub.port_number = a.port
    stub.listen()
    print(f"port {stub.port_number}", flush=True)
    reactor.callLater(a.stop_after, reactor.stop)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

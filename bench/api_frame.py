#!/usr/bin/env python3
"""CPU time of one WebSocket transmit inside the proxy, in one process:
a masked client frame ``{"id", "reader", "apdus": [SELECT MF]}`` goes into
``ApiWebSocket.dataReceived`` (Autobahn's frame handling, JSON, the
dispatcher, an emulated card) and the answer frame comes out on a
``StringTransport``; no sockets, no reactor.

Two ways, to show why one client costs so much more per APDU than many:

* back to back (best of 5 x 20,000 frames): caches and branch predictors
  hold exactly this code, as under load with many clients;
* after a pause (``time.sleep``) before every frame, median of 3,000: the
  CPU has run other code (the kernel, other processes) in between, as for
  a proxy woken by each message of one client.

    .venv/bin/python bench/api_frame.py            # PYTHONPATH=DIR/src for another build

Loopback-free and bounded: about 20 s.
"""

import base64
import json
import statistics
import sys
import time
import timeit

SELECT_MF = "00A4000C023F00"
TOKEN = "bench-api-frame-token"


def client_frame(payload, mask=b"\x37\xfa\x21\x3d"):
    """One masked text frame (RFC 6455 section 5.2), payload under 126 bytes."""
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def connection():
    """(protocol, transport, frame): an upgraded, authenticated ApiWebSocket
    and one transmit frame."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from cloudfoxy_proxy.backends.emulated import EmulatedBackend
    from cloudfoxy_proxy.cards.iso7816 import Iso7816Card
    from cloudfoxy_proxy.dispatch import Dispatcher
    from cloudfoxy_proxy.frontends import api
    from cloudfoxy_proxy.registry import ReaderRegistry

    clock, registry = Clock(), ReaderRegistry()
    EmulatedBackend(clock=clock, cards=[Iso7816Card(serial=i) for i in range(4)]).start(registry)
    if hasattr(api, "API"):  # the API on the HTTP base: the token is an access secret
        from twisted.application.service import MultiService

        from cloudfoxy_proxy.access import Access
        from cloudfoxy_proxy.frontends.base import Core
        from cloudfoxy_proxy.limits import ConnectionLimits

        dispatcher = Dispatcher(registry, clock, command_timeout=5.0, access=Access(simple=[(TOKEN, "api")]))
        core = Core(reactor=clock, dispatcher=dispatcher, registry=registry, limits=ConnectionLimits(clock),
                    service=MultiService())
        resource = api.API.site(api.ApiSettings(endpoint="tcp:0"), core).resource
    else:  # an older build (PYTHONPATH=DIR/src): BearerAuth
        resource = api.ApiResource(Dispatcher(registry, clock, command_timeout=5.0), registry,
                                   api.BearerAuth(TOKEN), clock)
    ws = resource.ws_factory.buildProtocol(None)
    transport = StringTransport()
    ws.makeConnection(transport)
    key = base64.b64encode(b"bench-api-frame!").decode()
    ws.dataReceived((f"GET /api/v1/ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                     f"Authorization: Bearer {TOKEN}\r\n\r\n").encode())
    if not transport.value().startswith(b"HTTP/1.1 101 "):
        raise SystemExit(f"no WebSocket: {transport.value()[:200]!r}")
    transport.clear()
    if ws.identity is None:  # not judged by the HTTP channel here: the first message authenticates
        ws.dataReceived(client_frame(json.dumps({"id": 0, "auth": TOKEN}).encode()))
        if b'"authenticated":true' not in transport.value():
            raise SystemExit(f"not authenticated: {transport.value()!r}")
        transport.clear()
    frame = client_frame(json.dumps({"id": 1, "reader": "Emulated 00", "apdus": [SELECT_MF]}).encode())
    ws.dataReceived(frame)
    answer = transport.value()
    if b'"responses":["9000"]' not in answer.replace(b" ", b""):
        raise SystemExit(f"unexpected answer {answer!r}")
    transport.clear()
    return ws, transport, frame


def main():
    ws, transport, frame = connection()

    def one():
        ws.dataReceived(frame)
        transport.clear()

    n = 20000
    hot = min(timeit.repeat(one, number=n, repeat=5)) / n * 1e6
    rows = [("back to back (best of 5 x 20,000)", hot)]
    for gap in (0.0001, 0.001):
        cpu = []
        for _ in range(3000):
            time.sleep(gap)
            t0 = time.thread_time_ns()
            one()
            cpu.append((time.thread_time_ns() - t0) / 1000)
        rows.append((f"after a {gap * 1e6:.0f} µs sleep (median of 3,000)", statistics.median(cpu)))
    print("| one WebSocket transmit, frame in to frame out, in process | CPU µs |")
    print("|---|---|")
    for what, us in rows:
        print(f"| {what} | {us:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

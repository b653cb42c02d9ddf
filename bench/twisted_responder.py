#!/usr/bin/env python3
"""The cheapest honest Twisted server for the line protocol: a
``twisted.internet.protocol.Protocol`` whose ``dataReceived`` frames lines
as ``bench/trivial_responder.py`` does (every command line ``>ID:...`` is
answered ``>ID:9000``; a request ends with ``@@`` on an empty line, or when
all received bytes are consumed and a command is pending:
docs/protocol.md "When a request is complete", rule 2) and makes one
``transport.write`` per read.  No parsing beyond framing, no readers, no
cards, no ``twistd``; the default reactor (epoll on Linux), TCP_NODELAY as
the proxy sets it.

It is the floor of the proxy's line path: what Twisted's reactor and TCP
transport alone cost per request under the same load
(``bench/line_builds.py --floor twisted``).

    python bench/twisted_responder.py --port 0     # prints "port N"
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trivial_responder import frame  # noqa: E402  (the same framing rule)


def make_factory():
    from twisted.internet.protocol import Factory, Protocol

    class Responder(Protocol):
        partial = b""

        def __init__(self):
            self.out = []

        def connectionMade(self):
            self.transport.setTcpNoDelay(True)

        def dataReceived(self, data):
            self.partial, reply = frame(self.partial + data if self.partial else data, self.out)
            if reply:
                self.transport.write(b"".join(reply))

    factory = Factory()
    factory.protocol = Responder
    factory.noisy = False
    return factory


def main(argv=None):
    p = argparse.ArgumentParser(description="Answer every line-protocol command with 9000 (Twisted).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    p.add_argument("--stop-after", type=float, default=3600.0, help="exit after this many seconds")
    a = p.parse_args(argv)
    from twisted.internet import reactor

    port = reactor.listenTCP(a.port, make_factory(), backlog=1024, interface=a.host)
    print(f"port {port.getHost().port}", flush=True)
    reactor.callLater(a.stop_after, reactor.stop)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

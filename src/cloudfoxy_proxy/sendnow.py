"""Write a whole message to a TCP socket at once, when nothing is queued.

Twisted's ``transport.write`` only buffers: the bytes leave on the
reactor's next turn, after ``epoll`` has reported the socket writable, and
the transport then stops watching it again.  For a proxy whose every APDU
is one small message in and one out on each side, that is two more
``epoll_ctl`` calls and one more reactor event per message.
:func:`write_now` sends at once when the transport has nothing queued and
hands whatever the kernel did not take (or any error) back to
``transport.write``, so ordering, flow control (producers) and error
handling stay Twisted's.

Measured reason (``bench/rest_http.py``, 120 cards, 50 clients, K=1): see
docs/performance.md, "Sending at once".

Only a plain ``twisted.internet.tcp`` connection qualifies (one that
started TLS, and other transports, go through ``transport.write`` as
before); the check reads the
attributes ``twisted.internet.abstract.FileDescriptor`` keeps its send
buffer in, and a Twisted without them simply gets ``transport.write``.
"""

from twisted.internet import tcp

from .twisted_internals import nothing_queued

_TCP = tcp.Connection


def write_now(transport, data):
    """Send ``data`` (bytes, one whole message) on ``transport`` now if it
    is a plain TCP connection with an empty send buffer; else, and for the
    part the kernel did not take, ``transport.write(data)``."""
    if (isinstance(transport, _TCP) and transport.connected and not transport.disconnecting
            and not transport.TLS and nothing_queued(transport)):
        try:
            sent = transport.socket.send(data)
        except OSError:  # full, interrupted, or an error the write path below meets and closes on as usual
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


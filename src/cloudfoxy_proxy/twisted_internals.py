"""The one place that reads or sets private attributes of Twisted (and
pyOpenSSL-facing TLS options): every other module calls these functions.

Each is here because Twisted offers no public way to do it; each says
what it relies on.  ``setup.cfg`` pins the Twisted range they were checked
with (22.10 up to 26.x), and tests/test_twisted_internals.py checks every
attribute on the installed Twisted, so an upgrade that removes one fails
the suite instead of the proxy.  (Autobahn's private methods overridden
for speed are all in ``frontends/websocket.py``.)
"""

from twisted.python.failure import Failure


def raise_listen_errors(service):
    """Make a StreamServerEndpointService raise a listen failure from
    ``privilegedStartService`` instead of only logging it
    (``_raiseSynchronously``), so start-up stops with one clear line."""
    service._raiseSynchronously = True


def listening(service):
    """True once a StreamServerEndpointService's endpoint listens (Twisted
    keeps the listen Deferred as ``_waitingForPort``; after a failure its
    result is None)."""
    d = getattr(service, "_waitingForPort", None)
    if not (service.running and d is not None and d.called):
        return False
    return d.result is not None and not isinstance(d.result, Failure)


def listening_port(service):
    """The IListeningPort of a StreamServerEndpointService that listens, or None."""
    return service._waitingForPort.result if listening(service) else None


def forget_exit_signal(reactor, signum):
    """twistd re-raises the signal that stopped the reactor once it has run
    down (``_exitSignal``), so the process dies of it; after an orderly
    stop on ``signum`` the process should exit 0 instead."""
    if getattr(reactor, "_exitSignal", None) == signum:
        reactor._exitSignal = None


def unsent_bytes(transport):
    """Bytes a FileDescriptor transport holds that the peer has not taken
    yet: ``dataBuffer`` past ``offset``, and ``_tempDataLen`` (the writes
    not yet joined into it)."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def held_back(transport):
    """Bytes written to a connection's transport that the proxy still
    holds (not yet handed to the kernel): following protocol wrappers down
    (``transport``), a TLS transport's cleartext waiting for the handshake
    (``_appSendBuffer``) and its small-write aggregator (``_aggregator._buffer``,
    flushed on the next reactor turn), then the TCP transport's
    ``unsent_bytes``; 0 for a transport with no such buffers.  After the
    connection was lost, Twisted leaves a TCP transport's buffer as it was:
    what was never sent (TLS's aggregator is flushed into the closed
    connection then, and no longer counted)."""
    from twisted.internet.abstract import FileDescriptor

    held, depth = 0, 0
    while transport is not None and depth < 8:
        if isinstance(transport, FileDescriptor):
            return held + unsent_bytes(transport)
        own = vars(transport) if hasattr(transport, "__dict__") else {}  # wrappers forward other names down
        held += sum(len(b) for b in own.get("_appSendBuffer") or ())
        held += sum(len(b) for b in getattr(own.get("_aggregator"), "_buffer", None) or ())
        transport = own.get("transport")
        depth += 1
    return held


def nothing_queued(transport):
    """True when a FileDescriptor transport has no bytes waiting to be
    sent (``_tempDataLen`` and ``dataBuffer`` empty)."""
    return not getattr(transport, "_tempDataLen", 1) and not transport.dataBuffer


def tls_server_parts(endpoint):
    """``(reactor, port, context factory, backlog, interface)`` of a TLS
    server endpoint (``SSL4ServerEndpoint`` keeps them as ``_reactor``,
    ``_port``, ``_sslContextFactory``, ``_backlog``, ``_interface``), or
    None for other endpoints."""
    from twisted.internet.endpoints import SSL4ServerEndpoint

    if not isinstance(endpoint, SSL4ServerEndpoint):
        return None
    return (endpoint._reactor, endpoint._port, endpoint._sslContextFactory, endpoint._backlog,
            endpoint._interface)


def tls_options(endpoint):
    """The context factory of a TLS server endpoint (``SSL4ServerEndpoint``
    keeps it as ``_sslContextFactory``), or None for other endpoints."""
    options = getattr(endpoint, "_sslContextFactory", None)
    return options if hasattr(options, "getContext") else None


def quiet_retries(service_class, logger):
    """Give a ClientService subclass ``logger`` for its connection-retry
    lines (ClientService logs every retry at info through ``_log``)."""
    service_class._log = logger


def use_monotonic_clock(reactor):
    """Make ``reactor`` (a real reactor: a ``twisted.internet.base.ReactorBase``)
    measure time on ``time.monotonic`` instead of the wall clock: every
    ``callLater``, ``LoopingCall`` and timeout then keeps its length when
    the wall clock is stepped (NTP, a VM's clock fix).  Wall-clock time
    stays where it belongs: log and audit timestamps read ``time.time``
    themselves, not the reactor.

    Twisted lets ``seconds`` be replaced (``ReactorBase.seconds``, used by
    ``callLater``, ``runUntilCurrent`` and ``timeout``); the calls scheduled
    before the switch are moved onto the new clock, keeping what each has
    left to wait (their ``time``, and the reactor's private
    ``_pendingTimedCalls`` / ``_newTimedCalls`` lists that hold them, with
    cancelled ones: all shift by the same amount, so the heap order holds).
    Returns how many scheduled calls were moved, or None when ``reactor``
    is not a real reactor (a test's Clock) or already monotonic."""
    import time

    from twisted.internet.base import ReactorBase

    if not isinstance(reactor, ReactorBase) or reactor.seconds is time.monotonic:
        return None
    shift = time.monotonic() - reactor.seconds()
    moved = 0
    for call in list(reactor._pendingTimedCalls) + list(reactor._newTimedCalls):
        call.time += shift
        call.seconds = time.monotonic
        moved += 1
    reactor.seconds = time.monotonic
    return moved


def half_closing_tls_protocol():
    """The server side of TLS (a ``TLSMemoryBIOProtocol`` subclass) that
    treats the client's ``close_notify`` like a TCP half-close: a protocol
    under it that provides ``IHalfCloseableProtocol`` gets
    ``readConnectionLost()`` and may still write its answers; its
    ``loseConnection()`` then sends the proxy's ``close_notify`` and closes.
    (RFC 8446 section 6.1: a close_notify closes one direction.)  Protocols
    that are not half-closeable are closed as Twisted does.

    Twisted answers a close_notify with its own and drops everything
    written after it, inside ``TLSMemoryBIOProtocol._flushReceiveBIO``
    (Twisted 22.10 to 26.10): that method is replaced here, with the
    private attributes it uses (``_tlsConnection``, ``_lostTLSConnection``,
    ``_aborted``, ``_flushSendBIO``, ``_shutdownTLS``,
    ``_tlsShutdownFinished``, ``_producer``)."""
    global _HalfClosingTLS
    if _HalfClosingTLS is None:
        _HalfClosingTLS = _half_closing_tls()
    return _HalfClosingTLS


_HalfClosingTLS = None


def _half_closing_tls():
    from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
    from twisted.internet.interfaces import IHalfCloseableProtocol
    from twisted.protocols.policies import ProtocolWrapper
    from twisted.protocols.tls import TLSMemoryBIOProtocol
    from zope.interface import implementer

    @implementer(IHalfCloseableProtocol)
    class HalfClosingTLSProtocol(TLSMemoryBIOProtocol):
        _peer_closed = False  # the client's close_notify arrived (it sends no more)

        def _flushReceiveBIO(self):
            # TLSMemoryBIOProtocol's, but for the close_notify branch.
            while not self._lostTLSConnection and not self._peer_closed:
                try:
                    data = self._tlsConnection.recv(2 ** 15)
                except WantReadError:
                    break
                except ZeroReturnError:
                    if self.disconnecting or not IHalfCloseableProtocol.providedBy(self.wrappedProtocol):
                        self._shutdownTLS()
                        self._tlsShutdownFinished(None)
                    else:  # the client is done sending: its answers still go out
                        self._peer_closed = True
                        self._flushSendBIO()
                        self.wrappedProtocol.readConnectionLost()
                        return
                except Error:
                    from twisted.python.failure import Failure

                    self._tlsShutdownFinished(Failure())
                else:
                    if not self._aborted:
                        ProtocolWrapper.dataReceived(self, data)
            self._flushSendBIO()

        def readConnectionLost(self):
            """TCP EOF under TLS: after the client's close_notify the answers
            are still being written; without one (a truncated TLS stream),
            closed as without half-close."""
            if not self._peer_closed:
                self.transport.loseConnection()

        def writeConnectionLost(self):
            pass

        def loseConnection(self):
            # A server protocol here registers as the transport's producer
            # only to hear when to stop reading; TLS would otherwise wait
            # for it to unregister before its close_notify.
            if self._producer is not None and not self.disconnecting:
                self.unregisterProducer()
            super().loseConnection()

    return HalfClosingTLSProtocol


def request_line(channel):
    """``(method, target)`` (bytes) of the request line a twisted.web
    HTTPChannel has parsed for the request whose head it is reading
    (``_command`` and ``_path``, set as the line arrives; None before)."""
    return getattr(channel, "_command", None), getattr(channel, "_path", None)


def proxy_header_parsers():
    """``(V1Parser, V2Parser)``: Twisted's PROXY protocol header parsers
    (v1 text, v2 binary), whose ``feed(data)`` returns ``(ProxyInfo, rest)``
    once a header is complete, ``(None, None)`` before, and raises
    ``InvalidProxyHeader``; ``V2Parser.PREFIX`` is the v2 signature.
    Twisted keeps them in the private modules
    ``twisted.protocols.haproxy._v1parser`` / ``._v2parser`` (its package
    exports only ``proxyEndpoint``, whose wrapper ``proxy_protocol.py``
    cannot use)."""
    from twisted.protocols.haproxy._v1parser import V1Parser
    from twisted.protocols.haproxy._v2parser import V2Parser

    return V1Parser, V2Parser

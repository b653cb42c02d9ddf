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


def tls_options(endpoint):
    """The context factory of a TLS server endpoint (``SSL4ServerEndpoint``
    keeps it as ``_sslContextFactory``), or None for other endpoints."""
    options = getattr(endpoint, "_sslContextFactory", None)
    return options if hasattr(options, "getContext") else None


def quiet_retries(service_class, logger):
    """Give a ClientService subclass ``logger`` for its connection-retry
    lines (ClientService logs every retry at info through ``_log``)."""
    service_class._log = logger

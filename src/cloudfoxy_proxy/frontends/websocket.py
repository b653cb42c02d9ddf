"""The ``--api`` WebSocket, ``GET /api/v1/ws`` (docs/api.md "WebSocket:
/api/v1/ws"): ``ApiWebSocket`` (one client's connection on Autobahn:
transmits, a held card, reader events) and its ``ApiWebSocketFactory``,
``ReaderEvents`` (the registry's changes as events for subscribers),
``buffered_bytes`` (a slow subscriber's backlog) and ``_AutobahnLog``
(Autobahn's log lines as the proxy's).

The HTTP side (``api.ApiResource``) hands the upgrade request to Autobahn
and is each connection's ``factory.api``; this module does not import it.
"""

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IPushProducer
from twisted.logger import LogLevel
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from .. import errors
from ..logs import Levels
from ..twisted_internals import unsent_bytes
from ..dispatch import Session
from ..parser import Request as CardRequest
from .jsonapi import DEFAULT_IDLE, MAX_IDLE, ApiError, from_json, is_message_id, to_json

#: A WebSocket subscriber whose unsent bytes exceed this is dropped.
MAX_SUBSCRIBER_BACKLOG = 256 * 1024
#: Seconds a WebSocket without a bearer header has to send ``{"auth": TOKEN}``.
WS_AUTH_TIMEOUT = 10.0
#: The longest WebSocket message, and the longest before authentication.
MAX_WS_MESSAGE = 1024 * 1024
MAX_WS_MESSAGE_UNAUTHENTICATED = 4096


class ReaderEvents:
    """Reader events from the registry's changes: ``added``, ``removed``,
    ``inserted`` (a card arrived or its ATR changed), ``ejected``; every
    subscriber's ``event(dict, reader)`` is called at once (same reactor
    turn as the registry's change) with the registry.Reader it is about."""

    def __init__(self, registry):
        self.registry = registry
        self.subscribers = set()
        self.known = {r.name: self._state(r) for r in registry.readers}
        self.readers = {r.name: r for r in registry.readers}
        registry.add_listener(self._changed)

    @staticmethod
    def _state(reader):
        atr = reader.info.atr if reader.info is not None and reader.present else None
        return reader.present, atr.hex().upper() if atr else None

    def _changed(self, registry):
        now = {r.name: self._state(r) for r in registry.readers}
        readers = {r.name: r for r in registry.readers}
        events = []
        for name, (present, atr) in now.items():
            before = self.known.get(name)
            if before is None:
                events.append(({"event": "added", "reader": name, "present": present, "atr": atr}, readers[name]))
            elif present and (not before[0] or before[1] != atr):
                events.append(({"event": "inserted", "reader": name, "atr": atr}, readers[name]))
            elif before[0] and not present:
                events.append(({"event": "ejected", "reader": name}, readers[name]))
        for name in self.known:
            if name not in now:
                events.append(({"event": "removed", "reader": name}, self.readers[name]))
        self.readers = readers
        self.known = now
        for event, reader in events:
            for subscriber in list(self.subscribers):
                subscriber.event(event, reader)


def buffered_bytes(transport):
    """Bytes a connection has written that the peer has not taken yet
    (twisted's FileDescriptor buffers), following protocol wrappers."""
    seen = 0
    while transport is not None and seen < 8:
        if hasattr(transport, "dataBuffer"):
            return unsent_bytes(transport)
        transport = getattr(transport, "transport", None)
        seen += 1
    return 0


class _AutobahnLog(Levels):
    """Autobahn's log of one API WebSocket: its debug lines are dropped
    (they hold the raw opening handshake, whose ``Authorization`` header
    is the client's secret, and every frame); the others (a failed
    handshake, a protocol violation, a closing handshake that timed out:
    all caused by the client) go through the front end's rate-limited
    client log, naming the peer."""

    def __init__(self, client_log, peer):
        self.client_log = client_log
        self.peer = getattr(peer, "host", peer)

    def emit(self, level, format, **fields):
        if level == LogLevel.debug:
            return
        if "peer" not in fields:
            format, fields["peer"] = "WebSocket client {peer}: " + format, self.peer
        self.client_log.emit(level, format, **fields)

    def __getattr__(self, name):  # any other level Autobahn may use: as debug
        return self.debug


@implementer(IPushProducer)
class ApiWebSocket(WebSocketServerProtocol):
    """One WebSocket client: ``{"id", "reader", "reset", "apdus"}`` is
    answered ``{"id", "atr", "responses"}`` or ``{"id", "error"}``;
    ``{"id", "subscribe": true}`` starts reader events; ``{"id", "hold":
    READER, "idle_timeout": s}`` / ``{"id", "release": true}`` hold the
    card for this connection (its transmits then run in the session).
    Without an ``Authorization: Bearer`` header the first message must be
    ``{"auth": SECRET}`` (browsers cannot set headers on WebSockets),
    judged by ``Dispatcher.identify`` like every secret; with the header,
    the HTTP base judged the upgrade request.  The connection acts as its
    identity: events and listings name only the readers it may see."""

    identity = None
    _auth_timer = None
    _judged = False  # the first message is being (or was) judged
    upgrade = None  # the dispatch Session the HTTP base gave the upgrade request

    def _as_tls(self, method):
        """Run Autobahn's ``method`` with the TLS transport under our
        limits._Guard as ``self.transport``: Autobahn reads the TLS channel
        from ``self.transport`` and only knows Twisted's TLS protocol."""
        tls = getattr(self.transport, "transport", None)
        if not isinstance(tls, TLSMemoryBIOProtocol):
            return method()
        guard, self.transport = self.transport, tls
        try:
            return method()
        finally:
            self.transport = guard

    def connectionMade(self):
        self.log = _AutobahnLog(self.factory.api.client_log, self.transport.getPeer())
        upgrade = self.upgrade
        self.counters = self.factory.api.site.counters
        if upgrade is not None and upgrade.identity is not None:  # a secret in the upgrade's header
            self.identity = upgrade.identity
            self.session = Session(upgrade.peer, "api", upgrade.host, identity=upgrade.identity,
                                   counters=self.counters)
        else:  # the first message authenticates this session (Dispatcher.identify)
            peer = self.transport.getPeer()
            host = getattr(peer, "host", None)
            self.session = Session(upgrade.peer if upgrade is not None else str(peer), "api",
                                   host if isinstance(host, str) else None, counters=self.counters)
        self._as_tls(super().connectionMade)
        # Back-pressure: the HTTP channel this connection replaced is still
        # the transport's producer; this connection takes its place, so a
        # client that does not read its answers is not read from either.
        try:
            self.transport.unregisterProducer()
        except RuntimeError:
            pass  # none registered (a transport not taken over from HTTP)
        self.transport.registerProducer(self, True)

    # IPushProducer (registered on the transport in connectionMade): the
    # transport's send buffer is full (the client does not read), so stop
    # reading its requests until the buffer has drained.  Answers of the
    # requests already read (at most 64 in flight, and those of the bytes
    # being handled) still go out.
    def pauseProducing(self):
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self):
        if self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self):
        pass

    # The HTTP channel it replaced was half-closeable (the connection's
    # wrapper says so): a client that half-closes the TCP connection (or
    # sends TLS close_notify) without a close frame is closed.
    def readConnectionLost(self):
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def _onOpen(self):
        self._as_tls(super()._onOpen)

    def connectionLost(self, reason):
        # This connection was counted by the HTTP channel it replaced
        # (_Channel.connectionMade), whose connectionLost never comes.
        super().connectionLost(reason)
        self.counters.connections -= 1

    def onConnect(self, request):
        self.inflight = {}
        return None

    # Autobahn formats the arguments of its per-message debug lines even
    # when debug logging is off (about twenty calls a message, a tenth of
    # the proxy's CPU per WebSocket APDU in a profile).  These three do what
    # Autobahn's do, without those lines and what nothing here uses.
    def dataReceived(self, data):
        self._dataReceived(data)

    def onMessageEnd(self):
        # Autobahn's, without firing its "message" observer event (a future
        # and its callbacks per message; nothing here observes it).
        data, self.message_data = self.message_data, None
        if not self.failedByMe:
            self._onMessage(b"".join(data), self.message_is_binary)

    def sendData(self, data, sync=False, chopsize=None):
        if sync or chopsize or self.send_queue or self.logOctets or self.state != self.STATE_OPEN:
            return super().sendData(data, sync, chopsize)
        self.transport.write(data)
        self.trafficStats.outgoingOctetsWireLevel += len(data)

    def _limit(self, size):
        """Autobahn's per-connection frame and message limits."""
        self.maxFramePayloadSize = self.maxMessagePayloadSize = size

    def onOpen(self):
        if self.identity is None:
            self._limit(MAX_WS_MESSAGE_UNAUTHENTICATED)
            self._auth_timer = self.factory.api.clock.callLater(WS_AUTH_TIMEOUT, self._auth_late)

    def _auth_late(self):
        self._auth_timer = None
        self.sendClose(4401, "unauthorized: send {\"auth\": TOKEN} first")

    @property
    def busy(self):
        """Not idle for limits.py while subscribed, following a trace, holding a card or waiting on one."""
        return bool(self.inflight) or self.session.card is not None or self in self.factory.api.events.subscribers \
            or bool(self.__dict__.get("_traced"))  # following a live trace

    def send(self, obj):
        if self.state == self.STATE_OPEN:
            self.sendMessage(to_json(obj))

    def event(self, event, reader):
        identity = self.identity
        if identity is None or (identity.readers is not None and not identity.sees(reader)):
            return
        if buffered_bytes(self.transport) > MAX_SUBSCRIBER_BACKLOG:
            self.factory.api.events.subscribers.discard(self)
            self.factory.api.client_log.info("WebSocket subscriber {peer} dropped: not reading events",
                                             peer=self.peer)
            self.dropConnection(abort=True)
            return
        self.send(event)

    def onMessage(self, payload, isBinary):
        counters = self.counters
        counters.requests += 1
        counters.bytes_in += len(payload)
        try:
            msg = from_json(payload)
        except ValueError:
            msg = None
        if self.identity is None:
            return self._authenticate(msg)
        if not isinstance(msg, dict):
            return self.send({"id": None, "error": {"code": errors.MALFORMED, "message": "send JSON objects"}})
        mid = msg.get("id")
        if mid is not None and not is_message_id(mid):
            return self.send({"id": None, "error": {"code": errors.MALFORMED,
                                                    "message": "id must be a string, a number or null"}})
        api = self.factory.api
        try:
            if msg.get("subscribe") is not None:
                if msg["subscribe"]:
                    api.events.subscribers.add(self)
                else:
                    api.events.subscribers.discard(self)
                return self.send({"id": mid, "subscribed": bool(msg["subscribe"]),
                                  "readers": api.reader_list(self.identity)})
            if "hold" in msg:
                return self._hold(mid, msg)
            if msg.get("release"):
                card = self.session.card
                if card is None:
                    raise ApiError(409, "this connection holds no card")
                card.close()
                return self.send({"id": mid, "released": True})
            if "trace" in msg or "untrace" in msg:  # the live trace (docs/trace.md "Live view")
                return self.send(dict(self._live_trace(msg), id=mid))
            reader = msg.get("reader")
            if not isinstance(reader, str):
                raise ApiError(400, "reader must be a reader name")
            if len(self.inflight) >= 64:
                raise ApiError(503, "too many requests in flight on this connection", errors.UPSTREAM)
            d = api.run_transmit(reader, msg.get("reset", False), msg.get("apdus", []), None, self.session)
        except ApiError as e:
            return self._error(mid, e)
        if isinstance(d, dict):  # answered at once
            d["id"] = mid
            return self.send(d)
        self._track(mid, d)

    def _authenticate(self, msg):
        """The first message of a connection without a secret in its
        upgrade: ``{"auth": SECRET}`` judged by ``Dispatcher.identify``;
        anything else, or a wrong secret (after the throttle's delay),
        closes with 4401.  Nothing else is read meanwhile."""
        if self._judged:
            return
        self._judged = True
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        self._auth_timer = None
        secret = msg.get("auth") if isinstance(msg, dict) else None
        mid = msg.get("id") if isinstance(msg, dict) else None
        if not isinstance(secret, str) or not secret or (mid is not None and not is_message_id(mid)):
            return self.sendClose(4401, "unauthorized: send {\"auth\": SECRET} first")
        api = self.factory.api
        identity, _pin, delay = api.dispatcher.identify(CardRequest(None, secret), self.session)
        if identity.__class__ is str:
            if delay and not self.session.drop:  # a throttled guess: closed later
                self._auth_timer = api.clock.callLater(delay, self.sendClose, 4401, "unauthorized")
                return
            return self.sendClose(4401, "unauthorized")
        self.identity = identity
        self._judged = False
        self._limit(MAX_WS_MESSAGE)
        self.send({"id": mid, "authenticated": True})

    def _track(self, mid, d):
        key = object()
        self.inflight[key] = d

        def done(result):
            self.inflight.pop(key, None)
            self.send(dict(result, id=mid))

        def failed(failure):
            self.inflight.pop(key, None)
            if failure.check(CancelledError):
                return
            if failure.check(ApiError):
                return self._error(mid, failure.value)
            self.factory.api.log.failure("WebSocket request failed", failure)
            self._error(mid, ApiError(500, "internal error", errors.INTERNAL))

        d.addCallbacks(done, failed)

    def _hold(self, mid, msg):
        api = self.factory.api
        idle = msg.get("idle_timeout", DEFAULT_IDLE)
        if not isinstance(msg["hold"], str) or isinstance(idle, bool) or not isinstance(
                idle, (int, float)) or not 0 < idle <= MAX_IDLE:
            raise ApiError(400, "hold must be a reader name, idle_timeout seconds")
        if self.session.card is not None:
            raise ApiError(409, "this connection holds a card already")
        d = api.dispatcher.hold(msg["hold"], self.session, idle_timeout=idle)

        def granted(card):
            card.ended.addCallback(lambda reason: self.send({"event": "released", "reader": card.reader.name,
                                                            "reason": reason}))
            return {"held": card.reader.name}

        def failed(failure):
            if failure.check(errors.CardError):
                raise ApiError.of(failure.value.code, msg["hold"])
            return failure

        self._track(mid, d.addCallbacks(granted, failed))

    def _error(self, mid, e):
        self.send({"id": mid, "error": {"code": e.code, "message": e.message}})

    def _live_trace(self, msg):
        """``{"trace": READER}`` / ``{"untrace": READER}``: follow (or stop
        following) the --trace records of a reader this identity may see
        (``Dispatcher.target`` under its identity), redacted as the files."""
        api = self.factory.api
        tracer = api.dispatcher.trace
        name = msg.get("trace", msg.get("untrace"))
        if not isinstance(name, str):
            raise ApiError(400, "trace must be a reader name")
        found = api.dispatcher.target(CardRequest(name, None), self.identity)
        if found.__class__ is str:
            raise ApiError.of(found, name)
        watching = self.__dict__.setdefault("_traced", {})
        if "untrace" in msg:
            stop = watching.pop(found.name, None)
            if stop is not None:
                stop()
            return {"untraced": found.name}
        if tracer is None or not tracer.traces(found):
            raise ApiError(409, f"{found.name} is not traced (start the proxy with --trace)")
        if found.name not in watching:
            if len(watching) >= 16:
                raise ApiError(409, "at most 16 live traces per connection")

            def tell(record, reader=found.name):
                if buffered_bytes(self.transport) > MAX_SUBSCRIBER_BACKLOG:
                    watching.pop(reader, lambda: None)()
                    self.send({"event": "untraced", "reader": reader, "reason": "not reading"})
                    return
                self.send({"event": "trace", "record": record})

            watching[found.name] = tracer.watch(found.name, tell)
        return {"traced": found.name}

    def onClose(self, wasClean, code, reason):
        api = self.factory.api
        api.events.subscribers.discard(self)
        for stop in list(self.__dict__.pop("_traced", {}).values()):  # live traces
            stop()
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        for d in list(getattr(self, "inflight", {}).values()):
            d.cancel()
        session = getattr(self, "session", None)
        if session is not None and session.card is not None:
            session.card.close()


class ApiWebSocketFactory(WebSocketServerFactory):
    protocol = ApiWebSocket

    def __init__(self, api):
        super().__init__()
        self.api = api
        # Bounded messages (a transmit of MAX_APDUS short APDUs fits).
        # A client that breaks the protocol or a limit gets a close frame
        # with the code and reason (RFC 6455 section 7.4), not a bare drop;
        # a text message that is not UTF-8 is closed 1007 (section 8.1:
        # Autobahn's incremental validator, native code).
        self.setProtocolOptions(maxFramePayloadSize=MAX_WS_MESSAGE, maxMessagePayloadSize=MAX_WS_MESSAGE,
                                utf8validateIncoming=True, failByDrop=False)
        self._upgrade = None

    def upgrade(self, resource, request):
        """Hand the upgrade ``request`` (judged by the HTTP base: its
        ``session``) to Autobahn's ``resource``; the connection it builds
        acts as that session's identity, or authenticates with its first
        message when the request presented no secret."""
        self._upgrade = request.session
        try:
            return resource.render(request)
        finally:
            self._upgrade = None

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        protocol.upgrade = self._upgrade
        return protocol

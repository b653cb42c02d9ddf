"""The client protocol of one ``tcp://``/``tls://`` upstream connection
(see ``tcp.py``) and the requests it carries.

* ``_UpstreamProtocol`` — writes requests, reads the ``>ID:RESULT`` answer
  lines up to ``@@`` (docs/protocol.md) and hands each answer to the oldest
  call;
* ``_Call`` — one upstream request; ``_OneByOne`` — a batch sent as one
  request per command.
"""

import collections
import socket

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import errors
from ..errors import CardError
from ..interfaces import MAX_RESPONSE
from ..logs import Logger

#: The longest answer line to a command: the largest response APDU in hex
#: after ``>ID:``.  A longer one fails that command (C086), nothing else.
MAX_LINE = 2 * MAX_RESPONSE + 256
#: A connection still open this long after an answer proves the upstream
#: keeps connections (pipelining allowed); one closed sooner, right after its
#: first answer, marks an upstream that closes after every answer.
PROBE_DELAY = 0.5


# States of one upstream call.
_QUEUED, _SENT, _DONE, _CANCELLED = range(4)


class _Call:
    """One upstream request: its bytes, our ids of its commands (in order),
    its Deferred.  ``results`` collects one text per answer line (None for
    a line that was malformed); ``batch``: the Deferred fires with a list
    of per-command results (see :meth:`TcpBackend.transmit_batch`); ``raw``:
    with a list of the result strings (:meth:`TcpBackend.ask`);
    ``heartbeat``: the liveness check of its connection (its answer and
    failure go nowhere; ``watch`` is then its deadline); ``client``: who
    a card request is for (``(peer, identity name, front end)``, or None:
    the proxy's own), told to the upstream with CLIENT (relay.py) before
    it when its connection last told another; ``control``: that CLIENT
    request itself (its failure goes nowhere)."""

    __slots__ = ("backend", "ids", "key", "data", "readers", "batch", "d", "state", "conn",
                 "results", "bad", "watch", "heartbeat", "client", "control", "raw")

    def __init__(self, backend, ids, key, data, readers=False, batch=False, heartbeat=False, client=None,
                 control=False, raw=False):
        self.backend, self.ids, self.key, self.data = backend, ids, key, data
        self.readers, self.batch, self.heartbeat, self.raw = readers, batch, heartbeat, raw
        self.client, self.control = client, control
        self.d = Deferred(self._cancel)
        if heartbeat or control:
            self.d.addErrback(lambda f: None)  # a lost connection says all there is to say
        self.state, self.conn, self.results = _QUEUED, None, []
        self.bad = None  # why an answer line was malformed, for the log
        self.watch = None

    @property
    def id(self):
        return self.ids[0]

    def _cancel(self, _d):
        # The Deferred errbacks with CancelledError after this returns.
        if self.state == _SENT:
            self.state = _CANCELLED
            self.backend._watch(self)
        elif self.state == _QUEUED:
            self.state = _CANCELLED  # flushing skips it: it is never sent

    def fail(self, reason):
        if self.state in (_QUEUED, _SENT):
            self.state = _DONE
            self.d.errback(CardError(errors.UPSTREAM, reason))

    def stop_watch(self):
        if self.watch is not None:
            if self.watch.active():
                self.watch.cancel()
            self.watch = None


class _OneByOne:
    """A batch sent as one upstream request per command, one after another
    (an upstream that cannot take several commands in one request)."""

    __slots__ = ("backend", "key", "commands", "results", "current", "stepping", "deferred", "client")

    def __init__(self, backend, key, commands, client=None):
        self.backend = backend
        self.key = key
        self.commands = commands
        self.client = client
        self.results = []
        self.current = None
        self.stepping = False
        self.deferred = Deferred(self._cancel)

    def start(self):
        self._next()
        return self.deferred

    def _next(self):
        self.stepping = True
        try:
            while len(self.results) < len(self.commands):
                try:
                    d = self.backend._submit(self.key, [self.commands[len(self.results)]],
                                             client=self.client)
                except CardError as e:  # down or stopped: so are the rest
                    self.results.extend([e] * (len(self.commands) - len(self.results)))
                    break
                self.current = d
                d.addBoth(self._done, d)
                if self.current is d:
                    return  # its answer comes later: _done carries on
        finally:
            self.stepping = False
        self.deferred.callback(self.results)

    def _done(self, result, d):
        if self.current is not d:
            return None  # cancelled
        self.current = None
        if isinstance(result, Failure):
            if not result.check(CardError):
                self.deferred.errback(result)  # cancelled by the timeout, or a bug
                return None
            result = result.value
        self.results.append(result)
        if not self.stepping:
            self._next()
        return None

    def _cancel(self, _d):
        current, self.current = self.current, None
        if current is not None:
            current.addErrback(lambda f: None)
            current.cancel()


class _UpstreamProtocol(Protocol):
    """One connection to the upstream: writes requests, reads ``>ID:RESULT``
    lines until ``@@`` and hands each answer to the oldest call (responses
    come back in request order; the id must match, or the connection is
    dropped rather than risk giving one card's answer to another).

    Its framer is its own, not twisted's ``LineOnlyReceiver``, for two
    reasons.  Measured (bench/upstream_framing.py, in process, this
    machine): a READERS answer is one line of up to ``readers_max`` names
    read in 64 KiB pieces, and LineOnlyReceiver joins and splits the whole
    partial line again on every read (quadratic in the line's length):
    125.6 us per read against 3.0 us here for a 10,000-reader listing;
    for one-command answers it would save 0.6 us per read (0.67 against
    1.29 us), far below the noise of one round trip through the hop
    (bench/tcp_hop.py).  And behaviour: the limit depends on the answer due
    (``_limit``: a listing may be far longer than a command's answer), and
    an over-long line must fail only the request it belongs to while the
    framing goes on (its ``@@`` still ends it) where LineOnlyReceiver stops
    reading the rest of that read and, by default, drops the connection.
    """

    log = Logger()

    def __init__(self, backend, tls):
        self.backend = backend
        self.tls = tls
        self.calls = collections.deque()  # written, not yet answered (in order)
        self.keys = {}  # reader key -> number of its calls in self.calls
        self.ready = False
        self.ready_at = None
        self.answers = 0
        self.first_answer_at = None
        self.spent = False  # not to be reused (the upstream may close it)
        self.probe = None  # DelayedCall: is it still open PROBE_DELAY after an answer?
        self.broken = False
        self.silent = False  # dropped for a missed heartbeat (it or a sibling)
        self.beat = None  # DelayedCall: the next heartbeat
        self._buf = b""
        self._skipping = False  # discarding the rest of an over-long line
        self.client = None  # the client the upstream was last told of (CLIENT), on this connection
        self.refused = False  # the upstream answered CLIENT with an error here: not sent again on it

    def connectionMade(self):
        transport = self.transport
        for option in ("setTcpNoDelay", "setTcpKeepAlive"):
            try:
                getattr(transport, option)(True)
            except Exception:
                pass  # not a TCP transport (tests), or not supported
        if self.backend.keepalive is not None:
            set_keepalive(transport, *self.backend.keepalive)
        if not self.tls:
            self._ready()

    # IHandshakeListener (provided below for TLS): usable once verified.
    def handshakeCompleted(self):
        self._ready()

    def _ready(self):
        if not self.ready and not self.broken:
            self.ready = True
            self.ready_at = self.backend.clock.seconds()
            self.backend._ready(self)
            self.arm()

    # -- liveness -------------------------------------------------------

    def arm(self):
        """The next heartbeat in ``heartbeat`` seconds (none when off)."""
        backend = self.backend
        if backend.heartbeat and not self.broken and (self.beat is None or not self.beat.active()):
            self.beat = backend.clock.callLater(backend.heartbeat, self._beat)

    def _beat(self):
        """Idle (nothing in flight) on a persistent upstream: a READERS
        request that must be answered within ``heartbeat_timeout``.  Busy
        connections are left alone (a slow card is not a dead flow); their
        idle siblings' heartbeats speak for the upstream."""
        self.beat = None
        backend = self.backend
        if self.broken or not backend._running:
            return
        if self.calls or backend.persistent is not True or self.factory.slot is None:
            self.arm()
            return
        call = backend._readers_call(heartbeat=True)
        self.send(call)
        call.watch = backend.clock.callLater(backend.heartbeat_timeout, backend._missed, self, call)

    def send(self, call):
        client = call.client
        if client is not None and client != self.client and not self.refused and self.backend.relaying \
                and self.backend.persistent is True:
            self.client = client  # sticky on the upstream's side: told once per change
            self._send(self.backend._client_call(client))
        self._send(call)

    def _send(self, call):
        call.state = _SENT
        call.conn = self
        self.calls.append(call)
        key = call.key
        self.keys[key] = self.keys.get(key, 0) + 1
        self.transport.write(call.data)

    def _limit(self):
        """The longest line the answer now due may have."""
        calls = self.calls
        if calls and calls[0].readers:
            return self.backend.listing_limit
        return MAX_LINE

    def dataReceived(self, data):
        buf = self._buf + data if self._buf else data
        start = 0
        if self._skipping:  # the rest of an over-long line
            nl = buf.find(b"\n")
            if nl < 0:
                self._buf = b""
                return
            start = nl + 1
            self._skipping = False
        while not self.broken:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            if nl - start > self._limit():
                self._overlong()
            else:
                line = buf[start:nl].strip()
                if line:
                    self._line(line)
            start = nl + 1
        if self.broken:
            self._buf = b""
            return
        self._buf = buf[start:]
        if len(self._buf) > self._limit():
            self._overlong()
            self._buf = b""
            self._skipping = True

    def _overlong(self):
        """A line over the limit: a malformed answer of the request now due
        (the framing is intact: its ``@@`` still ends it)."""
        if self.calls:
            self._malformed(self.calls[0], f"a line longer than {self._limit()} bytes")

    def _malformed(self, head, why):
        head.bad = head.bad or why
        if len(head.results) < len(head.ids):
            head.results.append(None)

    def _line(self, line):
        if line[:1] == b">":
            cid, _, result = line[1:].partition(b":")
            if not self.calls:
                self._violation("an answer to no request")
                return
            head = self.calls[0]
            n = len(head.results)
            cid = cid.strip()
            if n < len(head.ids) and cid == head.ids[n]:
                head.results.append(result.strip().decode("utf-8", "replace"))
                return
            if head.readers and n == 0 and len(head.ids) == 2 and cid == head.ids[1]:
                # OWNER and READERS to an upstream that answers only a
                # request's last command (foxyproxy 2.10): it has no id.
                head.results.append(errors.FAILED)
                head.results.append(result.strip().decode("utf-8", "replace"))
                return
            if any(cid in call.ids for call in self.calls if call is not head):
                # The upstream skipped ahead: its answers no longer match ours.
                self._violation(f"an answer to {cid[:40]!r} before the one to {head.id!r}")
                return
            if n < len(head.ids):
                self._malformed(head, f"answer id {cid[:40]!r} where {head.ids[n]!r} was due")
            else:  # more answer lines than commands: none of them can be trusted
                head.bad = "more answer lines than commands"
                head.results[:] = [None] * len(head.results)
        elif line == b"@@":
            if not self.calls:
                self.log.debug("ignored a stray @@ from {upstream}", upstream=self.backend.where)
                return
            self._complete()
        elif self.calls and line.decode("ascii", "replace") in errors.MEANING:
            # A bare result code instead of a response: foxyproxy 2.10 answers
            # an unknown reader with "C083" and closes the connection.
            head = self.calls[0]
            code = line.decode("ascii")
            head.results.extend([code] * (len(head.ids) - len(head.results)))
            self._complete()
        # Anything else ("#" signals, junk) is ignored, as a server would.

    def _complete(self):
        call = self.calls.popleft()
        key = call.key
        n = self.keys[key] - 1
        if n:
            self.keys[key] = n
        else:
            del self.keys[key]
        self.answers += 1
        if self.first_answer_at is None:
            self.first_answer_at = self.backend.clock.seconds()
        self.backend._answer(self, call)

    def _violation(self, what):
        self.log.warn("upstream {upstream} broke the protocol ({what}); reconnecting",
                      upstream=self.backend.where, what=what)
        self.broken = True
        self.transport.abortConnection()

    def connectionLost(self, reason):
        if not self.broken and self.calls and self._buf.strip():
            self._line(self._buf.strip())  # a last line without its newline ("C083")
        self._buf = b""
        self.broken = True
        if self.probe is not None and self.probe.active():
            self.probe.cancel()
        if self.beat is not None and self.beat.active():
            self.beat.cancel()
        self.beat = None
        calls = list(self.calls)
        self.calls.clear()
        self.keys.clear()
        self.backend._lost(self, reason, calls)


def set_keepalive(transport, idle, interval, count):
    """TCP keepalive on the socket under ``transport`` (TLS over TCP
    included): the first probe after ``idle`` s without traffic, then every
    ``interval`` s, ``count`` probes; TCP_USER_TIMEOUT bounds unacknowledged
    data the same way.  False when there is no TCP socket (tests) or the
    system lacks the options."""
    handle = None
    for _ in range(4):  # our transport, TLS's transport, ...
        get = getattr(transport, "getHandle", None)
        handle = get() if get is not None else None
        if isinstance(handle, socket.socket):
            break
        transport = getattr(transport, "transport", None)
        if transport is None:
            return False
    if not isinstance(handle, socket.socket):
        return False
    try:
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        handle.setsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", 18),
                          1000 * (idle + interval * count))
    except (OSError, AttributeError):
        return False
    return True


@implementer(IHandshakeListener)
class _TLSUpstreamProtocol(_UpstreamProtocol):
    pass


class _UpstreamFactory(Factory):
    """Builds the protocol of one connection; ``slot`` is the ClientService
    that keeps it (None: a one-off connection opened for a request);
    ``sentinel``: the upstream's liveness connection, which carries
    heartbeats only (never a command; see ``TcpBackend.liveness``)."""

    noisy = False  # no "Starting factory" line for every connection attempt

    def __init__(self, backend, slot=None, sentinel=False):
        self.backend = backend
        self.slot = slot
        self.sentinel = sentinel

    def buildProtocol(self, addr):
        kind = _TLSUpstreamProtocol if self.backend.tls else _UpstreamProtocol
        p = kind(self.backend, self.backend.tls)
        p.factory = self
        return p

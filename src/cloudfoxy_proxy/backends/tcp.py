"""``tcp://`` and ``tls://`` — another line-protocol endpoint as a backend.

``tcp://HOST:PORT?prefix=NAME&password_file=FILE&connections=4&refresh=10&readers_max=10000``
``tls://HOST:PORT?ca=FILE&cert=FILE&key=FILE&prefix=NAME&...``

The upstream is a CloudFoxy TCP endpoint or another proxy (chaining).  Its
readers come from its ``READERS`` answer and appear here as ``PREFIX`` +
their upstream name (at most ``readers_max`` of them, names of at most
MAX_NAME bytes).  RESET and APDU go upstream with ids of our own, a
client request's run of them as one upstream request (:meth:`transmit_batch`,
so they stay back to back on the card), over a small pool of persistent
connections (ClientService each, reconnecting with back-off).  See docs/tcp.md.

An answer that is malformed for one request (a wrong id, a result that is
not hex, an over-long line) fails that request's commands with ``C086`` and
nothing else; a connection is dropped only when its stream can no longer be
matched to our requests (an answer to no request, or one that skips ahead
to a later request), and then only the commands in flight on it fail.

Failure semantics (nothing silently lost, nothing repeated):

* a command already written to a connection that dies is answered ``C086``,
  never re-sent (APDUs are not idempotent);
* a command not yet written (no connection up yet, or the last one just
  died) waits for the next connection and goes out there;
* when the upstream is known to be down (the last connection attempt
  failed and no connection is up) new commands fail at once with ``C086``;
* a command the dispatcher cancels (command timeout) stays in its
  connection's queue so that the late answer is recognised by its id and
  discarded, never given to another command.  A connection that still has
  not answered a command that long after its timeout is dropped.

Connection reuse is learnt, not assumed: foxyproxy 2.10 answers one request
per connection and closes it; it reads its connections one at a time, in
the order it accepted them (an idle connection stalls it), and would run a
second request that arrived in the same read on the wrong reader.  Until a
connection has stayed open for PROBE_DELAY after an answer, each
connection carries one request and is not reused; once one has, the
upstream is "persistent" and requests are pipelined over the pool.  A
connection closed right after its first answer marks the upstream "one
request per connection": the pool is parked and every request gets a
connection of its own, opened when it is needed (no idle connections, no
warnings).  A later connection that stays open switches back.
"""

import base64
import collections
import random
from urllib.parse import parse_qsl, urlsplit

import attr
from twisted.application.internet import ClientService
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import errors
from ..interfaces import MAX_RESPONSE, IBackend, ReaderInfo
from ..errors import CardError
from ..logs import Logger, RetryLogger
from ..parser import COMMANDS
from ..secrets import read_secret
from . import (
    MAX_NAME, READERS_MAX, ReaderCap, ReaderUpdates, float_param, int_param, query, tls_material,
)

DEFAULT_PORT = 4001
#: Back-off between connection attempts: the first retry after a lost
#: connection comes after ~MIN_BACKOFF, doubling per failure up to MAX_BACKOFF.
MIN_BACKOFF = 0.1
MAX_BACKOFF = 3.0
#: A connection that dies sooner than this after connecting, without having
#: answered anything, counts as a failed attempt (so a peer that accepts and
#: closes at once is retried with back-off, not in a tight loop).
MIN_HEALTHY_LIFETIME = 1.0
#: The longest answer line to a command: the largest response APDU in hex
#: after ``>ID:``.  A longer one fails that command (C086), nothing else.
MAX_LINE = 2 * MAX_RESPONSE + 256
#: Bytes of a READERS answer line per reader: base64 of a MAX_NAME-byte name and ``|``.
LISTING_BYTES_PER_READER = 4 * -(-MAX_NAME // 3) + 1
#: A connection still open this long after an answer proves the upstream
#: keeps connections (pipelining allowed); one closed sooner, right after its
#: first answer, marks an upstream that closes after every answer.
PROBE_DELAY = 0.5
#: An empty or failed READERS answer is asked again after this, doubling up
#: to ``refresh`` (an upstream proxy that has not found its own cards yet).
EMPTY_RETRY = 0.5



def check_password(password):
    """A reader-line password the upstream's parser would misread is refused:
    ``READER:PW`` whose first ``:`` field is a command name starts a command
    line, not a reader line (PROTOCOL.md 1.1)."""
    first = password.split(":")[0].partition("|")[0].strip().upper()
    if first in COMMANDS:
        raise ValueError("the upstream password must not start with a command name "
                         f"({first}): the upstream would read the reader line as a command")
    if "\n" in password or "\r" in password:
        raise ValueError("the upstream password must be one line")


def tls_options(host, params):
    """Client TLS options: the server certificate is verified for ``host``
    (service_identity) against ``ca=`` (a PEM file, one or more
    certificates) or the platform's trust store; ``cert=``/``key=`` add a
    client certificate."""
    from twisted.internet.ssl import optionsForClientTLS, platformTrust

    trust, client = tls_material(params)
    trust = trust or platformTrust()
    try:
        return optionsForClientTLS(host, trustRoot=trust, clientCertificate=client)
    except Exception as e:
        raise ValueError(f"cannot verify TLS for host {host!r}: {e}") from None


def from_url(url, config):
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    tls = scheme == "tls"
    allowed = {"prefix", "password_file", "connections", "refresh", "readers_max"}
    if tls:
        allowed |= {"ca", "cert", "key"}
    if any(k == "password" for k, _ in parse_qsl(parts.query, keep_blank_values=True)):
        raise ValueError("password= in the URL would be visible to every user (ps); "
                         "use password_file=FILE, --password-file FILE or env FOXYPROXY_PASSWORD")
    params = query(url, allowed)
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are not allowed; use password_file=FILE")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise ValueError(f"bad port: {e}") from None
    if not host:
        raise ValueError(f"expected {scheme}://HOST:PORT")
    port = DEFAULT_PORT if port is None else port
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range 1..65535")
    if parts.path not in ("", "/"):
        raise ValueError(f"unexpected path {parts.path!r}: expected {scheme}://HOST:PORT?PARAMS")
    connections = int_param(params, "connections", 4, 1, 64)
    readers_max = int_param(params, "readers_max", READERS_MAX, 1, 100000)
    refresh = float_param(params, "refresh", 10.0, 0.0, 86400.0)
    if 0 < refresh < 0.1:
        raise ValueError("refresh= must be 0 (off) or at least 0.1 seconds")
    prefix = params.get("prefix", "")
    if "password_file" in params:
        password = read_secret("password_file", params["password_file"])
    else:
        password = config.get("password")
    password = password or None
    if password is not None:
        check_password(password)
    timeout = float(config.get("command-timeout") or 15.0)
    options = tls_options(host, params) if tls else None
    where = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"

    def make(reactor):
        from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

        endpoint = HostnameEndpoint(reactor, host, port, timeout=max(1.0, min(10.0, timeout)))
        if options is not None:
            endpoint = wrapClientTLS(options, endpoint)
        return TcpBackend(endpoint=endpoint, clock=reactor, where=where, password=password,
                          prefix=prefix, connections=connections, refresh=refresh,
                          timeout=timeout, tls=tls, readers_max=readers_max)

    return make


# States of one upstream call.
_QUEUED, _SENT, _DONE, _CANCELLED = range(4)


class _Call:
    """One upstream request: its bytes, our ids of its commands (in order),
    its Deferred.  ``results`` collects one text per answer line (None for
    a line that was malformed); ``batch``: the Deferred fires with a list
    of per-command results (see :meth:`TcpBackend.transmit_batch`)."""

    __slots__ = ("backend", "ids", "key", "data", "readers", "batch", "d", "state", "conn",
                 "results", "bad", "watch")

    def __init__(self, backend, ids, key, data, readers=False, batch=False):
        self.backend = backend
        self.ids = ids
        self.key = key
        self.data = data
        self.readers = readers
        self.batch = batch
        self.d = Deferred(self._cancel)
        self.state = _QUEUED
        self.conn = None
        self.results = []
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

    __slots__ = ("backend", "key", "commands", "results", "current", "stepping", "deferred")

    def __init__(self, backend, key, commands):
        self.backend = backend
        self.key = key
        self.commands = commands
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
                    d = self.backend._submit(self.key, [self.commands[len(self.results)]])
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
    dropped rather than risk giving one card's answer to another)."""

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
        self._buf = b""
        self._skipping = False  # discarding the rest of an over-long line

    def connectionMade(self):
        transport = self.transport
        for option in ("setTcpNoDelay", "setTcpKeepAlive"):
            try:
                getattr(transport, option)(True)
            except Exception:
                pass  # not a TCP transport (tests), or not supported
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

    def send(self, call):
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
        calls = list(self.calls)
        self.calls.clear()
        self.keys.clear()
        self.backend._lost(self, reason, calls)


@implementer(IHandshakeListener)
class _TLSUpstreamProtocol(_UpstreamProtocol):
    pass


class _UpstreamFactory(Factory):
    """Builds the protocol of one connection; ``slot`` is the ClientService
    that keeps it (None: a one-off connection opened for a request)."""

    noisy = False  # no "Starting factory" line for every connection attempt

    def __init__(self, backend, slot=None):
        self.backend = backend
        self.slot = slot

    def buildProtocol(self, addr):
        kind = _TLSUpstreamProtocol if self.backend.tls else _UpstreamProtocol
        p = kind(self.backend, self.backend.tls)
        p.factory = self
        return p


@implementer(IStreamClientEndpoint)
@attr.s(eq=False)
class _WatchedEndpoint:
    """An endpoint that tells ``failed(failure)`` about every failed attempt
    (ClientService retries by itself but does not say when one failed) and
    ``started()`` about every attempt."""

    endpoint = attr.ib()
    failed = attr.ib()
    started = attr.ib(default=None)

    def connect(self, factory):
        def failed(f):
            if not f.check(CancelledError):
                self.failed(f)
            return f

        if self.started is not None:
            self.started()
        return self.endpoint.connect(factory).addErrback(failed)


class _Slot(ClientService):
    """One persistent connection of the pool.  ``waiting``: between
    attempts (stopping and starting it again is then harmless);
    ``parked``: waiting without a deadline (an upstream that closes after
    every answer gets one-off connections instead)."""

    _log = RetryLogger()
    waiting = False
    parked = False


#: How long a parked slot waits before it reconnects on its own.
PARKED = 3600.0


@implementer(IBackend)
@attr.s(eq=False)
class TcpBackend:
    """The readers of one upstream line-protocol endpoint.

    ``endpoint`` is an IStreamClientEndpoint (TLS-wrapped for ``tls://``);
    ``clock`` an IReactorTime; ``connections`` the pool size; ``refresh``
    how often (seconds, 0: never) the reader list is re-read; ``timeout``
    bounds a READERS call and is the grace a connection gets to answer a
    command that already timed out.  ``retry_delay(failures)``, if given,
    replaces the randomised back-off (tests).  ``persistent`` is what has
    been learnt about the upstream: None (not yet known), True (keeps
    connections open: a pool of ClientServices, pipelining) or False (one
    request per connection: a new connection for every request, at most
    ``connections`` at once, and the pool parked).
    """

    endpoint = attr.ib()
    clock = attr.ib()
    where = attr.ib(default="upstream")
    password = attr.ib(default=None, repr=False)
    prefix = attr.ib(default="")
    connections = attr.ib(default=4)
    refresh = attr.ib(default=10.0)
    timeout = attr.ib(default=15.0)
    tls = attr.ib(default=False)
    retry_delay = attr.ib(default=None)
    persistent = attr.ib(default=None)
    services = attr.ib(init=False, factory=list, repr=False)
    listing = attr.ib(init=False, default=None, repr=False)  # upstream names, as last read
    _live = attr.ib(init=False, factory=list, repr=False)  # ready connections, oldest first
    _queue = attr.ib(init=False, factory=collections.deque, repr=False)  # calls waiting for one
    _opening = attr.ib(init=False, factory=set, repr=False)  # one-off connection attempts
    _lines = attr.ib(init=False, factory=dict, repr=False)  # key -> reader line bytes
    _registry = attr.ib(init=False, default=None, repr=False)
    _running = attr.ib(init=False, default=False, repr=False)
    _down = attr.ib(init=False, default=False, repr=False)
    _stale = attr.ib(init=False, default=True, repr=False)  # re-read the readers on connecting
    _failures = attr.ib(init=False, default=0, repr=False)
    _next_id = attr.ib(init=False, default=0, repr=False)
    _refreshing = attr.ib(init=False, default=None, repr=False)
    _loop = attr.ib(init=False, default=None, repr=False)
    _soon = attr.ib(init=False, default=None, repr=False)  # DelayedCall: re-read an empty list
    _soon_delay = attr.ib(init=False, default=EMPTY_RETRY, repr=False)
    readers_max = attr.ib(default=READERS_MAX)
    _cap = attr.ib(init=False, default=None, repr=False)
    _updates = attr.ib(init=False, default=None, repr=False)
    _malformed_next = attr.ib(init=False, default=0.0, repr=False)
    _malformed_quiet = attr.ib(init=False, default=0, repr=False)

    log = Logger()

    def __attrs_post_init__(self):
        self._cap = ReaderCap(self.where, self.readers_max)

    @property
    def listing_limit(self):
        """The longest READERS answer line read (``readers_max`` names)."""
        return self.readers_max * LISTING_BYTES_PER_READER + 1024

    @property
    def description(self):
        return f"{self.where} ({self.connections} connections)"

    @property
    def up(self):
        """True while at least one connection is usable."""
        return bool(self._live)

    # -- IBackend ---------------------------------------------------------

    def start(self, registry):
        self._registry = registry
        self._updates = ReaderUpdates(registry, self, self.clock)
        self._running = True
        for _ in range(self.connections):
            slot = self._slot()
            self.services.append(slot)
            slot.startService()
        if self.refresh:
            self._loop = LoopingCall(self._refresh)
            self._loop.clock = self.clock
            self._loop.start(self.refresh, now=False).addErrback(
                lambda f: self.log.failure("reader refresh of {upstream} stopped", f,
                                           upstream=self.where))

    def stop(self):
        self._running = False
        if self._updates is not None:
            self._updates.stop()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self._fail_queue("backend stopped")
        for d in list(self._opening):
            d.cancel()
        for conn in list(self._live):
            if conn.factory.slot is None:
                conn.transport.loseConnection()  # one-off connections; slots close their own
        services, self.services = self.services, []
        return gatherResults([s.stopService() for s in services])

    def _slot(self):
        endpoint = _WatchedEndpoint(self.endpoint, self._attempt_failed)
        factory = _UpstreamFactory(self)
        slot = _Slot(endpoint, factory, retryPolicy=lambda attempt: self._retry(slot),
                     clock=self.clock)
        endpoint.started = lambda: setattr(slot, "waiting", False)
        factory.slot = slot
        return slot

    def reset(self, key):
        return self._submit(key, [b"RESET"])

    def transmit(self, key, apdu):
        return self._submit(key, [b"APDU:" + apdu.hex().upper().encode("ascii")])

    def transmit_batch(self, key, steps):
        """The steps (``("RESET", None)`` / ``("APDU", bytes)``) as one
        upstream request, so they run back to back on the card; a Deferred
        for one result per step (bytes, or a CardError).

        Only once the upstream is known to keep connections (a proxy like
        this one): foxyproxy 2.10, which closes after every answer, answers
        a request of several commands with the last one's line only, so
        there (and while that is not known yet) the steps go one request
        each, one after another."""
        commands = [b"RESET" if kind == "RESET" else b"APDU:" + data.hex().upper().encode("ascii")
                    for kind, data in steps]
        if self.persistent is not True:
            return _OneByOne(self, key, commands).start()
        return self._submit(key, commands, batch=True)

    # -- requests ---------------------------------------------------------

    def _id(self):
        self._next_id += 1
        return b"%d" % self._next_id

    def _reader_line(self, key):
        line = self._lines.get(key)
        if line is None:
            # The upstream's exact canonical name, unless its own parser
            # could not read it back (":" separates the password; leading or
            # trailing blanks are stripped): then its base64 alias.
            if not key or ":" in key or key != key.strip() or "\n" in key or "\r" in key:
                text = base64.b64encode(key.encode("utf-8")).decode("ascii")
            else:
                text = key
            if self.password:
                text += ":" + self.password
            line = self._lines[key] = b">" + text.encode("utf-8") + b"|\n"
        return line

    def _submit(self, key, commands, batch=False):
        if not self._running:
            raise CardError(errors.UPSTREAM, "backend stopped")
        conn = self._pick(key)
        if conn is None and self._down:
            raise CardError(errors.UPSTREAM, f"upstream {self.where} unreachable")
        ids = [self._id() for _ in commands]
        data = b"".join(b">" + cid + b":" + command + b"|\n" for cid, command in zip(ids, commands))
        call = _Call(self, ids, key, self._reader_line(key) + data + b"\n", batch=batch)
        if conn is not None:
            conn.send(call)
        else:
            self._wait(call)
        return call.d

    def _wait(self, call):
        """No connection for ``call`` now: it goes out on the next free one."""
        self._queue.append(call)
        self._open_more()

    def _pick(self, key):
        """The connection for a call on ``key``, or None (wait for one).

        A persistent upstream: the connection still holding an earlier
        (timed-out) call for that card, to keep the card's order; else an
        idle one; else the least busy (pipelining).  Otherwise: the oldest
        idle connection not used before (foxyproxy 2.10 reads its
        connections one at a time, in the order it accepted them)."""
        if self.persistent:
            best = None
            for conn in self._live:
                if key in conn.keys:
                    return conn
                if best is None or len(conn.calls) < len(best.calls):
                    best = conn
            return best
        for conn in self._live:
            if not conn.calls and not conn.spent:
                return conn
        return None

    def _answer(self, conn, call):
        call.stop_watch()
        if not self.persistent:
            # Not known to keep connections: do not reuse this one until it
            # has stayed open a while (then the upstream is persistent).
            conn.spent = True
            if conn.probe is None:
                conn.probe = self.clock.callLater(PROBE_DELAY, self._probed, conn)
        if call.state == _CANCELLED:
            self.log.debug("discarded the late answer to {id} from {upstream}",
                           id=call.id, upstream=self.where)
        else:
            call.state = _DONE
            if call.bad is None and not call.readers and len(call.results) < len(call.ids):
                call.bad = "fewer answer lines than commands"
            if call.bad is not None:
                self._warn_malformed(call)
            results = call.results
            if call.readers:
                if results and results[0] is not None:
                    call.d.callback(results[0])
                else:
                    call.d.errback(CardError(errors.UPSTREAM, call.bad or "no READERS answer"))
            else:
                values = [self._value(results[i] if i < len(results) else None)
                          for i in range(len(call.ids))]
                if any(isinstance(v, CardError) and v.code == errors.NOT_FOUND for v in values):
                    self._refresh()
                if call.batch:
                    call.d.callback(values)
                elif isinstance(values[0], CardError):
                    call.d.errback(values[0])
                else:
                    call.d.callback(values[0])
        if self._queue:
            self._flush()

    def _value(self, result):
        """One answer line's result: the answer's bytes or a CardError."""
        if result is None:
            return CardError(errors.UPSTREAM, f"upstream {self.where} gave no valid result")
        if result in errors.MEANING:
            return CardError(result, f"upstream {self.where} answered {result}")
        try:
            return bytes.fromhex(result)
        except ValueError:
            return CardError(errors.UPSTREAM, f"upstream {self.where} answered no hex")

    #: At most one warning about malformed answers this often.
    MALFORMED_WARN_EVERY = 10.0

    def _warn_malformed(self, call):
        now = self.clock.seconds()
        if now < self._malformed_next:
            self._malformed_quiet += 1
            return
        more = self._malformed_quiet
        self._malformed_next = now + self.MALFORMED_WARN_EVERY
        self._malformed_quiet = 0
        self.log.warn("upstream {upstream} sent a malformed answer for reader {reader!r} ({why}): "
                      "C086 for that request{more}", upstream=self.where, reader=call.key,
                      why=call.bad, more=f" ({more} more since the last warning)" if more else "")

    def _probed(self, conn):
        conn.probe = None
        if conn.broken or not self._running:
            return
        if not self.persistent:
            self.log.info("upstream {upstream} keeps connections open: pipelining requests",
                          upstream=self.where)
            self.persistent = True
            self._unpark()
        for c in self._live:
            c.spent = False
        self._flush()

    def _watch(self, call):
        """``call`` timed out while on a connection: if the connection has
        still not answered it after another ``timeout``, it is stuck; drop it
        (its other calls are answered C086) and reconnect."""
        call.watch = self.clock.callLater(self.timeout, self._stuck, call)

    def _stuck(self, call):
        call.watch = None
        conn = call.conn
        if conn is not None and not conn.broken and call in conn.calls:
            self.log.warn("upstream {upstream} has not answered for {seconds}s; reconnecting",
                          upstream=self.where, seconds=2 * self.timeout)
            conn.broken = True
            conn.transport.abortConnection()

    def _fail_queue(self, reason):
        queue, self._queue = self._queue, collections.deque()
        for call in queue:
            call.fail(reason)

    def _flush(self):
        queue = self._queue
        while queue:
            call = queue[0]
            if call.state != _QUEUED:
                queue.popleft()  # cancelled while waiting: never sent
                continue
            conn = self._pick(call.key)
            if conn is None:
                break
            queue.popleft()
            conn.send(call)
        if queue:
            self._open_more()

    # -- connections ------------------------------------------------------

    def _retry(self, slot):
        """ClientService's retry policy for ``slot``; the attempt count is
        ours (it also knows about failed handshakes)."""
        slot.waiting = True
        if self.persistent is False and not self._down:
            slot.parked = True  # one-off connections serve an upstream that closes
            return PARKED
        if self.retry_delay is not None:
            return self.retry_delay(self._failures)
        delay = min(MAX_BACKOFF, MIN_BACKOFF * 2 ** min(self._failures, 20))
        return delay * (0.5 + random.random() / 2)

    def _unpark(self):
        """Parked slots try to connect again now (upstream down, or it
        turned out to keep connections after all)."""
        for slot in self.services:
            if slot.parked and slot.waiting and slot.running:
                slot.parked = False
                slot.stopService()  # waiting: stops at once, no connection to close
                slot.startService()

    def _open_more(self):
        """For an upstream that closes after every answer: a new connection
        per waiting call, at most ``connections`` opening at once."""
        if self.persistent is not False or not self._running or self._down:
            return
        while len(self._opening) < min(self.connections, len(self._queue)):
            d = _WatchedEndpoint(self.endpoint, self._attempt_failed).connect(
                _UpstreamFactory(self))
            if d.called:  # failed at once (the errback has run)
                d.addErrback(lambda f: None)
                break
            self._opening.add(d)
            d.addBoth(self._opened, d)

    def _opened(self, result, d):
        self._opening.discard(d)
        if isinstance(result, Failure):
            return None  # _attempt_failed has dealt with it
        if self._queue:
            self._flush()
        return None

    def _attempt_failed(self, reason):
        self._failures += 1
        if self._live or not self._running:
            return
        self._stale = True
        if not self._down:
            self._down = True
            self.log.warn("upstream {upstream} is unreachable ({why}); retrying",
                          upstream=self.where, why=reason.getErrorMessage())
            self._unpark()  # the pool retries with back-off until it is back
        self._fail_queue(f"upstream {self.where} unreachable")

    def _ready(self, conn):
        if not self._running:
            conn.transport.loseConnection()
            return
        if not self._live and (self._down or self.listing is None):
            self.log.info("connected to upstream {upstream}", upstream=self.where)
        self._live.append(conn)
        self._down = False
        self._flush()
        if self._stale:
            self._stale = False
            self._refresh()
        if self.persistent is False and not conn.calls:
            # Nothing for it to do: an idle connection would stall an
            # upstream that reads its connections one at a time.
            conn.spent = True
            conn.transport.loseConnection()

    def _lost(self, conn, reason, calls):
        for call in calls:
            call.stop_watch()
        if not conn.ready:
            # Connected but never usable (e.g. TLS verification failed).
            self._attempt_failed(reason)
        else:
            self._live.remove(conn)
            now = self.clock.seconds()
            healthy = conn.answers or now - conn.ready_at >= MIN_HEALTHY_LIFETIME
            self._failures = 0 if healthy else self._failures + 1
            closes_after_answer = (
                conn.answers == 1 and reason.check(ConnectionDone) is not None
                and now - conn.first_answer_at < PROBE_DELAY)
            if closes_after_answer and self.persistent is not False:
                self.log.info("upstream {upstream} closes the connection after each answer: "
                              "a new connection for every request", upstream=self.where)
                self.persistent = False
                for c in list(self._live):
                    if not c.calls and not c.spent:
                        c.spent = True
                        c.transport.loseConnection()  # idle: it would stall the upstream
            in_flight = sum(1 for c in calls if c.state == _SENT)
            expected = conn.spent and not in_flight and self.persistent is not True
            if self._running and not expected and (in_flight or not self._live):
                if not self._live:
                    self._stale = True
                self.log.warn(
                    "lost a connection to upstream {upstream} ({why}); {n} command(s) in "
                    "flight answered C086; reconnecting",
                    upstream=self.where, why=reason.getErrorMessage(), n=in_flight)
        for call in calls:
            call.fail(f"connection to upstream {self.where} lost")
        if self._queue and self._running:
            self._flush()

    # -- readers ----------------------------------------------------------

    def _refresh(self):
        """Re-read the upstream's reader list (one READERS call at a time)."""
        if self._refreshing is not None or not self._running:
            return
        if self._down or (not self._live and self.persistent is not False):
            self._stale = True  # on the next connection
            return
        cid = self._id()
        data = b">*" + (b":" + self.password.encode("utf-8") if self.password else b"") \
            + b"|\n>" + cid + b":READERS|\n\n"
        call = _Call(self, [cid], None, data, readers=True)
        conn = self._pick(None)
        if conn is not None:
            conn.send(call)
        else:
            self._wait(call)
        d = self._refreshing = call.d
        d.addTimeout(self.timeout, self.clock)
        d.addCallbacks(self._got_readers, self._readers_failed)
        d.addBoth(self._refreshed)

    def _refreshed(self, _):
        self._refreshing = None

    def _readers_failed(self, failure):
        self.log.warn("reading the readers of {upstream} failed: {why}",
                      upstream=self.where, why=failure.getErrorMessage())
        self._again_soon()

    def _again_soon(self):
        """Ask READERS again shortly (not only at the next ``refresh``)."""
        if not self._running or (self._soon is not None and self._soon.active()):
            return
        delay = self._soon_delay
        if self.refresh:
            delay = min(delay, self.refresh)
        self._soon_delay = min(delay * 2, self.refresh or 60.0)
        self._soon = self.clock.callLater(delay, self._refresh)

    def _got_readers(self, result):
        if result is None or errors.is_error(result):
            self.log.warn("upstream {upstream} answered READERS with {result}",
                          upstream=self.where, result=result)
            self._again_soon()
            return
        names = []
        cap = self._cap
        cap.begin()
        rest = result
        while rest is not None:
            # Split no further than needed: a listing may hold far more names than are kept.
            room = self.readers_max - len(names) + 16
            tokens = rest.split("|", room)
            rest = tokens.pop() if len(tokens) > room else None
            for i, token in enumerate(tokens):
                token = token.strip()
                if not token:
                    continue
                if len(names) >= self.readers_max:
                    left = sum(1 for t in tokens[i:] if t.strip())
                    if rest is not None:  # counted, not split: blank tokens count too
                        left += rest.count("|") + 1
                    cap.too_many(left)
                    rest = None
                    break
                try:
                    name = base64.b64decode(token, validate=True).decode("utf-8")
                except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
                    cap.invalid(token)
                    continue
                if cap.fits(name):
                    names.append(name)
        cap.end(self.log)
        names = tuple(dict.fromkeys(names))
        if names:
            self._soon_delay = EMPTY_RETRY
        else:
            self._again_soon()  # e.g. an upstream proxy still finding its cards
        if names == self.listing or self._registry is None:
            return
        self.listing = names
        self._lines = {}
        prefix = self.prefix
        self._updates.update(names, lambda n: ReaderInfo(n, prefix + n))

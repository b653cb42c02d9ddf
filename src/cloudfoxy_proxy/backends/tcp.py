"""``tcp://`` and ``tls://`` — another line-protocol endpoint as a backend.

``tcp://HOST:PORT?prefix=NAME&password_file=FILE&connections=4&refresh=10``
``tls://HOST:PORT?ca=FILE&cert=FILE&key=FILE&prefix=NAME&...``

The upstream is a CloudFoxy TCP endpoint or another proxy (chaining).  Its
readers come from its ``READERS`` answer and appear here as ``PREFIX`` +
their upstream name.  RESET and APDU go upstream with ids of our own, one
command per request, over a small pool of persistent connections
(ClientService each, reconnecting with back-off).  See docs/tcp.md.

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
"""

import base64
import collections
import random
import re
from urllib.parse import parse_qsl, urlsplit

import attr
from twisted.application.internet import ClientService
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.interfaces import IHandshakeListener, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import LogLevel
from zope.interface import implementer

from .. import errors
from ..backend import IBackend, ReaderInfo
from ..errors import CardError
from ..logs import Logger
from ..parser import COMMANDS
from . import float_param, int_param, query

DEFAULT_PORT = 4001
#: Back-off between connection attempts: the first retry after a lost
#: connection comes after ~MIN_BACKOFF, doubling per failure up to MAX_BACKOFF.
MIN_BACKOFF = 0.1
MAX_BACKOFF = 3.0
#: A connection that dies sooner than this after connecting, without having
#: answered anything, counts as a failed attempt (so a peer that accepts and
#: closes at once is retried with back-off, not in a tight loop).
MIN_HEALTHY_LIFETIME = 1.0
#: The longest line accepted from an upstream (a READERS answer of thousands
#: of readers, or an extended response APDU in hex, fits easily).
MAX_LINE = 8 * 1024 * 1024

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def _read_first_line(option, path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    except OSError as e:
        raise ValueError(f"{option}={path!r}: {e.strerror}") from None


def _read_bytes(option, path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{option}={path!r}: {e.strerror}") from None


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
    from twisted.internet.ssl import (
        Certificate, PrivateCertificate, optionsForClientTLS, platformTrust,
        trustRootFromCertificates)

    trust = platformTrust()
    if "ca" in params:
        data = _read_bytes("ca", params["ca"])
        blocks = _PEM_CERT.findall(data)
        if not blocks:
            raise ValueError(f"ca={params['ca']!r}: no PEM certificate in the file")
        try:
            trust = trustRootFromCertificates([Certificate.loadPEM(b) for b in blocks])
        except Exception as e:
            raise ValueError(f"ca={params['ca']!r}: not a usable certificate ({e})") from None
    client = None
    if ("cert" in params) != ("key" in params):
        raise ValueError("cert= and key= go together (a client certificate and its private key)")
    if "cert" in params:
        pem = _read_bytes("cert", params["cert"]) + b"\n" + _read_bytes("key", params["key"])
        try:
            client = PrivateCertificate.loadPEM(pem)
        except Exception as e:
            raise ValueError(f"cert={params['cert']!r}/key={params['key']!r}: "
                             f"not a usable certificate and key ({e})") from None
    try:
        return optionsForClientTLS(host, trustRoot=trust, clientCertificate=client)
    except Exception as e:
        raise ValueError(f"cannot verify TLS for host {host!r}: {e}") from None


def from_url(url, config):
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    tls = scheme == "tls"
    allowed = {"prefix", "password_file", "connections", "refresh"}
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
    refresh = float_param(params, "refresh", 10.0, 0.0, 86400.0)
    if 0 < refresh < 0.1:
        raise ValueError("refresh= must be 0 (off) or at least 0.1 seconds")
    prefix = params.get("prefix", "")
    if "password_file" in params:
        password = _read_first_line("password_file", params["password_file"])
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
                          timeout=timeout, tls=tls)

    return make


# States of one upstream call.
_QUEUED, _SENT, _DONE, _CANCELLED = range(4)


class _Call:
    """One command sent upstream: its request bytes, our id, its Deferred."""

    __slots__ = ("backend", "id", "key", "data", "readers", "d", "state", "conn",
                 "result", "watch")

    def __init__(self, backend, cid, key, data, readers=False):
        self.backend = backend
        self.id = cid
        self.key = key
        self.data = data
        self.readers = readers
        self.d = Deferred(self._cancel)
        self.state = _QUEUED
        self.conn = None
        self.result = None
        self.watch = None

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
        self.answered = False
        self.broken = False
        self._buf = b""

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

    def dataReceived(self, data):
        buf = self._buf + data if self._buf else data
        start = 0
        while not self.broken:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = buf[start:nl].strip()
            start = nl + 1
            if line:
                self._line(line)
        if self.broken:
            self._buf = b""
            return
        self._buf = buf[start:]
        if len(self._buf) > MAX_LINE:
            self._violation(f"a line longer than {MAX_LINE} bytes")

    def _line(self, line):
        if line[:1] == b">":
            cid, _, result = line[1:].partition(b":")
            if not self.calls:
                self._violation("an answer to no request")
                return
            head = self.calls[0]
            if cid.strip() != head.id:
                self._violation(f"answer id {cid[:40]!r} where {head.id!r} was due")
                return
            if head.result is None:
                head.result = result.strip().decode("utf-8", "replace")
        elif line == b"@@":
            if not self.calls:
                self.log.debug("ignored a stray @@ from {upstream}", upstream=self.backend.where)
                return
            call = self.calls.popleft()
            key = call.key
            n = self.keys[key] - 1
            if n:
                self.keys[key] = n
            else:
                del self.keys[key]
            self.answered = True
            self.backend._answer(call)
        # Anything else ("#" signals, junk) is ignored, as a server would.

    def _violation(self, what):
        self.log.warn("upstream {upstream} broke the protocol ({what}); reconnecting",
                      upstream=self.backend.where, what=what)
        self.broken = True
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self.broken = True
        calls = list(self.calls)
        self.calls.clear()
        self.keys.clear()
        self.backend._lost(self, reason, calls)


@implementer(IHandshakeListener)
class _TLSUpstreamProtocol(_UpstreamProtocol):
    pass


class _UpstreamFactory(Factory):
    noisy = False  # no "Starting factory" line for every connection attempt

    def __init__(self, backend):
        self.backend = backend

    def buildProtocol(self, addr):
        kind = _TLSUpstreamProtocol if self.backend.tls else _UpstreamProtocol
        p = kind(self.backend, self.backend.tls)
        p.factory = self
        return p


@implementer(IStreamClientEndpoint)
@attr.s(eq=False)
class _WatchedEndpoint:
    """An endpoint that tells ``failed(failure)`` about every failed attempt
    (ClientService retries by itself but does not say when one failed)."""

    endpoint = attr.ib()
    failed = attr.ib()

    def connect(self, factory):
        def failed(f):
            if not f.check(CancelledError):
                self.failed(f)
            return f

        return self.endpoint.connect(factory).addErrback(failed)


class _QuietLogger(Logger):
    """ClientService logs every retry at info level; that is debug for us
    (the backend logs the transitions between up and down itself)."""

    def emit(self, level, format=None, **kwargs):
        super().emit(LogLevel.debug if level == LogLevel.info else level, format, **kwargs)


class _Slot(ClientService):
    _log = _QuietLogger()


@implementer(IBackend)
@attr.s(eq=False)
class TcpBackend:
    """The readers of one upstream line-protocol endpoint.

    ``endpoint`` is an IStreamClientEndpoint (TLS-wrapped for ``tls://``);
    ``clock`` an IReactorTime; ``connections`` the pool size; ``refresh``
    how often (seconds, 0: never) the reader list is re-read; ``timeout``
    bounds a READERS call and is the grace a connection gets to answer a
    command that already timed out.  ``retry_delay(failures)``, if given,
    replaces the randomised back-off (tests).
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
    services = attr.ib(init=False, factory=list)
    listing = attr.ib(init=False, default=None)  # upstream names, as last read
    _live = attr.ib(init=False, factory=list)  # ready connections
    _queue = attr.ib(init=False, factory=collections.deque)  # calls waiting for one
    _lines = attr.ib(init=False, factory=dict)  # key -> reader line bytes
    _registry = attr.ib(init=False, default=None)
    _running = attr.ib(init=False, default=False)
    _down = attr.ib(init=False, default=False)
    _failures = attr.ib(init=False, default=0)
    _next_id = attr.ib(init=False, default=0)
    _refreshing = attr.ib(init=False, default=None)
    _loop = attr.ib(init=False, default=None)

    log = Logger()

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
        self._running = True
        factory = _UpstreamFactory(self)
        endpoint = _WatchedEndpoint(self.endpoint, self._attempt_failed)
        for _ in range(self.connections):
            service = _Slot(endpoint, factory, retryPolicy=self._retry, clock=self.clock)
            self.services.append(service)
            service.startService()
        if self.refresh:
            self._loop = LoopingCall(self._refresh)
            self._loop.clock = self.clock
            self._loop.start(self.refresh, now=False).addErrback(
                lambda f: self.log.failure("reader refresh of {upstream} stopped", f,
                                           upstream=self.where))

    def stop(self):
        self._running = False
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._fail_queue("backend stopped")
        services, self.services = self.services, []
        return gatherResults([s.stopService() for s in services])

    def reset(self, key):
        return self._submit(key, b"RESET")

    def transmit(self, key, apdu):
        return self._submit(key, b"APDU:" + apdu.hex().upper().encode("ascii"))

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

    def _submit(self, key, command):
        if not self._running:
            raise CardError(errors.UPSTREAM, "backend stopped")
        conn = self._pick(key)
        if conn is None and self._down:
            raise CardError(errors.UPSTREAM, f"upstream {self.where} unreachable")
        cid = self._id()
        call = _Call(self, cid, key,
                     self._reader_line(key) + b">" + cid + b":" + command + b"|\n\n")
        if conn is not None:
            conn.send(call)
        else:
            self._queue.append(call)  # goes out on the next connection
        return call.d

    def _pick(self, key):
        """The connection for a call on ``key``: the one still holding an
        earlier (timed-out) call for that card, to keep the card's order;
        else an idle one; else the least busy (pipelining)."""
        best = None
        for conn in self._live:
            if key in conn.keys:
                return conn
            if best is None or len(conn.calls) < len(best.calls):
                best = conn
        return best

    def _answer(self, call):
        call.stop_watch()
        if call.state == _CANCELLED:
            self.log.debug("discarded the late answer to {id} from {upstream}",
                           id=call.id, upstream=self.where)
            return
        call.state = _DONE
        result = call.result
        if call.readers:
            call.d.callback(result)
        elif result is None:
            call.d.errback(CardError(errors.UPSTREAM, "upstream gave no result"))
        elif result in errors.MEANING:
            call.d.errback(CardError(result, f"upstream {self.where} answered {result}"))
            if result == errors.NOT_FOUND:
                self._refresh()
        else:
            try:
                answer = bytes.fromhex(result)
            except ValueError:
                call.d.errback(CardError(errors.UPSTREAM, "upstream answer is not hex"))
            else:
                call.d.callback(answer)

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
        while self._queue and self._live:
            call = self._queue.popleft()
            if call.state == _QUEUED:
                self._pick(call.key).send(call)

    # -- connections ------------------------------------------------------

    def _retry(self, attempt):
        """ClientService's retry policy; ``attempt`` is ignored in favour of
        our own count, which also knows about handshake failures."""
        if self.retry_delay is not None:
            return self.retry_delay(self._failures)
        delay = min(MAX_BACKOFF, MIN_BACKOFF * 2 ** min(self._failures, 20))
        return delay * (0.5 + random.random() / 2)

    def _attempt_failed(self, reason):
        self._failures += 1
        if self._live or not self._running:
            return
        if not self._down:
            self._down = True
            self.log.warn("upstream {upstream} is unreachable ({why}); retrying",
                          upstream=self.where, why=reason.getErrorMessage())
        self._fail_queue(f"upstream {self.where} unreachable")

    def _ready(self, conn):
        if not self._running:
            conn.transport.loseConnection()
            return
        first = not self._live
        self._live.append(conn)
        if first:
            self.log.info("connected to upstream {upstream}", upstream=self.where)
        self._down = False
        self._flush()
        if first:
            self._refresh()

    def _lost(self, conn, reason, calls):
        for call in calls:
            call.stop_watch()
        if not conn.ready:
            # Connected but never usable (e.g. TLS verification failed).
            self._attempt_failed(reason)
        else:
            self._live.remove(conn)
            healthy = conn.answered or (
                self.clock.seconds() - conn.ready_at >= MIN_HEALTHY_LIFETIME)
            self._failures = 0 if healthy else self._failures + 1
            in_flight = sum(1 for c in calls if c.state == _SENT)
            if self._running and (in_flight or not self._live):
                self.log.warn(
                    "lost a connection to upstream {upstream} ({why}); {n} command(s) in "
                    "flight answered C086; reconnecting",
                    upstream=self.where, why=reason.getErrorMessage(), n=in_flight)
        for call in calls:
            call.fail(f"connection to upstream {self.where} lost")

    # -- readers ----------------------------------------------------------

    def _refresh(self):
        """Re-read the upstream's reader list (one READERS call at a time)."""
        if self._refreshing is not None or not self._live or not self._running:
            return
        cid = self._id()
        data = b">*" + (b":" + self.password.encode("utf-8") if self.password else b"") \
            + b"|\n>" + cid + b":READERS|\n\n"
        call = _Call(self, cid, None, data, readers=True)
        self._pick(None).send(call)
        d = self._refreshing = call.d
        d.addTimeout(self.timeout, self.clock)
        d.addCallbacks(self._got_readers, self._readers_failed)
        d.addBoth(self._refreshed)

    def _refreshed(self, _):
        self._refreshing = None

    def _readers_failed(self, failure):
        self.log.warn("reading the readers of {upstream} failed: {why}",
                      upstream=self.where, why=failure.getErrorMessage())

    def _got_readers(self, result):
        if result is None or errors.is_error(result):
            self.log.warn("upstream {upstream} answered READERS with {result}",
                          upstream=self.where, result=result)
            return
        names = []
        for token in result.split("|"):
            token = token.strip()
            if not token:
                continue
            try:
                names.append(base64.b64decode(token, validate=True).decode("utf-8"))
            except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
                self.log.warn("upstream {upstream} listed a reader name that is not "
                              "base64 UTF-8: {token!r}", upstream=self.where, token=token[:100])
        names = tuple(dict.fromkeys(names))
        if names == self.listing or self._registry is None:
            return
        self.listing = names
        self._lines = {}
        self._registry.update(self, [ReaderInfo(n, self.prefix + n) for n in names])

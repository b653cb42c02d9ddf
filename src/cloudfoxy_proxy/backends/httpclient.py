"""The REST backend's per-APDU HTTP client: keep-alive GETs to one server,
the responses parsed by ``httptools`` (llhttp, the parser of Node.js and
uvicorn).

One GET per call, over a pool of persistent connections.  treq and
twisted.web's Agent are general (redirects, cookies, request bodies, a
Response with a body producer, several Deferreds a request); on this path
they cost more CPU per APDU (docs/performance.md has the figures of each
option).  This client only frames the request, hands the bytes to llhttp
and keeps the connection for the next request when the server allows it
(HTTP/1.1 without ``Connection: close``; an HTTP/1.0 answer only with
``Connection: keep-alive``, RFC 9112 section 9.3).

Nothing is ever sent twice (an APDU is not idempotent, docs/rest.md):

* a pooled connection found closed or out of step *before* a request is
  written to it is skipped (the request goes on another or a new
  connection);
* once a request is written, a connection that fails before the whole
  answer has come fails that request (the caller answers ``C086``).
"""

import socket

import httptools
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from .. import errors
from ..errors import CardError
from ..logs import Logger
from ..sendnow import write_now

MAX_HEAD = 64 * 1024  #: status line and header lines together, bytes

_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
#: A pooled connection idle at least this many seconds is looked at (one
#: recv(MSG_PEEK) system call) before a request is written to it, in case
#: the server's close arrived after the reactor last looked.  Servers close
#: idle connections after seconds; under load connections are reused within
#: milliseconds, where the call would only cost CPU.
PEEK_AFTER = 0.25


class HTTPPool:
    """Persistent HTTP/1.1 connections to one server (``endpoint``).

    ``get(target, headers)`` sends ``GET target`` (bytes, path and query)
    with the given extra header lines (bytes, each ending in CRLF) and
    returns a cancellable Deferred for ``(status, body)`` (int, bytes);
    it fails with CardError(C086) for a malformed or over-long answer and
    with the connection's error when the connection fails.  Cancelling
    aborts the connection.  ``send(target, headers, waiter)`` is the same
    without a Deferred (the per-APDU path): exactly one of
    ``waiter.answered((status, body))`` or ``waiter.failed(failure)`` is
    called later, unless the returned handle's ``cancel()`` is called
    first (then neither).  Idle connections are reused newest first and
    closed after ``idle_timeout`` seconds; at most ``max_idle`` are kept.
    """

    log = Logger()

    def __init__(self, clock, endpoint, host, max_body, idle_timeout=20.0, max_idle=128):
        self.clock = clock
        self.endpoint = endpoint
        if isinstance(host, str):
            try:
                host = host.encode("ascii")
            except UnicodeEncodeError:
                host = host.encode("idna")
        self.host = host  # the Host header: name[:port]
        self.max_body = max_body
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.idle = []  # [(since, connection)], newest last
        self.closed = False
        self._factory = Factory.forProtocol(lambda: _Connection(self))
        self._factory.noisy = False

    def get(self, target, headers=b""):
        return _DeferredWaiter(self, target, headers).deferred

    def request_tail(self, headers):
        """What follows the target in a request with these extra header
        lines: ``b" HTTP/1.1\\r\\nHost: ...\\r\\n" + headers + b"\\r\\n"``."""
        return b" HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (self.host, headers)

    def send(self, target, headers, waiter):
        return self.send_request(b"GET %s%s" % (target, self.request_tail(headers)), waiter)

    def send_request(self, request, waiter):
        """``send``, the request's bytes made already (``b"GET " + target +
        request_tail(headers)``)."""
        now = self.clock.seconds()
        idle = self.idle
        while idle:
            since, conn = idle.pop()
            idle_for = now - since
            if idle_for < self.idle_timeout and conn.usable(idle_for >= PEEK_AFTER):
                conn.send(request, waiter)
                return conn
            conn.close()
        return _Pending(self, request, waiter)

    def release(self, conn):
        """``conn`` finished a response and may be reused."""
        if self.closed or len(self.idle) >= self.max_idle:
            conn.close()
        else:
            self.idle.append((self.clock.seconds(), conn))

    def forget(self, conn):
        if any(c is conn for _, c in self.idle):
            self.idle = [(t, c) for t, c in self.idle if c is not conn]

    def close(self):
        """Close every idle connection; requests in flight finish first."""
        self.closed = True
        idle, self.idle = self.idle, []
        for _, conn in idle:
            conn.close()


class _DeferredWaiter:
    """HTTPPool.get: a request's outcome as a cancellable Deferred."""

    __slots__ = ("deferred", "handle")

    def __init__(self, pool, target, headers):
        self.deferred = Deferred(self._cancel)
        self.handle = pool.send(target, headers, self)

    def answered(self, answer):
        self.deferred.callback(answer)

    def failed(self, failure):
        self.deferred.errback(failure)

    def _cancel(self, _d):
        self.handle.cancel()


class _Pending:
    """A request waiting for its new connection."""

    __slots__ = ("pool", "request", "waiter", "connecting", "sent", "cancelled")

    def __init__(self, pool, request, waiter):
        self.pool = pool
        self.request = request
        self.waiter = waiter
        self.sent = None
        self.cancelled = False
        self.connecting = pool.endpoint.connect(pool._factory)
        self.connecting.addCallbacks(self._connected, self._failed)

    def _connected(self, conn):
        self.connecting = None
        if self.cancelled:
            conn.close()
            return
        self.sent = conn
        conn.send(self.request, self.waiter)

    def _failed(self, failure):
        self.connecting = None
        if not self.cancelled:
            self.waiter.failed(failure)

    def cancel(self):
        if self.cancelled:
            return
        self.cancelled = True
        connecting, self.connecting = self.connecting, None
        if connecting is not None:
            connecting.cancel()
        if self.sent is not None:
            self.sent.cancel()


class _Extra(Exception):
    """The server sent the start of a second answer to one request."""


class _Connection(Protocol):
    """One connection: one request at a time, its answer parsed by llhttp."""

    waiter = None  # the waiter of the request under way (HTTPPool.send)
    lost = False
    parser = None
    sock = None  # the socket, on plain TCP

    def __init__(self, pool):
        self.pool = pool

    def connectionMade(self):
        handle = getattr(self.transport, "getHandle", lambda: None)()
        if isinstance(handle, socket.socket):
            self.sock = handle  # plain TCP: see usable()

    def usable(self, peek=True):
        """True when a request may be written: the connection is open and
        idle, and (on plain TCP, with ``peek``) the server has neither
        closed it nor sent anything since the last answer, as far as the
        socket knows now (before the reactor has seen it)."""
        if self.lost or self.waiter is not None or self.transport is None:
            return False
        sock = self.sock
        if peek and sock is not None:
            try:
                sock.recv(1, _PEEK)
            except BlockingIOError:
                return True  # nothing to read: still open
            except OSError:
                pass
            self.lost = True  # end of stream, an error, or bytes nobody asked for
            return False
        return True

    def close(self):
        if not self.lost and self.transport is not None:
            self.lost = True
            self.transport.loseConnection()

    def send(self, request, waiter):
        self.waiter = waiter
        if self.parser is None:
            self.parser = httptools.HttpResponseParser(self)  # llhttp starts over after each answer
        self.status = None
        self.framed = False  # Content-Length or chunked: the body does not end at the close
        self.head = 0  # bytes received before the end of the head
        self.headers_done = False
        self.complete = False
        self.body = []
        self.size = 0
        write_now(self.transport, request)

    def cancel(self):
        """Give up the request under way: its waiter hears nothing more; the
        answer may still come, so this connection cannot be reused."""
        if self.waiter is None:
            return
        self.waiter = None
        self.lost = True
        self.transport.abortConnection()

    # -- llhttp's callbacks

    def on_message_begin(self):
        if self.complete:
            raise _Extra()

    def on_header(self, name, value):
        size = len(name)
        if size == 14 and name.lower() == b"content-length":
            self.framed = True
            if value.strip().isdigit() and int(value) > self.pool.max_body:
                raise CardError(errors.UPSTREAM, f"response body over {self.pool.max_body} bytes")
        elif size == 17 and name.lower() == b"transfer-encoding":
            self.framed = True

    def on_headers_complete(self):
        self.headers_done = True

    def on_body(self, data):
        self.size += len(data)
        if self.size > self.pool.max_body:
            raise CardError(errors.UPSTREAM, f"response body over {self.pool.max_body} bytes")
        self.body.append(data)

    def on_message_complete(self):
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer: the real one follows
            self.framed = self.headers_done = False
            return
        self.status = status
        self.keep = self.parser.should_keep_alive()  # valid only inside this callback
        self.complete = True

    # -- the transport

    def dataReceived(self, data):
        if self.waiter is None:
            self.lost = True  # bytes nobody asked for: the stream is out of step
            self.transport.abortConnection()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            cause = e.__context__
            if self.complete:  # bytes after the answer: deliver it, drop the connection
                self._done(keep=False)
            elif isinstance(cause, CardError):
                self._fail(cause)
            else:
                self._fail(CardError(errors.UPSTREAM, f"malformed HTTP response ({e})"))
            return
        if self.complete:
            self._done(self.keep)
        elif not self.headers_done:
            self.head += len(data)
            if self.head > MAX_HEAD:
                self._fail(CardError(errors.UPSTREAM, "HTTP response head too long"))

    def _done(self, keep):
        waiter, self.waiter = self.waiter, None
        result = (self.status, b"".join(self.body))
        self.body = []
        if keep:
            self.pool.release(self)
        else:
            self.lost = True
            self.transport.loseConnection()
        waiter.answered(result)

    def _fail(self, error):
        waiter, self.waiter = self.waiter, None
        self.lost = True
        self.transport.abortConnection()
        if waiter is not None:
            waiter.failed(Failure(error))

    def connectionLost(self, reason):
        self.lost = True
        self.pool.forget(self)
        waiter, self.waiter = self.waiter, None
        if waiter is None:
            return
        if self.headers_done and not self.framed and self.status is None:
            # No Content-Length, not chunked: the body ends with the connection.
            status = self.parser.get_status_code()
            if status >= 200:
                waiter.answered((status, b"".join(self.body)))
                return
        waiter.failed(reason)

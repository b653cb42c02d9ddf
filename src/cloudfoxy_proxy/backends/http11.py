"""A minimal HTTP/1.1 keep-alive client for the REST backend's hot path.

One GET per card command, over a pool of persistent connections to one
server.  twisted.web's Agent and treq are general (redirects, cookies,
request bodies, a Response object with a body producer, several Deferreds a
request): on this path they cost about a third of the proxy's CPU per
APDU.  This client does only what ``/api/v1/basic`` needs: send a GET,
read the status, headers and body (Content-Length, chunked, or until
close), and keep the connection for the next request.

Nothing is ever retried here: a request whose connection fails is an
error for the caller (an APDU is not idempotent).
"""

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol

from .. import errors
from ..errors import CardError
from ..logs import Logger

MAX_HEAD = 64 * 1024  #: status line and headers together


class HTTPPool:
    """Persistent HTTP/1.1 connections to one server (``endpoint``).

    ``get(target, headers)`` sends ``GET target`` (bytes, path and query)
    with the given extra header lines (bytes, each ending in CRLF) and
    returns a cancellable Deferred for ``(status, body)``.  Idle
    connections are reused newest first and dropped after
    ``idle_timeout`` seconds, before a server's own keep-alive timeout can
    race a new request.
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
        request = b"GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (target, self.host, headers)
        now = self.clock.seconds()
        idle = self.idle
        while idle:
            since, conn = idle.pop()
            if now - since < self.idle_timeout and conn.usable():
                return conn.send(request)
            conn.close()
        return _Pending(self, request).deferred

    def release(self, conn):
        """``conn`` finished a response and may be reused."""
        if self.closed or len(self.idle) >= self.max_idle:
            conn.close()
        else:
            self.idle.append((self.clock.seconds(), conn))

    def forget(self, conn):
        self.idle = [(t, c) for t, c in self.idle if c is not conn]

    def close(self):
        """Close every idle connection; requests in flight finish first."""
        self.closed = True
        idle, self.idle = self.idle, []
        for _, conn in idle:
            conn.close()


class _Pending:
    """A request waiting for its new connection."""

    __slots__ = ("pool", "request", "deferred", "connecting", "sent")

    def __init__(self, pool, request):
        self.pool = pool
        self.request = request
        self.sent = None
        self.deferred = Deferred(self._cancel)
        self.connecting = pool.endpoint.connect(pool._factory)
        self.connecting.addCallbacks(self._connected, self._failed)

    def _connected(self, conn):
        self.connecting = None
        if self.deferred.called:  # cancelled meanwhile
            conn.close()
            return
        self.sent = conn.send(self.request)
        self.sent.chainDeferred(self.deferred)

    def _failed(self, failure):
        self.connecting = None
        if not self.deferred.called:
            self.deferred.errback(failure)

    def _cancel(self, _d):
        if self.connecting is not None:
            self.connecting.cancel()
        if self.sent is not None:
            self.sent.cancel()


class _Connection(Protocol):
    """One connection: one request at a time; parses the response."""

    def __init__(self, pool):
        self.pool = pool
        self.d = None
        self.buf = b""
        self.state = None
        self.lost = False

    def usable(self):
        return not self.lost and self.d is None and self.transport is not None

    def close(self):
        if not self.lost and self.transport is not None:
            self.transport.loseConnection()

    def send(self, request):
        self.d = Deferred(self._cancel)
        self.buf = b""
        self.state = "head"
        self.status = None
        self.length = None
        self.chunked = False
        self.keep = True
        self.body = []
        self.size = 0
        self.transport.write(request)
        return self.d

    def _cancel(self, _d):
        # The answer may still come: this connection cannot be reused.
        self.d = None
        self.lost = True
        self.transport.abortConnection()

    def dataReceived(self, data):
        if self.d is None:
            self.lost = True  # bytes nobody asked for: the stream is out of step
            self.transport.abortConnection()
            return
        self.buf += data
        try:
            self._parse()
        except CardError as e:
            self._fail(e)

    def _parse(self):
        while self.d is not None:
            state = self.state
            if state == "head":
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > MAX_HEAD:
                        raise CardError(errors.UPSTREAM, "HTTP response head too long")
                    return
                head, self.buf = self.buf[:end], self.buf[end + 4:]
                if not self._head(head):
                    continue  # 1xx: the real answer follows
            elif state == "body":
                if self.length is None:
                    self._take(self.buf)  # until the server closes
                    self.buf = b""
                    return
                need = self.length - self.size
                if len(self.buf) < need:
                    self._take(self.buf)
                    self.buf = b""
                    return
                self._take(self.buf[:need])
                self.buf = self.buf[need:]
                self._done()
            elif state == "size":
                end = self.buf.find(b"\r\n")
                if end < 0:
                    if len(self.buf) > 1024:
                        raise CardError(errors.UPSTREAM, "bad chunk size line")
                    return
                line, self.buf = self.buf[:end], self.buf[end + 2:]
                try:
                    n = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise CardError(errors.UPSTREAM, "bad chunk size") from None
                if n:
                    self.chunk = n
                    self.state = "chunk"
                else:
                    self.state = "trailer"
            elif state == "chunk":
                if len(self.buf) < self.chunk + 2:
                    return
                if self.buf[self.chunk:self.chunk + 2] != b"\r\n":
                    raise CardError(errors.UPSTREAM, "bad chunk")
                self._take(self.buf[:self.chunk])
                self.buf = self.buf[self.chunk + 2:]
                self.state = "size"
            else:  # trailer: header lines until an empty one
                end = self.buf.find(b"\r\n")
                if end < 0:
                    if len(self.buf) > MAX_HEAD:
                        raise CardError(errors.UPSTREAM, "HTTP trailer too long")
                    return
                line, self.buf = self.buf[:end], self.buf[end + 2:]
                if not line:
                    self._done()

    def _head(self, head):
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise CardError(errors.UPSTREAM, f"not an HTTP response: {lines[0][:60]!r}")
        status = int(parts[1])
        if 100 <= status < 200:
            return False
        self.status = status
        self.keep = parts[0] == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip()
            if name == b"content-length":
                try:
                    self.length = int(value)
                except ValueError:
                    raise CardError(errors.UPSTREAM, "bad Content-Length") from None
                if self.length > self.pool.max_body:
                    raise CardError(errors.UPSTREAM, f"response body over {self.pool.max_body} bytes")
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
            elif name == b"connection":
                if b"close" in value.lower():
                    self.keep = False
                elif b"keep-alive" in value.lower():
                    self.keep = True
        if self.chunked:
            self.length = None
            self.state = "size"
        elif self.length == 0:
            self._done()
        else:
            self.state = "body"
            if self.length is None:
                self.keep = False  # the body ends when the connection does
        return True

    def _take(self, data):
        if data:
            self.size += len(data)
            if self.size > self.pool.max_body:
                raise CardError(errors.UPSTREAM, f"response body over {self.pool.max_body} bytes")
            self.body.append(data)

    def _done(self):
        d, self.d = self.d, None
        result = (self.status, b"".join(self.body))
        self.body = []
        if self.keep and not self.buf:
            self.pool.release(self)
        else:
            self.lost = True
            self.transport.loseConnection()
        d.callback(result)

    def _fail(self, error):
        d, self.d = self.d, None
        self.lost = True
        self.transport.abortConnection()
        if d is not None:
            d.errback(error)

    def connectionLost(self, reason):
        self.lost = True
        self.pool.forget(self)
        d, self.d = self.d, None
        if d is None:
            return
        if self.state == "body" and self.length is None and self.status is not None:
            d.callback((self.status, b"".join(self.body)))  # a body delimited by the close
        else:
            d.errback(reason)

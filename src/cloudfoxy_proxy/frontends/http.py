"""The HTTP base of every HTTP front end (``--rest``, ``--api``, ``--ram``,
``--ram-daemon``, ``--metrics``): one channel and one Site on twisted.web.

Each front end subclasses :class:`HttpSite` and says, per request head,
which :class:`Route` applies (methods, the largest body, how the client
authenticates) and where its credential is (``credential``).  The base does
the rest, the same way for all of them, right after the request's headers
and before any body byte is read or stored:

* **who it is**: the credential goes to ``Dispatcher.identify`` with the
  connection's ``dispatch.Session`` (the front end's name, the peer): the
  one access check, with its throttle (failed guesses answered later,
  ``access.Throttle``), log lines and audit lines; a verified TLS client
  certificate (``mtls:``) names the identity instead.  An accepted request
  carries ``request.session``: a ``dispatch.Session`` with that fixed
  identity, for the dispatcher.  Protected mode (no credentials for this
  front end) serves only loopback clients: others get 403.
* **what it may send**: a route's body limit is decided from the head
  (``Content-Length`` over it: 413; chunked bodies: 411; a body where none
  is expected: 413); a body being received counts against the process's
  ``--max-buffered-bytes`` (``limits.BufferBudget``), like a request head
  still arriving.
* **how long it may take**: the whole request head must arrive within
  ``header_timeout`` seconds of its first byte (``--header-timeout``, and
  never longer than ``--idle-timeout``), else the connection is closed.
* **Host**: a request that presents no secret (protected mode's loopback
  clients, the RAM daemon, a WebSocket before its first message) must name
  this machine in ``Host`` (an IP address, ``localhost``, the host name):
  a DNS-rebinding page names its own domain and is refused (403).
* **errors**: a refusal is one response and a closed connection, in the
  front end's format (``error_body``: JSON for the API and metrics, text
  for REST and RAM); counted, and logged rate-limited with the peer.
* TLS with ALPN: the Site offers ``http/1.1`` only (this channel speaks
  HTTP/1.1), and ``limits.GuardedFactory`` passes that on to TLS.

:func:`answer_later` writes a Deferred's result when it fires, and
cancels it when the client goes away first.

This module is the one place that relies on twisted.web's HTTPChannel
internals beyond its documented methods (the ``length`` of the body being
read, the ``requests`` queue, ``writeHeaders``, ``requestDone``; the
parsed request line through ``twisted_internals.request_line``);
tests/test_http_base.py checks them on the installed Twisted, whose range
is pinned in setup.cfg.
"""

import ipaddress
import socket

import attr
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import LogLevel
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from .. import errors
from ..access import is_local
from ..dispatch import Session
from ..logs import Logger, RateLimitedLog, enabled
from ..parser import Request as CardRequest
from ..tls import ISSLTransport, certificate_identity
from ..twisted_internals import request_line

#: How a route authenticates: a secret (checked by Dispatcher.identify),
#: nothing (health checks, CORS preflights, a WebSocket that authenticates
#: with its first message), or loopback only (the RAM daemon).
SECRET, NONE, LOOPBACK = "secret", "none", "loopback"

#: Reasons twisted.web does not know (RFC 6585).
REASONS = {431: b"Request Header Fields Too Large"}


def reason(status):
    return REASONS.get(status) or RESPONSES.get(status, b"Error")


@attr.s(frozen=True, slots=True)
class Route:
    """What a request head may be: ``methods`` (bytes), ``body`` the largest
    body in bytes (0: none), ``auth`` (SECRET, NONE or LOOPBACK),
    ``host_check`` (the Host rule above, for requests without a secret)
    and ``length_required`` (a ``Content-Length`` must be sent: 411)."""

    methods = attr.ib(converter=frozenset)
    body = attr.ib(default=0)
    auth = attr.ib(default=SECRET)
    host_check = attr.ib(default=True)
    length_required = attr.ib(default=False)


class Head:
    """A request as known after its headers: ``method`` and ``path`` (bytes,
    the path without the query), ``query`` (bytes), ``headers``
    (twisted.web Headers), ``length`` (the declared body length, or None
    for a chunked body)."""

    __slots__ = ("method", "path", "query", "headers", "length")

    def __init__(self, method, path, query, headers, length):
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.length = length

    def header(self, name):
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


class Refusal(Exception):
    """A request answered ``status`` with ``message`` (and the result code
    ``code`` where the front end's errors carry one), then the connection
    closed; ``headers`` are more response headers, ``delay`` seconds the
    answer waits (a throttled failed authentication)."""

    def __init__(self, status, message, code=None, headers=(), delay=0.0, why=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = tuple(headers)
        self.delay = delay
        self.why = why or message


class HttpRequest(Request):
    """twisted.web's Request with ``session``: the ``dispatch.Session`` the
    base gave the request (its identity fixed), or None; and ``gone``:
    True once the client's connection was lost (nothing can be written)."""

    session = None
    gone = False

    def connectionLost(self, reason):
        self.gone = True
        super().connectionLost(reason)


def gone(request):
    """Whether ``request``'s client went away (False for requests that are
    not HttpRequests, e.g. in tests)."""
    return getattr(request, "gone", False)


_THIS_HOST = None


def this_host_names():
    """Names a ``Host`` header may give for this machine (lower case)."""
    global _THIS_HOST
    if _THIS_HOST is None:
        names = {"localhost", "localhost.localdomain"}
        for name in (socket.gethostname(), socket.getfqdn()):
            if name:
                names.add(name.lower())
        _THIS_HOST = frozenset(names)
    return _THIS_HOST


def host_allowed(host):
    """True when a Host header value (bytes; None: absent) names this
    machine: an IP address, ``localhost`` (or a name under ``.localhost``),
    or the machine's host name, with an optional port."""
    if not host:
        return False
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        literal = text[1:].partition("]")[0]
    else:
        literal = text.rpartition(":")[0] if text.count(":") == 1 else text
    try:
        ipaddress.ip_address(literal)
        return True
    except ValueError:
        pass
    return literal in this_host_names() or literal.endswith(".localhost")


def credential_of_authorization(value):
    """The secret of an ``Authorization`` header (bytes or None): a Bearer
    token, or a Basic password (any user name: what browsers prompt for);
    None otherwise."""
    if not value:
        return None
    scheme, _, rest = value.partition(b" ")
    scheme = scheme.lower()
    if scheme == b"bearer":
        secret = rest.strip()
    elif scheme == b"basic":
        import base64
        import binascii

        try:
            secret = base64.b64decode(rest.strip(), validate=True).partition(b":")[2]
        except (ValueError, binascii.Error):
            return None
    else:
        return None
    return secret.decode("utf-8", "replace") or None


@implementer(IHalfCloseableProtocol)
class HttpChannel(HTTPChannel):
    """One HTTP connection of an HttpSite; see the module docstring.

    A TLS client that sends ``close_notify`` after its request (done
    sending) gets the answer, then the connection closes; a request still
    incomplete at that point is not answered.  On plain TCP a FIN is taken
    as the client gone (HTTP clients close, they do not half-close): the
    connection closes at once and its request is cancelled."""

    _state = "idle"  # idle (between requests), head, body, busy (request running), refused
    _head_bytes = 0
    _charged = 0  # bytes of the head or body charged to site.buffers
    _head_since = 0.0  # when the first byte of the head being read arrived (site.clock)
    _deadline = None  # DelayedCall: the check that the head took no longer than header_timeout
    _delayed = None  # DelayedCall of a throttled refusal
    auth = None  # the dispatch.Session identify() keeps for this connection

    _peer = _host = None  # the connection's addresses (getPeer, getHost)

    def connectionMade(self):
        site = self.site
        site.counters.connections += 1
        peer = self._peer = self.transport.getPeer()
        self._host = self.transport.getHost()
        host = getattr(peer, "host", None)
        port = getattr(peer, "port", None)
        self.auth = Session(f"{host}:{port}" if isinstance(host, str) and port is not None else str(peer),
                            site.frontend, host if isinstance(host, str) and host else None,
                            counters=site.counters)
        self._tls = ISSLTransport.providedBy(self.transport)
        super().connectionMade()

    # twisted.web asks for both with every request; they do not change
    # while the connection lasts (the host is a getsockname call each time).
    def getPeer(self):
        return self._peer

    def getHost(self):
        return self._host

    @property
    def busy(self):
        """A request is running (e.g. waiting on a card): not idle (limits.py)."""
        return self._state == "busy"

    # -- reading

    def dataReceived(self, data):
        site = self.site
        site.counters.bytes_in += len(data)
        if self._state == "refused":
            return
        if self._state in ("idle", "head"):
            if self._state == "idle":
                self._state = "head"
                self._head_since = site.clock.seconds()
                if self._deadline is None:  # else the running check looks at this head too
                    self._deadline = site.clock.callLater(site.header_timeout, self._too_slow)
            self._head_bytes += len(data)
            if self._head_bytes > site.buffers.free or self._charged:
                self._charged, over = site.buffers.charge(self._head_bytes, self._charged)
                if over:
                    site.client_log.warn(
                        "{frontend} request from {peer} refused: its head would exceed the buffered "
                        "bytes of all connections (--max-buffered-bytes)", frontend=site.frontend,
                        peer=self.auth.peer)
                    return self._refuse(Refusal(431, "request head too large: try again later",
                                                errors.MALFORMED))
        super().dataReceived(data)

    def rawDataReceived(self, data):
        if self._state != "refused":
            super().rawDataReceived(data)

    def _too_slow(self):
        # One DelayedCall per connection, not one per request: it is left
        # running when a head is complete, and looks at the head being
        # read (if any) when it fires.
        self._deadline = None
        if self._state != "head":
            return  # no head being read: the next one starts the check again
        left = self._head_since + self.site.header_timeout - self.site.clock.seconds()
        if left > 0:
            self._deadline = self.site.clock.callLater(left, self._too_slow)
            return
        self.site.client_log.info("{frontend} client {peer}: closed: no complete request head within "
                                  "{seconds:g} s", frontend=self.site.frontend, peer=self.auth.peer,
                                  seconds=self.site.header_timeout)
        self._state = "refused"
        self.transport.abortConnection()

    def _stop_deadline(self):
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def allHeadersReceived(self):
        site = self.site
        request = self.requests[-1]
        method, target = request_line(self)
        path, _, query = (target or b"/").partition(b"?")
        headers = request.requestHeaders
        head = Head(method or b"", path, query, headers,
                    None if headers.hasHeader(b"transfer-encoding") else self.length)
        if self._tls:  # the handshake is done: a verified client certificate names the identity
            self._tls = False
            identity = certificate_identity(self.transport, site.dispatcher.access)
            if identity is not None:
                self.auth.identity, self.auth.fixed = identity, True
        try:
            request.session = site.judge(head, self)
        except Refusal as refusal:
            return self._refused(refusal)
        # The head is read: its bytes are given back; a body's declared
        # length is charged until it has arrived.
        self._head_bytes = 0
        self._charged, over = site.buffers.charge(self.length or 0, self._charged)
        if over:
            return self._refuse(Refusal(503, "busy: the proxy holds too many request bodies; try again later",
                                        errors.UPSTREAM, ((b"retry-after", b"1"),)))
        self._state = "body"
        super().allHeadersReceived()

    def allContentReceived(self):
        if self._state == "refused":
            return
        if self._charged:
            self._charged, _ = self.site.buffers.charge(0, self._charged)
        self._state = "busy"
        super().allContentReceived()

    def requestDone(self, request):
        self._state = "idle"
        super().requestDone(request)
        if self._eof and self._state != "busy" and self.transport is not None:
            self.loseConnection()

    # -- the client is done sending (IHalfCloseableProtocol)

    _eof = False

    def readConnectionLost(self):
        if self._eof:
            return
        self._eof = True
        if ISSLTransport.providedBy(self.transport) and (self._state == "busy" or self._delayed is not None):
            return  # closed once answered (requestDone, _refuse)
        self.loseConnection()

    def writeConnectionLost(self):
        self.loseConnection()

    # -- refusing

    def _refused(self, refusal):
        # (failed authentications are counted by Dispatcher.identify)
        self.site.client_log.info("{frontend} request from {peer} refused ({status}): {why}",
                                  frontend=self.site.frontend, peer=self.auth.peer,
                                  status=refusal.status, why=refusal.why)
        if refusal.delay:  # a throttled failed authentication: read nothing, answer later
            self._state = "refused"
            self.transport.pauseProducing()
            self._delayed = self.site.clock.callLater(refusal.delay, self._refuse, refusal)
            return
        self._refuse(refusal)

    def _refuse(self, refusal):
        """Answer ``refusal`` now and close; read nothing more."""
        self._state = "refused"
        self._delayed = None
        self._stop_deadline()
        if self._charged:
            self._charged, _ = self.site.buffers.charge(0, self._charged)
        if self.transport is None or not self.connected:
            return
        site = self.site
        content_type, body = site.error_body(refusal.status, refusal.code, refusal.message)
        headers = [(b"Content-Type", content_type), (b"Content-Length", b"%d" % len(body)),
                   (b"Connection", b"close"), (b"Cache-Control", b"no-store")]
        headers += list(refusal.headers) + site.refusal_headers(self.requests[-1] if self.requests else None)
        site.counters.requests += 1
        site.counters.bytes_out += len(body)
        self.writeHeaders(b"HTTP/1.1", b"%d" % refusal.status, reason(refusal.status), headers)
        self.transport.write(body)
        self.transport.resumeProducing()
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.site.counters.connections -= 1
        self._stop_deadline()
        if self._delayed is not None and self._delayed.active():
            self._delayed.cancel()
        self._delayed = None
        if self._charged:
            self._charged, _ = self.site.buffers.charge(0, self._charged)
        super().connectionLost(reason)


class HttpSite(Site):
    """A front end's Site on the HTTP base.  Subclasses set ``frontend``
    (its name), ``log_prefix`` and ``json_errors``, and override
    ``route`` (and ``credential`` where the secret is not in
    ``Authorization``); ``core`` is the front end's ``frontends.base.Core``.

    ``max_line`` bounds the request line and each header line (bytes);
    the whole head is bounded by ``max_line + 16384``."""

    protocol = HttpChannel
    requestFactory = HttpRequest
    noisy = False
    frontend = "http"
    log_prefix = "HttpSite"
    json_errors = True
    max_line = 16384
    #: the status of a wrong or missing secret (RAM answers an unknown path 404)
    unauthorized = 401
    #: where refusals are logged (rate-limited: ``client_log``)
    refusals = Logger(namespace="cloudfoxy_proxy.frontends.http")

    def __init__(self, resource, core):
        # No idle timeout of twisted.web's own: core.limits closes idle
        # connections (and never one whose request is running).
        super().__init__(resource, reactor=core.reactor, timeout=None)
        self.core = core
        self.dispatcher = core.dispatcher
        self.clock = core.reactor
        self.buffers = core.limits.buffers
        idle = core.limits.idle_timeout
        self.header_timeout = min(core.header_timeout, idle) if idle else core.header_timeout
        self.counters = core.counters(self.frontend)
        self.client_log = RateLimitedLog(core.reactor, self.refusals, what=f"refused {self.frontend} requests")

    def logPrefix(self):
        return self.log_prefix

    def acceptableProtocols(self):
        """ALPN (IProtocolNegotiationFactory): HTTP/1.1 only, what the channel speaks."""
        return [b"http/1.1"]

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        channel.MAX_LENGTH = self.max_line
        channel.totalHeadersSize = self.max_line + 16384
        return channel

    #: the access log's debug line, a format of ``method``, ``path`` and
    #: ``code`` (None: no line); ``access_path`` False leaves the path out
    #: (the RAM front end's path holds its secret)
    access_line = None
    access_path = True
    #: where the access log's lines go (a front end sets its own namespace)
    access_log = Logger(namespace="cloudfoxy_proxy.frontends.http")

    def log(self, request):
        """The access log: counted, and a debug line (``access_line``)."""
        counters = self.counters
        counters.requests += 1
        counters.bytes_out += request.sentLength
        if self.access_line is not None and enabled(LogLevel.debug):  # else its fields alone cost 4 % of a request
            fields = {"method": request.method.decode("ascii", "replace"), "code": request.code}
            if self.access_path:
                fields["path"] = request.path.decode("ascii", "replace")
            self.access_log.debug(self.access_line, **fields)

    # -- what front ends say

    def route(self, head):
        """The Route of ``head``, or raise Refusal (404, 405...)."""
        raise NotImplementedError

    def credential(self, head):
        """The secret the request presents (str), or None."""
        return credential_of_authorization(head.header(b"authorization"))

    def error_body(self, status, code, message):
        """``(content type, body)`` of an error answer."""
        from .jsonapi import error_body

        if self.json_errors:
            return b"application/json", error_body(code or errors.FAILED, message)
        text = f"{code} {message}" if code and not message.startswith(code) else message
        return b"text/plain; charset=utf-8", text.encode("utf-8") + b"\n"

    def refusal_headers(self, request):
        """More headers on every refusal (e.g. CORS)."""
        return []

    # -- the one judgement of a request head

    def judge(self, head, channel):
        """The ``dispatch.Session`` a request runs with, or raise Refusal;
        see the module docstring."""
        route = self.route(head)
        auth = channel.auth
        dispatcher = self.dispatcher
        if route.auth == SECRET:
            given = None if auth.fixed else self.credential(head)
            if given is None and not auth.fixed:
                auth.identity = auth.given = None  # every request presents its secret
            identity, _pin, delay = dispatcher.identify(CardRequest(None, given), auth)
            if identity.__class__ is str:
                if auth.drop:
                    delay = 0.0
                if dispatcher.access.modes.get(self.frontend) == "open" and not auth.fixed:
                    raise Refusal(403, "forbidden: only loopback clients are served (the proxy has no "
                                       "credentials configured)", errors.BAD_PIN, why="protected mode")
                raise Refusal(self.unauthorized, "unauthorized: send your secret" + self.how_to_authenticate,
                              errors.BAD_PIN, self.challenge, delay,
                              why="no secret" if given is None else "wrong secret or front end not allowed")
            # proven by a secret (or a client certificate): not protected
            # mode's anonymous loopback client, whatever it sent
            secret = auth.fixed or (given is not None and identity is not dispatcher.access.anonymous)
        else:
            identity, secret = None, False
            if route.auth == LOOPBACK and not (dispatcher.access.allow_anonymous or is_local(auth.host)):
                dispatcher.protected(auth)
                raise Refusal(403, "forbidden: only loopback clients are served", errors.BAD_PIN,
                              why="not loopback")
        if route.host_check and not secret and not host_allowed(head.header(b"host")):
            raise Refusal(403, "forbidden: Host does not name this machine (DNS rebinding?)", errors.BAD_PIN,
                          why="Host " + (head.header(b"host") or b"(none)")[:100].decode("latin-1"))
        # Then what the request may be, once it is known who sends it (a
        # client without a secret learns nothing of the routes).
        if head.method not in route.methods:
            allowed = b", ".join(sorted(route.methods))
            raise Refusal(405, "method not allowed: use " + allowed.decode("ascii"), errors.FAILED,
                          ((b"allow", allowed),))
        if head.length is None or (route.length_required and not head.headers.hasHeader(b"content-length")):
            raise Refusal(411, "send the body with a Content-Length (no chunked bodies)", errors.MALFORMED)
        if head.length > route.body:
            raise Refusal(413, f"request body over {route.body} bytes" if route.body else
                          "no request body allowed here", errors.MALFORMED)
        return Session(auth.peer, self.frontend, auth.host, identity=identity, counters=self.counters)

    #: appended to the 401 message: how this front end takes its secret
    how_to_authenticate = " as Authorization: Bearer SECRET"
    challenge = ((b"www-authenticate", b'Bearer realm="cloudfoxy-proxy"'),)


def _finish(request, body):
    """One body, with its Content-Length (not chunked, like an answer given at once)."""
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


def answer_later(request, d, write, failed):
    """Finish ``request`` when ``d`` fires: ``write(result)`` returns the
    body bytes, ``failed(failure)`` the body of an error (having set the
    status); when the client disconnects first, ``d`` is cancelled (a
    card command in flight still completes) and nothing is written."""
    gone = []

    def disconnected(_):
        gone.append(True)
        d.cancel()

    def done(result):
        if not gone:
            _finish(request, write(result))

    def error(failure):
        if gone and failure.check(CancelledError):
            return
        body = failed(failure)
        if not gone:
            _finish(request, body)

    request.notifyFinish().addErrback(disconnected)
    d.addCallbacks(done, error)
    return NOT_DONE_YET

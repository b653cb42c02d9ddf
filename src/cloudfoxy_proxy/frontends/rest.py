"""``--rest ENDPOINT``: a CloudFoxy-compatible REST front end (docs/rest.md
"Front end") over every backend of the proxy.

* ``GET /api/v1/basic?terminal=T&reset=0|1&apdu=HEX[&apdu=HEX...]`` runs a
  reset and/or APDUs through ``Dispatcher.submit`` as one queue turn (back
  to back on the card, one answer line per APDU): the same per-card queue
  as the line protocol, so REST and line clients share cards safely.
* ``GET /api/v1/inventory``: one line per card, ``/NAME ATR``.
* ``GET /api/v1/hello``: three lines; line 2 is ``Uptime: N s``.

Every request needs ``X-Auth-Token`` (``--rest-token-file`` / env
``FOXYPROXY_REST_TOKEN``).  Terminal ids are ``/`` + the proxy's canonical
reader name with white space as ``_`` (clients split inventory lines on
white space); see docs/rest.md for the mapping and error answers.
"""

import re

import attr

from twisted.internet.defer import CancelledError
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from .. import __version__, errors
from ..dispatch import Session
from ..limits import BufferBudget
from ..logs import Logger, RateLimitedLog
from ..parser import APDU, MAX_APDU_BYTES, RESET, Request, make_command
from ..tls import ISSLTransport, certificate_identity

#: HTTP status and reason for each result code a card command can end with.
STATUS = {
    errors.NOT_FOUND: 404,   # unknown terminal
    errors.AMBIGUOUS: 400,
    errors.MALFORMED: 400,
    errors.NO_CARD: 503,
    errors.UPSTREAM: 502,
    errors.BAD_PIN: 403,
    errors.FAILED: 500,
    errors.INTERNAL: 500,
}

PLAIN = b"text/plain; charset=utf-8"
#: Reasons twisted.web does not know (RFC 6585).
REASONS = {431: b"Request Header Fields Too Large"}

_BLANK = re.compile(r"\s")


def terminal_id(name):
    """The REST terminal id of a reader name: ``/`` + the name with each
    white-space character as ``_`` (``Emulated 00`` -> ``/Emulated_00``)."""
    return "/" + _BLANK.sub("_", name)


class _Channel(HTTPChannel):
    """Request lines long enough for the longest extended APDU in hex.

    Requests are judged right after their headers
    (``RestResource.refusal``): one without a valid X-Auth-Token, with a
    body (the API is GET-only) or with another method is answered at once
    and the connection closed, before any body is read, so nothing a
    client without the token sends is stored.
    """

    MAX_LENGTH = 2 * MAX_APDU_BYTES + 8192
    totalHeadersSize = MAX_LENGTH + 16384
    _refused = False
    _charged = 0  # bytes of an unfinished request head charged to site.buffers
    _delayed = None  # DelayedCall of a throttled refusal (failed authentication)
    session = None  # the dispatch.Session of this connection (who it is)

    def dataReceived(self, data):
        self.site.bytes_in += len(data)
        super().dataReceived(data)
        # A request head still arriving counts against the process's
        # buffered-bytes budget (limits.BufferBudget), like a partial line.
        held = len(self._buffer) + self._receivedHeaderSize
        budget = self.site.buffers
        if (held > budget.free or self._charged) and not self._refused and self.transport is not None:
            self._charged, over = budget.charge(held, self._charged)
            if over:
                peer = self.transport.getPeer()
                self.site.resource.client_log.warn(
                    "REST request from {peer} refused: its head of {n} bytes would exceed the "
                    "buffered bytes of all connections (--max-buffered-bytes)",
                    peer=getattr(peer, "host", peer), n=held)
                self._refuse(431, "request header fields too large: try again later", ())

    def connectionLost(self, reason):
        self.site.connections -= 1
        if self._delayed is not None and self._delayed.active():
            self._delayed.cancel()
        self._delayed = None
        if self._charged:
            self._charged, _ = self.site.buffers.charge(0, self._charged)
        super().connectionLost(reason)

    @property
    def busy(self):
        """A request is running (waiting on a card): not idle (limits.py)."""
        return self._handlingRequest

    def allHeadersReceived(self):
        request = self.requests[-1]
        headers = request.requestHeaders
        body = self.length != 0 or headers.hasHeader(b"transfer-encoding")
        peer = self.transport.getPeer()
        session = self.session
        if not session.fixed and ISSLTransport.providedBy(self.transport):
            identity = certificate_identity(self.transport, self.site.resource.dispatcher.access)
            if identity is not None:  # mtls: the verified certificate says who this is
                session.identity, session.fixed = identity, True
        refusal = self.site.resource.refusal(self._command, headers.getRawHeaders(b"x-auth-token", [None])[0],
                                             body, getattr(peer, "host", peer), self.session)
        if refusal is None:
            return super().allHeadersReceived()
        delay = refusal[3] if len(refusal) > 3 else 0
        if delay:  # a throttled failed authentication: read nothing, answer later
            self._refused = True
            self.transport.pauseProducing()
            self._delayed = self.site.resource.clock.callLater(delay, self._refuse, *refusal[:3])
            return
        self._refuse(*refusal[:3])

    def _refuse(self, code, text, extra):
        """Answer ``code`` at once and close; read nothing more."""
        self._refused = True
        self._delayed = None
        if self._charged:
            self._charged, _ = self.site.buffers.charge(0, self._charged)
        body = text.encode("utf-8") + b"\n"
        head = [b"HTTP/1.1 %d %s" % (code, REASONS.get(code) or RESPONSES.get(code, b"Error")),
                b"Content-Type: " + PLAIN, b"Content-Length: %d" % len(body), b"Connection: close"]
        head += [name + b": " + value for name, value in extra]
        answer = b"\r\n".join(head) + b"\r\n\r\n" + body
        site = self.site
        site.requests += 1  # refused before twisted.web saw it: counted here (metrics)
        site.bytes_out += len(answer)
        if code == 401:
            site.auth_failures += 1
        self.transport.write(answer)
        self.loseConnection()

    def allContentReceived(self):
        if not self._refused:
            super().allContentReceived()
            if self._charged:  # the head is parsed: give its bytes back
                self._charged, _ = self.site.buffers.charge(len(self._buffer), self._charged)

    def rawDataReceived(self, data):
        if not self._refused:
            super().rawDataReceived(data)

    # counted for metrics (the front end "rest"): see RestSite
    def connectionMade(self):
        self.site.connections += 1
        peer = self.transport.getPeer()
        host = getattr(peer, "host", None)
        self.session = Session(f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}", "rest",
                               host if isinstance(host, str) else None)
        super().connectionMade()


class RestSite(Site):
    """A Site whose access log goes to our logger at debug level (the
    listening line still says ``Site starting on N``)."""

    protocol = _Channel
    noisy = False
    _logger = Logger()
    # read by metrics.Metrics as the front end "rest"
    connections = requests = auth_failures = bytes_in = bytes_out = 0

    def __init__(self, resource, buffers=None, **kw):
        """``buffers``: the limits.BufferBudget shared with the other front
        ends (make_rest_service); a budget of its own when None."""
        super().__init__(resource, **kw)
        self.buffers = buffers if buffers is not None else BufferBudget()

    def logPrefix(self):
        return "Site"

    def log(self, request):
        self.requests += 1
        self.bytes_out += request.sentLength
        if request.code == 401:
            self.auth_failures += 1
        self._logger.debug("REST {method} {path} -> {code}", method=request.method.decode("ascii", "replace"),
                        path=request.path.decode("ascii", "replace"), code=request.code)


class Inventory:
    """The ``/api/v1/inventory`` text, and the moment it last changed.

    ``/api/v1/hello`` reports the seconds since that moment as the uptime,
    so clients that re-read the inventory when the uptime shrinks (as
    CloudFoxy's clients and our REST backend do) follow cards coming and
    going without the proxy restarting.
    """

    def __init__(self, registry, clock):
        self.registry = registry
        self.clock = clock
        self.text = None
        self.count = 0
        self.ids = {}  # terminal id -> Reader
        self.since = clock.seconds()
        registry.add_listener(self._changed)
        self._changed(registry)

    def _changed(self, registry):
        lines = []
        ids = {}
        for reader in registry.readers:
            tid = terminal_id(reader.name)
            n = 2
            while tid in ids:  # "A B" and "A_B" both listed: the later one gets a suffix
                tid = f"{terminal_id(reader.name)}_({n})"
                n += 1
            ids[tid] = reader
            if not reader.present:
                continue
            atr = reader.info.atr if reader.info is not None else None
            lines.append(f"{tid} {atr.hex().upper()}" if atr else tid)
        self.ids = ids
        text = "".join(line + "\n" for line in lines)
        if text != self.text:
            if self.text is not None:
                self.since = self.clock.seconds()
            self.text = text
            self.count = len(lines)

    def uptime(self):
        return max(0, int(self.clock.seconds() - self.since))


class RestResource(Resource):
    """The whole API as one leaf resource: three paths, GET only."""

    isLeaf = True
    log = Logger()

    def __init__(self, dispatcher, registry, token, clock):
        """Who may call is ``dispatcher.access``'s business (X-Auth-Token:
        simple mode's --rest-token-file, or a client secret of
        --credentials; docs/security.md); ``token``, when not None, is
        added to it as simple mode's REST token."""
        super().__init__()
        if token is not None and not token:
            raise ValueError("an empty REST token would let anybody in")
        if token is not None:
            dispatcher.access.add_simple([(token, "rest")])
        self.dispatcher = dispatcher
        self.registry = registry
        self.clock = clock
        self.client_log = RateLimitedLog(clock, self.log, what="refused REST requests")
        self.inventory = Inventory(registry, clock)
        self.routes = {
            b"/api/v1/basic": self.basic,
            b"/api/v1/inventory": self.list_inventory,
            b"/api/v1/hello": self.hello,
        }

    # -- plumbing

    def render(self, request):
        request.setHeader(b"content-type", PLAIN)
        request.setHeader(b"cache-control", b"no-store")
        peer = request.getClientAddress()
        content = request.content
        body = content is not None and content.seek(0, 2) > 0
        if content is not None:
            content.seek(0)
        session = getattr(request.channel, "session", None)
        if session is None:  # not one of our channels (tests): a connection of its own
            host = getattr(peer, "host", None)
            session = Session(str(host), "rest", host if isinstance(host, str) else None)
        request.session_of = session
        refusal = self.refusal(request.method, request.getHeader(b"x-auth-token"), body,
                               getattr(peer, "host", peer), session)
        if refusal is not None:
            code, text, extra = refusal[:3]
            for name, value in extra:
                request.setHeader(name, value)
            return self._answer(request, code, text)
        handler = self.routes.get(request.path.rstrip(b"/") or b"/")
        if handler is None:
            return self._answer(request, 404, "not found: use /api/v1/basic, /api/v1/inventory or /api/v1/hello")
        return handler(request)

    def refusal(self, method, token, body, peer, session):
        """``(status, text, headers[, delay])`` for a request that must not
        run, else None: another method than GET (405), a body (the API is
        GET-only: 413), no or a wrong X-Auth-Token (401; answered after
        ``delay`` seconds when the peer is guessing, access.Throttle), a
        client from outside loopback in protected mode (403).  The token is
        checked by ``Dispatcher.identify`` on the connection's ``session``
        (a dispatch.Session; its identity is then set).  Decided from the
        request line and headers alone (``_Channel`` asks before reading a
        body); each refusal is logged with the peer, rate-limited."""
        if method != b"GET":
            why, answer = "method " + method[:16].decode("ascii", "replace"), (
                405, "method not allowed: use GET", ((b"allow", b"GET"),))
        elif body:
            why, answer = "a request body", (413, "request body not accepted: the API is GET-only", ())
        else:
            given = None if token is None or session.fixed else token.decode("utf-8", "replace")
            identity, pin, delay = self.dispatcher.identify(Request(None, given), session)
            if not isinstance(identity, str) and pin is None:
                return None
            if self.dispatcher.access.modes.get("rest") == "open":
                why = "protected mode"
                answer = (403, f"{errors.BAD_PIN} forbidden: only loopback clients are served "
                               "(the proxy has no credentials configured)", ())
            else:
                why = "no X-Auth-Token" if token is None else "wrong X-Auth-Token"
                answer = (401, "unauthorized: send the X-Auth-Token header",
                          ((b"www-authenticate", b'X-Auth-Token realm="cloudfoxy-proxy"'),), delay)
        self.client_log.info("REST request from {peer} refused: {why}", peer=peer, why=why)
        return answer

    @staticmethod
    def _answer(request, code, text):
        request.setResponseCode(code)
        return text.encode("utf-8") + b"\n"

    @staticmethod
    def _arg(request, name):
        """A query parameter's text, None when absent; ValueError when repeated."""
        values = request.args.get(name.encode("ascii"))
        if not values:
            return None
        if len(values) > 1:
            raise ValueError(f"{name}= given more than once")
        try:
            return values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{name}= is not UTF-8") from None

    # -- /api/v1/hello and /api/v1/inventory

    def hello(self, request):
        return (f"CloudFoxy REST API of cloudfoxy-proxy {__version__}\n"
                f"Uptime: {self.inventory.uptime()} s\n"
                f"Cards: {self._listed(request)[1]}\n").encode("utf-8")

    def list_inventory(self, request):
        return self._listed(request)[0].encode("utf-8")

    def _listed(self, request):
        """The inventory text and its card count as the caller may see them
        (readers outside its identity's permissions are not listed)."""
        identity = request.session_of.identity
        if identity is None or identity.readers is None:
            return self.inventory.text, self.inventory.count
        sees = identity.sees
        lines = [line for line in self.inventory.text.splitlines()
                 if sees(self.inventory.ids[line.split(" ", 1)[0]])]
        return "".join(line + "\n" for line in lines), len(lines)

    # -- /api/v1/basic

    def terminal(self, text):
        """The reader a ``terminal=`` value names: its terminal id (as
        listed by the inventory, ``/`` optional), ``/`` + canonical name, the
        canonical name, or an alias (``/IP@id``, ``Foxy NET IP-id``, base64).
        No patterns: a REST client always names one card exactly, so only
        the exact steps of the registry's resolution apply."""
        ids = self.inventory.ids
        reader = ids.get(text) or ids.get("/" + text)
        if reader is not None:
            return reader, None
        if text.startswith("/"):
            reader = self.registry.get(text[1:])
            if reader is not None:
                return reader, None
        try:
            return self.registry.resolve(text, patterns=False), None
        except errors.CardError as e:
            return None, e.code

    def basic(self, request):
        try:
            terminal = self._arg(request, "terminal")
            reset = self._arg(request, "reset")
            apdus = [value.decode("ascii") for value in request.args.get(b"apdu", ())]
        except UnicodeDecodeError:
            return self._answer(request, 400, "bad request: apdu= is not a command APDU in hex")
        except ValueError as e:
            return self._answer(request, 400, f"bad request: {e}")
        if not terminal:
            return self._answer(request, 400, "bad request: terminal= is missing")
        reset = (reset or "0").strip()
        if reset not in ("0", "1"):
            return self._answer(request, 400, f"bad request: reset={reset[:20]!r} must be 0 or 1")
        commands = []
        if reset == "1":
            commands.append(make_command(["1", RESET]))
        for n, apdu in enumerate(apdus, 2):
            command = make_command([str(n), APDU, apdu])
            if command.error is not None:
                return self._answer(request, 400, f"bad request: apdu= is not a command APDU in hex "
                                                  f"(4 to {MAX_APDU_BYTES} bytes)")
            commands.append(command)
        if not commands:
            return self._answer(request, 400, "bad request: give apdu=HEX, reset=1, or both")
        reader, code = self.terminal(terminal)
        if reader is None:
            return self._error(request, code, terminal)
        d = self.dispatcher.submit(reader.name, commands, session=request.session_of)
        if d.called:
            lines = []
            d.addCallback(lines.extend)  # already fired: runs now
            return self._results(request, lines, terminal)
        gone = []

        def disconnected(_):
            gone.append(True)
            d.cancel()  # leave the card's queue; an APDU in flight still completes

        request.notifyFinish().addErrback(disconnected)
        d.addCallback(self._write_results, request, terminal, gone)
        d.addErrback(self._failed, request, gone)
        return NOT_DONE_YET

    def _results(self, request, lines, terminal):
        for _, result in lines:
            if errors.is_error(result):
                return self._error(request, result, terminal)
        # The ATR of a reset alone, else one line per APDU (a reset before
        # APDUs is done, but only the APDUs' answers are returned).
        if len(lines) > 1 and lines[0][0] == "1":
            lines = lines[1:]
        return "".join(result + "\n" for _, result in lines).encode("ascii")

    def _error(self, request, code, terminal):
        if code == errors.NOT_FOUND:
            text = f"{code} terminal not found: {terminal[:200]}"
        else:
            text = f"{code} {errors.MEANING.get(code, 'error')}"
        return self._answer(request, STATUS.get(code, 500), text)

    def _write_results(self, lines, request, terminal, gone):
        if gone:
            return
        request.write(self._results(request, lines, terminal))
        request.finish()

    def _failed(self, failure, request, gone):
        if failure.check(CancelledError) and gone:
            return  # the client disconnected
        self.log.failure("REST request failed", failure)
        if not gone:
            request.write(self._answer(request, 500, f"{errors.INTERNAL} internal error"))
            request.finish()


def _not_blank(inst, attribute, value):
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{attribute.name} must be a non-empty string")


@attr.s(frozen=True, kw_only=True)
class RestSettings:
    """``--rest ENDPOINT`` (a twisted server endpoint string, checked by
    tap.py) and its token (``--rest-token-file``/``FOXYPROXY_REST_TOKEN``,
    non-empty; None when clients authenticate with ``--credentials``
    secrets instead: tap.py hands both to ``dispatcher.access``)."""

    endpoint = attr.ib(validator=_not_blank)
    token = attr.ib(validator=attr.validators.optional(_not_blank), repr=False, default=None)


def make_rest_service(settings, dispatcher, registry, reactor, limits=None):
    """The ``--rest`` listener (``settings``: a RestSettings): a
    tap.Listener of a RestSite, its connections counted and timed out by
    ``limits`` (a limits.ConnectionLimits shared with the other front ends;
    None: a new one with the defaults)."""
    from twisted.internet.endpoints import serverFromString

    from ..limits import ConnectionLimits
    from ..tap import Listener  # tap imports this module only inside makeService

    resource = RestResource(dispatcher, registry, None, reactor)  # tap.py gave the token to dispatcher.access
    # No idle timeout of twisted.web's own: ``limits`` closes idle
    # connections (and never one whose request waits on a card).
    if limits is None:
        limits = ConnectionLimits(reactor)
    site = RestSite(resource, buffers=limits.buffers, reactor=reactor, timeout=None)
    return Listener(serverFromString(reactor, settings.endpoint), limits.wrap(site), settings.endpoint, "--rest")

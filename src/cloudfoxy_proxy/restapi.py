"""``--rest ENDPOINT``: a CloudFoxy-compatible REST front end (PROTOCOL.md
section 2) over every backend of the proxy.

* ``GET /api/v1/basic?terminal=T&reset=0|1&apdu=HEX`` runs a reset and/or
  an APDU through ``Dispatcher.submit``: the same per-card queue as the line
  protocol, so REST and line clients share cards safely.
* ``GET /api/v1/inventory``: one line per card, ``/NAME ATR``.
* ``GET /api/v1/hello``: three lines; line 2 is ``Uptime: N s``.

Every request needs ``X-Auth-Token`` (``--rest-token-file`` / env
``FOXYPROXY_REST_TOKEN``).  Terminal names are ``/`` + the proxy's
canonical reader name; see docs/rest.md for the mapping and error answers.
"""

import hmac

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import CancelledError
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from . import __version__, errors
from .logs import Logger
from .parser import APDU, MAX_APDU_BYTES, RESET, make_command
from .registry import b64name

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


class _Channel(HTTPChannel):
    """Request lines long enough for the longest extended APDU in hex."""

    MAX_LENGTH = 2 * MAX_APDU_BYTES + 8192
    totalHeadersSize = MAX_LENGTH + 16384

    # counted for metrics (the front end "rest"): see RestSite
    def connectionMade(self):
        self.site.connections += 1
        super().connectionMade()

    def connectionLost(self, reason):
        self.site.connections -= 1
        super().connectionLost(reason)

    def dataReceived(self, data):
        self.site.bytes_in += len(data)
        super().dataReceived(data)


class RestSite(Site):
    """A Site whose access log goes to our logger at debug level (the
    listening line still says ``Site starting on N``)."""

    protocol = _Channel
    noisy = False
    _logger = Logger()
    # read by metrics.Metrics as the front end "rest"
    connections = requests = auth_failures = bytes_in = bytes_out = 0

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
        self.since = clock.seconds()
        registry.add_listener(self._changed)
        self._changed(registry)

    def _changed(self, registry):
        lines = []
        for reader in registry.readers:
            if not reader.present:
                continue
            atr = reader.info.atr if reader.info is not None else None
            lines.append(f"/{reader.name} {atr.hex().upper()}" if atr else f"/{reader.name}")
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
        super().__init__()
        if not token:
            raise ValueError("the REST front end needs a token")
        self.dispatcher = dispatcher
        self.registry = registry
        self.token = token.encode("utf-8")
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
        if request.method != b"GET":
            request.setHeader(b"allow", b"GET")
            return self._answer(request, 405, "method not allowed: use GET")
        handler = self.routes.get(request.path.rstrip(b"/") or b"/")
        if handler is None:
            return self._answer(request, 404, "not found: use /api/v1/basic, /api/v1/inventory or /api/v1/hello")
        given = request.getHeader(b"x-auth-token")
        if given is None or not hmac.compare_digest(given, self.token):
            peer = request.getClientAddress()
            self.log.info("REST request from {peer} refused: {why}", peer=getattr(peer, "host", peer),
                          why="no X-Auth-Token" if given is None else "wrong X-Auth-Token")
            request.setHeader(b"www-authenticate", b'X-Auth-Token realm="cloudfoxy-proxy"')
            return self._answer(request, 401, "unauthorized: send the X-Auth-Token header")
        return handler(request)

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
                f"Cards: {self.inventory.count}\n").encode("utf-8")

    def list_inventory(self, request):
        return self.inventory.text.encode("utf-8")

    # -- /api/v1/basic

    def terminal(self, text):
        """The reader a ``terminal=`` value names: ``/`` + canonical name, the
        canonical name, or an alias (``/IP@id``, ``Foxy NET IP-id``, base64).
        No patterns: a REST client always names one card exactly."""
        registry = self.registry
        if text.startswith("/"):
            reader = registry.get(text[1:])
            if reader is not None:
                return reader, None
        reader = registry.get(text)
        if reader is not None:
            return reader, None
        found = [r for r in registry.match(text) if text in r.aliases or text == b64name(r.name)]
        if len(found) == 1:
            return found[0], None
        return None, (errors.AMBIGUOUS if found else errors.NOT_FOUND)

    def basic(self, request):
        try:
            terminal = self._arg(request, "terminal")
            reset = self._arg(request, "reset")
            apdu = self._arg(request, "apdu")
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
        if apdu is not None:
            command = make_command(["2", APDU, apdu])
            if command.error is not None:
                return self._answer(request, 400, f"bad request: apdu= is not a command APDU in hex "
                                                  f"(4 to {MAX_APDU_BYTES} bytes)")
            commands.append(command)
        if not commands:
            return self._answer(request, 400, "bad request: give apdu=HEX, reset=1, or both")
        reader, code = self.terminal(terminal)
        if reader is None:
            return self._error(request, code, terminal)
        d = self.dispatcher.submit(reader.name, commands, password=self.dispatcher.password)
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
        # One line: the ATR of a reset, else the response APDU (a reset
        # before an APDU is done, but only the APDU's answer is returned).
        return (lines[-1][1] + "\n").encode("ascii")

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


def make_rest_service(config, dispatcher, registry, reactor):
    """The ``--rest`` listener: a StreamServerEndpointService of a RestSite."""
    from twisted.internet.endpoints import serverFromString

    resource = RestResource(dispatcher, registry, config["rest-token"], reactor)
    site = RestSite(resource, reactor=reactor)
    service = StreamServerEndpointService(serverFromString(reactor, config["rest"]), site)
    service._raiseSynchronously = True
    return service

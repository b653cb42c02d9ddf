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
from twisted.web.resource import Resource

from .. import __version__, errors
from ..logs import Logger
from ..parser import APDU, MAX_APDU_BYTES, RESET, make_command
from .base import OneListener
from .http import HttpSite, Route, answer_later

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

_BLANK = re.compile(r"\s")
#: Every route: GET only, no body (the API is GET-only).
_GET = Route({b"GET"})


def terminal_id(name):
    """The REST terminal id of a reader name: ``/`` + the name with each
    white-space character as ``_`` (``Emulated 00`` -> ``/Emulated_00``)."""
    return "/" + _BLANK.sub("_", name)


class RestSite(HttpSite):
    """The REST front end on the HTTP base (frontends/http.py): request
    lines long enough for the longest extended APDU in hex; the secret is
    ``X-Auth-Token``; errors are text.  Every route is GET without a body,
    so a request with a body or another method is refused from its head."""

    frontend = "rest"
    log_prefix = "Site"
    json_errors = False
    max_line = 2 * MAX_APDU_BYTES + 8192
    how_to_authenticate = " as the X-Auth-Token header"
    challenge = ((b"www-authenticate", b'X-Auth-Token realm="cloudfoxy-proxy"'),)
    access_line = "REST {method} {path} -> {code}"
    access_log = Logger()

    def route(self, head):
        return _GET

    def credential(self, head):
        token = head.header(b"x-auth-token")
        return None if token is None else token.decode("utf-8", "replace")


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
    """The whole API as one leaf resource: three paths, GET only.  Who may
    call was decided by the HTTP base (``RestSite``, ``Dispatcher.identify``:
    simple mode's --rest-token-file, or a client secret of --credentials;
    docs/security.md): ``request.session`` carries the identity."""

    isLeaf = True
    log = Logger()

    def __init__(self, dispatcher, registry, clock):
        super().__init__()
        self.dispatcher = dispatcher
        self.registry = registry
        self.clock = clock
        self.inventory = Inventory(registry, clock)
        self.routes = {
            b"/api/v1/basic": self.basic,
            b"/api/v1/inventory": self.list_inventory,
            b"/api/v1/hello": self.hello,
        }

    def render(self, request):
        request.setHeader(b"content-type", PLAIN)
        request.setHeader(b"cache-control", b"no-store")
        handler = self.routes.get(request.path.rstrip(b"/") or b"/")
        if handler is None:
            return self._answer(request, 404, "not found: use /api/v1/basic, /api/v1/inventory or /api/v1/hello")
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
                f"Cards: {self._listed(request)[1]}\n").encode("utf-8")

    def list_inventory(self, request):
        return self._listed(request)[0].encode("utf-8")

    def _listed(self, request):
        """The inventory text and its card count as the caller may see them
        (readers outside its identity's permissions are not listed)."""
        identity = request.session.identity
        if identity is None or identity.readers is None:
            return self.inventory.text, self.inventory.count
        sees = identity.sees
        lines = [line for line in self.inventory.text.splitlines()
                 if sees(self.inventory.ids[line.split(" ", 1)[0]])]
        return "".join(line + "\n" for line in lines), len(lines)

    # -- /api/v1/basic

    def terminal(self, text, identity=None):
        """The reader a ``terminal=`` value names: its terminal id (as
        listed by the inventory, ``/`` optional), ``/`` + canonical name, the
        canonical name, or an alias (``/IP@id``, ``Foxy NET IP-id``, base64).
        No patterns: a REST client always names one card exactly, so only
        the exact steps of the registry's resolution apply.  A reader
        ``identity`` may not see is not there (C083)."""
        sees = None if identity is None or identity.readers is None else identity.sees
        ids = self.inventory.ids
        reader = ids.get(text) or ids.get("/" + text)
        if reader is None and text.startswith("/"):
            reader = self.registry.get(text[1:])
        if reader is not None:
            return (reader, None) if sees is None or sees(reader) else (None, errors.NOT_FOUND)
        try:
            return self.registry.resolve(text, patterns=False, sees=sees), None
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
        reader, code = self.terminal(terminal, request.session.identity)
        if reader is None and code == errors.NOT_FOUND:
            # a reader the identity may not see: the dispatcher answers C083
            # for it as for any, and the audit line names it
            reader, code = self.terminal(terminal)
            if reader is None:
                code = errors.NOT_FOUND
        # an unknown terminal still goes through the dispatcher: authorized
        # and audited like every request, answered with its code
        lines = self.dispatcher.run(terminal if reader is None else reader.name, commands,
                                    session=request.session, unresolved=code if reader is None else None)
        if isinstance(lines, list):
            return self._results(request, lines, terminal)
        return answer_later(request, lines, lambda done: self._results(request, done, terminal),
                            lambda failure: self._failed(failure, request))

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

    def _failed(self, failure, request):
        self.log.failure("REST request failed", failure)
        return self._answer(request, 500, f"{errors.INTERNAL} internal error")


@attr.s(frozen=True, kw_only=True)
class RestSettings:
    """``--rest ENDPOINT`` (a twisted server endpoint string, checked by
    tap.py).  The token (``--rest-token-file``) or the ``--credentials``
    secrets clients use are the dispatcher's access, set up by tap.py."""

    endpoint = attr.ib(validator=attr.validators.instance_of(str))


class RestFrontend(OneListener):
    """``--rest``: the CloudFoxy REST front end (IFrontend)."""

    name = option = "rest"

    def settings_of(self, options):
        return RestSettings(endpoint=options["rest"])

    def make_service(self, settings, core):
        resource = RestResource(core.dispatcher, core.registry, core.reactor)
        return core.listen(settings.endpoint, RestSite(resource, core), "--rest")


REST = RestFrontend()

"""``--api ENDPOINT``: the HTTP/JSON and WebSocket API (docs/api.md).

Routes (JSON in and out, byte strings as upper-case hex; described in
OpenAPI 3 at ``/api/v1/openapi.json``):

* ``GET /api/v1/readers``; ``POST /api/v1/readers/{name}/transmit``
  (a reset and/or APDUs as one turn on the card's queue, through
  ``Dispatcher.submit``);
* ``POST /api/v1/sessions``, ``DELETE /api/v1/sessions/{id}``: a card held
  across calls (``Dispatcher.hold``, docs/protocol.md "Card sessions");
* ``GET /api/v1/certificates``, ``.../{alias}/chain``, ``POST
  .../{alias}/sign``: ALIASES, CHAIN and SIGN (docs/signing.md);
* ``GET /api/v1/ws``: a WebSocket (Autobahn) for transmit messages and
  reader events (``websocket.py``);
* FoxyProxy 2.10's ``/api/v1.0/command``, ``/hello``, ``/select``
  (``foxyproxy.py``).

Every request but a CORS preflight needs ``Authorization: Bearer SECRET``:
``--api-token-file``'s token or a ``--credentials`` client's secret, judged
by the HTTP base (``ApiSite``, frontends/http.py: ``Dispatcher.identify``)
right after the request's headers, before any body is read; bodies are
bounded per route (``MAX_BODY`` where a route takes one).  A WebSocket
upgrade without the header authenticates with its first message.  The
request runs as its identity: readers it may not see are in no answer and
answer C083 when named; commands it may not use answer C085.  Errors are
``{"error": {"code": "C08x", "message": ...}}`` with the HTTP status of
``jsonapi.STATUS``.

This module holds the HTTP side: ``ApiSite``, the card sessions
(``ApiSession``), the transmit helpers, ``ApiResource`` (the route table,
the ``/api/v1`` handlers) and the IFrontend ``API``; the JSON codec and
``ApiError`` are ``jsonapi.py``'s, shared with the other two.
"""

import base64
import secrets
from importlib import resources
from urllib.parse import unquote

import attr
from autobahn.twisted.resource import WebSocketResource
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from .. import errors
from ..dispatch import Session
from ..logs import Logger
from ..parser import Request as CardRequest
from ..parser import ALIASES, APDU, CHAIN, MAX_APDU_BYTES, RESET, SIGN, Command, make_command, parse_apdu
from .base import OneListener
from .foxyproxy import FoxyProxyRoutes
from .http import NONE, HttpSite, Route, answer_later, host_allowed
from .jsonapi import DEFAULT_IDLE, JSON, MAX_APDUS, MAX_IDLE, ApiError, dump, error_body, from_json
from .websocket import ApiWebSocketFactory, ReaderEvents

#: The largest request body: 100 extended APDUs in hex and then some.
MAX_BODY = 16 * 1024 * 1024
#: API card sessions open at once (each holds a card or waits for one).
MAX_SESSIONS = 1000


class ApiSite(HttpSite):
    """The API on the HTTP base: the secret is ``Authorization: Bearer``;
    errors are JSON; each route's methods and body limit come from the
    resource's route table; CORS headers go on refusals too."""

    frontend = "api"
    log_prefix = "ApiSite"
    json_errors = True
    access_line = "API {method} {path} -> {code}"
    access_log = Logger()

    def route(self, head):
        if head.method == b"OPTIONS":  # a CORS preflight: no secret (browsers send none)
            return _PREFLIGHT
        if head.path == b"/api/v1/ws" and head.headers.hasHeader(b"upgrade") and not head.headers.hasHeader(
                b"authorization"):
            return _WS_FIRST_MESSAGE  # browsers cannot set headers: the first message authenticates
        methods = self.resource.methods_of(head.path)
        if methods is None:
            return _UNKNOWN
        route = _ROUTES.get(methods)
        if route is None:  # one Route per set of methods (the routes have a few)
            route = _ROUTES[methods] = Route(methods, body=MAX_BODY if b"POST" in methods else 0)
        return route

    def refusal_headers(self, request):
        return self.resource.cors_headers(request)


_PREFLIGHT = Route({b"OPTIONS"}, auth=NONE, host_check=False)
_ROUTES = {}
_NO_MATCH = object()
#: ApiResource._match remembers paths up to this long (bytes), this many.
_MATCHED_PATH, _MATCHED = 512, 1024
_WS_FIRST_MESSAGE = Route({b"GET"}, auth=NONE)
#: An unknown path: the secret first, then 404.
_UNKNOWN = Route({b"GET", b"POST", b"DELETE", b"PUT", b"PATCH", b"HEAD"})


class ApiSession:
    """An API card session: a dispatch Session holding a card (CardSession),
    acting as its owner's identity."""

    __slots__ = ("id", "owner", "session", "card", "reader")

    def __init__(self, sid, owner):
        """``owner``: the dispatch Session of the request that opened it."""
        self.id = sid
        self.owner = owner.identity
        self.session = Session(f"{owner.peer} (api session {sid[:6]})", "api", owner.host, identity=owner.identity)
        self.card = None
        self.reader = None


def _segments(path):
    text = path.decode("ascii", "replace")
    return [unquote(s) for s in text.split("/")[1:]] if "%" in text else text.split("/")[1:]


def _hex_list(values, what):
    if not isinstance(values, list) or len(values) > MAX_APDUS:
        raise ApiError(400, f"{what} must be a list of at most {MAX_APDUS} hex strings")
    for v in values:
        if not isinstance(v, str):
            raise ApiError(400, f"{what} must be a list of hex strings")
    return values


def transmit_commands(reset, apdus):
    """parser.Commands for a reset (id ``R``) and the APDUs (ids ``0``..)."""
    if not isinstance(reset, bool):
        raise ApiError(400, "reset must be true or false")
    commands = [Command("R", RESET)] if reset else []
    for n, text in enumerate(_hex_list(apdus, "apdus")):
        apdu = parse_apdu(text)
        if apdu is None:
            raise ApiError(400, f"apdus[{n}] is not a command APDU in hex (4 to {MAX_APDU_BYTES} bytes)")
        commands.append(Command(str(n), APDU, apdu=apdu))
    if not commands:
        raise ApiError(400, "give apdus, reset: true, or both")
    return commands


def transmit_answer(lines, reader):
    """``{"atr", "responses"}`` from a transmit's result lines, or ApiError
    (with the responses so far) for the first error."""
    atr = None
    responses = []
    for cid, result in lines:
        if errors.is_error(result):
            e = ApiError.of(result, reader if result == errors.NOT_FOUND else "")
            e.extra = {"atr": atr, "responses": responses}
            raise e
        if cid == "R":
            atr = result
        else:
            responses.append(result)
    return {"atr": atr, "responses": responses}


def same_origin(request, origin):
    """True when ``origin`` (bytes) is the request's own origin: a page
    this proxy served (scheme and ``Host`` as the request came in, and
    ``Host`` names this machine, so a rebound domain is not taken for it)."""
    host = request.getHeader(b"host")
    scheme = b"https://" if request.isSecure() else b"http://"
    return host is not None and origin == scheme + host and host_allowed(host)


class ApiResource(Resource):
    """Every route of the API as one leaf resource (routing by path
    segments; the WebSocket route hands its request to Autobahn)."""

    isLeaf = True
    log = Logger()

    #: (method, path template): every route; the OpenAPI test checks them.
    ROUTES = (
        ("GET", "/api/v1/readers"),
        ("POST", "/api/v1/readers/{name}/transmit"),
        ("POST", "/api/v1/sessions"),
        ("DELETE", "/api/v1/sessions/{id}"),
        ("GET", "/api/v1/certificates"),
        ("GET", "/api/v1/certificates/{alias}/chain"),
        ("POST", "/api/v1/certificates/{alias}/sign"),
        ("GET", "/api/v1/ws"),
        ("GET", "/api/v1/openapi.json"),
        ("POST", "/api/v1.0/command"),
        ("GET", "/api/v1.0/hello"),
        ("GET", "/api/v1.0/select/{name}"),
        ("GET", "/api/v1.0/select/{name}/{limit}"),
    )

    def __init__(self, dispatcher, registry, clock, cors_origins=(), client_log=None):
        """``client_log``: the rate-limited log of client-caused lines (the
        site's); WebSocket clients' lines go there."""
        super().__init__()
        self.dispatcher = dispatcher
        self.registry = registry
        self.clock = clock
        self.cors_origins = frozenset(o.encode("ascii") for o in cors_origins)
        self.client_log = client_log
        self.site = None
        self.sessions = {}
        self.events = ReaderEvents(registry)
        self.ws_factory = ApiWebSocketFactory(self)
        self.websocket = WebSocketResource(self.ws_factory)
        self.openapi = resources.files(__package__).joinpath("openapi.json").read_bytes()
        self.foxyproxy = FoxyProxyRoutes(self)
        #: path -> what ``_match`` found for it (paths up to _MATCHED_PATH bytes;
        #: emptied when it holds _MATCHED entries)
        self._matched = {}
        #: (path segments after /api, None for a parameter) -> {method: handler}
        self.table = tuple({
            ("v1", "readers"): {"GET": self.readers},
            ("v1", "readers", None, "transmit"): {"POST": self.transmit},
            ("v1", "sessions"): {"POST": self.open_session},
            ("v1", "sessions", None): {"DELETE": self.close_session},
            ("v1", "certificates"): {"GET": self.certificates},
            ("v1", "certificates", None, "chain"): {"GET": self.chain},
            ("v1", "certificates", None, "sign"): {"POST": self.sign},
            ("v1", "openapi.json"): {"GET": self.openapi_json},
            ("v1.0", "command"): {"POST": self.foxyproxy.command},
            ("v1.0", "hello"): {"GET": self.foxyproxy.hello},
            ("v1.0", "select", None): {"GET": self.foxyproxy.select},
            ("v1.0", "select", None, None): {"GET": self.foxyproxy.select},
        }.items())

    def methods_of(self, path):
        """The methods (bytes) of the route ``path`` names, or None."""
        found = self._match(path)
        return None if found is None else found[2]

    def _match(self, path):
        """``({method: handler}, path parameters, methods as bytes)`` of
        the route ``path`` names (the WebSocket route has no handlers), or
        None; remembered per path, as the same few paths come again and
        again."""
        found = self._matched.get(path, _NO_MATCH)
        if found is _NO_MATCH:
            found = self._lookup(path)
            if len(path) <= _MATCHED_PATH:
                if len(self._matched) >= _MATCHED:
                    self._matched.clear()
                self._matched[path] = found
        return found

    def _lookup(self, path):
        try:
            parts = _segments(path.rstrip(b"/") if path != b"/" else path)
        except UnicodeDecodeError:
            return None
        key = [parts[1]] + parts[2:] if parts[:1] == ["api"] and parts[1:2] else None
        if key is not None:
            if key == ["v1", "ws"]:
                return {}, (), frozenset((b"GET",))
            for pattern, methods in self.table:
                if len(pattern) == len(key) and all(p is None or p == k for p, k in zip(pattern, key)):
                    return (methods, tuple(k for p, k in zip(pattern, key) if p is None),
                            frozenset(m.encode("ascii") for m in methods))
        return None

    def cors_headers(self, request):
        """CORS headers for a request from an allowed origin, else none."""
        origin = request.getHeader(b"origin") if request is not None else None
        if origin is None or origin not in self.cors_origins:
            return []
        return [(b"Access-Control-Allow-Origin", origin), (b"Vary", b"Origin")]

    # -- plumbing

    def render(self, request):
        if self.cors_origins:  # (else no origin is allowed, and none is looked at)
            origin = request.getHeader(b"origin")
            allowed = origin is not None and origin in self.cors_origins
            if allowed:
                request.setHeader(b"access-control-allow-origin", origin)
                request.setHeader(b"vary", b"Origin")
        else:
            origin, allowed = None, False
        if request.method == b"OPTIONS":
            return self.preflight(request, allowed)
        session = request.session  # judged by the HTTP base (ApiSite): who this is
        if request.path == b"/api/v1/ws":
            if origin is not None and self.cors_origins and not allowed and not same_origin(request, origin):
                return self._error(request, ApiError(403, "origin not allowed"))
            return self.ws_factory.upgrade(self.websocket, request)  # without a secret: the first message
        request.setHeader(b"content-type", JSON)
        request.setHeader(b"cache-control", b"no-store")
        try:
            handler, params = self.route(request.method, request.path)
            result = handler(request, session, *params)
        except ApiError as e:
            return self._error(request, e)
        if result.__class__ is dict:  # answered at once (an idle card)
            return dump(result)
        if isinstance(result, bytes):
            return result
        if not hasattr(result, "addCallbacks"):
            return dump(result)
        if result.called:  # answered at once (an idle card): no Deferred chain for the request
            done = []
            result.addBoth(done.append)
            if not isinstance(done[0], Failure):
                return dump(done[0])
            return self._failed(done[0], request)
        return answer_later(request, result, lambda value: value if isinstance(value, bytes) else dump(value),
                            lambda failure: self._failed(failure, request))

    def route(self, method, path):
        """(handler, path parameters) or ApiError 404/405."""
        found = self._match(path)
        if found is None or not found[0]:
            raise ApiError(404, "no such resource; see /api/v1/openapi.json", errors.NOT_FOUND)
        methods, params, _ = found
        handler = methods.get(method.decode("ascii", "replace"))
        if handler is None:
            raise ApiError(405, f"method not allowed: use {', '.join(methods)}")
        return handler, params

    def preflight(self, request, allowed):
        if not allowed:
            request.setResponseCode(403)
            request.setHeader(b"content-type", JSON)
            return error_body(errors.BAD_PIN, "origin not allowed (--api-cors-origin)")
        request.setResponseCode(204)
        request.setHeader(b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS")
        request.setHeader(b"access-control-allow-headers", b"Authorization, Content-Type")
        request.setHeader(b"access-control-max-age", b"600")
        return b""

    def _error(self, request, e):
        request.setResponseCode(e.status)
        request.setHeader(b"content-type", JSON)
        body = {"error": {"code": e.code, "message": e.message}}
        body.update(e.extra)
        return dump(body)

    def _failed(self, failure, request):
        if failure.check(ApiError):
            return self._error(request, failure.value)
        self.log.failure("API request failed", failure)
        return self._error(request, ApiError(500, "internal error", errors.INTERNAL))

    @staticmethod
    def body(request):
        """The request's JSON object body (whatever its Content-Type, so
        ``curl -d`` works); ApiError 400 otherwise."""
        try:
            data = from_json(request.content.read() or b"{}")
        except ValueError:
            raise ApiError(400, "the body is not JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        return data

    # -- readers and transmit

    def reader_list(self, identity):
        """The readers ``identity`` may see, as the API lists them."""
        sees = None if identity is None or identity.readers is None else identity.sees
        out = []
        for r in self.registry.readers:
            if sees is not None and not sees(r):
                continue
            atr = r.info.atr if r.info is not None and r.present else None
            out.append({"name": r.name, "aliases": list(r.aliases + r.extra_aliases), "present": r.present,
                        "atr": atr.hex().upper() if atr else None, "backend": r.backend.description,
                        "queued": len(r.queue)})
        return out

    def readers(self, request, session):
        return {"readers": self.reader_list(session.identity)}

    def transmit(self, request, session, name):
        data = self.body(request)
        return self.run_transmit(name, data.get("reset", False), data.get("apdus", []),
                                 data.get("session"), session)

    def run_transmit(self, name, reset, apdus, session_id, session):
        """``{"atr", "responses"}`` when the card answered at once, else a
        Deferred firing with it; ApiError (raised, or the Deferred's
        failure) for an error.  ``session``: the dispatch Session of the
        client (its identity), unless ``session_id`` names an API card
        session of that identity, whose card the transmit then uses."""
        commands = transmit_commands(reset, apdus)
        if session_id is not None:
            held = self.sessions.get(session_id) if isinstance(session_id, str) else None
            if held is None or held.owner != session.identity:
                raise ApiError(404, "no such session (ended or never opened)", errors.NOT_FOUND)
            reader = self.dispatcher.target(CardRequest(name, None), session.identity)
            if isinstance(reader, str):
                raise ApiError.of(reader, name)
            if reader is not held.reader:
                raise ApiError(409, f"session {session_id} holds {held.reader.name}, not {reader.name}")
            session = held.session
            held.card.touch()
        result = self.dispatcher.run(name, commands, session=session)
        if isinstance(result, list):
            return transmit_answer(result, name)
        return result.addCallback(transmit_answer, name)

    # -- card sessions

    def open_session(self, request, session):
        data = self.body(request)
        name = data.get("reader")
        idle = data.get("idle_timeout", DEFAULT_IDLE)
        if not isinstance(name, str):
            raise ApiError(400, "reader must be a reader name")
        if isinstance(idle, bool) or not isinstance(idle, (int, float)) or not 0 < idle <= MAX_IDLE:
            raise ApiError(400, f"idle_timeout must be seconds, above 0 and at most {MAX_IDLE:g}")
        if len(self.sessions) >= MAX_SESSIONS:
            raise ApiError(503, "too many card sessions open", errors.UPSTREAM)
        held = ApiSession(secrets.token_urlsafe(16), session)
        d = self.dispatcher.hold(name, held.session, idle_timeout=idle)
        self.sessions[held.id] = held

        def granted(card):
            held.card = card
            held.reader = card.reader
            card.ended.addCallback(lambda _: self.sessions.pop(held.id, None))
            return {"session": held.id, "reader": card.reader.name, "idle_timeout": idle}

        def failed(failure):
            self.sessions.pop(held.id, None)
            if failure.check(errors.CardError):
                raise ApiError.of(failure.value.code, name)
            return failure

        return d.addCallbacks(granted, failed)

    def close_session(self, request, session, sid):
        held = self.sessions.get(sid)
        if held is None or held.owner != session.identity or held.card is None:
            raise ApiError(404, "no such session (ended or never opened)", errors.NOT_FOUND)
        held.card.close()
        return {"session": sid, "closed": True}

    # -- signing (docs/signing.md)

    def _simple(self, reader, command, session, password=None):
        d = self.dispatcher.submit(reader, [command], password=password, session=session)

        def result(lines):
            value = lines[0][1]
            if errors.is_error(value):
                if value == errors.FAILED and self.dispatcher.signing is None:
                    raise ApiError(501, "signing is off (--no-signing)", errors.FAILED)
                raise ApiError.of(value, reader or "")
            return value

        return d.addCallback(result)

    def certificates(self, request, session):
        def listed(text):
            out = []
            for b64 in filter(None, text.split("|")):
                alias = _b64(b64)
                hits = self.registry.match(alias, patterns=False)
                out.append({"alias": alias, "reader": hits[0].name if len(hits) == 1 else None})
            return {"certificates": out}

        return self._simple("", make_command(["1", ALIASES]), session).addCallback(listed)

    def chain(self, request, session, alias):
        return self._simple(alias, make_command(["1", CHAIN]), session).addCallback(
            lambda text: {"chain": [base64.b64decode(c).hex().upper() for c in text.split(":") if c]})

    def sign(self, request, session, alias):
        data = self.body(request)
        digest, algorithm, pin = data.get("digest"), data.get("algorithm", ""), data.get("pin")
        if not isinstance(digest, str) or not isinstance(algorithm, str) or not isinstance(pin, str) or not pin:
            raise ApiError(400, "give digest (hex), pin and optionally algorithm (e.g. SHA256)")
        if ":" in digest or ":" in algorithm:
            raise ApiError(400, "digest must be hex")
        return self._simple(alias, make_command(["1", SIGN, digest, algorithm]), session, pin).addCallback(
            lambda sig: {"signature": sig})

    def openapi_json(self, request, session):
        return self.openapi


def _b64(text):
    return base64.b64decode(text).decode("utf-8", "replace")


@attr.s(frozen=True, kw_only=True)
class ApiSettings:
    """``--api ENDPOINT`` and the browser origins of ``--api-cors-origin``;
    the token (``--api-token-file``) and ``--credentials`` secrets are the
    dispatcher's access (tap.py)."""

    endpoint = attr.ib()
    cors_origins = attr.ib(default=(), converter=tuple)


class ApiFrontend(OneListener):
    """``--api``: the HTTP/JSON and WebSocket API (IFrontend)."""

    name = option = "api"

    def settings_of(self, options):
        return ApiSettings(endpoint=options["api"], cors_origins=options.get("api-cors-origin", ()))

    def site(self, settings, core):
        """The API's ApiSite and its ApiResource (``site.resource``)."""
        resource = ApiResource(core.dispatcher, core.registry, core.reactor, cors_origins=settings.cors_origins)
        site = resource.site = ApiSite(resource, core)
        resource.client_log = site.client_log
        return site

    def make_service(self, settings, core):
        return core.listen(settings.endpoint, self.site(settings, core), "--api")


API = ApiFrontend()

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
  reader events;
* FoxyProxy 2.10's ``/api/v1.0/command``, ``/hello``, ``/select``.

Every request but a CORS preflight needs ``Authorization: Bearer TOKEN``
(``--api-token-file``/``FOXYPROXY_API_TOKEN``); it is judged right after
the request's headers, before any body is read (``_ApiChannel``), and
bodies are bounded (``MAX_BODY``).  Errors are ``{"error": {"code":
"C08x", "message": ...}}`` with the HTTP status of ``STATUS``.
"""

import base64
import hmac
import json
import secrets
from importlib import resources
from urllib.parse import unquote

import orjson
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.defer import CancelledError
from twisted.logger import LogLevel
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from .. import errors
from ..access import full_access
from ..dispatch import Session
from ..logs import Levels, Logger, RateLimitedLog, enabled
from ..parser import ALIASES, APDU, CHAIN, MAX_APDU_BYTES, RESET, SIGN, Command, make_command, parse_apdu
from .rest import REASONS, _Channel

#: HTTP status of each result code (docs/api.md, "Conventions").
STATUS = {
    errors.NOT_FOUND: 404,
    errors.AMBIGUOUS: 400,
    errors.MALFORMED: 400,
    errors.NO_CARD: 503,
    errors.UPSTREAM: 502,
    errors.BAD_PIN: 403,
    errors.FAILED: 422,
    errors.INTERNAL: 500,
}
#: The code in error bodies that are not about a card command.
HTTP_CODES = {400: errors.MALFORMED, 401: errors.BAD_PIN, 403: errors.BAD_PIN, 404: errors.NOT_FOUND,
              405: errors.FAILED, 409: errors.UPSTREAM, 411: errors.MALFORMED, 413: errors.MALFORMED,
              431: errors.MALFORMED, 500: errors.INTERNAL, 503: errors.UPSTREAM}

JSON = b"application/json"
#: The largest request body: 100 extended APDUs in hex and then some.
MAX_BODY = 16 * 1024 * 1024
MAX_APDUS = 1000
DEFAULT_IDLE = 30.0
MAX_IDLE = 3600.0
#: API card sessions open at once (each holds a card or waits for one).
MAX_SESSIONS = 1000
#: A WebSocket subscriber whose unsent bytes exceed this is dropped.
MAX_SUBSCRIBER_BACKLOG = 256 * 1024
#: Seconds a WebSocket without a bearer header has to send ``{"auth": TOKEN}``.
WS_AUTH_TIMEOUT = 10.0
#: The longest WebSocket message, and the longest before authentication.
MAX_WS_MESSAGE = 1024 * 1024
MAX_WS_MESSAGE_UNAUTHENTICATED = 4096


def to_json(obj):
    """``obj`` as compact JSON in UTF-8 bytes: orjson (a tenth of the
    standard library's time for the API's small messages); the standard
    library for the little orjson refuses (integers over 64 bits, strings
    with lone surrogates, which it writes as ``\\ud800`` escapes)."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def from_json(data):
    """The value of the JSON text ``data`` (bytes, UTF-8); ValueError when
    it is not JSON (bad UTF-8, a byte order mark, NaN, nesting deeper than
    1,024).  Integers over 64 bits come back as floats."""
    return orjson.loads(data)


def is_message_id(value):
    """Whether a client's ``id`` (or FoxyProxy ``nonce``), echoed in its
    answer, is a string or a number (not a boolean, not a container: those
    could be nested deeper than any JSON writer goes)."""
    return value.__class__ is not bool and isinstance(value, (str, int, float))


def dump(obj):
    """A JSON answer's bytes (one line, so curl output ends with a newline)."""
    return to_json(obj) + b"\n"


def error_body(code, message):
    return dump({"error": {"code": code, "message": message}})



def api_session(peer):
    """A dispatch Session for the API: its clients proved the bearer token
    (``BearerAuth``), so the dispatcher sees the fixed identity ``api`` with
    access to every reader (docs/security.md); a reader-line password is
    then only SIGN's PIN."""
    return Session(peer, "api", identity=full_access("api"))

class ApiError(Exception):
    """An answer other than 200: ``status``, a result ``code``, a message."""

    def __init__(self, status, message, code=None, extra=None):
        super().__init__(message)
        self.status = status
        self.code = code or HTTP_CODES.get(status, errors.FAILED)
        self.message = message
        self.extra = extra or {}

    @classmethod
    def of(cls, code, what=""):
        meaning = errors.MEANING.get(code, "error")
        return cls(STATUS.get(code, 500), f"{meaning}{': ' + what if what else ''}", code)


class BearerAuth:
    """The one place API requests are authenticated: ``check(header)`` is
    the identity a request acts as (here the string ``"token"``), or None.
    Compared in constant time; access control may replace this object with
    one that maps tokens to identities."""

    def __init__(self, token):
        if not token:
            raise ValueError("the API needs a token")
        self.token = token.encode("utf-8")

    def check(self, authorization):
        """``authorization``: the raw Authorization header (bytes) or None."""
        if not authorization or not authorization[:7].lower() == b"bearer ":
            return None
        return "token" if hmac.compare_digest(authorization[7:].strip(), self.token) else None

    def check_token(self, token):
        """A bare token (the WebSocket ``auth`` message)."""
        if not isinstance(token, str):
            return None
        return "token" if hmac.compare_digest(token.encode("utf-8"), self.token) else None


class _ApiChannel(_Channel):
    """restapi's channel (head bytes under the buffered-bytes budget),
    judging API requests after their headers (``ApiResource.refusal``):
    refused requests are answered in JSON and the connection closed before
    any body byte is read; an accepted body's declared length is charged to
    the budget until it has arrived."""

    def allHeadersReceived(self):
        request = self.requests[-1]
        headers = request.requestHeaders
        peer = self.transport.getPeer()
        refusal = self.site.resource.refusal(self._command, self._path.split(b"?", 1)[0], headers, self.length,
                                             getattr(peer, "host", peer))
        if refusal is not None:
            return self._refuse(*refusal)
        if self.length:
            self._body, over = self.site.buffers.charge(self.length, self._body)
            if over:
                return self._refuse(503, "busy: the proxy holds too many request bodies; try again later",
                                    ((b"retry-after", b"1"),))
        return super(_Channel, self).allHeadersReceived()

    _body = 0  # the declared body length charged to site.buffers

    def _give_back_body(self):
        if self._body:
            self._body, _ = self.site.buffers.charge(0, self._body)

    def allContentReceived(self):
        self._give_back_body()
        super().allContentReceived()

    def connectionLost(self, reason):
        self._give_back_body()
        super().connectionLost(reason)

    def _refuse(self, code, text, extra):
        self._refused = True
        self._give_back_body()
        if self._charged:
            self._charged, _ = self.site.buffers.charge(0, self._charged)
        body = error_body(HTTP_CODES.get(code, errors.FAILED), text)
        head = [b"HTTP/1.1 %d %s" % (code, _reason(code)), b"Content-Type: " + JSON,
                b"Content-Length: %d" % len(body), b"Connection: close"]
        head += [name + b": " + value for name, value in extra]
        head += self.site.resource.cors_headers(self.requests[-1] if self.requests else None)
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.loseConnection()


def _reason(code):
    return REASONS.get(code) or RESPONSES.get(code, b"Error")


class ApiSite(Site):
    """The API's Site: counted as the front end ``api`` by metrics."""

    protocol = _ApiChannel
    noisy = False
    _logger = Logger()
    connections = requests = auth_failures = bytes_in = bytes_out = 0

    def __init__(self, resource, buffers, **kw):
        super().__init__(resource, **kw)
        self.buffers = buffers

    def logPrefix(self):
        return "ApiSite"

    def log(self, request):
        self.requests += 1
        self.bytes_out += request.sentLength
        if enabled(LogLevel.debug):  # else its fields alone cost 4 % of a request
            self._logger.debug("API {method} {path} -> {code}", method=request.method.decode("ascii", "replace"),
                               path=request.path.decode("ascii", "replace"), code=request.code)


class ApiSession:
    """An API card session: a dispatch Session holding a card (CardSession)."""

    __slots__ = ("id", "owner", "session", "card", "reader")

    def __init__(self, sid, owner):
        self.id = sid
        self.owner = owner
        self.session = api_session(f"api session {sid[:6]}")
        self.card = None
        self.reader = None


def _segments(path):
    return [unquote(s) for s in path.decode("ascii", "replace").split("/")[1:]]


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

    def __init__(self, dispatcher, registry, auth, clock, cors_origins=(), signing=None):
        super().__init__()
        self.dispatcher = dispatcher
        self.registry = registry
        self.auth = auth
        self.clock = clock
        self.cors_origins = frozenset(o.encode("ascii") for o in cors_origins)
        self.client_log = RateLimitedLog(clock, self.log, what="refused API requests")
        self.sessions = {}
        self.events = ReaderEvents(registry)
        self.ws_factory = ApiWebSocketFactory(self)
        self.websocket = WebSocketResource(self.ws_factory)
        self.openapi = resources.files(__package__).joinpath("openapi.json").read_bytes()
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
            ("v1.0", "command"): {"POST": self.fp_command},
            ("v1.0", "hello"): {"GET": self.fp_hello},
            ("v1.0", "select", None): {"GET": self.fp_select},
            ("v1.0", "select", None, None): {"GET": self.fp_select},
        }.items())

    # -- judged after the headers (_ApiChannel) and again in render

    def refusal(self, method, path, headers, length, peer):
        """``(status, message, headers)`` for a request that must not run, else None."""
        if headers.hasHeader(b"transfer-encoding"):
            why, answer = "chunked body", (411, "send the body with a Content-Length", ())
        elif length and length > MAX_BODY:
            why, answer = "body too large", (413, f"request body over {MAX_BODY} bytes", ())
        elif method == b"OPTIONS" or (path == b"/api/v1/ws" and headers.hasHeader(b"upgrade")):
            # A CORS preflight, or a WebSocket whose first message may
            # authenticate (browsers cannot set headers): no body either way.
            if not length:
                return None
            why, answer = "a body without a token", (413, "no body allowed here", ())
        elif self.auth.check(headers.getRawHeaders(b"authorization", [None])[0]) is None:
            why = "no or a wrong bearer token"
            answer = (401, "unauthorized: send Authorization: Bearer TOKEN",
                      ((b"www-authenticate", b'Bearer realm="cloudfoxy-proxy"'),))
        else:
            return None
        if answer[0] == 401:
            self.auth_failed()
        self.client_log.info("API request from {peer} refused: {why}", peer=peer, why=why)
        return answer

    def auth_failed(self):
        site = getattr(self, "site", None)
        if site is not None:
            site.auth_failures += 1

    def cors_headers(self, request):
        """CORS headers for a request from an allowed origin, else none."""
        origin = request.getHeader(b"origin") if request is not None else None
        if origin is None or origin not in self.cors_origins:
            return []
        return [b"Access-Control-Allow-Origin: " + origin, b"Vary: Origin"]

    # -- plumbing

    def render(self, request):
        origin = request.getHeader(b"origin")
        allowed = origin is not None and origin in self.cors_origins
        if allowed:
            request.setHeader(b"access-control-allow-origin", origin)
            request.setHeader(b"vary", b"Origin")
        if request.method == b"OPTIONS":
            return self.preflight(request, allowed)
        authorization = request.getHeader(b"authorization")
        identity = self.auth.check(authorization)
        if request.path == b"/api/v1/ws":
            if origin is not None and self.cors_origins and not allowed:
                return self._error(request, ApiError(403, "origin not allowed"))
            if authorization is None or identity is not None:
                return self.websocket.render(request)  # without a header: the first message authenticates
        if identity is None:  # _ApiChannel refused it already but for a WebSocket; kept for in-memory use
            self.auth_failed()
            request.setHeader(b"www-authenticate", b'Bearer realm="cloudfoxy-proxy"')
            return self._error(request, ApiError(401, "unauthorized: send Authorization: Bearer TOKEN"))
        request.setHeader(b"content-type", JSON)
        request.setHeader(b"cache-control", b"no-store")
        try:
            handler, params = self.route(request.method, request.path)
            result = handler(request, identity, *params)
        except ApiError as e:
            return self._error(request, e)
        if isinstance(result, bytes):
            return result
        if not hasattr(result, "addCallbacks"):
            return dump(result)
        if result.called:  # answered at once (an idle card): no Deferred chain for the request
            done = []
            result.addBoth(done.append)
            if not isinstance(done[0], Failure):
                return dump(done[0])
            if done[0].check(ApiError):
                return self._error(request, done[0].value)
            self.log.failure("API request failed", done[0])
            return self._error(request, ApiError(500, "internal error", errors.INTERNAL))
        gone = []

        def disconnected(_):
            gone.append(True)
            result.cancel()

        request.notifyFinish().addErrback(disconnected)
        result.addCallbacks(self._write, self._failed, callbackArgs=(request, gone),
                            errbackArgs=(request, gone))
        return NOT_DONE_YET

    def route(self, method, path):
        """(handler, path parameters) or ApiError 404/405."""
        parts = _segments(path.rstrip(b"/") if path != b"/" else path)
        m = method.decode("ascii", "replace")
        tail = parts[2:] if parts[:1] == ["api"] else None
        if tail is not None and parts[1:2]:
            key = [parts[1]] + tail
            for pattern, methods in self.table:
                if len(pattern) == len(key) and all(p is None or p == k for p, k in zip(pattern, key)):
                    params = [k for p, k in zip(pattern, key) if p is None]
                    if m not in methods:
                        raise ApiError(405, f"method not allowed: use {', '.join(methods)}")
                    return methods[m], params
        raise ApiError(404, "no such resource; see /api/v1/openapi.json", errors.NOT_FOUND)

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

    def _write(self, result, request, gone):
        if not gone:
            request.write(result if isinstance(result, bytes) else dump(result))
            request.finish()

    def _failed(self, failure, request, gone):
        if gone and failure.check(CancelledError):
            return
        if failure.check(ApiError):
            body = self._error(request, failure.value)
        else:
            self.log.failure("API request failed", failure)
            body = self._error(request, ApiError(500, "internal error", errors.INTERNAL))
        if not gone:
            request.write(body)
            request.finish()

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

    def reader_list(self):
        out = []
        for r in self.registry.readers:
            atr = r.info.atr if r.info is not None and r.present else None
            out.append({"name": r.name, "aliases": list(r.aliases + r.extra_aliases), "present": r.present,
                        "atr": atr.hex().upper() if atr else None, "backend": r.backend.description,
                        "queued": len(r.queue)})
        return out

    def readers(self, request, identity):
        return {"readers": self.reader_list()}

    def transmit(self, request, identity, name):
        data = self.body(request)
        return self.run_transmit(name, data.get("reset", False), data.get("apdus", []),
                                 data.get("session"), identity)

    def run_transmit(self, name, reset, apdus, session_id, identity, session=None):
        """``{"atr", "responses"}`` when the card answered at once, else a
        Deferred firing with it; ApiError (raised, or the Deferred's
        failure) for an error."""
        commands = transmit_commands(reset, apdus)
        if session_id is not None:
            held = self.sessions.get(session_id) if isinstance(session_id, str) else None
            if held is None or held.owner != identity:
                raise ApiError(404, "no such session (ended or never opened)", errors.NOT_FOUND)
            try:
                reader = self.registry.resolve(name)
            except errors.CardError as e:
                raise ApiError.of(e.code, name) from None
            if reader is not held.reader:
                raise ApiError(409, f"session {session_id} holds {held.reader.name}, not {reader.name}")
            session = held.session
            held.card.touch()
        result = self.dispatcher.run(name, commands, session=session or api_session("api"))
        if isinstance(result, list):
            return transmit_answer(result, name)
        return result.addCallback(transmit_answer, name)

    # -- card sessions

    def open_session(self, request, identity):
        data = self.body(request)
        name = data.get("reader")
        idle = data.get("idle_timeout", DEFAULT_IDLE)
        if not isinstance(name, str):
            raise ApiError(400, "reader must be a reader name")
        if isinstance(idle, bool) or not isinstance(idle, (int, float)) or not 0 < idle <= MAX_IDLE:
            raise ApiError(400, f"idle_timeout must be seconds, above 0 and at most {MAX_IDLE:g}")
        if len(self.sessions) >= MAX_SESSIONS:
            raise ApiError(503, "too many card sessions open", errors.UPSTREAM)
        held = ApiSession(secrets.token_urlsafe(16), identity)
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

    def close_session(self, request, identity, sid):
        held = self.sessions.get(sid)
        if held is None or held.owner != identity or held.card is None:
            raise ApiError(404, "no such session (ended or never opened)", errors.NOT_FOUND)
        held.card.close()
        return {"session": sid, "closed": True}

    # -- signing (docs/signing.md)

    def _simple(self, reader, command, password=None):
        d = self.dispatcher.submit(reader, [command], password=password, session=api_session("api"))

        def result(lines):
            value = lines[0][1]
            if errors.is_error(value):
                if value == errors.FAILED and self.dispatcher.signing is None:
                    raise ApiError(501, "signing is off (--no-signing)", errors.FAILED)
                raise ApiError.of(value, reader or "")
            return value

        return d.addCallback(result)

    def certificates(self, request, identity):
        def listed(text):
            out = []
            for b64 in filter(None, text.split("|")):
                alias = _b64(b64)
                hits = self.registry.match(alias, patterns=False)
                out.append({"alias": alias, "reader": hits[0].name if len(hits) == 1 else None})
            return {"certificates": out}

        return self._simple("", make_command(["1", ALIASES])).addCallback(listed)

    def chain(self, request, identity, alias):
        return self._simple(alias, make_command(["1", CHAIN])).addCallback(
            lambda text: {"chain": [base64.b64decode(c).hex().upper() for c in text.split(":") if c]})

    def sign(self, request, identity, alias):
        data = self.body(request)
        digest, algorithm, pin = data.get("digest"), data.get("algorithm", ""), data.get("pin")
        if not isinstance(digest, str) or not isinstance(algorithm, str) or not isinstance(pin, str) or not pin:
            raise ApiError(400, "give digest (hex), pin and optionally algorithm (e.g. SHA256)")
        if ":" in digest or ":" in algorithm:
            raise ApiError(400, "digest must be hex")
        return self._simple(alias, make_command(["1", SIGN, digest, algorithm]), pin).addCallback(
            lambda sig: {"signature": sig})

    def openapi_json(self, request, identity):
        return self.openapi

    # -- FoxyProxy 2.10 (foxy_proxy_rest.py, client_thread.py of foxyproxy 2.10.0)

    def fp_hello(self, request, identity):
        return {"result": True}

    def fp_command(self, request, identity):
        try:
            data = from_json(request.content.read() or b"null")
        except ValueError:
            data = None
        data = data.get("data") if isinstance(data, dict) else None
        if not isinstance(data, dict) or "reader" not in data or not (
                "commands" in data or "command" in data):
            raise ApiError(400, "expected {\"data\": {\"reader\": R, \"commands\": [{\"nonce\", \"line\"}]}}")
        items = data["commands"] if "commands" in data else [data["command"]]
        if not isinstance(items, list) or len(items) > MAX_APDUS:
            raise ApiError(400, f"commands must be a list of at most {MAX_APDUS}")
        commands = []
        if not isinstance(data["reader"], str):
            raise ApiError(400, "reader must be a reader name")
        for item in items:
            cid = item.get("nonce", item.get("id")) if isinstance(item, dict) else None
            line = item.get("line") if isinstance(item, dict) else None
            if not is_message_id(cid) or not isinstance(line, str):
                continue  # FoxyProxy skips such items
            cid = cid if isinstance(cid, str) else to_json(cid).decode("ascii")
            commands.append(make_command([cid] + line.split(":", 2)))
        if not commands:
            raise ApiError(400, "no command has both nonce (or id: a string or a number) and line")
        reader = data["reader"]
        pin = data.get("password") if isinstance(data.get("password"), str) else None
        d = self.dispatcher.submit(reader, commands, password=pin, session=api_session("api"))
        return d.addCallback(lambda lines: [{"response": [{"id": c, "line": r} for c, r in lines]}])

    def fp_select(self, request, identity, name, limit="1"):
        try:
            limit = max(0, int(limit))
        except ValueError:
            raise ApiError(400, "Request has an incorrect parameter 'limit'") from None
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if limit == 0:
            return "".join(r.name + "\n" for r in self.registry.readers).encode("utf-8")
        lines = []
        signing = self.dispatcher.signing
        for state, cert in (signing.entries() if signing is not None else ()):
            if name and state.reader.name.endswith(name.strip()):
                lines.insert(0, f"{state.reader.name} ({cert.subject or '---'})")
        return "".join(line + "\n" for line in lines).encode("utf-8")


def _b64(text):
    return base64.b64decode(text).decode("utf-8", "replace")


class ReaderEvents:
    """Reader events from the registry's changes: ``added``, ``removed``,
    ``inserted`` (a card arrived or its ATR changed), ``ejected``; every
    subscriber's ``event(dict)`` is called at once (same reactor turn as
    the registry's change)."""

    def __init__(self, registry):
        self.registry = registry
        self.subscribers = set()
        self.known = {r.name: self._state(r) for r in registry.readers}
        registry.add_listener(self._changed)

    @staticmethod
    def _state(reader):
        atr = reader.info.atr if reader.info is not None and reader.present else None
        return reader.present, atr.hex().upper() if atr else None

    def _changed(self, registry):
        now = {r.name: self._state(r) for r in registry.readers}
        events = []
        for name, (present, atr) in now.items():
            before = self.known.get(name)
            if before is None:
                events.append({"event": "added", "reader": name, "present": present, "atr": atr})
            elif present and (not before[0] or before[1] != atr):
                events.append({"event": "inserted", "reader": name, "atr": atr})
            elif before[0] and not present:
                events.append({"event": "ejected", "reader": name})
        for name in self.known:
            if name not in now:
                events.append({"event": "removed", "reader": name})
        self.known = now
        for event in events:
            for subscriber in list(self.subscribers):
                subscriber.event(event)


def buffered_bytes(transport):
    """Bytes a connection has written that the peer has not taken yet
    (twisted's FileDescriptor buffers), following protocol wrappers."""
    seen = 0
    while transport is not None and seen < 8:
        if hasattr(transport, "dataBuffer"):
            return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        transport = getattr(transport, "transport", None)
        seen += 1
    return 0


class _AutobahnLog(Levels):
    """Autobahn's log of one API WebSocket: its debug lines as the proxy's
    (``--log-level``), the others (a failed handshake, a protocol
    violation, a closing handshake that timed out: all caused by the
    client) through the front end's rate-limited client log, naming the
    peer."""

    _debug = Logger(namespace="autobahn")

    def __init__(self, client_log, peer):
        self.client_log = client_log
        self.peer = getattr(peer, "host", peer)

    def emit(self, level, format, **fields):
        if level == LogLevel.debug:
            return self._debug.emit(level, format, **fields)
        if "peer" not in fields:
            format, fields["peer"] = "WebSocket client {peer}: " + format, self.peer
        self.client_log.emit(level, format, **fields)

    def __getattr__(self, name):  # any other level Autobahn may use: as debug
        return self.debug


class ApiWebSocket(WebSocketServerProtocol):
    """One WebSocket client: ``{"id", "reader", "reset", "apdus"}`` is
    answered ``{"id", "atr", "responses"}`` or ``{"id", "error"}``;
    ``{"id", "subscribe": true}`` starts reader events; ``{"id", "hold":
    READER, "idle_timeout": s}`` / ``{"id", "release": true}`` hold the
    card for this connection (its transmits then run in the session).
    Without an ``Authorization: Bearer`` header the first message must be
    ``{"auth": TOKEN}`` (browsers cannot set headers on WebSockets)."""

    identity = None
    _auth_timer = None

    def _as_tls(self, method):
        """Run Autobahn's ``method`` with the TLS transport under our
        limits._Guard as ``self.transport``: Autobahn reads the TLS channel
        from ``self.transport`` and only knows Twisted's TLS protocol."""
        tls = getattr(self.transport, "transport", None)
        if not isinstance(tls, TLSMemoryBIOProtocol):
            return method()
        guard, self.transport = self.transport, tls
        try:
            return method()
        finally:
            self.transport = guard

    def connectionMade(self):
        self.log = _AutobahnLog(self.factory.api.client_log, self.transport.getPeer())
        self._as_tls(super().connectionMade)

    def _onOpen(self):
        self._as_tls(super()._onOpen)

    def connectionLost(self, reason):
        # This connection was counted by the HTTP channel it replaced
        # (_Channel.connectionMade), whose connectionLost never comes.
        super().connectionLost(reason)
        site = getattr(self.factory.api, "site", None)
        if site is not None:
            site.connections -= 1

    def onConnect(self, request):
        auth = request.headers.get("authorization")
        if auth is not None:
            self.identity = self.factory.api.auth.check(auth.encode("utf-8", "replace"))
            if self.identity is None:
                self.factory.api.auth_failed()
                from autobahn.websocket.types import ConnectionDeny

                raise ConnectionDeny(401, "unauthorized")
        self.session = api_session(str(self.peer))
        self.inflight = {}
        return None

    # Autobahn formats the arguments of its per-message debug lines even
    # when debug logging is off (about twenty calls a message, a tenth of
    # the proxy's CPU per WebSocket APDU in a profile).  These three do what
    # Autobahn's do, without those lines and what nothing here uses.
    def dataReceived(self, data):
        self._dataReceived(data)

    def onMessageEnd(self):
        # Autobahn's, without firing its "message" observer event (a future
        # and its callbacks per message; nothing here observes it).
        data, self.message_data = self.message_data, None
        if not self.failedByMe:
            self._onMessage(b"".join(data), self.message_is_binary)

    def sendData(self, data, sync=False, chopsize=None):
        if sync or chopsize or self.send_queue or self.logOctets or self.state != self.STATE_OPEN:
            return super().sendData(data, sync, chopsize)
        self.transport.write(data)
        self.trafficStats.outgoingOctetsWireLevel += len(data)

    def _limit(self, size):
        """Autobahn's per-connection frame and message limits."""
        self.maxFramePayloadSize = self.maxMessagePayloadSize = size

    def onOpen(self):
        if self.identity is None:
            self._limit(MAX_WS_MESSAGE_UNAUTHENTICATED)
            self._auth_timer = self.factory.api.clock.callLater(WS_AUTH_TIMEOUT, self._auth_late)

    def _auth_late(self):
        self._auth_timer = None
        self.sendClose(4401, "unauthorized: send {\"auth\": TOKEN} first")

    @property
    def busy(self):
        """Not idle for limits.py while subscribed, holding a card or waiting on one."""
        return bool(self.inflight) or self.session.card is not None or self in self.factory.api.events.subscribers

    def send(self, obj):
        if self.state == self.STATE_OPEN:
            self.sendMessage(to_json(obj))

    def event(self, event):
        if buffered_bytes(self.transport) > MAX_SUBSCRIBER_BACKLOG:
            self.factory.api.events.subscribers.discard(self)
            self.factory.api.client_log.info("WebSocket subscriber {peer} dropped: not reading events",
                                             peer=self.peer)
            self.dropConnection(abort=True)
            return
        self.send(event)

    def onMessage(self, payload, isBinary):
        site = getattr(self.factory.api, "site", None)
        if site is not None:
            site.requests += 1
            site.bytes_in += len(payload)
        try:
            msg = from_json(payload)
        except ValueError:
            msg = None
        if not isinstance(msg, dict):
            return self.send({"id": None, "error": {"code": errors.MALFORMED, "message": "send JSON objects"}})
        mid = msg.get("id")
        if mid is not None and not is_message_id(mid):
            return self.send({"id": None, "error": {"code": errors.MALFORMED,
                                                    "message": "id must be a string, a number or null"}})
        api = self.factory.api
        if self.identity is None:
            self.identity = api.auth.check_token(msg.get("auth"))
            if self.identity is None:
                api.auth_failed()
                return self.sendClose(4401, "unauthorized")
            if self._auth_timer is not None and self._auth_timer.active():
                self._auth_timer.cancel()
            self._limit(MAX_WS_MESSAGE)
            return self.send({"id": mid, "authenticated": True})
        try:
            if msg.get("subscribe") is not None:
                if msg["subscribe"]:
                    api.events.subscribers.add(self)
                else:
                    api.events.subscribers.discard(self)
                return self.send({"id": mid, "subscribed": bool(msg["subscribe"]),
                                  "readers": api.reader_list()})
            if "hold" in msg:
                return self._hold(mid, msg)
            if msg.get("release"):
                card = self.session.card
                if card is None:
                    raise ApiError(409, "this connection holds no card")
                card.close()
                return self.send({"id": mid, "released": True})
            reader = msg.get("reader")
            if not isinstance(reader, str):
                raise ApiError(400, "reader must be a reader name")
            if len(self.inflight) >= 64:
                raise ApiError(503, "too many requests in flight on this connection", errors.UPSTREAM)
            d = api.run_transmit(reader, msg.get("reset", False), msg.get("apdus", []), None, self.identity,
                                 session=self.session)
        except ApiError as e:
            return self._error(mid, e)
        if isinstance(d, dict):  # answered at once
            d["id"] = mid
            return self.send(d)
        self._track(mid, d)

    def _track(self, mid, d):
        key = object()
        self.inflight[key] = d

        def done(result):
            self.inflight.pop(key, None)
            self.send(dict(result, id=mid))

        def failed(failure):
            self.inflight.pop(key, None)
            if failure.check(CancelledError):
                return
            if failure.check(ApiError):
                return self._error(mid, failure.value)
            self.factory.api.log.failure("WebSocket request failed", failure)
            self._error(mid, ApiError(500, "internal error", errors.INTERNAL))

        d.addCallbacks(done, failed)

    def _hold(self, mid, msg):
        api = self.factory.api
        idle = msg.get("idle_timeout", DEFAULT_IDLE)
        if not isinstance(msg["hold"], str) or isinstance(idle, bool) or not isinstance(
                idle, (int, float)) or not 0 < idle <= MAX_IDLE:
            raise ApiError(400, "hold must be a reader name, idle_timeout seconds")
        if self.session.card is not None:
            raise ApiError(409, "this connection holds a card already")
        d = api.dispatcher.hold(msg["hold"], self.session, idle_timeout=idle)

        def granted(card):
            card.ended.addCallback(lambda reason: self.send({"event": "released", "reader": card.reader.name,
                                                            "reason": reason}))
            return {"held": card.reader.name}

        def failed(failure):
            if failure.check(errors.CardError):
                raise ApiError.of(failure.value.code, msg["hold"])
            return failure

        self._track(mid, d.addCallbacks(granted, failed))

    def _error(self, mid, e):
        self.send({"id": mid, "error": {"code": e.code, "message": e.message}})

    def onClose(self, wasClean, code, reason):
        api = self.factory.api
        api.events.subscribers.discard(self)
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        for d in list(getattr(self, "inflight", {}).values()):
            d.cancel()
        session = getattr(self, "session", None)
        if session is not None and session.card is not None:
            session.card.close()


class ApiWebSocketFactory(WebSocketServerFactory):
    protocol = ApiWebSocket

    def __init__(self, api):
        super().__init__()
        self.api = api
        # Bounded messages (a transmit of MAX_APDUS short APDUs fits).
        # Incoming text is not UTF-8-checked twice: from_json rejects bad UTF-8.
        # A client that breaks the protocol or a limit gets a close frame
        # with the code and reason (RFC 6455 section 7.4), not a bare drop.
        self.setProtocolOptions(maxFramePayloadSize=MAX_WS_MESSAGE, maxMessagePayloadSize=MAX_WS_MESSAGE,
                                utf8validateIncoming=False, failByDrop=False)


def make_api_service(config, dispatcher, registry, reactor, limits):
    """The ``--api`` listener: a tap.Listener of an ApiSite under the
    shared ``limits`` (a limits.ConnectionLimits)."""
    from twisted.internet.endpoints import serverFromString

    from ..tap import Listener

    resource = ApiResource(dispatcher, registry, BearerAuth(config["api-token"]), reactor,
                           cors_origins=config.get("api-cors-origin", ()))
    site = ApiSite(resource, buffers=limits.buffers, reactor=reactor, timeout=None)
    resource.site = site
    return Listener(serverFromString(reactor, config["api"]), limits.wrap(site), config["api"], "--api")

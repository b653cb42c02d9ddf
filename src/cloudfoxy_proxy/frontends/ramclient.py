"""The RAMOverHTTP client side: ``--ram-connect URL=READER`` and the OCF
daemon mode ``--ram-daemon`` (docs/ramoverhttp.md).

:class:`RamClient` runs one session: it holds READER (any backend's card,
resolved like a reader line) as a card session (``Dispatcher.hold``),
resets it, POSTs ``E8 { C0 ATR }`` to the server's URL, runs each ``AA``
script's ``22``/``C0``/``E0`` items in order through the dispatcher and
POSTs ``AB { 23 ..|C0 ATR|E1 { 0C text }, 80 count }`` until the server
answers 204 (done), 404 (bad URL), 504 (server aborted) or anything else
(an error).  Like CardContact's C client it sends ``Content-Type:
application/org.openscdp-content-mgt-response;version=1.0``, ``X-Admin-Protocol:
openscdp-remote-admin/1.0`` and the ``JSESSIONID`` cookie (preset, or the
first the server set), gives up after :data:`ANSWER_TIMEOUT` seconds
without an answer, and never sends a script's commands to the card twice:
only when a reused connection died before the answer is the identical
``AB`` sent once more, on a new connection.
"""

import struct
import zlib
from http.cookies import CookieError, SimpleCookie
from urllib.parse import unquote, unquote_plus, urlsplit

import attr
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.web.client import HTTPConnectionPool, ResponseNeverReceived, RequestTransmissionFailed
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from .. import errors
from ..access import full_access
from ..dispatch import Session
from ..errors import CardError
from ..interfaces import IFrontend
from ..logs import Logger, RateLimitedLog
from ..parser import APDU, RESET, make_command
from . import ramwire as wire
from .base import OneListener
from .http import LOOPBACK, HttpSite, Route, gone

#: Seconds without an answer before the client gives up (the C client's 40 s).
ANSWER_TIMEOUT = 40.0
#: Seconds ``--ram-connect`` waits at start-up for READER to be listed.
START_WAIT = 30.0
#: Outcomes of a session.
PASSED, FAILED = "passed", "failed"


class SessionFailed(Exception):
    """A RAM session ended with an error (the message says which)."""


class RamClient:
    """One RAMOverHTTP session of the card ``reader`` against ``url``.

    ``run()`` returns a Deferred firing with ``(outcome, text)``: outcome
    :data:`PASSED` after the server's 204, else :data:`FAILED` with why.
    ``session_id`` presets the JSESSIONID cookie (OCF ``-s``).  ``agent``:
    a twisted.web IAgent factory taking a pool (tests), default
    ``treq``'s HTTPClient over twisted's Agent.  ``frontend``: who
    started it, ``ram-connect`` or ``ram-daemon`` (its audit lines' front
    end and identity)."""

    log = Logger()

    def __init__(self, dispatcher, reader, url, clock, session_id=None, http=None,
                 answer_timeout=ANSWER_TIMEOUT, start_wait=0.0, frontend="ram-connect"):
        self.dispatcher = dispatcher
        self.reader = reader
        self.url = url
        self.clock = clock
        self.cookie = session_id
        self.answer_timeout = answer_timeout
        self.start_wait = start_wait
        # configured by the operator (--ram-connect, --ram-approved-urls): a
        # fixed identity with access to every reader (docs/security.md)
        #: the URL as logs and the audit trail show it (its secret cut out)
        self.shown = shown_url(url)
        self.session = Session(f"RAM client of {self.shown}", frontend, identity=full_access(frontend))
        self.pool = HTTPConnectionPool(clock, persistent=True)
        self.pool.maxPersistentPerHost = 1
        if http is None:
            from treq.client import HTTPClient
            from twisted.web.client import Agent

            http = HTTPClient(Agent(clock, pool=self.pool))
        self.http = http
        self.card = None
        self.requests = 0  # POSTs answered: a later one reuses the connection
        self.stopped = False
        self._call = None

    # -- the session

    def run(self):
        d = Deferred.fromCoroutine(self._run())
        return d

    async def _run(self):
        try:
            await self._hold()
            atr = await self._command(RESET, None)
            body = wire.encode_initiation(atr)
            while True:
                code, answer = await self._post(body)
                if code == 204:
                    self.log.info("RAM session on {reader} with {url} done", reader=self.reader, url=self.shown)
                    return PASSED, "done"
                if code == 404:
                    raise SessionFailed(f"{self.shown}: 404 (not a RAM URL, or a wrong secret)")
                if code == 504:
                    raise SessionFailed(f"{self.shown}: 504 (the server aborted the session)")
                if code != 200:
                    raise SessionFailed(f"{self.shown}: HTTP status {code}")
                if not answer:
                    raise SessionFailed(f"{self.shown}: an empty 200 answer")
                try:
                    tag, items = wire.template(answer)
                    if tag != wire.SCRIPT:
                        raise ValueError(f"template {tag:02X} instead of AA")
                    steps = wire.decode_script(items)
                except ValueError as e:
                    raise SessionFailed(f"{self.shown}: not a script ({e})") from None
                body = await self._execute(steps)
                if body is None:
                    return PASSED, "stopped by the server's negative notify id"
        except SessionFailed as e:
            self.log.warn("RAM session on {reader} with {url} failed: {why}", reader=self.reader,
                          url=self.shown, why=str(e))
            return FAILED, str(e)
        finally:
            if self.card is not None:
                self.card.close()
            self.pool.closeCachedConnections()

    async def _hold(self):
        deadline = self.clock.seconds() + self.start_wait
        while True:
            try:
                self.card = await self.dispatcher.hold(self.reader, self.session)
                return
            except CardError as e:
                if e.code != errors.NOT_FOUND or self.clock.seconds() >= deadline or self.stopped:
                    raise SessionFailed(f"reader {self.reader!r}: {e.code} "
                                        f"{errors.MEANING.get(e.code, '')}") from None
            wait = Deferred()
            self._call = self.clock.callLater(0.5, wait.callback, None)
            await wait

    async def _command(self, kind, apdu):
        """Run RESET or one APDU in the card session; its bytes, or
        SessionFailed naming the result code."""
        if self.stopped:
            raise SessionFailed("stopped")
        command = make_command(["1", RESET] if kind == RESET else ["1", APDU, apdu.hex()])
        if command.error is not None:
            raise _CardFailed(f"{command.error} malformed command APDU")
        lines = await self.dispatcher.submit(self.card.reader.name, [command], session=self.session)
        result = lines[0][1]
        if errors.is_error(result):
            raise _CardFailed(f"{result} {errors.MEANING[result]}")
        return bytes.fromhex(result)

    async def _execute(self, steps):
        """One script's items in order; the AB body (None: stop now)."""
        answers = []
        for kind, value in steps:
            if kind == wire.MESSAGE:
                number, text = value
                self.log.info("RAM server {url} says: {text}", url=self.shown, text=text[:500])
                if number < 0:
                    return None
                continue
            try:
                data = await self._command(kind, value)
            except _CardFailed as e:
                answers.append((wire.FAILURE, f"card error: {e}"))
                break
            answers.append((wire.RESET if kind == wire.RESET else wire.RESPONSE, data))
        return wire.encode_answer(answers)

    async def _post(self, body):
        """POST ``body``: ``(status, answer bytes)``.  The identical body is
        sent once more, on a new connection, only when a reused connection
        died before any answer came."""
        try:
            return await self._post_once(body)
        except (ResponseNeverReceived, RequestTransmissionFailed) as e:
            if not self.requests or self.stopped:
                raise SessionFailed(f"{self.shown}: {_why(e)}") from None
            self.log.info("RAM connection to {url} died before the answer: sending the same "
                          "answer once more on a new connection", url=self.shown)
            await self.pool.closeCachedConnections()
            try:
                return await self._post_once(body)
            except (ResponseNeverReceived, RequestTransmissionFailed) as e2:
                raise SessionFailed(f"{self.shown}: {_why(e2)}") from None

    async def _post_once(self, body):
        if self.stopped:
            raise SessionFailed("stopped")
        headers = {b"Content-Type": [wire.REQUEST_TYPE], b"X-Admin-Protocol": [wire.ADMIN_PROTOCOL]}
        if self.cookie:
            headers[b"Cookie"] = [b"JSESSIONID=" + self.cookie.encode("ascii")]
        d = self.http.post(self.url, data=body, headers=headers)
        d.addTimeout(self.answer_timeout, self.clock)
        self._call = d
        try:
            response = await d
            length = response.length
            if isinstance(length, int) and length > wire.MAX_BODY:
                response.deliverBody(_Discard())
                raise SessionFailed(f"{self.shown}: an answer of {length} bytes")
            content = response.content()
            content.addTimeout(self.answer_timeout, self.clock)
            self._call = content
            answer = await content
        except (TimeoutError, CancelledError):
            raise SessionFailed(f"{self.shown}: no answer within {self.answer_timeout:g} s"
                                if not self.stopped else "stopped") from None
        except (ResponseNeverReceived, RequestTransmissionFailed):
            raise
        except SessionFailed:
            raise
        except Exception as e:
            raise SessionFailed(f"{self.shown}: {_why(e)}") from None
        finally:
            self._call = None
        self.requests += 1
        self._keep_cookie(response.headers)
        if len(answer) > wire.MAX_BODY:
            raise SessionFailed(f"{self.shown}: an answer of {len(answer)} bytes")
        return response.code, answer

    def _keep_cookie(self, headers):
        """The first JSESSIONID the server sets is kept for the session."""
        if self.cookie:
            return
        for raw in headers.getRawHeaders(b"set-cookie", []):
            try:
                jar = SimpleCookie(raw.decode("latin-1"))
            except CookieError:
                continue
            if "JSESSIONID" in jar:
                self.cookie = jar["JSESSIONID"].value
                return

    def stop(self):
        """Give up (the proxy stops): the POST in flight is cancelled."""
        self.stopped = True
        call, self._call = self._call, None
        if call is not None:
            if hasattr(call, "cancel") and hasattr(call, "called"):
                if not call.called:
                    call.cancel()
            elif call.active():
                call.cancel()


class _CardFailed(Exception):
    """A command of a script got a result code (answered with E1)."""


def _why(e):
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return str(e) or type(e).__name__


class _Discard:
    def makeConnection(self, transport):
        transport.stopProducing()

    def dataReceived(self, data):
        pass

    def connectionLost(self, reason):
        pass


class RamConnectService(Service):
    """``--ram-connect URL=READER``: one session, started with the proxy."""

    log = Logger()

    def __init__(self, dispatcher, url, reader, clock):
        self.dispatcher = dispatcher
        self.url, self.session_id = split_session(url)
        self.reader = reader
        self.clock = clock
        self.client = None
        self.outcome = None

    def startService(self):
        super().startService()
        self.client = RamClient(self.dispatcher, self.reader, self.url, self.clock,
                                session_id=self.session_id, start_wait=START_WAIT)
        self.clock.callLater(0, self._start)

    def _start(self):
        if self.running:
            self.client.run().addCallback(self._done)

    def _done(self, outcome):
        self.outcome = outcome

    def stopService(self):
        super().stopService()
        if self.client is not None:
            self.client.stop()


def shown_url(url):
    """``url`` as logs and audit lines may show it: a RAM server's URL
    carries its secret as the last path segment (``https://host/rt/SECRET``),
    so that segment (and any query) is shown as ``...``."""
    base, _, _query = url.partition("?")
    head, slash, last = base.rpartition("/")
    if not slash or head.endswith("/") or head.count("/") < 2:  # no path beyond the host
        return base
    return f"{head}/..." if last else base


def split_session(url):
    """``URL?session=ID`` -> ``(URL, ID)``; ``(URL, None)`` without it."""
    base, q, query = url.partition("?")
    if q:
        params = [p for p in query.split("&") if p]
        rest = [p for p in params if not p.startswith("session=")]
        ids = [p[len("session="):] for p in params if p.startswith("session=")]
        if ids:
            return (base + ("?" + "&".join(rest) if rest else "")), unquote(ids[-1])
    return url, None


# -- OCF daemon mode -------------------------------------------------------------------

def _png(width, height, rgb):
    """A valid truecolour PNG of one colour (PNG spec: IHDR, IDAT, IEND)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    row = b"\x00" + bytes(rgb) * width
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * height))
            + chunk(b"IEND", b""))


#: What the daemon answers: a green 24x24 image (the session passed) or a
#: red 12x12 one (failed, refused or not approved).  A page can tell them
#: apart by ``naturalWidth`` without reading pixels.
PASSED_PNG = _png(24, 24, (0x2E, 0xA0, 0x43))
FAILED_PNG = _png(12, 12, (0xD0, 0x21, 0x21))
#: Default of ``--ram-daemon`` when only ``--ram-approved-urls`` is given
#: (the address OCF's daemon listens on).
DEFAULT_DAEMON = "tcp:27001:interface=127.0.0.1"
#: Sessions the daemon runs at once; more get the failed image.
MAX_DAEMON_SESSIONS = 4


def read_approved_urls(path):
    """``--ram-approved-urls FILE``: one ``URL [READER]`` a line (``#``
    comments).  URL is exact or a prefix ending in ``/``; READER, after
    white space, is the reader sessions of that URL run on (it may contain
    spaces; without it, ``--ram-reader``).  Returns ``[(url, reader or
    None)]``; ValueError with a one-line reason naming the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--ram-approved-urls {path!r}: {getattr(e, 'strerror', None) or e}") from None
    entries = []
    seen = {}
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(None, 1)
        url = fields[0]
        reader = fields[1].strip() if len(fields) > 1 else None
        if not url.lower().startswith(("http://", "https://")) or not urlsplit(url).netloc:
            raise ValueError(f"--ram-approved-urls {path!r} line {n}: not an http:// or https:// URL")
        if url in seen:
            raise ValueError(f"--ram-approved-urls {path!r} line {n}: {url} is given twice "
                             f"(first on line {seen[url]})")
        seen[url] = n
        entries.append((url, reader))
    if not entries:
        raise ValueError(f"--ram-approved-urls {path!r}: no URL in the file")
    return entries


def approved(url, entries):
    """The entry ``(approved URL, reader or None)`` of ``entries`` (as
    ``read_approved_urls`` gives; a plain string is a URL without a
    reader) that ``url`` equals, else the longest that ends in ``/`` and
    ``url`` starts with; None when ``url`` is not approved."""
    best = None
    for entry in entries:
        u, reader = (entry, None) if isinstance(entry, str) else entry
        if url == u:
            return u, reader
        if u.endswith("/") and url.startswith(u) and (best is None or len(u) > len(best[0])):
            best = u, reader
    return best


class RamDaemonResource(Resource):
    """``GET /<anything>.png?url=U&sessionId=S[&reader=R]`` (OCF's daemon):
    one RamClient session, answered with PASSED_PNG or FAILED_PNG.

    The caller (any web page: the trigger is an ``<img>``) chooses neither
    the server nor the card: ``U`` must be approved (``approved_urls``, as
    ``read_approved_urls`` gives), and the session runs on the reader
    configured for it, else on ``default_reader`` (``--ram-reader``); with
    neither, or with a ``reader=`` naming another reader, nothing starts.

    Query values are taken as sent (OCF does not URL-decode them); a value
    starting ``http%3A``/``https%3A`` is decoded, and ``reader=`` matches
    the configured reader as sent or URL-decoded.  ``pinrequired=`` other
    than 0 is refused (failed image): the proxy has no PIN source for it."""

    isLeaf = True
    log = Logger()

    def __init__(self, dispatcher, clock, approved_urls, default_reader):
        super().__init__()
        self.dispatcher = dispatcher
        self.clock = clock
        self.approved_urls = approved_urls
        self.default_reader = default_reader
        self.running = set()
        self.client_log = RateLimitedLog(clock, self.log, what="refused RAM daemon requests")

    def render_GET(self, request):
        path, _, query = request.uri.partition(b"?")
        params = {}
        for part in query.split(b"&"):
            name, _, value = part.partition(b"=")
            params[name.decode("latin-1")] = value.decode("latin-1")
        url = params.get("url", "")
        if url.lower().startswith(("http%3a", "https%3a")):
            url = unquote(url)
        session_id = params.get("sessionId") or None
        asked = params.get("reader") or None
        why = reader = None
        if not path.lower().endswith(b".png"):
            why = "the path does not end in .png"
        elif not url:
            why = "no url="
        elif params.get("pinrequired", "0") not in ("", "0"):
            why = "pinrequired= is not supported (no PIN source)"
        else:
            entry = approved(url, self.approved_urls)
            if entry is None:
                why = f"{url[:200]} is not in --ram-approved-urls"
            else:
                reader = entry[1] or self.default_reader
                if not reader:
                    why = f"no reader for {entry[0][:200]} in --ram-approved-urls and no --ram-reader"
                elif asked is not None and reader not in (asked, unquote(asked), unquote_plus(asked)):
                    why = f"reader= {asked[:100]!r} is not the reader configured for {entry[0][:200]}"
                elif len(self.running) >= MAX_DAEMON_SESSIONS:
                    why = f"{MAX_DAEMON_SESSIONS} sessions running"
        if why is not None:
            self.client_log.warn("client {peer}: RAM daemon request refused: {why}",
                                 peer=self._peer(request), why=why)
            return self._image(request, FAILED, why)  # twisted.web writes it and Content-Length
        client = RamClient(self.dispatcher, reader, url, self.clock, session_id=session_id, frontend="ram-daemon")
        self.running.add(client)
        self.log.info("RAM daemon: session on {reader} with {url}", reader=reader, url=shown_url(url))

        def done(outcome):
            self.running.discard(client)
            if not gone(request):
                body = self._image(request, *outcome)
                request.setHeader(b"content-length", b"%d" % len(body))
                request.write(body)
                request.finish()

        client.run().addCallback(done)
        return NOT_DONE_YET

    @staticmethod
    def _peer(request):
        """``host:port`` of the request's client, for log lines."""
        address = request.getClientAddress()
        host, port = getattr(address, "host", None), getattr(address, "port", None)
        return f"{host}:{port}" if host is not None else str(address)

    @staticmethod
    def _image(request, outcome, text):
        body = PASSED_PNG if outcome == PASSED else FAILED_PNG
        request.setHeader(b"content-type", b"image/png")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-ram-result", f"{outcome}: {text}"[:200].encode("utf-8", "replace")
                          .replace(b"\r", b" ").replace(b"\n", b" "))
        return body

    def stop(self):
        for client in list(self.running):
            client.stop()


class DaemonSite(HttpSite):
    """The RAM daemon on the HTTP base: ``GET`` without a body, for
    loopback clients only (unless --allow-anonymous) and only with a
    ``Host`` naming this machine (no DNS rebinding): the trigger has no
    secret by design (``<img>`` tags)."""

    frontend = "ram-daemon"
    log_prefix = "RamDaemonSite"
    json_errors = False

    def route(self, head):
        return _TRIGGER


_TRIGGER = Route({b"GET"}, auth=LOOPBACK)


@attr.s(frozen=True, kw_only=True)
class DaemonSettings:
    """``--ram-daemon ENDPOINT`` with ``--ram-approved-urls`` (parsed) and
    ``--ram-reader``."""

    endpoint = attr.ib()
    approved_urls = attr.ib()
    default_reader = attr.ib(default=None)


class DaemonFrontend(OneListener):
    """``--ram-daemon``: OCF-daemon-compatible triggers (IFrontend)."""

    name = option = "ram-daemon"

    def settings_of(self, options):
        return DaemonSettings(endpoint=options["ram-daemon"], approved_urls=options["ram-approved-url-list"],
                              default_reader=options["ram-reader"])

    def make_service(self, settings, core):
        resource = RamDaemonResource(core.dispatcher, core.reactor, settings.approved_urls,
                                     settings.default_reader)
        service = core.listen(settings.endpoint, DaemonSite(resource, core), "--ram-daemon")
        service.on_stop.append(resource.stop)
        service.resource = resource
        return service


@attr.s(frozen=True, kw_only=True)
class ConnectSettings:
    """One ``--ram-connect URL=READER``."""

    url = attr.ib()
    reader = attr.ib()


@implementer(IFrontend)
class ConnectFrontend:
    """``--ram-connect``: the proxy connects out to a RAM server (no
    listener), with the operator's full access (IFrontend)."""

    name = "ram-connect"

    def settings(self, options):
        return [ConnectSettings(url=u, reader=r) for u, r in options.get("ram-connect", ())]

    def listeners(self, settings):
        return []

    def make_service(self, settings, core):
        return RamConnectService(core.dispatcher, settings.url, settings.reader, core.reactor)


RAM_DAEMON = DaemonFrontend()
RAM_CONNECT = ConnectFrontend()

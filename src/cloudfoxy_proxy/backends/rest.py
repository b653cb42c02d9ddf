"""``cloudfoxy+http://HOST:PORT`` and ``cloudfoxy+https://HOST:PORT?ca=FILE&cert=FILE&key=FILE``:
the cards of a CloudFoxy RESTful server (docs/rest.md): hello and
inventory over treq (twisted.web's Agent, one persistent connection pool),
card commands over :mod:`.httpclient` (keep-alive connections, responses
parsed by httptools/llhttp).

URL parameters (all optional): ``readers_max=N`` (cards kept from the
inventory, default 10,000; names of at most 256 bytes), ``token_file=FILE`` (else ``--token-file``,
else env ``FOXYPROXY_TOKEN``), ``poll=SECONDS`` (how often ``/api/v1/hello``
is asked whether the server restarted; default 10), ``prefix=NAME`` (reader
names are ``PREFIX IP@id``; default ``CloudFoxy``), ``connections=N``
(persistent connections kept open; default 128, raised to the card count),
and for ``cloudfoxy+https`` only ``ca=FILE`` (PEM bundle of the CAs to trust
instead of the system's), ``cert=FILE`` and ``key=FILE`` (client
certificate; ``key=`` may be left out when ``cert=`` holds the key too).

One request per command: ``RESET`` is ``GET /api/v1/basic?terminal=T&reset=1``,
``APDU`` is ``...&reset=0&apdu=HEX``; a client request's run of commands
is one request with ``apdu=`` repeated (``reset=1`` first when the run
starts with RESET), answered one line per APDU and run back to back on the
card (:meth:`RestBackend.transmit_batch`).  An answer whose first line has SW1
``C0`` (a hardware error at the CloudFoxy box) is asked again, three tries
in all, as CloudFoxy's own clients do; nothing else is ever retried, since
an APDU is not idempotent.  Every failure (server unreachable, HTTP error,
bad body) is the result ``C086`` plus one log line.  The dispatcher bounds
each call with the command timeout and cancels it; cancelling aborts the
HTTP request, body included.  See docs/rest.md.

This module holds the URL's settings and the backend (its calls, their two
state machines ``_Exchange`` and ``_Batch``, and its reader list: one
concern, a little over 500 lines); ``rest_wire.py`` the REST paths, the parsers of the server's
answers and the HTTP plumbing.
"""

from binascii import hexlify
from urllib.parse import quote, urlsplit

import attr
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.web import client as wclient
from zope.interface import implementer

from .. import errors
from ..interfaces import IBackend, ReaderInfo
from ..errors import CardError
from ..logs import Logger
from .httpclient import HTTPPool
from ..secrets import read_secret
from . import READERS_MAX, BackendSettings, ReaderCap, ReaderUpdates, float_param, int_param, query
from .rest_wire import (
    BASIC, FIRST_RETRY, HELLO, HW_TRIES, IDLE_TIMEOUT, INVENTORY, INVENTORY_BYTES_PER_CARD, MAX_BODY,
    OneServer, QuietHTTP11ClientFactory, quote_value, body_lines, describe, foxy_name, hardware_error,
    load_tls, parse_hex, parse_inventory, parse_uptime, read_body, request_url,
)

_PARAMS = {"token_file", "poll", "prefix", "connections", "ca", "cert", "key", "readers_max"}


def from_url(url, settings=BackendSettings()):
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    tls = scheme == "cloudfoxy+https"
    params = query(url, _PARAMS)
    try:
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise ValueError(f"bad host or port ({e})") from None
    if not host:
        raise ValueError("needs a server: cloudfoxy+http://HOST:PORT")
    if parts.username is not None or parts.password is not None:
        raise ValueError("put no credentials in the URL: the token comes from token_file=, "
                         "--token-file or env FOXYPROXY_TOKEN")
    if parts.fragment:
        raise ValueError("a #fragment means nothing here")
    if not tls and any(k in params for k in ("ca", "cert", "key")):
        raise ValueError("ca=, cert= and key= need cloudfoxy+https://")
    if "token_file" in params:
        token = read_secret("token_file", params["token_file"])
    else:
        token = settings.token
    if not token:
        raise ValueError("no token: give token_file=FILE in the URL, --token-file FILE or env FOXYPROXY_TOKEN")
    poll = float_param(params, "poll", 10.0, 0.05, 86400.0)
    connections = int_param(params, "connections", 128, 1, 100000)
    readers_max = int_param(params, "readers_max", READERS_MAX, 1, 100000)
    prefix = params.get("prefix", "CloudFoxy").strip()
    policy = load_tls(params) if tls else None
    timeout = settings.command_timeout
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"bad host name {host!r}") from None
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    path = quote(parts.path.rstrip("/"), safe="/%")
    base = f"{'https' if tls else 'http'}://{netloc}{path}"

    def make(reactor):
        from treq.client import HTTPClient

        pool = wclient.HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = connections
        pool.cachedConnectionTimeout = IDLE_TIMEOUT
        # Only hello and inventory (idempotent GETs) use this pool: a request
        # written to a pooled connection the server had just closed (an
        # HTTP/1.0 server closes after every answer) is sent again on a new one.
        pool.retryAutomatically = True
        pool._factory = QuietHTTP11ClientFactory  # no log line per connection
        endpoints = OneServer(reactor, policy or wclient.BrowserLikePolicyForHTTPS(), timeout)
        agent = wclient.Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
        client = HTTPPool(reactor, endpoints.endpoint(b"https" if tls else b"http", host, port or
                                                      (443 if tls else 80)),
                          netloc, MAX_BODY, idle_timeout=IDLE_TIMEOUT, max_idle=connections)
        return RestBackend(base_url=base, token=token, clock=reactor, http=HTTPClient(agent),
                           client=client, pool=pool, poll=poll, timeout=timeout, prefix=prefix,
                           connections=connections, readers_max=readers_max)

    return make


# --- the backend --------------------------------------------------------------

class _Cancellable:
    """Work made of HTTP requests one after another (``current``), with one
    ``deferred`` for its outcome whose cancel aborts the request under way."""

    __slots__ = ("current", "cancelled", "deferred")

    def __init__(self):
        self.current = None
        self.cancelled = False
        self.deferred = Deferred(self._cancel)

    def _cancel(self, _d):
        self.cancelled = True
        current, self.current = self.current, None
        if current is not None:
            current.cancel()


class _Exchange(_Cancellable):
    """One card command, ``apdu`` (bytes) or a reset (``apdu`` None): its
    HTTP request(s) (three tries on a hardware error), cancellable as a
    whole."""

    __slots__ = ("backend", "key", "apdu", "reset", "tries")

    def __init__(self, backend, key, apdu):
        super().__init__()
        self.backend = backend
        self.key = key
        self.apdu = apdu
        self.reset = apdu is None
        self.tries = 0

    @property
    def what(self):
        return "RESET" if self.reset else "APDU"

    def start(self):
        self._attempt()
        return self.deferred

    def _attempt(self):
        self.tries += 1
        self.current = self.backend.request(self)

    # the waiter of RestBackend.request
    def answered(self, answer):
        self.current = None
        if self.cancelled:
            return
        status, body = answer
        if status == 200 and not self.reset:
            # The common answer: one line, a response APDU whose SW1 is not C0.
            parts = body.split()
            if len(parts) == 1:
                try:
                    value = bytes.fromhex(parts[0].decode("ascii"))
                except ValueError:  # not hex (UnicodeDecodeError is one): the full check below
                    value = None
                if value is not None and (len(value) < 2 or value[-2] != 0xC0):
                    self.deferred.callback(value)
                    return
        try:
            lines = body_lines(self.backend._checked(answer))
            if not lines:
                raise CardError(errors.UPSTREAM, "empty answer")
            if hardware_error(lines[0], self.reset) and self.tries < HW_TRIES:
                self.backend.log.info("{server}: hardware error {sw} on {terminal}, try {n} of {max}",
                                      server=self.backend.base_url, sw=lines[0][-4:],
                                      terminal=self.key, n=self.tries + 1, max=HW_TRIES)
                self._attempt()
                return
            value = parse_hex(lines[0], "ATR" if self.reset else "response APDU")
        except CardError as e:
            self.backend.log_failure(self.what, self.key, e.reason)
            self.deferred.errback(e)
            return
        except Exception:
            self.deferred.errback()  # a bug: the dispatcher answers C090 and logs it
            return
        self.deferred.callback(value)

    def failed(self, failure):
        self.current = None
        if self.cancelled:
            return
        self.deferred.errback(self.backend.upstream_error(failure, self.what, self.key))


class _Batch(_Cancellable):
    """A run of card commands as few ``/api/v1/basic`` calls as the API
    allows: one per RESET (``reset=1`` and the APDUs after it) plus one for
    APDUs before the first RESET; each call's APDUs run back to back.  The
    API answers a reset that comes with APDUs by the APDUs' lines only, so
    such a reset's result is the card's ATR from the inventory; a card with
    none listed is reset by a call of its own first.  No retries: an APDU
    is not idempotent.  Cancellable as a whole."""

    __slots__ = ("backend", "key", "total", "segments", "results")

    def __init__(self, backend, key, steps):
        super().__init__()
        self.backend = backend
        self.key = key
        self.total = len(steps)
        self.segments = []  # [reset?, [apdu hex, ...]]
        for kind, data in steps:
            if kind == "RESET" or not self.segments:
                self.segments.append([kind == "RESET", []])
            if kind != "RESET":
                self.segments[-1][1].append(data.hex().upper())
        self.results = []

    def start(self):
        self._next()
        return self.deferred

    def _next(self):
        if not self.segments:
            self.deferred.callback(self.results)
            return
        reset, apdus = self.segments[0]
        atr = self.backend.known_atr(self.key) if reset else None
        params = [("terminal", self.key)]
        if reset and (not apdus or atr is None):
            params.append(("reset", "1"))
            if apdus:  # the ATR first, the APDUs in the next call
                self.segments[0] = [False, apdus]
            else:
                self.segments.pop(0)
            expect = None
        else:
            self.segments.pop(0)
            params.append(("reset", "1" if reset else "0"))
            params.extend(("apdu", apdu) for apdu in apdus)
            if reset:
                self.results.append(atr)
            expect = len(apdus)
        self.current = self.backend.basic(params)
        self.current.addCallbacks(self._got, self._failed, callbackArgs=(expect, reset))

    def _got(self, body, expect, reset):
        self.current = None
        if self.cancelled:
            return
        lines = body_lines(body)
        if expect is None:  # a reset alone: its ATR
            expect = 1
        elif reset and len(lines) == expect + 1:
            # A server that answers the reset's ATR too: use it.
            try:
                self.results[-1] = parse_hex(lines.pop(0), "ATR")
            except CardError as e:
                self.results[-1] = e
        values = []
        for i in range(expect):
            try:
                if len(lines) != expect:  # the lines cannot be matched to the commands
                    raise CardError(errors.UPSTREAM, f"{len(lines)} answer lines for {expect} commands")
                values.append(parse_hex(lines[i], "answer"))
            except CardError as e:
                self.backend.log_failure("APDU batch", self.key, e.reason)
                values.append(e)
        self.results.extend(values)
        self._next()

    def _failed(self, failure):
        self.current = None
        if self.cancelled:
            return
        error = self.backend.upstream_error(failure, "APDU batch", self.key)
        if not isinstance(error, CardError):
            self.deferred.errback(error)  # cancelled or timed out
            return
        # Steps already answered keep their results; the rest fail.
        self.results.extend([error] * (self.total - len(self.results)))
        self.deferred.callback(self.results)


@implementer(IBackend)
@attr.s(eq=False)
class RestBackend:
    """The cards of one CloudFoxy RESTful server.

    ``http`` is a treq ``HTTPClient`` (or ``treq.testing.StubTreq``) over
    an Agent using one persistent ``pool``, for hello and inventory; card
    commands go to ``client`` (an ``httpclient.HTTPPool``; in-memory tests
    may leave it out, then they go through ``http`` too, see :meth:`basic`).
    ``clock``
    schedules the polling of ``/api/v1/hello`` every ``poll`` seconds and
    bounds those calls by ``timeout``.  Reader keys are the server's
    terminal names (``/IP@id``).
    """

    base_url = attr.ib()
    token = attr.ib(repr=False)
    clock = attr.ib()
    http = attr.ib()
    client = attr.ib(default=None)
    pool = attr.ib(default=None)
    poll = attr.ib(default=10.0)
    timeout = attr.ib(default=15.0)
    prefix = attr.ib(default="CloudFoxy")
    connections = attr.ib(default=128)
    readers_max = attr.ib(default=READERS_MAX)
    log = Logger()

    _registry = attr.ib(init=False, default=None)
    _headers = attr.ib(init=False, default=None)
    _header_lines = attr.ib(init=False, default=None)
    _basic_target = attr.ib(init=False, default=None)
    _request_tail = attr.ib(init=False, default=None)
    _starts = attr.ib(init=False, factory=dict)  # terminal -> b"GET .../basic?terminal=T&reset="
    _uptime = attr.ib(init=False, default=None)
    _loaded = attr.ib(init=False, default=False)
    _cards = attr.ib(init=False, factory=list)
    _call = attr.ib(init=False, default=None)
    _polling = attr.ib(init=False, default=None)
    _retry = attr.ib(init=False, default=FIRST_RETRY)
    _poll_error = attr.ib(init=False, default=None)
    _cap = attr.ib(init=False, default=None)
    _atrs = attr.ib(init=False, factory=dict)
    _updates = attr.ib(init=False, default=None)

    def __attrs_post_init__(self):
        self._headers = {"X-Auth-Token": [self.token], "Accept": ["text/plain"]}
        self._header_lines = b"X-Auth-Token: %s\r\nAccept: text/plain\r\n" % self.token.encode("utf-8")
        self._basic_target = urlsplit(self.base_url).path + BASIC + "?"
        if self.client is not None:
            self._request_tail = self.client.request_tail(self._header_lines)
        self._cap = ReaderCap(self.base_url, self.readers_max)

    @property
    def description(self):
        return f"cloudfoxy REST {self.base_url}"

    # -- naming

    def display_name(self, native):
        bare = native[1:] if native.startswith("/") else native
        return f"{self.prefix} {bare}" if self.prefix else bare

    def reader_info(self, native, atr):
        aliases = tuple(dict.fromkeys(a for a in (native, foxy_name(native)) if a != self.display_name(native)))
        return ReaderInfo(native, self.display_name(native), aliases=aliases, present=True, atr=atr)

    # -- HTTP

    def get(self, path, params=None, limit=MAX_BODY):
        """GET ``path``: a cancellable Deferred for the body of a 200 answer
        (at most ``limit`` bytes); any other status is a CardError(C086)
        (after reading the body)."""
        return self._fetch(path, params, limit).addCallback(self._checked)

    def basic(self, params):
        """GET ``/api/v1/basic`` with ``params``, like :meth:`get`.

        ``params`` is a list of ``(name, value)`` pairs (a name may repeat);
        the Deferred fires with the body (bytes) of a 200 answer, fails with
        CardError(C086) for any other status, and its ``cancel()`` aborts
        the connection."""
        if self.client is None:
            d = self._fetch(BASIC, params)
        else:
            d = self.client.get(self._target(params), self._header_lines)
        return d.addCallback(self._checked)

    def request(self, exchange):
        """GET ``/api/v1/basic`` for ``exchange`` (an ``_Exchange``: its
        ``key``, and its ``apdu`` or a reset); later exactly one of
        ``exchange.answered((status, body))`` (int, bytes; see
        :meth:`_checked`) or ``exchange.failed(failure)``, unless the
        returned handle's ``cancel()`` came first.  The hot path: with a
        ``client`` (:class:`.httpclient.HTTPPool`) the request skips treq's
        and Agent's general machinery and Deferreds (docs/performance.md
        compares the options), its bytes made from a start kept per card."""
        key, apdu = exchange.key, exchange.apdu
        if self.client is None:
            params = [("terminal", key), ("reset", "1" if apdu is None else "0")]
            if apdu is not None:
                params.append(("apdu", apdu.hex().upper()))
            return self._fetch(BASIC, params).addCallbacks(exchange.answered, exchange.failed)
        start = self._starts.get(key)
        if start is None:
            start = self._starts[key] = b"GET %s&reset=" % self._target([("terminal", key)])
        if apdu is None:
            request = start + b"1" + self._request_tail
        else:
            request = b"%s0&apdu=%s%s" % (start, hexlify(apdu).upper(), self._request_tail)
        return self.client.send_request(request, exchange)

    def _fetch(self, path, params=None, limit=MAX_BODY):
        """GET ``path`` through treq: a cancellable Deferred for ``(status,
        body)``, the body read with a limit of ``limit`` bytes."""
        d = self.http.get(request_url(self.base_url + path), params=params, headers=self._headers,
                          unbuffered=True, allow_redirects=False)
        return d.addCallback(lambda response: read_body(response, limit).addCallback(
            lambda body: (response.code, body)))

    def _target(self, params):
        return (self._basic_target + "&".join(f"{k}={quote_value(v)}" for k, v in params)).encode("ascii")

    def _checked(self, answer):
        """The body of a 200 ``(status, body)`` answer; else CardError(C086)."""
        status, body = answer
        if status == 200:
            return body
        text = " ".join(body_lines(body))[:160]
        hint = " (is the token right?)" if status in (401, 403) else ""
        raise CardError(errors.UPSTREAM, f"HTTP {status}{hint}: {text!r}")

    def upstream_error(self, failure, what, key):
        """The CardError for a failed exchange, logged once; a cancellation
        (the dispatcher's timeout, or the client gone) passes through as is."""
        if failure.check(CancelledError, TimeoutError):
            return failure
        if failure.check(CardError):
            reason = failure.value.reason
            error = failure.value
        else:
            reason = describe(failure)
            error = CardError(errors.UPSTREAM, reason)
        self.log_failure(what, key, reason)
        return error

    def log_failure(self, what, key, reason):
        self.log.warn("{server}: {what} on {terminal} failed: {reason}",
                      server=self.base_url, what=what, terminal=key, reason=reason)

    # -- IBackend

    def reset(self, key):
        return _Exchange(self, key, None).start()

    def transmit(self, key, apdu):
        return _Exchange(self, key, apdu).start()

    def transmit_batch(self, key, steps):
        """``steps`` (``("RESET", None)``/``("APDU", bytes)``) in as few
        ``/api/v1/basic`` calls as the API allows (see _Batch); a Deferred
        for one result per step (bytes or CardError), or failing with a
        CardError when a call failed (then every step is ``C086``)."""
        return _Batch(self, key, steps).start()

    def known_atr(self, key):
        """The ATR the inventory lists for terminal ``key``, or None."""
        return self._atrs.get(key)

    def start(self, registry):
        self._registry = registry
        self._updates = ReaderUpdates(registry, self, self.clock)
        registry.update(self, [])  # keep this backend's place in the listing
        self._poll()

    def stop(self):
        self._registry = None
        if self._updates is not None:
            self._updates.stop()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        polling, self._polling = self._polling, None
        if polling is not None:
            polling.cancel()
        if self.client is not None:
            self.client.close()
        if self.pool is not None:
            return self.pool.closeCachedConnections()
        return None

    # -- readers: /api/v1/hello and /api/v1/inventory

    def _bounded(self, d):
        return d.addTimeout(self.timeout, self.clock)

    @property
    def up(self):
        """True once the server's inventory has been read (readiness)."""
        return self._loaded

    def _poll(self):
        self._call = None
        if self._registry is None or self._polling is not None:
            return
        d = self._polling = self._bounded(self.get(HELLO))
        d.addCallback(self._hello)
        d.addCallbacks(self._poll_ok, self._poll_failed)
        d.addBoth(self._poll_done)

    def _hello(self, body):
        uptime = parse_uptime(body)
        restarted = self._uptime is not None and uptime < self._uptime
        self._uptime = uptime
        if restarted:
            self.log.info("{server} restarted (uptime {uptime}s): reading its inventory",
                          server=self.base_url, uptime=uptime)
        if restarted or not self._loaded or not self._cards:
            limit = self.readers_max * INVENTORY_BYTES_PER_CARD + 4096
            return self._bounded(self.get(INVENTORY, limit=limit)).addCallback(self._inventory)
        return None

    def _inventory(self, body):
        cap = self._cap
        cap.begin()
        cards, more = parse_inventory(body, self.readers_max)
        cards = [card for card in cards if cap.fits(card[0])]
        cap.too_many(more)
        cap.end(self.log)
        if self._registry is None:
            return
        first = not self._loaded
        self._loaded = True
        self._cards = cards
        self._atrs = {name: atr for name, atr in cards if atr is not None}
        self._starts = {}  # only the cards listed now
        if self.pool is not None:
            self.pool.maxPersistentPerHost = max(self.connections, len(cards) + 8)
        if self.client is not None:
            self.client.max_idle = max(self.connections, len(cards) + 8)
        self._updates.update(cards, lambda card: self.reader_info(*card))
        self.log.info("{server}: {count} cards{first}", server=self.base_url, count=len(cards),
                      first=" (first inventory)" if first else "")

    def _poll_ok(self, _):
        if self._poll_error is not None:
            self.log.info("{server} answers again", server=self.base_url)
        self._poll_error = None
        self._retry = FIRST_RETRY

    def _poll_failed(self, failure):
        if self._registry is None:
            return  # stopped
        if failure.check(CardError):
            reason = failure.value.reason
        elif failure.check(CancelledError, TimeoutError):
            reason = f"no answer within {self.timeout:g}s"
        else:
            reason = describe(failure)
        if reason != self._poll_error:
            self.log.warn("{server}: cannot read hello/inventory: {reason}", server=self.base_url,
                          reason=reason)
        else:
            self.log.debug("{server}: still failing: {reason}", server=self.base_url, reason=reason)
        self._poll_error = reason

    def _poll_done(self, _):
        self._polling = None
        if self._registry is None:
            return
        if self._loaded:
            delay = self.poll
        else:
            delay = min(self._retry, self.poll)
            self._retry = min(self._retry * 2, self.poll)
        self._call = self.clock.callLater(delay, self._poll)

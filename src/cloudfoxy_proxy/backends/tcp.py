"""``tcp://`` and ``tls://`` — another line-protocol endpoint as a backend.

``tcp://HOST:PORT?prefix=NAME&password_file=FILE&connections=4&refresh=10&readers_max=10000``
``&heartbeat=2&heartbeat_timeout=2&keepalive_idle=2&keepalive_interval=1&keepalive_count=3``
``tls://HOST:PORT?ca=FILE&cert=FILE&key=FILE&prefix=NAME&...``

The upstream is a CloudFoxy TCP endpoint or another proxy (chaining).  Its
readers come from its ``READERS`` answer, asked together with ``OWNER``
(docs/protocol.md "### OWNER"), and appear here as ``<owner id>/`` + their
upstream name, or ``PREFIX`` + that name when the URL gives ``prefix=`` or
the upstream has no owner id (``C081``: foxyproxy 2.10); at most
``readers_max`` of them, names of at most MAX_NAME bytes.  An upstream
named by an owner id another upstream of this process has, or whose names
are another backend's, is refused (owners.OwnerClaims): at start-up the
process stops with one line, later its readers are not listed.  RESET and
APDU go upstream with ids of our own, a
client request's run of them as one upstream request (:meth:`transmit_batch`,
so they stay back to back on the card), over a small pool of persistent
connections (ClientService each, reconnecting with back-off).  See docs/tcp.md.

An answer that is malformed for one request (a wrong id, a result that is
not hex, an over-long line) fails that request's commands with ``C086`` and
nothing else; a connection is dropped only when its stream can no longer be
matched to our requests (an answer to no request, or one that skips ahead
to a later request), and then only the commands in flight on it fail.

Failure semantics (nothing silently lost, nothing repeated):

* a command already written to a connection that dies is answered ``C086``,
  never re-sent (APDUs are not idempotent);
* a command not yet written (no connection up yet, or the last one just
  died) waits for the next connection and goes out there;
* when the upstream is known to be down (the last connection attempt
  failed and no connection is up) new commands fail at once with ``C086``;
* a command the dispatcher cancels (command timeout) stays in its
  connection's queue so that the late answer is recognised by its id and
  discarded, never given to another command.  A connection that still has
  not answered a command that long after its timeout is dropped.

Connection reuse is learnt, not assumed: foxyproxy 2.10 answers one request
per connection and closes it; it reads its connections one at a time, in
the order it accepted them (an idle connection stalls it), and would run a
second request that arrived in the same read on the wrong reader.  Until a
connection has stayed open for PROBE_DELAY after an answer, each
connection carries one request and is not reused; once one has, the
upstream is "persistent" and requests are pipelined over the pool.  A
connection closed right after its first answer marks the upstream "one
request per connection": the pool is parked and every request gets a
connection of its own, opened when it is needed (no idle connections, no
warnings).  A later connection that stays open switches back.

Liveness (an upstream that goes silent without closing: NAT or firewall
state dropped, a frozen peer): every ``heartbeat`` seconds an idle pooled
connection of a persistent upstream, and a liveness connection of its own
that never carries a command (so busy connections do not hide a silent
upstream), carry a READERS request (answered by every line-protocol
server, no card touched); one not answered within ``heartbeat_timeout``
drops that connection *and every sibling to the same upstream* at once
(their commands in flight get ``C086``, never re-sent) and they are
dialled again, so a silent flow loss costs one short timeout, not one per
connection.  Until the upstream answers again (or while it is
unreachable) its readers are listed absent and commands to them get
``C086`` at once.  TCP keepalive with ``keepalive_idle`` /
``keepalive_interval`` / ``keepalive_count`` (and TCP_USER_TIMEOUT for
unacknowledged data) ends a connection whose peer host is gone.

Files: this module holds the URL's settings and ``TcpBackend`` (IBackend,
requests and answers, the reader list); ``tcp_pool.py`` the connection
pool policy (``UpstreamPool``, its base class); ``tcp_upstream.py`` the
protocol of one upstream connection.
"""

import base64
import collections
from urllib.parse import parse_qsl, urlsplit

import attr
from twisted.internet.defer import fail, gatherResults, succeed
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from .. import errors
from ..interfaces import IBackend, ReaderInfo, settle
from ..errors import CardError
from ..logs import Logger
from ..owners import claims as owner_claims, is_owner_id
from ..parser import COMMANDS
from ..secrets import read_secret
from .tcp_hold import HeldCard
from .tcp_pool import UpstreamPool
from .tcp_upstream import _CANCELLED, _DONE, PROBE_DELAY, _Call, _OneByOne
from . import (
    MAX_NAME, READERS_MAX, BackendSettings, ReaderCap, ReaderUpdates, float_param, int_param, query,
    tls_material,
)

DEFAULT_PORT = 4001
#: Bytes of a READERS answer line per reader: base64 of a MAX_NAME-byte name and ``|``.
LISTING_BYTES_PER_READER = 4 * -(-MAX_NAME // 3) + 1
#: An empty or failed READERS answer is asked again after this, doubling up
#: to ``refresh`` (an upstream proxy that has not found its own cards yet).
EMPTY_RETRY = 0.5
#: Liveness defaults (seconds; see docs/tcp.md "Liveness"): a heartbeat on an
#: idle connection (and on the liveness connection) every HEARTBEAT, answered
#: within HEARTBEAT_TIMEOUT; TCP keepalive (idle, interval, probes).  A
#: silent upstream is found within HEARTBEAT + HEARTBEAT_TIMEOUT (2.5 s),
#: also while every pooled connection waits on a card.
HEARTBEAT = 1.0
HEARTBEAT_TIMEOUT = 1.5
KEEPALIVE = (2, 1, 3)


def check_password(password):
    """A reader-line password the upstream's parser would misread is refused:
    ``READER:PW`` whose first ``:`` field is a command name starts a command
    line, not a reader line (docs/protocol.md "Requests")."""
    first = password.split(":")[0].partition("|")[0].strip().upper()
    if first in COMMANDS:
        raise ValueError("the upstream password must not start with a command name "
                         f"({first}): the upstream would read the reader line as a command")
    if "\n" in password or "\r" in password:
        raise ValueError("the upstream password must be one line")


def tls_options(host, params):
    """Client TLS options: the server certificate is verified for ``host``
    (service_identity) against ``ca=`` (a PEM file, one or more
    certificates) or the platform's trust store; ``cert=``/``key=`` add a
    client certificate."""
    from twisted.internet.ssl import optionsForClientTLS, platformTrust

    trust, client = tls_material(params)
    trust = trust or platformTrust()
    try:
        return optionsForClientTLS(host, trustRoot=trust, clientCertificate=client)
    except Exception as e:
        raise ValueError(f"cannot verify TLS for host {host!r}: {e}") from None


def from_url(url, settings=BackendSettings()):
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    tls = scheme == "tls"
    allowed = {"prefix", "password_file", "connections", "refresh", "readers_max", "heartbeat",
               "heartbeat_timeout", "keepalive_idle", "keepalive_interval", "keepalive_count"}
    if tls:
        allowed |= {"ca", "cert", "key"}
    if any(k == "password" for k, _ in parse_qsl(parts.query, keep_blank_values=True)):
        raise ValueError("password= in the URL would be visible to every user (ps); "
                         "use password_file=FILE, --password-file FILE or env FOXYPROXY_PASSWORD")
    params = query(url, allowed)
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are not allowed; use password_file=FILE")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise ValueError(f"bad port: {e}") from None
    if not host:
        raise ValueError(f"expected {scheme}://HOST:PORT")
    port = DEFAULT_PORT if port is None else port
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range 1..65535")
    if parts.path not in ("", "/"):
        raise ValueError(f"unexpected path {parts.path!r}: expected {scheme}://HOST:PORT?PARAMS")
    connections = int_param(params, "connections", 4, 1, 64)
    readers_max = int_param(params, "readers_max", READERS_MAX, 1, 100000)
    refresh = float_param(params, "refresh", 10.0, 0.0, 86400.0)
    if 0 < refresh < 0.1:
        raise ValueError("refresh= must be 0 (off) or at least 0.1 seconds")
    heartbeat = float_param(params, "heartbeat", HEARTBEAT, 0.0, 3600.0)
    if 0 < heartbeat < 0.1:
        raise ValueError("heartbeat= must be 0 (off) or at least 0.1 seconds")
    heartbeat_timeout = float_param(params, "heartbeat_timeout", HEARTBEAT_TIMEOUT, 0.1, 600.0)
    keepalive = (int_param(params, "keepalive_idle", KEEPALIVE[0], 1, 32767),
                 int_param(params, "keepalive_interval", KEEPALIVE[1], 1, 32767),
                 int_param(params, "keepalive_count", KEEPALIVE[2], 1, 127))
    prefix = params.get("prefix")  # None: name the readers by the upstream's owner id
    if "password_file" in params:
        password = read_secret("password_file", params["password_file"])
    else:
        password = settings.password
    password = password or None
    if password is not None:
        check_password(password)
    timeout = settings.command_timeout
    options = tls_options(host, params) if tls else None
    where = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"

    def make(reactor):
        from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

        endpoint = HostnameEndpoint(reactor, host, port, timeout=max(1.0, min(10.0, timeout)))
        if options is not None:
            endpoint = wrapClientTLS(options, endpoint)
        return TcpBackend(endpoint=endpoint, clock=reactor, where=where, password=password,
                          prefix=prefix, connections=connections, refresh=refresh,
                          timeout=timeout, tls=tls, readers_max=readers_max, heartbeat=heartbeat,
                          heartbeat_timeout=heartbeat_timeout, keepalive=keepalive,
                          liveness=heartbeat > 0)

    return make


@implementer(IBackend)
@attr.s(eq=False)
class TcpBackend(UpstreamPool):
    """The readers of one upstream line-protocol endpoint.

    ``endpoint`` is an IStreamClientEndpoint (TLS-wrapped for ``tls://``);
    ``clock`` an IReactorTime; ``connections`` the pool size; ``refresh``
    how often (seconds, 0: never) the reader list is re-read; ``timeout``
    bounds a READERS call and is the grace a connection gets to answer a
    command that already timed out.  ``retry_delay(failures)``, if given,
    replaces the randomised back-off (tests).  ``persistent`` is what has
    been learnt about the upstream: None (not yet known), True (keeps
    connections open: a pool of ClientServices, pipelining) or False (one
    request per connection: a new connection for every request, at most
    ``connections`` at once, and the pool parked).  ``heartbeat`` (seconds, 0:
    off; ``from_url`` gives HEARTBEAT) and ``heartbeat_timeout``: the
    liveness check of idle connections of a persistent upstream;
    ``keepalive``: (TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT) in seconds,
    seconds and probes, or None (the system's defaults).  ``prefix``: put
    before every upstream reader name; None (the URL gives no ``prefix=``):
    ``<owner id>/``, or nothing for an upstream without one.  ``owner``: the
    upstream's owner id once its readers are listed (None: none, or not
    known yet); it is fixed for the life of the backend.  ``liveness``
    (``from_url``: on when ``heartbeat`` is): one more connection, opened
    once the upstream is known to be persistent, that carries heartbeats
    only, so a silent upstream is found within ``heartbeat +
    heartbeat_timeout`` even while every pooled connection waits on a card.

    ``upstream_state`` is ``"up"``, ``"down"`` or ``"silent"`` (readiness,
    ``/status.json``); ``owner`` as above.
    """

    endpoint = attr.ib()
    clock = attr.ib()
    where = attr.ib(default="upstream")
    password = attr.ib(default=None, repr=False)
    prefix = attr.ib(default=None)
    connections = attr.ib(default=4)
    refresh = attr.ib(default=10.0)
    timeout = attr.ib(default=15.0)
    tls = attr.ib(default=False)
    retry_delay = attr.ib(default=None)
    persistent = attr.ib(default=None)
    heartbeat = attr.ib(default=0.0)
    heartbeat_timeout = attr.ib(default=HEARTBEAT_TIMEOUT)
    keepalive = attr.ib(default=None)
    liveness = attr.ib(default=False)
    #: silent flow losses found by a missed heartbeat (metrics, tests)
    heartbeat_misses = attr.ib(init=False, default=0, repr=False)
    _silent = attr.ib(init=False, default=False, repr=False)  # missed, and none answered since
    _sentinel_slot = attr.ib(init=False, default=None, repr=False)  # ClientService of the liveness connection
    _sentinel = attr.ib(init=False, default=None, repr=False)  # the liveness connection, when up
    _present = attr.ib(init=False, default=True, repr=False)  # readers listed present
    services = attr.ib(init=False, factory=list, repr=False)
    listing = attr.ib(init=False, default=None, repr=False)  # upstream names, as last read
    _live = attr.ib(init=False, factory=list, repr=False)  # ready connections, oldest first
    _queue = attr.ib(init=False, factory=collections.deque, repr=False)  # calls waiting for one
    _opening = attr.ib(init=False, factory=set, repr=False)  # one-off connection attempts
    _lines = attr.ib(init=False, factory=dict, repr=False)  # key -> reader line bytes
    _registry = attr.ib(init=False, default=None, repr=False)
    _running = attr.ib(init=False, default=False, repr=False)
    _down = attr.ib(init=False, default=False, repr=False)
    _stale = attr.ib(init=False, default=True, repr=False)  # re-read the readers on connecting
    _failures = attr.ib(init=False, default=0, repr=False)
    _next_id = attr.ib(init=False, default=0, repr=False)
    _refreshing = attr.ib(init=False, default=None, repr=False)
    _loop = attr.ib(init=False, default=None, repr=False)
    _soon = attr.ib(init=False, default=None, repr=False)  # DelayedCall: re-read an empty list
    _soon_delay = attr.ib(init=False, default=EMPTY_RETRY, repr=False)
    readers_max = attr.ib(default=READERS_MAX)
    _cap = attr.ib(init=False, default=None, repr=False)
    _updates = attr.ib(init=False, default=None, repr=False)
    _malformed_next = attr.ib(init=False, default=0.0, repr=False)
    _malformed_quiet = attr.ib(init=False, default=0, repr=False)
    #: times a usable connection came back after every one was lost (metrics)
    reconnects = attr.ib(init=False, default=0, repr=False)
    _connected_before = attr.ib(init=False, default=False, repr=False)
    _held = attr.ib(init=False, factory=set, repr=False)  # HeldCards: card sessions held upstream
    _hold_unsupported = attr.ib(init=False, default=False, repr=False)  # said once
    #: who the next card call is for (``for_client``), consumed by it
    _client = attr.ib(init=False, default=None, repr=False)
    #: False once the upstream answered CLIENT with C081 (an older proxy: it
    #: audits this proxy, not its clients); CLIENT is not sent to it again
    relaying = attr.ib(init=False, default=True, repr=False)
    _client_warned = attr.ib(init=False, default=None, repr=False)  # when C085 was last logged
    owner = attr.ib(init=False, default=None)
    _named = attr.ib(init=False, default=False, repr=False)  # owner fixed by a first listing
    _claims = attr.ib(init=False, default=None, repr=False)  # owners.OwnerClaims of the registry
    _refused = attr.ib(init=False, default=None, repr=False)  # why the last listing was not used
    _odd_owner = attr.ib(init=False, default=None, repr=False)  # an OWNER answer logged as no id

    log = Logger()

    def __attrs_post_init__(self):
        self._cap = ReaderCap(self.where, self.readers_max)

    @property
    def listing_limit(self):
        """The longest READERS answer line read (``readers_max`` names)."""
        return self.readers_max * LISTING_BYTES_PER_READER + 1024

    @property
    def description(self):
        return f"{self.where} ({self.connections} connections)"

    @property
    def up(self):
        """True while at least one connection is usable."""
        return bool(self._live)

    @property
    def upstream_state(self):
        """``"silent"``: a heartbeat was missed and nothing answered since;
        ``"up"``: the reader list has been read, and the upstream answered
        since it was last unreachable (an upstream that closes after every
        answer has no connection between requests); else ``"down"``."""
        if self._silent:
            return "silent"
        if not self._down and self._present and self.listing is not None:
            return "up"
        return "down"

    def _set_present(self, present):
        """List every reader of this upstream present or absent (an
        upstream that does not answer: its cards cannot be reached)."""
        if present == self._present:
            return
        self._present = present
        registry = self._registry
        if registry is None or not registry.reported(self):
            return
        infos = [attr.evolve(r.info, present=present) for r in registry.readers
                 if r.backend is self and r.info is not None]
        if infos:
            self.log.info("readers of upstream {upstream} listed {state}", upstream=self.where,
                          state="present again" if present else "absent")
            registry.update(self, infos)

    # -- IBackend ---------------------------------------------------------

    def start(self, registry):
        self._registry = registry
        self._claims = owner_claims(registry)
        self._claims.begin(self)
        self._updates = ReaderUpdates(registry, self, self.clock)
        self._running = True
        for _ in range(self.connections):
            slot = self._slot()
            self.services.append(slot)
            slot.startService()
        self._start_sentinel()
        if self.refresh:
            self._loop = LoopingCall(self._refresh)
            self._loop.clock = self.clock
            self._loop.start(self.refresh, now=False).addErrback(
                lambda f: self.log.failure("reader refresh of {upstream} stopped", f,
                                           upstream=self.where))

    def stop(self):
        self._running = False
        if self._claims is not None:
            self._claims.release(self)
        if self._updates is not None:
            self._updates.stop()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self._fail_queue("backend stopped")
        for d in list(self._opening):
            d.cancel()
        for held in list(self._held):
            held.release()
        self._held.clear()
        sentinel, self._sentinel_slot = self._sentinel_slot, None
        if sentinel is not None:
            self.services.append(sentinel)  # stopped with the pool's slots below
        for conn in list(self._live):
            if conn.factory.slot is None:
                conn.transport.loseConnection()  # one-off connections; slots close their own
        services, self.services = self.services, []
        return gatherResults([s.stopService() for s in services])

    def for_client(self, session, identity):
        """The next card call is for this client (IBackend's optional
        ``for_client``): the upstream is told with CLIENT (relay.py).  A
        session without a peer is the proxy's own work: nothing is told."""
        self._client = (session.peer, getattr(identity, "name", None), session.frontend) if session.peer else None

    def reset(self, key):
        client, self._client = self._client, None
        return self._submit(key, [b"RESET"], client=client)

    def transmit(self, key, apdu):
        client, self._client = self._client, None
        return self._submit(key, [b"APDU:" + apdu.hex().upper().encode("ascii")], client=client)

    def transmit_batch(self, key, steps):
        """The steps (``("RESET", None)`` / ``("APDU", bytes)``) as one
        upstream request, so they run back to back on the card; a Deferred
        for one result per step (bytes, or a CardError).

        Only once the upstream is known to keep connections (a proxy like
        this one): foxyproxy 2.10, which closes after every answer, answers
        a request of several commands with the last one's line only, so
        there (and while that is not known yet) the steps go one request
        each, one after another."""
        commands = [b"RESET" if kind == "RESET" else b"APDU:" + data.hex().upper().encode("ascii")
                    for kind, data in steps]
        client, self._client = self._client, None
        if self.persistent is not True:
            return _OneByOne(self, key, commands, client).start()
        return self._submit(key, commands, batch=True, client=client)

    def hold(self, key, idle_timeout, lost):
        """Hold the card ``key`` at the upstream for a card session
        (IBackend's optional ``hold``), on a connection of its own: a
        Deferred for a ``tcp_hold.HeldCard`` (its ``reset``, ``transmit``,
        ``transmit_batch`` and ``release``), for None when the upstream
        cannot hold cards (``C081``: logged once; the session is then held
        on this proxy only), or failing with a CardError (docs/tcp.md
        "Card sessions through a front")."""
        client, self._client = self._client, None  # for_client: the session's client
        if not self._running:
            raise CardError(errors.UPSTREAM, "backend stopped")
        if self.persistent is False:  # one request per connection: FoxyProxy 2.10
            self._hold_answered(False)
            return succeed(None)
        held = HeldCard(self, key, idle_timeout, lost, client if self.relaying else None)
        self._held.add(held)
        d = held.start()
        held.d.addBoth(self._hold_done, held)
        return d

    def _hold_done(self, result, held):
        if held.state != "held":
            self._held.discard(held)
        return result

    def _hold_answered(self, supported):
        """Say once (until it holds cards again) that the upstream cannot."""
        if supported:
            self._hold_unsupported = False
        elif not self._hold_unsupported:
            self._hold_unsupported = True
            self.log.warn("upstream {upstream} does not know HOLD (an older proxy or FoxyProxy 2.10): "
                          "card sessions on its readers are held on this proxy only; its other "
                          "clients can use those cards meanwhile", upstream=self.where)

    # -- requests ---------------------------------------------------------

    def _id(self):
        self._next_id += 1
        return b"%d" % self._next_id

    def _reader_line(self, key):
        line = self._lines.get(key)
        if line is None:
            # The upstream's exact canonical name, unless its own parser
            # could not read it back (":" separates the password; leading or
            # trailing blanks are stripped): then its base64 alias.
            if not key or ":" in key or key != key.strip() or "\n" in key or "\r" in key:
                text = base64.b64encode(key.encode("utf-8")).decode("ascii")
            else:
                text = key
            if self.password:
                text += ":" + self.password
            line = self._lines[key] = b">" + text.encode("utf-8") + b"|\n"
        return line

    def _submit(self, key, commands, batch=False, client=None):
        if not self._running:
            raise CardError(errors.UPSTREAM, "backend stopped")
        if self._silent:
            raise CardError(errors.UPSTREAM, f"upstream {self.where} does not answer")
        conn = self._pick(key)
        if conn is None and self._down:
            raise CardError(errors.UPSTREAM, f"upstream {self.where} unreachable")
        ids = [self._id() for _ in commands]
        data = b"".join(b">" + cid + b":" + command + b"|\n" for cid, command in zip(ids, commands))
        call = _Call(self, ids, key, self._reader_line(key) + data + b"\n", batch=batch, client=client)
        if conn is not None:
            conn.send(call)
        else:
            self._wait(call)
        return call.d

    def _answer(self, conn, call):
        call.stop_watch()
        if self._silent:
            self._silent = False
            self.log.info("upstream {upstream} answers again", upstream=self.where)
        if not self._present:
            self._set_present(True)
        if call.control:
            call.state = _DONE
            self._client_answered(conn, call.results[0] if call.results else None)
            if self._queue:
                self._flush()
            return
        if call.heartbeat:
            call.state = _DONE
            conn.arm()
            if self._queue:
                self._flush()
            return
        if not self.persistent:
            # Not known to keep connections: do not reuse this one until it
            # has stayed open a while (then the upstream is persistent).
            conn.spent = True
            if conn.probe is None:
                conn.probe = self.clock.callLater(PROBE_DELAY, self._probed, conn)
        if call.state == _CANCELLED:
            self.log.debug("discarded the late answer to {id} from {upstream}",
                           id=call.id, upstream=self.where)
        else:
            call.state = _DONE
            if call.bad is None and not call.readers and len(call.results) < len(call.ids):
                call.bad = "fewer answer lines than commands"
            if call.bad is not None:
                self._warn_malformed(call)
            results = call.results
            if call.raw:
                call.d.callback([results[i] if i < len(results) and results[i] is not None
                                 else errors.UPSTREAM for i in range(len(call.ids))])
            elif call.readers:
                n = len(call.ids)  # OWNER and READERS, or READERS alone
                if len(results) >= n and results[n - 1] is not None:
                    call.d.callback((results[0], results[1]) if n == 2 else results[0])
                else:
                    call.d.errback(CardError(errors.UPSTREAM, call.bad or "no READERS answer"))
            else:
                values = [self._value(results[i] if i < len(results) else None)
                          for i in range(len(call.ids))]
                if any(isinstance(v, CardError) and v.code == errors.NOT_FOUND for v in values):
                    self._refresh()
                settle(call.d, values, call.batch)
        if self._queue:
            self._flush()

    def _client_call(self, client):
        """The CLIENT request telling the upstream who the next requests on
        a connection are for (relay.py)."""
        from ..relay import encode

        cid = self._id()
        data = b">*" + (b":" + self.password.encode("utf-8") if self.password else b"") \
            + b"|\n>" + cid + b":CLIENT:" + encode(*client).encode("ascii") + b"|\n\n"
        return _Call(self, [cid], None, data, control=True)

    #: At most one warning about a refused CLIENT this often (seconds).
    CLIENT_WARN_EVERY = 60.0

    def _client_answered(self, conn, result):
        """The upstream's answer to CLIENT on ``conn``: an error stops it on
        that connection (a refusal is one audit line there, not one per
        client), C081 on every connection."""
        if result == "OK":
            return
        conn.refused = True
        if result == errors.FAILED:
            self.relaying = False
            self.log.info("upstream {upstream} does not know CLIENT (an older proxy): its audit log names "
                          "this proxy, not the clients it acts for", upstream=self.where)
            return
        now = self.clock.seconds()
        if self._client_warned is not None and now - self._client_warned < self.CLIENT_WARN_EVERY:
            return
        self._client_warned = now
        self.log.warn("upstream {upstream} answered CLIENT with {result}: its audit log names this proxy, "
                      "not the clients it acts for{hint}", upstream=self.where, result=result,
                      hint=" (give this proxy's identity there relay = true)" if result == errors.BAD_PIN else "")

    def _value(self, result):
        """One answer line's result: the answer's bytes or a CardError."""
        if result is None:
            return CardError(errors.UPSTREAM, f"upstream {self.where} gave no valid result")
        if result in errors.MEANING:
            return CardError(result, f"upstream {self.where} answered {result}")
        try:
            return bytes.fromhex(result)
        except ValueError:
            return CardError(errors.UPSTREAM, f"upstream {self.where} answered no hex")

    #: At most one warning about malformed answers this often.
    MALFORMED_WARN_EVERY = 10.0

    def _warn_malformed(self, call):
        now = self.clock.seconds()
        if now < self._malformed_next:
            self._malformed_quiet += 1
            return
        more = self._malformed_quiet
        self._malformed_next = now + self.MALFORMED_WARN_EVERY
        self._malformed_quiet = 0
        self.log.warn("upstream {upstream} sent a malformed answer for reader {reader!r} ({why}): "
                      "C086 for that request{more}", upstream=self.where, reader=call.key,
                      why=call.bad, more=f" ({more} more since the last warning)" if more else "")

    def ask(self, commands, reader=None, pin=None):
        """Commands the upstream answers itself (ENUM, ALIASES, CHAIN,
        SIGN: its certificate index, docs/tcp.md "Certificates at the
        owner") as one upstream request: ``commands`` are
        ``NAME[:DATA[:OBJECT]]`` texts, ``reader`` the reader line's
        text (an upstream reader name, or a certificate alias or subject
        without ``:``; None: ``*``), ``pin`` what follows the upstream
        password on it.  A Deferred firing with one result string per
        command (the answer, or a C08x code: ``C086`` for a lost or
        malformed answer); CardError ``C086`` at once when the upstream is
        down, TimeoutError after ``timeout`` seconds."""
        if not self._running:
            return fail(CardError(errors.UPSTREAM, "backend stopped"))
        conn = self._pick(None)
        if conn is None and self._down:
            return fail(CardError(errors.UPSTREAM, f"upstream {self.where} unreachable"))
        text = "*" if reader is None else reader
        for part in (self.password, pin):
            if part:
                text += ":" + part
        ids = [self._id() for _ in commands]
        lines = [b">" + cid + b":" + command.encode("utf-8") + b"|\n" for cid, command in zip(ids, commands)]
        call = _Call(self, ids, None, b">" + text.encode("utf-8") + b"|\n" + b"".join(lines) + b"\n", raw=True)
        if conn is not None:
            conn.send(call)
        else:
            self._wait(call)
        return call.d.addTimeout(self.timeout, self.clock)  # TimeoutError; the late answer is discarded

    # -- readers ----------------------------------------------------------

    def _refresh(self):
        """Re-read the upstream's reader list (one READERS call at a time)."""
        if self._refreshing is not None or not self._running:
            return
        if self._down or (not self._live and self.persistent is not False):
            self._stale = True  # on the next connection
            return
        call = self._readers_call()
        conn = self._pick(None)
        if conn is not None:
            conn.send(call)
        else:
            self._wait(call)
        d = self._refreshing = call.d
        d.addTimeout(self.timeout, self.clock)
        d.addCallbacks(self._got_readers, self._readers_failed)
        d.addBoth(self._refreshed)

    def _readers_call(self, heartbeat=False):
        """An OWNER and READERS request (for no reader in particular); a
        heartbeat asks READERS alone."""
        head = b">*" + (b":" + self.password.encode("utf-8") if self.password else b"") + b"|\n"
        ids = [self._id()] if heartbeat else [self._id(), self._id()]
        commands = [b"READERS"] if heartbeat else [b"OWNER", b"READERS"]
        data = head + b"".join(b">" + i + b":" + c + b"|\n" for i, c in zip(ids, commands)) + b"\n"
        return _Call(self, ids, None, data, readers=True, heartbeat=heartbeat)

    def _attempt_failed(self, reason):
        if self._claims is not None:
            self._claims.settled(self)  # down at start: a conflict later is no start-up error
        return UpstreamPool._attempt_failed(self, reason)

    def _refreshed(self, _):
        self._refreshing = None

    def _readers_failed(self, failure):
        if self._claims is not None:
            self._claims.settled(self)
        # While it is silent or unreachable, that has been said once already.
        say = self.log.debug if self._silent or self._down else self.log.warn
        say("reading the readers of {upstream} failed: {why}",
            upstream=self.where, why=failure.getErrorMessage())
        self._again_soon()

    def _again_soon(self):
        """Ask READERS again shortly (not only at the next ``refresh``)."""
        if not self._running or (self._soon is not None and self._soon.active()):
            return
        delay = self._soon_delay
        if self.refresh:
            delay = min(delay, self.refresh)
        self._soon_delay = min(delay * 2, self.refresh or 60.0)
        self._soon = self.clock.callLater(delay, self._refresh)

    def _got_readers(self, result):
        """An answer to :meth:`_readers_call`: ``(OWNER's result, READERS'
        result)``, or READERS' alone (no owner id)."""
        try:
            self._listed(*(result if isinstance(result, tuple) else (errors.FAILED, result)))
        finally:
            if self._claims is not None:
                self._claims.settled(self)

    def _listed(self, answer, result):
        if result is None or errors.is_error(result):
            self.log.warn("upstream {upstream} answered READERS with {result}",
                          upstream=self.where, result=result)
            self._again_soon()
            return
        owner = self._owner_answer(answer)
        names = []
        cap = self._cap
        cap.begin()
        rest = result
        while rest is not None:
            # Split no further than needed: a listing may hold far more names than are kept.
            room = self.readers_max - len(names) + 16
            tokens = rest.split("|", room)
            rest = tokens.pop() if len(tokens) > room else None
            for i, token in enumerate(tokens):
                token = token.strip()
                if not token:
                    continue
                if len(names) >= self.readers_max:
                    left = sum(1 for t in tokens[i:] if t.strip())
                    if rest is not None:  # counted, not split: blank tokens count too
                        left += rest.count("|") + 1
                    cap.too_many(left)
                    rest = None
                    break
                try:
                    name = base64.b64decode(token, validate=True).decode("utf-8")
                except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
                    cap.invalid(token)
                    continue
                if cap.fits(name):
                    names.append(name)
        cap.end(self.log)
        names = tuple(dict.fromkeys(names))
        if names:
            self._soon_delay = EMPTY_RETRY
        else:
            self._again_soon()  # e.g. an upstream proxy still finding its cards
        if self._registry is None or (names == self.listing and owner == (self.owner or "")):
            return
        why = self._refusal(owner, names)
        if why is not None:
            self._refuse(why)
            return
        if self._refused is not None:
            self.log.info("upstream {upstream}: its readers are listed again", upstream=self.where)
            self._refused = None
        self.owner, self._named = owner or None, True
        if owner and self.persistent is not True:
            # Only a proxy like this one answers OWNER with an id, and it keeps
            # connections: pipeline now rather than learn it (a quick restart
            # of the owner must not look like "one request per connection").
            self._keeps_connections("upstream {upstream} is owner {owner}, so it keeps connections "
                                    "open: pipelining requests", owner=owner)
        self.listing = names
        self._lines = {}
        prefix = self._prefix(owner)
        self._updates.update(names, lambda n: ReaderInfo(n, prefix + n))

    def _prefix(self, owner):
        """What goes before the upstream's reader names here."""
        if self.prefix is not None:
            return self.prefix
        return owner + "/" if owner else ""

    def _owner_answer(self, answer):
        """The owner id in OWNER's result, else ``""``: an upstream without
        one (``C081``: foxyproxy 2.10, an older proxy; anything else that is
        not an id is said once in the log)."""
        if is_owner_id(answer):
            return answer
        if answer != errors.FAILED and not self._named and answer != self._odd_owner:
            self._odd_owner = answer
            self.log.warn("upstream {upstream} answered OWNER with {answer!r}, not an owner id: "
                          "its readers are named as an upstream's without one", upstream=self.where,
                          answer=str(answer)[:80])
        return ""

    def _refusal(self, owner, names):
        """Why the upstream's readers (owner id ``owner``, names ``names``)
        cannot be listed, or None; claims ``owner`` when they can."""
        if self._named and owner != (self.owner or ""):
            self.listing = ()
            self._updates.update(())  # another owner at this address: none of its readers
            return (f"it now answers OWNER with {owner or 'no id'!r}, not {self.owner or 'no id'!r}: its "
                    "readers are not listed until it answers as before (restart this proxy to take the new owner)")
        by_owner = owner and self.prefix is None  # names made of the owner id: one upstream per id
        holder = self._claims.holder(owner) if by_owner else None
        if holder is not None and holder is not self:
            return f"owner id {owner!r} is already that of {holder.where} (two upstreams with one owner id)"
        prefix = self._prefix(owner)
        taken = self._registry.taken(self, [prefix + n for n in names])
        if taken:
            more = f" and {len(taken) - 3} more" if len(taken) > 3 else ""
            return (f"reader name(s) {', '.join(repr(t) for t in taken[:3])}{more} are another "
                    "backend's already")
        if by_owner:
            self._claims.claim(self, owner)
        return None

    def _refuse(self, why):
        """Do not list this listing (a conflict): fatal at start-up
        (owners.OwnerClaims), else one log line per reason."""
        message = f"backend {self.where}: {why}"
        if self._claims.refused(self, message) or why == self._refused:
            return
        self._refused = why
        self.log.warn("{refusal}; its readers are not listed", refusal=message)

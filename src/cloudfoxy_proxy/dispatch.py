"""Runs parsed requests: reader resolution, per-card scheduling, timeouts,
and the mapping of every outcome to a result line; ``Dispatcher.identify``
is the one access check of every front end.  One request in progress is
a ``run.RequestRun``.

``Dispatcher.execute`` returns the response lines directly when every
command finished at once (the hot path: no Deferred, lock or callback) and
a Deferred for them otherwise.
"""

import hmac

from twisted.internet.defer import Deferred, fail, succeed

from . import errors
from .access import Access, Throttle, is_local
from .interfaces import MAX_ATR, MAX_RESPONSE, MIN_ATR, bad_result
from .errors import CardError
from .logs import Logger, RateLimitedLog
from .parser import (
    ALIASES, CHAIN, ENUM, LIST, OWNER, PERSONALIZE, READERS, Request,
)
from .parser import CLIENT
from .registry import QueueFull, b64name
from .run import RequestRun
from .sessions import CardSession
from .timeouts import Deadlines


def _same(given, cached):
    """Constant-time comparison of a presented secret with the cached one."""
    try:
        return hmac.compare_digest(given, cached)
    except TypeError:  # not ASCII
        return hmac.compare_digest(given.encode("utf-8"), cached.encode("utf-8"))


def _timed_out(waiter):
    waiter.timed_out()


class Session:
    """What a client connection remembers between requests: the PERSONALIZE
    tag, the peer address for logs (``peer``, ``host:port``), the card it
    holds (``card``: a :class:`CardSession`, or None), and who it is.

    Front ends set ``frontend`` (``line``, ``rest``, ``api``, ``ram``,
    ``vpcd``), ``host`` (the peer's IP address; None: not an IP peer, e.g. a
    UNIX socket or the process itself) and ``counters`` (an object with an
    ``auth_failures`` attribute, counted for metrics).  A front end that
    authenticates the connection itself (a verified client certificate, an
    operator-configured bridge) sets ``identity`` (an access.Identity) and
    ``fixed = True``: the reader line's password is then only a PIN.
    Otherwise :meth:`Dispatcher.identify` sets ``identity`` from the first
    secret that proves one and remembers that secret (``given``), so later
    requests of the connection cost a comparison, no hashing.  ``drop``
    becomes True when the connection must be closed (too many failed
    authentications).  ``seen`` holds the card generation each reader's
    card had at the connection's last command (a change since: ``C080``
    once, docs/backends.md "Resets").
    """

    __slots__ = ("tag", "peer", "card", "frontend", "host", "counters", "identity", "fixed", "given",
                 "pin", "failures", "drop", "seen", "on_behalf_of")

    def __init__(self, peer="", frontend="line", host=None, identity=None, counters=None):
        self.tag = None
        self.peer = peer
        self.card = None
        self.frontend = frontend
        self.host = host
        self.counters = counters
        self.identity = identity
        self.fixed = identity is not None
        self.given = None
        self.pin = None
        self.failures = 0
        self.drop = False
        #: Reader -> the card's reset generation this connection last saw
        #: (registry.Reader.generation; at most one entry per reader)
        self.seen = {}
        #: who a relaying proxy on this connection acts for (relay.py: CLIENT), or None
        self.on_behalf_of = None


class Dispatcher:
    """Executes requests against the reader registry.

    ``clock`` bounds every backend call with ``command_timeout`` seconds;
    ``access`` (an access.Access; None: ``Access()``, no credentials, i.e.
    protected mode) says who may use which reader, command and front end:
    :meth:`identify` is the one place every front end's requests are
    checked (docs/security.md).  ``signing``, when set (tap.py sets a
    signing.index.CertIndex), answers ENUM, ALIASES, CHAIN and SIGN.
    ``audit``, when set, is an audit.AuditLog.  ``queue_timeout`` (seconds;
    None: ``command_timeout``) bounds the wait of a request or a card
    session in a card's queue (behind a busy card or one held by a card
    session): then its commands are answered ``C086`` and it leaves the
    queue; the card never runs them.  The wait and the command's own time
    on the card (``command_timeout``) are separate bounds.
    """

    log = Logger()

    def __init__(self, registry, clock, command_timeout=15.0, access=None, queue_timeout=None):
        self.registry = registry
        self.clock = clock
        self.command_timeout = command_timeout
        self.queue_timeout = command_timeout if queue_timeout is None else queue_timeout
        #: the waiters in card queues (RequestRun, CardSession), each told
        #: ``timed_out()`` after ``queue_timeout`` seconds without its turn
        self.queue_deadlines = Deadlines(clock, self.queue_timeout, _timed_out)
        self.access = Access() if access is None else access
        self.throttle = Throttle()
        self.auth_log = RateLimitedLog(clock, self.log, what="authentication failures")
        self._protected_warned = {}  # peer hosts told about protected mode (bounded)
        self.audit = None
        self.signing = None
        self.deadlines = Deadlines(clock, command_timeout)
        self.client_log = RateLimitedLog(clock, self.log, what="client log lines")
        self._rejected = {}  # reader name -> [next warn time, results not warned about]
        #: a metrics.Metrics counting every command result, or None
        self.metrics = None
        #: a trace.Tracer recording card exchanges (--trace), or None
        self.trace = None
        #: requests answered later, in start order (``give_up`` on shutdown)
        self.pending = {}
        #: this proxy's ``--owner-id``, the answer to OWNER (None: C081)
        self.owner_id = None

    def execute(self, request, session, unresolved=None):
        """Response lines (``(id, result)`` pairs) or a Deferred for them;
        a Deferred's ``cancel()`` abandons the request (client gone).
        ``unresolved``: a result code (C083, C082) that the front end's own
        reader resolution gave; the card commands answer it once authorized
        (and the request is audited like any other)."""
        if self.signing is not None and request.password is not None:
            self.signing.reader_line(request)  # a FoxyProxy 2.10 alias holds ":" (signing/index.py)
        run = RequestRun(self, request, session)
        if unresolved is not None:
            run.reader = unresolved
        if run.step():
            if self.audit is not None:
                self.audit.request(run)
            return run.lines
        run.deferred = Deferred(run.cancel)
        self.pending[run] = None
        return run.deferred

    def hold(self, reader, session, idle_timeout=None, max_duration=None, password=None):
        """Open a :class:`CardSession` on the reader line ``reader`` for
        ``session`` (which must not hold a card yet): a Deferred firing with
        it once the card is granted (cancel it to give up waiting), or
        failing with a CardError (``C083``/``C082`` no such reader,
        ``C085`` wrong password, ``C086`` queue full, card reserved, or no
        turn within ``queue_timeout`` seconds)."""
        if session.card is not None:
            raise ValueError("this session holds a card already")
        request = Request(reader, password, [])
        identity, _pin, _delay = self.identify(request, session)
        found = identity if isinstance(identity, str) else self.target(request, identity)
        if isinstance(found, str):
            return fail(CardError(found, f"reader {reader!r}"))
        if found.exclusive and found.holder is not None:
            return fail(CardError(errors.UPSTREAM, f"{found.name} is reserved"))
        card = CardSession(self, found, session, idle_timeout, max_duration)
        d = card.opened = Deferred(card._cancel_wait)
        try:
            got = found.queue.acquire(card)
        except QueueFull:
            card.opened = None
            return fail(CardError(errors.UPSTREAM, f"queue of {found.name} is full"))
        if got:
            card.granted()
        else:
            self.queue_deadlines.watch(card)
        return d

    def give_up(self, code):
        """Answer every request still waiting with ``code`` for each of its
        unanswered commands, now (the end of a drain on shutdown)."""
        for run in list(self.pending):
            run.give_up(code)

    def submit(self, reader, commands, password=None, session=None):
        """For front ends other than the line protocol (REST, vpcd bridge):
        run ``commands`` (parser.Command objects, e.g. from
        ``parser.make_command(["1", "APDU", hex])``) on the reader line
        ``reader`` under the same per-card scheduling; a Deferred firing
        with the ``(id, result)`` pairs.  ``errors.is_error(result)`` tells
        a result code from an answer."""
        result = self.run(reader, commands, password, session)
        return result if isinstance(result, Deferred) else succeed(result)

    def run(self, reader, commands, password=None, session=None, unresolved=None):
        """:meth:`submit`, but the list of pairs itself when the card
        answered at once (no Deferred: the API's hot path); ``unresolved``
        as for :meth:`execute`."""
        return self.execute(Request(reader, password, list(commands)), session or Session(), unresolved)

    def result(self, value, atr, reader):
        """A backend's answer as a result: the hex of a response APDU
        (2..65,538 bytes) or, when ``atr``, of an ATR (2..33 bytes);
        anything else is ``C086`` (see IBackend)."""
        if type(value) is bytes and (MIN_ATR <= len(value) <= MAX_ATR if atr
                                     else 2 <= len(value) <= MAX_RESPONSE):
            return value.hex().upper()
        self._reject(reader, bad_result(value, atr))
        return errors.UPSTREAM

    #: At most one warning per reader this often about results refused (C086).
    REJECT_WARN_EVERY = 10.0

    def _reject(self, reader, why):
        now = self.clock.seconds()
        state = self._rejected.get(reader.name)
        if state is not None and now < state[0]:
            state[1] += 1
            return
        more = state[1] if state is not None else 0
        self._rejected[reader.name] = [now + self.REJECT_WARN_EVERY, 0]
        self.log.warn("backend {backend} gave {why} for reader {reader}: answered C086"
                      "{more}", backend=reader.backend.description, why=why, reader=reader.name,
                      more=f" ({more} more such results since the last warning)" if more else "")

    def simple(self, command, session, request=None, identity=None):
        """The result of a command that needs no card, or a Deferred for it
        (ENUM, ALIASES, CHAIN while the certificate index probes a card);
        ``identity`` (None: every reader) limits what is listed."""
        name = command.name
        sees = None if identity is None or identity.readers is None else identity.sees
        if name == READERS or name == LIST:
            if sees is None:
                return self.registry.listing
            return "|".join(b64name(r.name) for r in self.registry.readers if sees(r))
        if name == OWNER:
            return self.owner_id or errors.FAILED
        if name == PERSONALIZE:
            session.tag = command.data[:100]  # a client tag, not a store for client bytes
            self.client_log.info("client {peer} personalized as {tag!r}", peer=session.peer,
                                 tag=session.tag)
            return "OK"
        if self.signing is not None and (name == ENUM or name == ALIASES or name == CHAIN):
            return self.signing.command(name, command, request, sees)
        if name == CLIENT:
            from .relay import client_command

            return client_command(self, command, session, identity)
        return errors.FAILED

    def target(self, request, identity=None):
        """The reader a request's card commands run on, or a result code;
        a reader ``identity`` may not see does not exist for it (C083)."""
        try:
            if identity is None or identity.readers is None:
                return self.registry.resolve(request.reader)
            registry = self.registry
            text = request.reader
            cache = identity.resolved
            if cache.get(None) is not registry.readers:  # the readers changed: start again
                cache.clear()
                cache[None] = registry.readers
            found = cache.get(text)
            if found is None:
                sees = identity.sees
                found = registry.resolve(text, sees=sees)
                if len(cache) < 256 and len(text) <= 256:
                    cache[text] = found
            return found
        except CardError as e:
            return e.code

    def identify(self, request, session):
        """Who sends ``request`` on ``session``: ``(identity, pin, delay)``
        with an access.Identity and SIGN's PIN (the reader line's password
        after the secret and its ``:``), or ``(code, None, delay)`` when it
        may not run (``C085``; answer after ``delay`` seconds: a throttled
        guess).  The single enforcement point of docs/security.md."""
        given = request.password
        if session.fixed:
            identity = session.identity
        elif given is None and session.identity is not None:
            return session.identity, None, 0.0  # authenticated earlier on this connection
        elif given is not None and given is session.given:
            return session.identity, session.pin, 0.0  # the connection's secret again: no hashing
        else:
            access = self.access
            if access.modes.get(session.frontend, access.mode) == "open":
                if not (access.allow_anonymous or is_local(session.host)):
                    self.protected(session)
                    return errors.BAD_PIN, None, 0.0
                identity, pin = access.anonymous, given
            elif given is None:
                return errors.BAD_PIN, None, 0.0  # no secret presented: not a guess
            else:
                cached = session.given
                if cached is not None and _same(given, cached):
                    return session.identity, session.pin, 0.0
                identity, pin = access.check(given, session.frontend)
                if identity is None:
                    return (errors.BAD_PIN, None) + (self._failed(session, "wrong password or secret"),)
            if not identity.serves(session.frontend):
                self.throttle.identity_failed(identity.name)
                return (errors.BAD_PIN, None) + (self._failed(session, "front end not allowed", identity),)
            session.identity, session.given, session.pin = identity, given, pin
            return identity, pin, 0.0
        if not identity.serves(session.frontend):
            self.throttle.identity_failed(identity.name)
            return (errors.BAD_PIN, None) + (self._failed(session, "front end not allowed", identity),)
        return identity, given, 0.0

    def _failed(self, session, why, identity=None):
        """Count, log and audit a failed authentication; the seconds its
        answer waits (access.Throttle).  Never logs the presented value."""
        session.failures += 1
        counters = session.counters
        if counters is not None:
            counters.auth_failures += 1
        host = session.host or session.peer
        delay = self.throttle.failed(host, self.clock.seconds())
        if delay is None or session.failures >= self.throttle.CLOSE_AFTER:
            session.drop = True
        self.auth_log.warn(
            "client {peer}: authentication failed on {frontend} ({why}{who}), refused with C085; "
            "{n} failures from this address{action}", peer=session.peer, frontend=session.frontend, why=why,
            who=f", client {identity.name}" if identity is not None else "",
            n=self.throttle.failures(host),
            action=", closing the connection" if session.drop else (
                f", answered after {delay:.2f} s" if delay else ""))
        if self.audit is not None:
            self.audit.auth_failure(session, why, identity)
        return delay or 0.0

    #: Peer hosts remembered as told about protected mode (then forgotten).
    MAX_WARNED = 1000

    def protected(self, session):
        """A non-loopback client in protected mode: said once per peer."""
        host = session.host
        warned = self._protected_warned
        if host in warned:
            return
        if len(warned) >= self.MAX_WARNED:
            warned.clear()
        warned[host] = None
        if session.counters is not None:
            session.counters.auth_failures += 1
        self.auth_log.warn(
            "client {peer}: refused (C085) on {frontend}: protected mode serves only loopback clients "
            "when no credentials are configured; open the proxy with --credentials FILE (or "
            "--client-password-file), or explicitly with --allow-anonymous",
            peer=session.peer, frontend=session.frontend)

    def sign(self, reader, command, request, pin=None):
        """SIGN on ``reader`` (held by the request): signature bytes or a Deferred."""
        if self.signing is None:
            raise CardError(errors.FAILED, "no certificate index")
        return self.signing.sign(reader, request.reader, pin, command.data, command.obj)

"""Runs parsed requests: reader resolution, per-card scheduling, timeouts,
and the mapping of every outcome to a result line.

``Dispatcher.execute`` returns the response lines directly when every
command finished at once (the hot path: no Deferred, lock or callback) and
a Deferred for them otherwise.
"""

import hmac
from time import perf_counter

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.task import deferLater

from . import errors
from .access import Access, Throttle, is_local
from .interfaces import MAX_ATR, MAX_RESPONSE, MIN_ATR, bad_result
from .errors import CardError
from .logs import Logger, RateLimitedLog
from .parser import (
    ALIASES, APDU, CARD_COMMANDS, CHAIN, ENUM, LIST, PERSONALIZE, READERS, RESET, SIGN, Request,
)
from .registry import QueueFull, b64name
from .sessions import CardSession
from .timeouts import Deadlines


def _same(given, cached):
    """Constant-time comparison of a presented secret with the cached one."""
    try:
        return hmac.compare_digest(given, cached)
    except TypeError:  # not ASCII
        return hmac.compare_digest(given.encode("utf-8"), cached.encode("utf-8"))


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
    authentications).
    """

    __slots__ = ("tag", "peer", "card", "frontend", "host", "counters", "identity", "fixed", "given",
                 "pin", "failures", "drop")

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


class Dispatcher:
    """Executes requests against the reader registry.

    ``clock`` bounds every backend call with ``command_timeout`` seconds;
    ``access`` (an access.Access; None: ``Access()``, no credentials, i.e.
    protected mode) says who may use which reader, command and front end:
    :meth:`identify` is the one place every front end's requests are
    checked (docs/security.md).  ``signing``, when set (tap.py sets a
    signing.index.CertIndex), answers ENUM, ALIASES, CHAIN and SIGN.
    ``audit``, when set, is an audit.AuditLog.
    """

    log = Logger()

    def __init__(self, registry, clock, command_timeout=15.0, access=None):
        self.registry = registry
        self.clock = clock
        self.command_timeout = command_timeout
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
        #: requests answered later, in start order (``give_up`` on shutdown)
        self.pending = {}

    def execute(self, request, session):
        """Response lines (``(id, result)`` pairs) or a Deferred for them;
        a Deferred's ``cancel()`` abandons the request (client gone)."""
        run = _Run(self, request, session)
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
        ``C085`` wrong password, ``C086`` queue full or card reserved)."""
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

    def run(self, reader, commands, password=None, session=None):
        """:meth:`submit`, but the list of pairs itself when the card
        answered at once (no Deferred: the API's hot path)."""
        return self.execute(Request(reader, password, list(commands)), session or Session())

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
        if name == PERSONALIZE:
            session.tag = command.data[:100]  # a client tag, not a store for client bytes
            self.client_log.info("client {peer} personalized as {tag!r}", peer=session.peer,
                                 tag=session.tag)
            return "OK"
        if self.signing is not None and (name == ENUM or name == ALIASES or name == CHAIN):
            return self.signing.command(name, command, request, sees)
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
                found = registry._one([r for r in registry.match(text) if sees(r)] if text is not None
                                      else [], text)
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


#: What a step of ``_Run.step`` gives when its command cannot go on: its
#: result line is in (on to the next command), or the request waits.
_ANSWERED = object()
_WAITING = object()


class _Run:
    """One request in progress: a trampoline over its commands that only
    becomes asynchronous when a card is busy or a backend answers later."""

    __slots__ = ("d", "request", "session", "lines", "i", "reader", "holding", "queue", "card",
                 "abandoned", "deferred", "_stepping", "_pending", "_call", "_batch_end",
                 "started", "identity", "pin", "_sleep", "begun")

    log = Logger()

    def __init__(self, dispatcher, request, session):
        self.d = dispatcher
        self.request = request
        self.session = session
        self.lines = []
        self.i = 0
        self.reader = None  # a Reader, a result code, or None (not looked up yet)
        self.holding = False
        self.queue = None  # the queue holding our place: the card's, or a card session's
        self.card = None  # the CardSession whose queue that is
        self.abandoned = False
        self.deferred = None
        self._stepping = False
        self._pending = False
        self._call = None
        self._batch_end = None
        self.started = self.begun = perf_counter()  # start of the current command (metrics), of the request
        self.identity = None  # an access.Identity or a result code, once known
        self.pin = None
        self._sleep = None  # the delay of a throttled failed authentication

    def step(self):
        """Run commands until done (True) or waiting (False): each is
        authorized (``_authorize``), answered without a card
        (``_call_simple``) or run on its reader once the request has its
        turn there (``_enter_queue``, then ``_call_batch`` or
        ``_call_backend``)."""
        self._stepping = True
        try:
            commands = self.request.commands
            while self.i < len(commands):
                if self.abandoned:
                    break
                command = commands[self.i]
                if command.error is not None:
                    self._result(command.error)
                    continue
                identity = self._authorize(command)
                if identity is _ANSWERED:
                    continue
                if identity is _WAITING:
                    return False
                if command.name not in CARD_COMMANDS:
                    if not self._call_simple(command, identity):
                        return False
                    continue
                reader = self.reader
                if reader is None:
                    reader = self.reader = self.d.target(self.request, identity)
                if reader.__class__ is str:  # a result code: no such reader for this client
                    self._result(reader)
                    continue
                entered = self._enter_queue(reader)
                if entered is _ANSWERED:
                    continue
                if entered is _WAITING:
                    return False
                if reader.batch is not None and command.name != SIGN:
                    end = self._run_end()
                    if end:
                        if not self._call_batch(reader, end):
                            return False
                        continue
                if not self._call_backend(reader, command):
                    return False
            self._release()
            return True
        finally:
            self._stepping = False

    def _authorize(self, command):
        """Who runs ``command``: an access.Identity, or None for simple
        mode's listings (they need no secret; a wrong one is ignored).
        ``_ANSWERED`` when it may not run (its line is the refusal: C085,
        or the code ``Dispatcher.identify`` gave), ``_WAITING`` while a
        throttled refusal waits.  The request's secret is judged once, at
        its first command that needs one."""
        identity = self.identity
        name = command.name
        if identity is not None and identity.__class__ is not str:  # known: the common case
            if identity.commands is not None and name not in identity.commands:
                self._result(errors.BAD_PIN)  # a command this client may not use
                return _ANSWERED
            return identity
        open_commands = self.d.access.open_commands.get(self.session.frontend, ())
        if identity is None and name not in open_commands:
            identity, self.pin, delay = self.d.identify(self.request, self.session)
            self.identity = identity
            if delay:
                self._sleep = deferLater(self.d.clock, delay, lambda: identity)
                return _ANSWERED if self._wait(self._sleep) else _WAITING
        if identity is None or (identity.__class__ is str and name in open_commands):
            return None
        if identity.__class__ is str:
            self._result(identity)
            return _ANSWERED
        if identity.commands is not None and name not in identity.commands:
            self._result(errors.BAD_PIN)  # a command this client may not use
            return _ANSWERED
        return identity

    def _call_simple(self, command, identity):
        """Answer a command that needs no card (``Dispatcher.simple``);
        False if its answer comes later (ENUM/ALIASES/CHAIN waiting for a
        probe)."""
        result = self.d.simple(command, self.session, self.request, identity)
        if isinstance(result, Deferred):
            return self._wait(result)
        self._result(result)
        return True

    def _enter_queue(self, reader):
        """Take the request's turn on ``reader``, once: in its card's queue,
        or in the queue of the card session this connection holds on it
        (kept until ``_release``).  None when the command may run;
        ``_ANSWERED`` when it may not (another connection reserved the
        reader, the queue is full, the card session ended); ``_WAITING``
        until the queue grants the turn (``granted``)."""
        if not self.holding:
            queue = reader.queue
            card = self.session.card
            if card is not None and card.reader is reader:
                queue = card.queue  # the holder's requests (CardSession)
                self.card = card
            elif reader.exclusive and reader.holder is not None and reader.holder is not self.session:
                self._result(errors.UPSTREAM)  # reserved (docs/vpcd.md, exclusive=1)
                return _ANSWERED
            self.queue = queue
            try:
                got = queue.acquire(self)
            except QueueFull:
                self.d.client_log.info("client {peer}: queue of {reader} is full (--max-queue)",
                                       peer=self.session.peer, reader=reader.name)
                self._result(errors.UPSTREAM)
                return _ANSWERED
            if not got:
                self._pending = True
                return _WAITING
            self.holding = True
        if self.card is not None and self.card.state != CardSession.HELD:
            self._result(errors.NO_CARD)  # the card session ended: its card state is gone
            return _ANSWERED
        return None

    def _call_backend(self, reader, command):
        """Run one card command; False if its answer comes later."""
        backend = reader.backend
        try:
            if command.name == APDU:
                result = backend.transmit(reader.key, command.apdu)
            elif command.name == RESET:
                self.d.registry.card_reset(reader, self.session)
                result = backend.reset(reader.key)
            else:
                result = self.d.sign(reader, command, self.request, self.pin)
        except CardError as e:
            self._result(e.code)
            return True
        except Exception:
            self.log.failure("backend {backend} failed on {reader}",
                             backend=backend.description, reader=reader.name)
            self._result(errors.INTERNAL)
            return True
        if type(result) is bytes and command.name == APDU and 2 <= len(result) <= MAX_RESPONSE:
            self._result(result.hex().upper())  # the hot path
            return True
        if not isinstance(result, Deferred):
            self._result(self._value(result, command.name, reader))
            return True
        self._pending = True
        self._call = result
        self.d.deadlines.watch(result)
        result.addCallbacks(self._answered, self._failed, errbackArgs=(reader,))
        return not self._pending

    def _wait(self, d):
        """A command's result comes later from ``d`` (a result string); False
        if it has not come yet."""
        self._pending = True
        self._call = d
        d.addBoth(self._waited)
        return not self._pending

    def _waited(self, result):
        self._call = None
        if not isinstance(result, str):
            if not self.abandoned:  # else: a throttled answer's delay, cancelled (client gone)
                self.log.failure("request failed", result)
            result = errors.INTERNAL
        self._result(result)
        self._resume()

    def _run_end(self):
        """The end of the run of RESET/APDU commands (and commands already
        answered with a parse error) starting here, if it holds at least
        two card commands; else None."""
        commands = self.request.commands
        end = self.i
        steps = 0
        while end < len(commands):
            command = commands[end]
            if command.error is None:
                if command.name != RESET and command.name != APDU:
                    break
                steps += 1
            end += 1
        return end if steps >= 2 else None

    def _call_batch(self, reader, end):
        """Run commands ``i..end`` with the backend's ``transmit_batch``;
        False if their answers come later."""
        steps = []
        for command in self.request.commands[self.i:end]:
            if command.error is not None:
                continue
            if command.name == RESET:
                self.d.registry.card_reset(reader, self.session)
                steps.append((RESET, None))
            else:
                steps.append((APDU, command.apdu))
        self._batch_end = end
        try:
            result = reader.batch(reader.key, steps)
        except CardError as e:
            self._batch_results(e.code, reader)
            return True
        except Exception:
            self.log.failure("backend {backend} failed on {reader}",
                             backend=reader.backend.description, reader=reader.name)
            self._batch_results(errors.INTERNAL, reader)
            return True
        if not isinstance(result, Deferred):
            self._batch_results(result, reader)
            return True
        self._pending = True
        self._call = result
        result.addTimeout(self.d.command_timeout * len(steps), self.d.clock)
        result.addCallbacks(self._batch_answered, self._failed, errbackArgs=(reader,))
        return not self._pending

    def _batch_results(self, values, reader):
        """One line per command of the run: its parse error, or its step's
        result (checked like any backend result); ``values`` a list of
        results or one result code for every step."""
        commands = self.request.commands
        k = 0
        for command in commands[self.i:self._batch_end]:
            if command.error is not None:
                self._result(command.error)
                continue
            value = values if isinstance(values, str) else (
                values[k] if k < len(values) else CardError(errors.UPSTREAM, "no result"))
            k += 1
            if isinstance(value, CardError):
                value = value.code
            elif isinstance(value, str):
                value = value if errors.is_error(value) else errors.INTERNAL
            else:
                value = self.d.result(value, command.name == RESET, reader)
            self._result(value)
        self._batch_end = None

    def _batch_answered(self, values):
        self._call = None
        if not isinstance(values, list):
            values = errors.INTERNAL  # a backend bug
        self._batch_results(values, self.reader)
        self._resume()

    def _value(self, result, name, reader):
        if name == SIGN:
            return result.hex().upper()  # a signature, not a card's answer
        return self.d.result(result, name == RESET, reader)

    def _result(self, value):
        self.lines.append((self.request.commands[self.i].id, value))
        self.i += 1
        if self.d.metrics is not None:
            self.started = self.d.metrics.record(self, value)

    def _answered(self, result):
        self.d.deadlines.forget(self._call)
        self._call = None
        self._result(self._value(result, self.request.commands[self.i].name, self.reader))
        self._resume()

    def _failed(self, failure, reader):
        self.d.deadlines.forget(self._call)
        self._call = None
        if failure.check(CardError):
            code = failure.value.code
        elif failure.check(TimeoutError, CancelledError):
            if not self.abandoned:
                self.log.warn("command timed out after {timeout}s on {reader}",
                              timeout=self.d.command_timeout, reader=reader.name)
            code = errors.UPSTREAM
        else:
            self.log.failure("backend {backend} failed on {reader}", failure,
                             backend=reader.backend.description, reader=reader.name)
            code = errors.INTERNAL
        if self._batch_end is not None:
            self._batch_results(code, reader)
        else:
            self._result(code)
        self._resume()

    def granted(self):
        """The card queue says it is our turn."""
        self.holding = True
        self._resume()

    def _resume(self):
        self._pending = False
        if self._stepping:
            return  # a synchronous answer: step()'s loop carries on
        try:
            done = self.step()
        except Exception:
            done = True
            self._release()
            self.log.failure("request failed")
            self.lines.extend((c.id, errors.INTERNAL) for c in self.request.commands[self.i:])
        if done and self.d.audit is not None:
            self.d.audit.request(self)
        if done and self.deferred is not None and not self.abandoned:
            self.d.pending.pop(self, None)
            self.deferred.callback(self.lines)

    def _release(self):
        if self.holding:
            self.holding = False
            reader = self.reader
            queue = self.queue
            if queue is reader.queue:
                if reader.release is not None:
                    reader.release(reader.key)
                queue.release()
            else:  # a card session's turn: the card stays held
                queue.release()
                self.card.request_done()

    def cancel(self, _deferred):
        """The client went away: leave the card's queue at once if waiting in
        it (no longer counted against ``--max-queue``); a command in flight
        finishes on the card, then the card goes to the next request."""
        self.d.pending.pop(self, None)
        if self._pending and not self.holding and not self._stepping and self._call is None:
            self.queue.leave(self)  # queued by step(), not granted yet
            return
        self.abandoned = True
        sleep, self._sleep = self._sleep, None
        if sleep is not None and not sleep.called:
            sleep.cancel()
        if not self._stepping and self._call is None:
            self._release()

    def give_up(self, code):
        """Answer now: ``code`` for every command not answered yet; a
        command in flight finishes on the card as after ``cancel``."""
        lines = self.lines + [(c.id, code) for c in self.request.commands[self.i:]]
        self.cancel(None)
        self.deferred.callback(lines)

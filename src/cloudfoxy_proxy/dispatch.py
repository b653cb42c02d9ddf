"""Runs parsed requests: reader resolution, per-card scheduling, timeouts,
and the mapping of every outcome to a result line.

``Dispatcher.execute`` returns the response lines directly when every
command finished at once (the hot path: no Deferred, lock or callback) and
a Deferred for them otherwise.
"""

import hmac
from time import perf_counter

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed

from . import errors
from .errors import CardError
from .logs import Logger
from .parser import (
    ALIASES, APDU, CARD_COMMANDS, CHAIN, ENUM, LIST, PERSONALIZE, READERS, RESET, Request,
)
from .registry import QueueFull
from .timeouts import Deadlines


class Session:
    """What a connection remembers between requests (the PERSONALIZE tag)."""

    __slots__ = ("tag", "peer")

    def __init__(self, peer=""):
        self.tag = None
        self.peer = peer


class Dispatcher:
    """Executes requests against the reader registry.

    ``clock`` bounds every backend call with ``command_timeout`` seconds;
    ``password``, when set, is required on the reader line of card commands
    (``READER:PASSWORD``; for SIGN ``ALIAS:PASSWORD:PIN``, see
    docs/signing.md).  ``signing``, when set (tap.py sets a
    certindex.CertIndex), answers ENUM, ALIASES, CHAIN and SIGN.
    """

    log = Logger()

    def __init__(self, registry, clock, command_timeout=15.0, password=None):
        self.registry = registry
        self.clock = clock
        self.command_timeout = command_timeout
        self.password = password
        self.signing = None
        self.deadlines = Deadlines(clock, command_timeout)
        #: a metrics.Metrics counting every command result, or None
        self.metrics = None
        #: requests answered later, in start order (``give_up`` on shutdown)
        self.pending = {}

    def execute(self, request, session):
        """Response lines (``(id, result)`` pairs) or a Deferred for them;
        a Deferred's ``cancel()`` abandons the request (client gone)."""
        run = _Run(self, request, session)
        if run.step():
            return run.lines
        run.deferred = Deferred(run.cancel)
        self.pending[run] = None
        return run.deferred

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
        result = self.execute(Request(reader, password, list(commands)), session or Session())
        return result if isinstance(result, Deferred) else succeed(result)

    def simple(self, command, session, request=None):
        """The result of a command that needs no card."""
        name = command.name
        if name == READERS or name == LIST:
            return self.registry.listing
        if name == PERSONALIZE:
            session.tag = command.data
            self.log.info("client {peer} personalized as {tag!r}", peer=session.peer,
                          tag=command.data[:100])
            return "OK"
        if self.signing is not None and (name == ENUM or name == ALIASES or name == CHAIN):
            return self.signing.command(name, command, request)
        return errors.FAILED

    def target(self, request):
        """The reader a request's card commands run on, or a result code."""
        if self.password is not None and not self._client_ok(request.password or ""):
            return errors.BAD_PIN
        try:
            return self.registry.resolve(request.reader)
        except CardError as e:
            return e.code

    def _client_ok(self, given):
        """The reader line's password is the client password, alone or
        followed by ``:PIN`` (SIGN)."""
        n = len(self.password)
        return hmac.compare_digest(given[:n].encode("utf-8"), self.password.encode("utf-8")) and (
            len(given) == n or given[n] == ":")

    def pin(self, request):
        """SIGN's PIN: the reader line's password, after the client password
        and its ``:`` when a client password is configured."""
        given = request.password
        if given is None or self.password is None:
            return given
        return given[len(self.password) + 1:] or None

    def sign(self, reader, command, request):
        """SIGN on ``reader`` (held by the request): signature bytes or a Deferred."""
        if self.signing is None:
            raise CardError(errors.FAILED, "no certificate index")
        return self.signing.sign(reader, request.reader, self.pin(request), command.data, command.obj)


class _Run:
    """One request in progress: a trampoline over its commands that only
    becomes asynchronous when a card is busy or a backend answers later."""

    __slots__ = ("d", "request", "session", "lines", "i", "reader", "holding",
                 "abandoned", "deferred", "_stepping", "_pending", "_call",
                 "started")

    log = Logger()

    def __init__(self, dispatcher, request, session):
        self.d = dispatcher
        self.request = request
        self.session = session
        self.lines = []
        self.i = 0
        self.reader = None  # a Reader, a result code, or None (not looked up yet)
        self.holding = False
        self.abandoned = False
        self.deferred = None
        self._stepping = False
        self._pending = False
        self._call = None
        self.started = perf_counter()  # start of the current command (metrics)

    def step(self):
        """Run commands until done (True) or waiting (False)."""
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
                if command.name not in CARD_COMMANDS:
                    self._result(self.d.simple(command, self.session, self.request))
                    continue
                reader = self.reader
                if reader is None:
                    reader = self.reader = self.d.target(self.request)
                if isinstance(reader, str):
                    self._result(reader)
                    continue
                if not self.holding:
                    try:
                        got = reader.queue.acquire(self)
                    except QueueFull:
                        self.log.info("queue of {reader} is full", reader=reader.name)
                        self._result(errors.UPSTREAM)
                        continue
                    if not got:
                        self._pending = True
                        return False
                    self.holding = True
                if not self._call_backend(reader, command):
                    return False
            self._release()
            return True
        finally:
            self._stepping = False

    def _call_backend(self, reader, command):
        """Run one card command; False if its answer comes later."""
        backend = reader.backend
        try:
            if command.name == APDU:
                result = backend.transmit(reader.key, command.apdu)
            elif command.name == RESET:
                if self.d.signing is not None:
                    self.d.signing.after_reset(reader)
                result = backend.reset(reader.key)
            else:
                result = self.d.sign(reader, command, self.request)
        except CardError as e:
            self._result(e.code)
            return True
        except Exception:
            self.log.failure("backend {backend} failed on {reader}",
                             backend=backend.description, reader=reader.name)
            self._result(errors.INTERNAL)
            return True
        if not isinstance(result, Deferred):
            self._result(result.hex().upper())
            return True
        self._pending = True
        self._call = result
        self.d.deadlines.watch(result)
        result.addCallbacks(self._answered, self._failed, errbackArgs=(reader,))
        return not self._pending

    def _result(self, value):
        self.lines.append((self.request.commands[self.i].id, value))
        self.i += 1
        if self.d.metrics is not None:
            self.started = self.d.metrics.record(self, value)

    def _answered(self, result):
        self.d.deadlines.forget(self._call)
        self._call = None
        self._result(result.hex().upper())
        self._resume()

    def _failed(self, failure, reader):
        self.d.deadlines.forget(self._call)
        self._call = None
        if failure.check(CardError):
            self._result(failure.value.code)
        elif failure.check(TimeoutError, CancelledError):
            if not self.abandoned:
                self.log.warn("command timed out after {timeout}s on {reader}",
                              timeout=self.d.command_timeout, reader=reader.name)
            self._result(errors.UPSTREAM)
        else:
            self.log.failure("backend {backend} failed on {reader}", failure,
                             backend=reader.backend.description, reader=reader.name)
            self._result(errors.INTERNAL)
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
        if done and self.deferred is not None and not self.abandoned:
            self.d.pending.pop(self, None)
            self.deferred.callback(self.lines)

    def _release(self):
        if self.holding:
            self.holding = False
            reader = self.reader
            if reader.release is not None:
                reader.release(reader.key)
            reader.queue.release()

    def cancel(self, _deferred):
        """The client went away: drop our place in the queue; a command in
        flight finishes on the card, then the card goes to the next request."""
        self.abandoned = True
        self.d.pending.pop(self, None)
        if not self._stepping and self._call is None:
            self._release()

    def give_up(self, code):
        """Answer now: ``code`` for every command not answered yet; a
        command in flight finishes on the card as after ``cancel``."""
        lines = self.lines + [(c.id, code) for c in self.request.commands[self.i:]]
        self.cancel(None)
        self.deferred.callback(lines)

"""One request in progress (``RequestRun``): a trampoline over its
commands, made by ``dispatch.Dispatcher.execute``.  Each command is
authorized (``_authorize``: ``Dispatcher.identify`` and the identity's
commands), answered without a card (``_call_simple``) or run on its reader
once the request has its turn in the card's queue (``_enter_queue``, then
``_call_batch`` or ``_call_backend``).  It only becomes asynchronous when a
card is busy or a backend answers later: the emulated cards' requests run
to the end in one call.
"""

from time import perf_counter

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import deferLater

from . import errors
from .errors import CardError
from .interfaces import MAX_RESPONSE
from .logs import Logger
from .parser import APDU, CARD_COMMANDS, RESET, SESSION_COMMANDS, SIGN
from .registry import QueueFull, changed_behind
from .sessions import CardSession, held_by, line_hold


#: What a step of ``RequestRun.step`` gives when its command cannot go on: its
#: result line is in (on to the next command), or the request waits.
_ANSWERED = object()
_WAITING = object()


class RequestRun:
    """One request in progress: a trampoline over its commands that only
    becomes asynchronous when a card is busy or a backend answers later."""

    __slots__ = ("d", "request", "session", "lines", "i", "reader", "holding", "queue", "card",
                 "abandoned", "deferred", "_stepping", "_pending", "_call", "_batch_end",
                 "started", "identity", "pin", "_sleep", "begun", "_hold")

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
        self._hold = None  # a HOLD's wait for its card (cancelled when the client goes away)

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
                identity = self.identity
                if identity is None or identity.__class__ is str or identity.commands is not None:
                    identity = self._authorize(command)  # else: known, every command allowed
                    if identity is _ANSWERED:
                        continue
                    if identity is _WAITING:
                        return False
                if command.name not in CARD_COMMANDS:
                    if command.name in SESSION_COMMANDS:
                        if not self._card_session(command):
                            return False
                    elif not self._call_simple(command, identity):
                        return False
                    continue
                reader = self.reader
                if reader is None:
                    reader = self.reader = self.d.target(self.request, identity)
                if reader.__class__ is str:  # a result code: no such reader for this client
                    self._result(reader)
                    continue
                if not self.holding or self.card is not None:  # else: our turn on the card already
                    entered = self._enter_queue(reader)
                    if entered is _ANSWERED:
                        continue
                    if entered is _WAITING:
                        return False
                if (command.name == APDU and self.session.seen.get(reader) != reader.generation
                        and self._changed(reader)):
                    continue
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

    def _card_session(self, command):
        """HOLD / RELEASE (``sessions.line_hold``); False if the answer
        comes later (HOLD waiting for its card).  Only the line protocol's
        connections hold cards this way (they end the session when they
        are lost): elsewhere ``C081``.  A turn this request has on a card
        ends first; its later card commands take their turn again."""
        if self.session.frontend != "line":
            self._result(errors.FAILED)
            return True
        self._release()
        self.card = None
        result = line_hold(self.d, self.request, self.session, command)
        if result.__class__ is str:
            self._result(result)
            return True
        self._hold = result
        return self._wait(result)

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
                self.d.queue_deadlines.watch(self)  # --queue-timeout: timed_out()
                return _WAITING
            self.holding = True
        if self.card is not None and self.card.state != CardSession.HELD:
            self._result(errors.NO_CARD)  # the card session ended: its card state is gone
            return _ANSWERED
        return None

    def _changed(self, reader):
        """True when the card changed behind this connection since its last
        command on it (``reader.generation`` moved: a reset by another
        client, a ``C080`` another client got, a card swap): this command
        answers ``C080``, once; the next ones run (docs/backends.md,
        "Resets").  Only APDUs are checked: RESET and SIGN set up the
        card's state themselves.  An absent reader's backend answers (no
        card, an owner that does not answer); the ``C080`` waits for the
        first APDU once it is present again."""
        if self.session.seen.get(reader) == reader.generation:
            return False  # the common case
        if not reader.present:
            return False  # no card to tell about yet: the backend answers (no card, owner unreachable)
        if not changed_behind(reader, self.session):
            return False
        self._result(errors.NO_CARD)
        return True

    def _upstream(self, reader):
        """Where this request's next card call goes: None for ``reader``'s
        backend (told on whose behalf first, when it fronts another proxy:
        relay.py), or the held card of the request's card session at an
        upstream proxy (its own connection there, sessions.py)."""
        card = self.card
        if card is None or card.upstream is None:
            if reader.for_client is not None:
                reader.for_client(self.session, self.identity)
            return None
        return card.upstream

    def _call_backend(self, reader, command):
        """Run one card command; False if its answer comes later."""
        upstream = self._upstream(reader)
        backend = reader.backend if upstream is None else upstream
        try:
            if command.name == APDU:
                result = backend.transmit(reader.key, command.apdu)
            elif command.name == RESET:
                self.d.registry.card_reset(reader, self.session)
                result = backend.reset(reader.key)
            else:
                result = self.d.sign(reader, command, self.request, self.pin)
        except CardError as e:
            if e.code == errors.NO_CARD:
                self.d.registry.card_lost(reader, self.session)
            self._result(e.code)
            return True
        except Exception:
            self.log.failure("backend {backend} failed on {reader}",
                             backend=backend.description, reader=reader.name)
            self._result(errors.INTERNAL)
            return True
        if type(result) is bytes and command.name == APDU and 2 <= len(result) <= MAX_RESPONSE:
            d = self.d
            if d.metrics is None:  # the hot path: _result, inline
                value = result.hex().upper()
                self.lines.append((command.id, value))
                self.i += 1
                trace = d.trace
                if trace is not None:  # --trace: its own hot path, one call
                    trace.answered(self, reader, command.apdu, value)
            else:
                self._result(result.hex().upper())
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
        upstream = self._upstream(reader)
        batch = reader.batch if upstream is None else upstream.transmit_batch
        try:
            result = batch(reader.key, steps)
        except CardError as e:
            if e.code == errors.NO_CARD:
                self.d.registry.card_lost(reader, self.session)
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
                if value == errors.NO_CARD:
                    self.d.registry.card_lost(reader, self.session)
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
        if self.d.trace is not None:  # --trace (trace.Tracer)
            self.d.trace.record(self, value)
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
            if code == errors.NO_CARD:
                self.d.registry.card_lost(reader, self.session)
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
        self.d.queue_deadlines.forget(self)
        self.holding = True
        self._resume()

    def timed_out(self):
        """No turn within the dispatcher's ``queue_timeout`` (called by its
        ``queue_deadlines``): leave the queue (the card never runs these
        commands) and answer every command not answered yet ``C086`` (a
        parse error keeps its own code); the card's holder and the
        command on the card are not touched."""
        if not self._pending or self.holding or self.abandoned:
            return
        self.queue.leave(self)  # the queue skips us from now on
        self._pending = False
        d = self.d
        reader = self.reader
        d.client_log.info("client {peer}: no turn on {reader} within {timeout:g} s (--queue-timeout): "
                          "answered C086{held}", peer=self.session.peer, reader=reader.name,
                          timeout=d.queue_timeout, held=held_by(reader))
        if d.metrics is not None:
            d.metrics.queue_timeout(reader)
        commands = self.request.commands
        while self.i < len(commands):
            self._result(commands[self.i].error or errors.UPSTREAM)
        if d.audit is not None:
            d.audit.request(self)
        d.pending.pop(self, None)
        if self.deferred is not None:
            self.deferred.callback(self.lines)

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
                reader.done()
            else:  # a card session's turn: the card stays held
                queue.release()
                self.card.request_done()

    def cancel(self, _deferred):
        """The client went away: leave the card's queue at once if waiting in
        it (no longer counted against ``--max-queue``); a command in flight
        finishes on the card, then the card goes to the next request."""
        self.d.pending.pop(self, None)
        if self._pending and not self.holding and not self._stepping and self._call is None:
            self.d.queue_deadlines.forget(self)
            self.queue.leave(self)  # queued by step(), not granted yet
            return
        self.abandoned = True
        sleep, self._sleep = self._sleep, None
        if sleep is not None and not sleep.called:
            sleep.cancel()
        hold, self._hold = self._hold, None
        if hold is not None and not hold.called:
            hold.cancel()
        if not self._stepping and self._call is None:
            self._release()

    def give_up(self, code):
        """Answer now: ``code`` for every command not answered yet; a
        command in flight finishes on the card as after ``cancel``."""
        lines = self.lines + [(c.id, code) for c in self.request.commands[self.i:]]
        self.cancel(None)
        self.deferred.callback(lines)

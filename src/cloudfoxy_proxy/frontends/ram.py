"""``--ram ENDPOINT``: the RAMOverHTTP server (OpenSCDP remote card access;
docs/ramoverhttp.md).

Remote users run CardContact's ``ram-client`` or OCF's ``ocf-cc.jar``
against ``POST /rt/<secret>`` (secrets from ``--ram-token-file``, lines
``NAME SECRET``).  While such a session lives, the user's card is the
reader ``RAM <NAME>`` of :class:`RamBackend` (an IBackend like any other),
so every front end reaches it through the dispatcher.  A request's card
commands go to the client as one ``AA`` script (RESET as ``C0``, APDUs as
``22``, via ``transmit_batch``); the ``AB`` answer's items map back in
order.  A POST with nothing to send yet is held and answered ``AA 00``
after :data:`KEEP_ALIVE` seconds (the C client gives up after 40 s).

Sessions are keyed by the ``JSESSIONID`` cookie, never by the TCP
connection.  Every ``AB`` is the answer to the script sent before it, on
whatever connection it comes, identical to the previous ``AB`` or not,
except a re-send: the ``AB`` of the previous POST again, on another
connection, while the answer to that POST is known not to have left the
proxy (see :meth:`RamSession.post`); that one is answered with the same
script again, which has not reached the client, so no command runs twice.

A session ends, its reader disappears and every command in flight or
queued gets ``C080`` when the client sends ``E1`` (a card error), when the
client is silent for ``--ram-session-timeout`` seconds since it last could
have answered (see :meth:`RamSession.waiting`), when a reset answers no
ATR, or when the proxy stops (a held POST is then answered 204).  Every
answer carries ``Content-Length``.
"""

import re
import secrets as _random

import attr
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from .. import errors
from ..interfaces import IBackend, ReaderInfo, settle
from ..errors import CardError
from ..logs import Logger
from ..twisted_internals import held_back
from . import ramwire as wire
from .base import OneListener
from .http import HttpSite, Route, gone

#: Seconds a POST with nothing to send is held before ``AA 00`` (under the
#: 30 s docs/ramoverhttp.md promises; the C client gives up after 40 s).
KEEP_ALIVE = 25.0
#: Default of ``--ram-session-timeout``: seconds the client may be silent
#: once it could have answered (RamSession.waiting) before the session
#: ends (the client is gone).
SESSION_TIMEOUT = 60.0
#: Default of ``--ram-max-sessions``.
MAX_SESSIONS = 100
#: Client-chosen JSESSIONID values (OCF ``-s``, the daemon's sessionId=).
_SESSION_ID = re.compile(rb"[A-Za-z0-9._~+/=-]{1,128}")


class _Script:
    """Steps sent (or to send) to the client as one ``AA``, and the
    Deferred of their results (one value, or a list when ``batch``)."""

    __slots__ = ("steps", "batch", "deferred", "sent", "cancelled")

    def __init__(self, steps, batch, canceller):
        self.steps = steps
        self.batch = batch
        self.sent = False
        self.cancelled = False
        self.deferred = Deferred(lambda d: canceller(self))


def _transport(request):
    """The transport of ``request``'s connection (None once it is lost)."""
    channel = getattr(request, "channel", None)
    return getattr(channel, "transport", None)


class RamSession:
    """One client's session: its card is reader ``RAM <name>`` (key ``key``).

    At most one script is at the client at a time (``sent``); ``parked``
    is the POST held while nothing is to be sent.  ``last_body`` /
    ``last_answer`` / ``last_carrier`` remember the newest POST's body,
    what it was answered with (None: not answered yet) and the transport
    that answer was written to, so that a re-send (:meth:`post`) gets the
    same answer again instead of being taken as the next answer."""

    log = Logger()

    def __init__(self, backend, sid, name, key, atr):
        self.backend = backend
        self.sid = sid
        self.name = name
        self.key = key
        self.atr = atr
        self.queue = []
        self.sent = None
        self.parked = None
        self.last_body = None
        self.last_answer = None
        self.last_carrier = None
        self.ended = False
        self.finishing = False  # done: the next POST is answered 204
        self._keep_alive = None
        self._silence = None
        self._done = None
        self._unused()

    # -- HTTP side

    def post(self, request, tag, items, body):
        """A POST of this session (``tag`` E8 or AB, its ``items``).

        An ``AB`` is the answer to the script sent before it, except a
        re-send: the body of the previous POST again, on another
        connection, when the answer to that POST never left the proxy --
        not answered yet (held), or its connection was lost (or is still
        open) with bytes of that answer not yet handed to the kernel
        (:func:`twisted_internals.held_back`).  A re-send gets the same
        answer again (or is held in the previous one's place).

        What this can know: only that bytes are still in the proxy.  An
        answer the kernel took counts as written, although the network may
        still lose it (a peer that vanishes silently); a re-send after such
        a loss is taken as the next answer, so its items answer the script
        the client never saw (or, when they cannot, end the session with
        an error) -- never is a script the client may have run sent twice.
        For TLS, bytes in the TLS layer when the connection is lost count
        as written for the same reason."""
        self._cancel(self._silence)
        self._silence = None
        answers = wire.decode_answer(items) if tag == wire.ANSWER else None
        if tag == wire.ANSWER and body == self.last_body:
            if self.last_answer is None:  # the held POST sent again: in its place
                self._drop_parked()
                script = self._next()
                return self._park(request) if script is None else self._send(request, script)
            if self.last_answer != wire.KEEP_ALIVE and self._undelivered(request):
                self.log.info("RAM {name}: the previous answer sent again (its script never left the "
                              "proxy): the script is sent again, not run twice", name=self.name)
                return self._answer(request, 200, self.last_answer)
        self._drop_parked()
        self.last_body = body
        if tag == wire.ANSWER:
            failure = self._answered(answers)
            if failure is not None:
                self.end(f"the client reported a card error: {failure}")
                return self._answer(request, 504, b"", remember=False)
        script = self._next()
        if script is None:
            if self.finishing:
                self.end(f"no card command for {self.backend.done_after:g} s (--ram-done-after)",
                         code=204, request=request)
                return NOT_DONE_YET
            return self._park(request)
        return self._send(request, script)

    def _undelivered(self, request):
        """Whether the answer to the previous POST is known not to have been
        completely written, ``request`` coming on another connection (a
        client re-sends only on a new one; on the same connection it read
        that answer first)."""
        carrier = self.last_carrier
        if carrier is None or carrier is _transport(request):
            return False
        return held_back(carrier) > 0

    def _answered(self, answers):
        """Map an AB's items to the script at the client; the text of an E1
        (or of a short answer), else None."""
        script, self.sent = self.sent, None
        failure = next((text for kind, text in answers if kind == wire.FAILURE), None)
        if script is None:
            return failure
        results = []
        for i, (kind, _) in enumerate(script.steps):
            if i >= len(answers) or answers[i][0] == wire.FAILURE:
                failure = failure or f"{len(answers)} answers to {len(script.steps)} commands"
                results.append(CardError(errors.NO_CARD, failure))
                continue
            got, value = answers[i]
            if kind == wire.RESET:
                if got != wire.RESET:
                    results.append(CardError(errors.UPSTREAM, "an R-APDU answered a reset"))
                    continue
                self._new_atr(value)
            elif got != wire.RESPONSE:
                results.append(CardError(errors.UPSTREAM, "an ATR answered an APDU"))
                continue
            results.append(value)
        if not script.cancelled:
            settle(script.deferred, results, script.batch)
        return failure

    def _new_atr(self, atr):
        if atr and atr != self.atr:
            self.atr = atr
            self.backend.report()

    def _next(self):
        while self.queue:
            script = self.queue.pop(0)
            if not script.cancelled:
                return script
        return None

    def _send(self, request, script):
        script.sent = True
        self.sent = script
        return self._answer(request, 200, wire.encode_script(script.steps))

    def _park(self, request):
        self.parked = request
        self.last_answer = None
        self.last_carrier = None
        self.waiting()  # stops the silence clock: the client is there
        self._keep_alive = self.backend.clock.callLater(self.backend.keep_alive, self._unpark)
        request.notifyFinish().addErrback(self._parked_lost, request)
        return NOT_DONE_YET

    def _unpark(self):
        """Nothing to send for KEEP_ALIVE seconds: the empty script."""
        self._keep_alive = None
        request, self.parked = self.parked, None
        if request is not None:
            self._answer(request, 200, wire.KEEP_ALIVE)

    def _parked_lost(self, _failure, request):
        if self.parked is request:
            self.log.info("RAM {name}: the connection of the held POST was lost (the client may post "
                          "again within {timeout:g} s)", name=self.name, timeout=self.backend.session_timeout)
            self.parked = None
            self._cancel(self._keep_alive)
            self._keep_alive = None
            self.waiting()

    def _drop_parked(self):
        request, self.parked = self.parked, None
        self._cancel(self._keep_alive)
        self._keep_alive = None
        if request is not None and not request.finished and not gone(request):
            self._answer(request, 200, wire.KEEP_ALIVE, remember=False)

    def _answer(self, request, code, body, remember=True):
        """Answer a POST; ``remember``: as the answer to ``last_body``."""
        if remember:
            self.last_answer = body
            self.last_carrier = _transport(request)
        if not self.ended:
            self.waiting()
        request.setResponseCode(code)
        request.addCookie(b"JSESSIONID", self.sid.encode("ascii"), path=b"/")
        if body:
            request.setHeader(b"content-type", wire.SCRIPT_TYPE)
        request.setHeader(b"content-length", b"%d" % len(body))
        request.setHeader(b"cache-control", b"no-store")
        if not gone(request):
            if body:
                request.write(body)
            request.finish()
        return NOT_DONE_YET

    def waiting(self):
        """(Re)start the silence clock if the client could answer now.

        The client is given ``--ram-session-timeout`` seconds of silence
        from the moment it last could have posted: once it has an answer
        that gives it nothing to run (``AA 00``, a held POST's connection
        lost), or once the script it runs is no longer waited for.  A
        script at the client stops the clock: its card may need any time,
        up to what the dispatcher allows the request
        (``--command-timeout`` per command of the script); when the
        dispatcher gives up on it (``C086`` to the requester), the clock
        starts.  So a client gone mid-script ends its session
        ``--command-timeout`` x commands + ``--ram-session-timeout``
        after its last POST, and no session of a live client ends while
        its card runs a script.  A held POST also stops the clock (the
        client is there)."""
        self._cancel(self._silence)
        self._silence = None
        if self.ended or self.parked is not None:
            return
        if self.sent is not None and not self.sent.cancelled:
            return
        self._silence = self.backend.clock.callLater(self.backend.session_timeout, self._silent)

    def _silent(self):
        self._silence = None
        self.end(f"the client was silent for {self.backend.session_timeout:g} s "
                 "(--ram-session-timeout) with nothing to run")

    def _unused(self):
        """(Re)start the ``--ram-done-after`` clock: no card command for
        that long and the session is done (its client gets 204)."""
        self._cancel(self._done)
        self._done = None
        if self.backend.done_after:
            self._done = self.backend.clock.callLater(self.backend.done_after, self._finish)

    def _finish(self):
        self._done = None
        if self.sent is not None or self.queue:
            return self._unused()
        self.finishing = True
        if self.parked is not None:
            self.end(f"no card command for {self.backend.done_after:g} s (--ram-done-after)", code=204)

    # -- card side

    def submit(self, steps, batch):
        if self.ended or self.finishing:
            raise CardError(errors.NO_CARD, "the RAM session ended")
        self._unused()
        script = _Script(steps, batch, self._cancelled)
        self.queue.append(script)
        request = self.parked
        if request is not None and self.sent is None:
            self.parked = None
            self._cancel(self._keep_alive)
            self._keep_alive = None
            self._send(request, self._next())
        return script.deferred

    def _cancelled(self, script):
        """The dispatcher gave up on a script (command timeout): one still
        queued is never sent; one at the client has its answer ignored."""
        script.cancelled = True
        if not script.sent and script in self.queue:
            self.queue.remove(script)
        if script is self.sent:
            self.waiting()  # nothing waits for the client's answer any more

    def end(self, why, code=504, request=None):
        """End the session: the reader goes, every command in flight or
        queued gets C080; the held POST (or ``request``) is answered
        ``code`` (204: done, or the proxy stops)."""
        if self.ended:
            return
        self.ended = True
        self.log.info("RAM session of {name} ended: {why}", name=self.name, why=why)
        for call in (self._keep_alive, self._silence, self._done):
            self._cancel(call)
        self._keep_alive = self._silence = self._done = None
        scripts = ([self.sent] if self.sent is not None else []) + self.queue
        self.sent, self.queue = None, []
        if request is None:
            request = self.parked
        self.parked = None
        self.backend.closed(self)
        for script in scripts:
            if not script.cancelled and not script.deferred.called:
                script.deferred.errback(CardError(errors.NO_CARD, f"RAM session ended: {why}"))
        if request is not None:
            self._answer(request, code, b"", remember=False)

    @staticmethod
    def _cancel(call):
        if call is not None and call.active():
            call.cancel()


@implementer(IBackend)
class RamBackend:
    """The cards of live RAMOverHTTP sessions as readers ``RAM <NAME>``
    (the registry numbers a second concurrent session of one NAME, e.g.
    ``RAM alice (2)``).  ``reset``/``transmit``/``transmit_batch`` send an
    ``AA`` script to the session's client and return a Deferred for the
    answer (IBackend); a missing or ended session is ``C080``."""

    log = Logger()

    def __init__(self, clock, max_sessions=MAX_SESSIONS, session_timeout=SESSION_TIMEOUT,
                 keep_alive=KEEP_ALIVE, done_after=0):
        self.clock = clock
        self.done_after = done_after
        self.max_sessions = max_sessions
        self.session_timeout = session_timeout
        self.keep_alive = keep_alive
        self.description = "RAMOverHTTP sessions"
        self.registry = None
        self.stopping = False
        self.sessions = {}  # JSESSIONID -> RamSession
        self._by_key = {}  # (NAME, slot) -> RamSession

    # -- IBackend

    def start(self, registry):
        self.registry = registry
        self.stopping = False
        self.report()

    def stop(self):
        self.shutdown()

    def reset(self, key):
        return self._session(key).submit([(wire.RESET, None)], batch=False)

    def transmit(self, key, apdu):
        return self._session(key).submit([(wire.APDU, apdu)], batch=False)

    def transmit_batch(self, key, steps):
        """IBackend's optional batch: the steps as one ``AA`` script."""
        return self._session(key).submit(
            [(wire.RESET, None) if kind == "RESET" else (wire.APDU, data) for kind, data in steps],
            batch=True)

    # -- sessions

    def _session(self, key):
        session = self._by_key.get(key)
        if session is None:
            raise CardError(errors.NO_CARD, "no RAM session for this reader")
        return session

    def report(self):
        if self.registry is not None:
            self.registry.update(self, [
                ReaderInfo(key, f"RAM {key[0]}" if not key[1] else f"RAM {key[0]} ({key[1] + 1})",
                           atr=s.atr)
                for key, s in sorted(self._by_key.items())])

    def open(self, sid, name, atr):
        """A new session (replacing a live one with the same JSESSIONID)."""
        old = self.sessions.get(sid)
        if old is not None:
            old.end("a new session with its JSESSIONID began")
        slot = 0
        while (name, slot) in self._by_key:
            slot += 1
        session = RamSession(self, sid, name, (name, slot), atr)
        self.sessions[sid] = session
        self._by_key[session.key] = session
        self.log.info("RAM session of {name} began (ATR {atr})", name=name, atr=atr.hex().upper())
        self.report()
        return session

    def closed(self, session):
        if self.sessions.get(session.sid) is session:
            del self.sessions[session.sid]
        if self._by_key.get(session.key) is session:
            del self._by_key[session.key]
        self.report()

    def shutdown(self):
        """The proxy stops: held POSTs get 204, every session ends."""
        self.stopping = True
        for session in list(self.sessions.values()):
            session.end("the proxy stops", code=204)


class RamResource(Resource):
    """``POST /rt/<secret>``: one leaf resource over a RamBackend.  The
    secret in the path was checked by the HTTP base (``RamSite``,
    ``Dispatcher.identify``): the identity's name is the session's NAME
    (``--ram-token-file`` lines, or a ``--credentials`` client allowed the
    front end ``ram``)."""

    isLeaf = True
    log = Logger()

    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def render_POST(self, request):
        name = request.session.identity.name
        body = request.content.read()
        try:
            tag, items = wire.template(body)
            if tag == wire.SCRIPT:
                raise ValueError("a script (AA) sent by a client")
            atr = wire.initiation_atr(items) if tag == wire.INITIATE else None
        except ValueError as e:
            return self._plain(request, 400, f"bad request: {e}")
        sid = request.getCookie(b"JSESSIONID")
        if sid is not None and not _SESSION_ID.fullmatch(sid):
            return self._plain(request, 400, "bad request: JSESSIONID is not a session id")
        backend = self.backend
        if tag == wire.INITIATE:
            if backend.stopping or len(backend.sessions) >= backend.max_sessions:
                self.log.warn("RAM session of {name} refused (204): {why}", name=name,
                              why="the proxy stops" if backend.stopping else
                              f"{backend.max_sessions} sessions live (--ram-max-sessions)")
                return self._plain(request, 204, "")
            if sid is not None:
                live = backend.sessions.get(sid.decode("ascii"))
                if live is not None and live.name != name:  # another user's session: never ended by this one
                    return self._plain(request, 400, "bad request: JSESSIONID in use")
            session = backend.open(sid.decode("ascii") if sid else _random.token_urlsafe(18), name, atr)
        else:
            session = backend.sessions.get(sid.decode("ascii")) if sid else None
            if session is None or session.name != name:
                return self._plain(request, 504, "")  # no such session (ended): server aborted
        return session.post(request, tag, items, body)

    @staticmethod
    def _plain(request, code, text):
        body = (text + "\n").encode("utf-8") if text else b""
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"content-length", b"%d" % len(body))
        return body


#: ``POST /rt/<secret>`` with a body of at most wire.MAX_BODY bytes.
_POST = Route({b"POST"}, body=wire.MAX_BODY, length_required=True)


class RamSite(HttpSite):
    """The RAM server on the HTTP base: the secret is the path's last
    segment (``/rt/<secret>``); a wrong one is 404, as for any unknown
    path; errors are text."""

    frontend = "ram"
    log_prefix = "RamSite"
    json_errors = False
    unauthorized = 404
    how_to_authenticate = " in the path /rt/SECRET"
    challenge = ()
    access_line = "RAM {method} -> {code}"
    access_path = False  # /rt/SECRET
    access_log = Logger()

    def route(self, head):
        return _POST

    def credential(self, head):
        if not head.path.startswith(b"/rt/") or b"/" in head.path[4:]:
            return None
        return head.path[4:].decode("utf-8", "replace") or None


@attr.s(frozen=True, kw_only=True)
class RamSettings:
    """``--ram ENDPOINT`` and its sessions' limits (``--ram-max-sessions``,
    ``--ram-session-timeout``, ``--ram-done-after``); the secrets of
    ``--ram-token-file`` are the dispatcher's access (tap.py)."""

    endpoint = attr.ib()
    max_sessions = attr.ib(default=MAX_SESSIONS)
    session_timeout = attr.ib(default=SESSION_TIMEOUT)
    done_after = attr.ib(default=0)


class RamFrontend(OneListener):
    """``--ram``: the RAMOverHTTP server (IFrontend); its cards are the
    readers of a RamBackend it adds to the core."""

    name = option = "ram"

    def settings_of(self, options):
        return RamSettings(endpoint=options["ram"], max_sessions=options["ram-max-sessions"],
                           session_timeout=options["ram-session-timeout"], done_after=options["ram-done-after"])

    def make_service(self, settings, core):
        backend = RamBackend(core.reactor, settings.max_sessions, settings.session_timeout,
                             done_after=settings.done_after)
        core.add_backend(backend)
        service = core.listen(settings.endpoint, RamSite(RamResource(backend), core), "--ram")
        # on stop: held POSTs get 204 and every session ends, before the drain
        service.on_stop.append(backend.shutdown)
        return service


RAM = RamFrontend()

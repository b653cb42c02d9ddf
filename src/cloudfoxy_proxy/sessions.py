"""Card sessions: one card held by one client across several requests
(docs/protocol.md, "Card sessions").  Opened with ``Dispatcher.hold``; the
dispatcher runs the holder's requests in the session's own queue."""

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from . import errors
from .errors import CardError
from .parser import RELEASE
from .registry import CardQueue


class CardSession:
    """One card held by one client across several requests.

    Opened with :meth:`Dispatcher.hold`: the session waits in the card's
    queue like any request (FIFO) and, once granted, keeps the card until
    :meth:`close`, ``idle_timeout`` seconds with no request of the holder
    (None: no limit), or ``max_duration`` seconds in all (None: no limit).
    Meanwhile other clients' requests for the card wait in its queue, and
    the holder's own requests (those executed with its ``Session``) run one
    after another in the session's own queue.  When the session ends its
    ``ended`` Deferred fires with the reason (``"closed"``, ``"idle"``,
    ``"max duration"``); the card goes to the next request once the
    holder's request in flight, if any, is done.  A holder's request still
    queued in the session when it ends gets ``C080`` for its card commands
    (the session's card state is gone); later requests of the same
    ``Session`` queue for the card like anybody's (docs/protocol.md,
    "Card sessions").  A session still waiting for the card after the
    dispatcher's ``queue_timeout`` seconds ends with ``"queue timeout"``
    (its ``opened`` fails with ``C086``); the card's holder is not touched.
    ``granted_at`` is the dispatcher clock's time the card was granted.

    A card whose backend has ``hold`` (an upstream proxy: IBackend) is held
    there too, on a connection of its own: ``opened`` fires once the
    upstream granted it (or said it cannot hold cards: then the session is
    held here only), and fails with the upstream's code (``C086``: no turn
    there within its queue timeout, unreachable).  Meanwhile ``upstream``
    (the backend's held card, or None) runs the holder's card commands; the
    session ends (``"upstream lost"``) if the upstream lets go of the card
    first, and lets go of it there when it ends.
    """

    __slots__ = ("dispatcher", "reader", "session", "idle_timeout", "max_duration", "queue",
                 "state", "abandoned", "opened", "ended", "granted_at", "_idle", "_deadline",
                 "upstream", "_upstream_wait")

    WAITING, HELD, CLOSED = "waiting", "held", "closed"

    def __init__(self, dispatcher, reader, session, idle_timeout=None, max_duration=None):
        self.dispatcher = dispatcher
        self.reader = reader
        self.session = session
        self.idle_timeout = idle_timeout
        self.max_duration = max_duration
        self.queue = CardQueue(reader.queue.max_queue)  # the holder's own requests
        self.state = self.WAITING
        self.abandoned = False  # CardQueue waiter protocol
        self.opened = None
        self.ended = Deferred()
        self.granted_at = None
        self._idle = None
        self._deadline = None
        #: the backend's held card running the holder's card commands (IBackend ``hold``), or None
        self.upstream = None
        self._upstream_wait = None  # Deferred of the backend's ``hold`` not answered yet

    @property
    def held(self):
        return self.state == self.HELD

    def granted(self):
        """The card's queue says it is our turn (CardQueue waiter protocol)."""
        self.state = self.HELD
        self.session.card = self
        self.reader.holder = self.session
        self.dispatcher.queue_deadlines.forget(self)
        hold = getattr(self.reader.backend, "hold", None)
        if hold is None:
            self._begin()
            return
        d = self.dispatcher
        if self.reader.for_client is not None:  # the upstream's audit names the session's client (relay.py)
            self.reader.for_client(self.session, self.session.identity)
        try:
            wait = hold(self.reader.key, self.idle_timeout, self._upstream_lost)
        except CardError as e:
            self._upstream_refused(Failure(e))
            return
        # bounded: the upstream's own queue wait, then its answer
        wait.addTimeout(d.queue_timeout + d.command_timeout, d.clock)
        self._upstream_wait = wait
        wait.addCallbacks(self._upstream_granted, self._upstream_refused)

    def _upstream_granted(self, upstream):
        self._upstream_wait = None
        if self.state != self.HELD:  # ended meanwhile
            if upstream is not None:
                upstream.release()
            return
        self.upstream = upstream
        self._begin()

    def _upstream_refused(self, failure):
        self._upstream_wait = None
        if self.state != self.HELD:
            return  # cancelled or closed meanwhile
        code = failure.value.code if failure.check(CardError) else errors.UPSTREAM
        self.dispatcher.client_log.info(
            "client {peer}: card session on {reader} refused by its upstream ({why}): {code}",
            peer=self.session.peer, reader=self.reader.name, why=failure.getErrorMessage(), code=code)
        opened, self.opened = self.opened, None
        self.close("upstream refused")
        if opened is not None:
            opened.errback(CardError(code, f"card session on {self.reader.name} refused upstream"))

    def _upstream_lost(self, why):
        """The backend's held card is gone (its connection lost): the
        session ends; the holder's commands in flight there got C086."""
        self.upstream = None
        if self.state == self.HELD:
            self.dispatcher.client_log.info(
                "client {peer}: card session on {reader} ended: {why}",
                peer=self.session.peer, reader=self.reader.name, why=why)
            self.close("upstream lost")

    def _begin(self):
        """The card is ours (here, and upstream if held there): start the clocks."""
        clock = self.dispatcher.clock
        self.granted_at = clock.seconds()
        if self.max_duration is not None:
            self._deadline = clock.callLater(self.max_duration, self.close, "max duration")
        self.touch()
        opened, self.opened = self.opened, None
        if opened is not None:
            opened.callback(self)

    def touch(self):
        """The holder used the card: the idle timeout starts again."""
        if self.idle_timeout is None or self.state != self.HELD:
            return
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.idle_timeout)
        else:
            self._idle = self.dispatcher.clock.callLater(self.idle_timeout, self._idle_expired)

    def set_idle_timeout(self, seconds):
        """A new idle timeout (seconds; None: none), counted from now; a
        card held upstream too is asked to keep it as long (else the
        upstream would let go of it at the old timeout while this side
        still holds it)."""
        self.idle_timeout = seconds
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        self.touch()
        if self.upstream is not None:
            self.upstream.set_idle_timeout(seconds)

    def _idle_expired(self):
        self._idle = None
        if self.queue.busy:
            self.touch()  # a request of the holder is running: not idle
        else:
            self.close("idle")

    def _cancel_wait(self, _d):
        """The client gave up before the card was granted."""
        self.opened = None
        if self.state == self.WAITING:
            self.state = self.CLOSED
            self.dispatcher.queue_deadlines.forget(self)
            self.reader.queue.leave(self)
        elif self._upstream_wait is not None:  # granted here, still waiting upstream
            self.close("cancelled")

    def timed_out(self):
        """No turn within the dispatcher's ``queue_timeout`` (called by its
        ``queue_deadlines``): the session ends before it began."""
        if self.state != self.WAITING:
            return
        d = self.dispatcher
        d.client_log.info("client {peer}: no turn on {reader} within {timeout:g} s (--queue-timeout): "
                          "card session refused with C086{held}", peer=self.session.peer,
                          reader=self.reader.name, timeout=d.queue_timeout, held=held_by(self.reader))
        if d.metrics is not None:
            d.metrics.queue_timeout(self.reader)
        self.close("queue timeout")

    def close(self, reason="closed"):
        """End the session (idempotent); the card is let go once no request
        of the holder runs on it."""
        if self.state == self.CLOSED:
            return
        was = self.state
        self.state = self.CLOSED
        for call in (self._idle, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._idle = self._deadline = None
        wait, self._upstream_wait = self._upstream_wait, None
        if wait is not None:
            wait.cancel()
        if was == self.WAITING:
            self.dispatcher.queue_deadlines.forget(self)
            self.reader.queue.leave(self)
            opened, self.opened = self.opened, None
            if opened is not None:
                opened.errback(CardError(errors.UPSTREAM, f"card session ended ({reason}) before it began"))
        elif not self.queue.busy:
            self._let_go()
        self.ended.callback(reason)

    def request_done(self):
        """A holder's request finished (called by the dispatcher)."""
        if self.state == self.CLOSED:
            if not self.queue.busy:
                self._let_go()
        else:
            self.touch()

    def _let_go(self):
        reader = self.reader
        if self.session.card is self:
            self.session.card = None
        if reader.holder is self.session:
            reader.holder = None
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.release()
        reader.done()


def held_by(reader):
    """For a log line: ``", held by PEER (FRONTEND)"`` while a session
    holds ``reader``, else ``""``."""
    session = reader.holder
    return "" if session is None else f", held by {session.peer} ({session.frontend})"


def holder(reader, now):
    """Who holds ``reader``, for the status page and metrics: None, or
    ``{"frontend", "identity", "peer", "held_seconds", "queued"}`` with
    the holder's front end, identity name (None: not authenticated), peer
    (``host:port`` or a description), seconds held by ``now`` (the
    dispatcher clock's time; a vpcd bridge counts from its connect to
    vpcd) and its own requests waiting inside the session."""
    session = reader.holder
    if session is None:
        return None
    card = session.card
    if card is not None and card.reader is not reader:
        card = None
    identity = session.identity
    since = reader.held_since if card is None else card.granted_at
    return {
        "frontend": session.frontend,
        "identity": getattr(identity, "name", None),
        "peer": session.peer,
        "held_seconds": None if since is None else max(0.0, now - since),
        "queued": 0 if card is None else len(card.queue),
    }


#: The longest idle timeout ``HOLD`` accepts (seconds; 0: none).
MAX_HOLD_IDLE = 86400.0


def line_hold(dispatcher, request, session, command):
    """A line-protocol connection's ``HOLD:IDLE_SECONDS`` or ``RELEASE``
    (docs/protocol.md "HOLD and RELEASE") for ``session`` on the reader
    line of ``request``: a result now (``"OK"``, ``C084`` for idle seconds
    that are not 0..MAX_HOLD_IDLE, ``C086`` while it holds another card)
    or a Deferred firing with one once the card is granted (``OK``) or
    refused (the code :meth:`Dispatcher.hold` failed with).  ``HOLD`` on
    the card the connection holds already sets its idle timeout again;
    ``RELEASE`` with nothing held is ``OK`` too."""
    card = session.card
    if command.name == RELEASE:
        if card is not None:
            card.close("released")
        return "OK"
    try:
        idle = float(command.data)
    except ValueError:
        return errors.MALFORMED
    if not 0 <= idle <= MAX_HOLD_IDLE:  # NaN fails too
        return errors.MALFORMED
    if card is not None:
        if dispatcher.target(request, session.identity) is card.reader and card.held:
            card.set_idle_timeout(idle or None)
            return "OK"
        return errors.UPSTREAM  # one card at a time
    if not request.reader or request.reader == "*":
        return errors.NOT_FOUND
    return dispatcher.hold(request.reader, session, idle or None, password=request.password).addCallbacks(
        lambda _card: "OK", _hold_failed)


def _hold_failed(failure):
    if failure.check(CardError):
        return failure.value.code
    return errors.UPSTREAM  # cancelled: nobody reads it

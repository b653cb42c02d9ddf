"""Card sessions: one card held by one client across several requests
(docs/protocol.md, "Card sessions").  Opened with ``Dispatcher.hold``; the
dispatcher runs the holder's requests in the session's own queue."""

from twisted.internet.defer import Deferred

from . import errors
from .errors import CardError
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
    """

    __slots__ = ("dispatcher", "reader", "session", "idle_timeout", "max_duration", "queue",
                 "state", "abandoned", "opened", "ended", "granted_at", "_idle", "_deadline")

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

    @property
    def held(self):
        return self.state == self.HELD

    def granted(self):
        """The card's queue says it is our turn (CardQueue waiter protocol)."""
        self.state = self.HELD
        self.session.card = self
        self.reader.holder = self.session
        clock = self.dispatcher.clock
        self.dispatcher.queue_deadlines.forget(self)
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

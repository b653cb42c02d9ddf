"""A card session of this proxy held at a ``tcp://``/``tls://`` upstream
(``TcpBackend.hold``; see ``tcp.py`` and docs/tcp.md "Card sessions
through a front").

``HeldCard`` is one card held at the upstream on a connection of its own
(never one of the pool's): it connects, asks ``HOLD:IDLE_SECONDS`` on the
card's reader line (docs/protocol.md "HOLD and RELEASE"), then carries
the session's card commands, and ``RELEASE`` when the session ends.  The
upstream ends its hold when that connection is lost, and so does this
side: a lost connection ends the session (``lost``), its commands in
flight get ``C086`` and are never re-sent.  A command the dispatcher
cancels (command timeout) drops the connection too: the card's state is
no longer known, so the session is over.  While the session is idle, the
backend's ``heartbeat`` (a READERS request, no card touched, the session's
idle clock not reset) must be answered within ``heartbeat_timeout``, else
the connection is dropped: a silent upstream ends the session within
``heartbeat + heartbeat_timeout`` seconds, and the upstream's
``--idle-timeout`` does not close a held connection whose holder pauses.
"""

from twisted.internet.defer import CancelledError, Deferred

from .. import errors
from ..errors import CardError
from ..interfaces import settle
from ..logs import Logger
from ..sessions import MAX_HOLD_IDLE
from .tcp_upstream import _DONE, _SENT, _Call, _UpstreamFactory

#: Seconds added to the session's idle timeout in the upstream's ``HOLD``:
#: the upstream's idle clock starts a little before ours (an answer's way
#: back), so it must not let go of the card first; this side sends
#: ``RELEASE`` when its own idle timeout ends the session.
IDLE_MARGIN = 2.0

CONNECTING, ASKING, HELD, ENDED = "connecting", "asking", "held", "ended"


class HeldCard:
    """One card held at ``backend``'s upstream (a ``TcpBackend``) for a
    card session: reader ``key`` (the upstream's name), ``idle_timeout``
    seconds (None: none), ``lost(why)`` called once if the upstream's hold
    ends before :meth:`release`.

    :meth:`start` gives a Deferred firing with this object once the
    upstream answered ``OK``, with None when it does not know ``HOLD``
    (``C081``: FoxyProxy 2.10, an older proxy), or failing with a
    CardError (the upstream's code, e.g. ``C086`` no turn within its
    queue timeout; ``C086`` unreachable or lost).  Then ``reset``,
    ``transmit`` and ``transmit_batch`` are the backend's (IBackend), on
    this connection only.  It plays the backend for its one
    ``_UpstreamProtocol`` (``_ready``, ``_answer``, ``_lost``, ``_watch``).
    """

    log = Logger()
    heartbeat = 0.0  # for _UpstreamProtocol: no pool heartbeat (ours is _beat)
    persistent = True

    def __init__(self, backend, key, idle_timeout, lost, client=None):
        self.backend = backend
        self.key = key
        self.idle_timeout = idle_timeout
        self.lost = lost
        #: ``(peer, identity name, front end)`` of the session's client, told
        #: to the upstream with CLIENT before HOLD (relay.py), or None
        self.client = client
        self.clock = backend.clock
        self.keepalive = backend.keepalive
        self.tls = backend.tls
        self.where = backend.where
        self.state = CONNECTING
        self.conn = None
        self.d = Deferred(self._cancel)
        self._connecting = None
        self._beat = None  # DelayedCall: the next heartbeat

    @property
    def listing_limit(self):
        return self.backend.listing_limit

    @property
    def description(self):
        return f"{self.where} (card session on {self.key!r})"

    @property
    def _running(self):
        return self.state != ENDED

    def start(self):
        self._connecting = self.backend.endpoint.connect(_UpstreamFactory(self))
        self._connecting.addErrback(self._connect_failed)
        return self.d

    # -- IBackend, on this connection --------------------------------------

    def reset(self, key):
        return self._submit([b"RESET"])

    def transmit(self, key, apdu):
        return self._submit([b"APDU:" + apdu.hex().upper().encode("ascii")])

    def transmit_batch(self, key, steps):
        """As ``TcpBackend.transmit_batch``: one upstream request (the
        upstream holds cards, so it is a proxy that takes several)."""
        return self._submit([b"RESET" if kind == "RESET" else b"APDU:" + data.hex().upper().encode("ascii")
                             for kind, data in steps], batch=True)

    def release(self):
        """The session ended: ``RELEASE`` and close (the upstream lets go
        of the card either way); idempotent."""
        state, self.state = self.state, ENDED
        self.backend._held.discard(self)
        self._disarm()
        conn = self.conn
        if state == HELD and conn is not None and not conn.broken:
            self._call([b"RELEASE"], control=True).d.addErrback(lambda f: None)  # closed next
            conn.transport.loseConnection()
        elif state in (CONNECTING, ASKING):
            self._close()
            if not self.d.called:
                self.d.errback(CardError(errors.UPSTREAM, "card session ended before the upstream granted it"))

    # -- the connection ------------------------------------------------------

    def _submit(self, commands, batch=False):
        if self.state != HELD or self.conn is None or self.conn.broken:
            raise CardError(errors.UPSTREAM, f"card session at upstream {self.where} ended")
        return self._call(commands, batch=batch).d

    def _call(self, commands, batch=False, control=False):
        backend = self.backend
        ids = [backend._id() for _ in commands]
        data = b"".join(b">" + cid + b":" + command + b"|\n" for cid, command in zip(ids, commands))
        # control: HOLD, RELEASE, a heartbeat READERS: their answer is text, read raw
        call = _Call(self, ids, self.key, backend._reader_line(self.key) + data + b"\n",
                     readers=control, batch=batch)
        self.conn.send(call)
        return call

    def _ready(self, conn):
        if self.state != CONNECTING:
            conn.transport.loseConnection()
            return
        self.conn = conn
        self.state = ASKING
        if self.client is not None:  # on whose behalf this connection's requests run (sticky)
            from ..relay import encode

            told = self._call([b"CLIENT:" + encode(*self.client).encode("ascii")], control=True)
            told.d.addCallback(self._client_answered).addErrback(lambda f: None)  # the HOLD says the rest
        call = self._call([self._hold_command()], control=True)
        call.d.addCallbacks(self._hold_answered, self._hold_failed)

    def _hold_command(self):
        idle = 0 if self.idle_timeout is None else min(self.idle_timeout + IDLE_MARGIN, MAX_HOLD_IDLE)
        return b"HOLD:%s" % (b"%g" % idle)

    def set_idle_timeout(self, seconds):
        """The session's idle timeout changed (its client's ``HOLD`` again):
        ``HOLD`` again here with it, before any later command of the
        session; an answer other than ``OK`` drops the connection (the
        session ends: its card may no longer be held there)."""
        self.idle_timeout = seconds
        conn = self.conn
        if self.state != HELD or conn is None or conn.broken:
            return
        call = self._call([self._hold_command()], control=True)
        call.d.addCallback(self._held_again, conn).addErrback(lambda f: None)

    def _held_again(self, result, conn):
        if result != "OK" and not conn.broken and self.state == HELD:
            self.log.warn("upstream {upstream} answered HOLD again with {result!r} for {reader!r}: "
                          "dropping the card session", upstream=self.where, result=result, reader=self.key)
            conn.broken = True
            conn.transport.abortConnection()

    def _client_answered(self, result):
        if result != "OK":  # the session goes on; its requests are audited as this proxy's
            self.log.info("upstream {upstream} answered CLIENT with {result} on a card session's "
                          "connection: its audit log names this proxy there", upstream=self.where,
                          result=result)

    def _hold_answered(self, result):
        if self.state != ASKING:
            return
        if result == "OK":
            self.state = HELD
            self.backend._hold_answered(True)
            self._arm()
            self.d.callback(self)
            return
        self.state = ENDED
        self._close()
        if result == errors.FAILED:  # no HOLD there: the session is held on this side only
            self.backend._hold_answered(False)
            self.d.callback(None)
        elif result in errors.MEANING:
            self.d.errback(CardError(result, f"upstream {self.where} answered HOLD with {result}"))
        else:
            self.d.errback(CardError(errors.UPSTREAM, f"upstream {self.where} answered HOLD with {result!r}"))

    def _hold_failed(self, failure):
        if self.state == ASKING:
            self.state = ENDED
            self._close()
            self.d.errback(failure)

    def _connect_failed(self, failure):
        if failure.check(CancelledError) or self.state != CONNECTING:
            return None
        self.state = ENDED
        self.d.errback(CardError(errors.UPSTREAM, f"upstream {self.where} unreachable for a card "
                                                  f"session: {failure.getErrorMessage()}"))
        return None

    def _cancel(self, _d):
        """The session gave up waiting for the upstream's grant."""
        self.state = ENDED
        self._close()

    def _close(self):
        connecting, self._connecting = self._connecting, None
        if connecting is not None and not connecting.called:
            connecting.cancel()
        if self.conn is not None:
            self.conn.transport.loseConnection()

    # -- liveness --------------------------------------------------------------

    def _arm(self):
        heartbeat = self.backend.heartbeat
        if heartbeat and self.state == HELD and (self._beat is None or not self._beat.active()):
            self._beat = self.clock.callLater(heartbeat, self._heartbeat)

    def _disarm(self):
        beat, self._beat = self._beat, None
        if beat is not None and beat.active():
            beat.cancel()

    def _heartbeat(self):
        self._beat = None
        conn = self.conn
        if self.state != HELD or conn is None or conn.broken:
            return
        if conn.calls:  # busy: a slow card is not a dead flow (the command timeout bounds it)
            self._arm()
            return
        call = self._call([b"READERS"], control=True)
        call.heartbeat = True
        call.d.addErrback(lambda f: None)
        call.watch = self.clock.callLater(self.backend.heartbeat_timeout, self._missed_beat, call)

    def _missed_beat(self, call):
        call.watch = None
        conn = self.conn
        if self.state != HELD or conn is None or conn.broken or call not in conn.calls:
            return
        self.log.warn("upstream {upstream} did not answer a heartbeat within {seconds:g}s on the "
                      "card session connection for {reader!r}: dropping it", upstream=self.where,
                      seconds=self.backend.heartbeat_timeout, reader=self.key)
        conn.broken = True
        conn.transport.abortConnection()

    def _answer(self, conn, call):
        call.stop_watch()
        if call.state != _SENT:
            return  # cancelled: the connection is being dropped
        call.state = _DONE
        if call.heartbeat:
            self._arm()
            call.d.callback(None)
            return
        if call.readers:
            call.d.callback(call.results[0] if call.results else None)
            return
        backend = self.backend
        if call.bad is not None:
            backend._warn_malformed(call)
        results = call.results
        settle(call.d, [backend._value(results[i] if i < len(results) else None)
                        for i in range(len(call.ids))], call.batch)

    def _watch(self, call):
        """A command timed out here: the card's state is unknown, so the
        session is over; drop the connection (the upstream lets go)."""
        conn = call.conn
        if conn is not None and not conn.broken:
            conn.broken = True
            conn.transport.abortConnection()

    def _missed(self, conn, call):  # no heartbeats on this connection
        pass

    def _lost(self, conn, reason, calls):
        for call in calls:
            call.stop_watch()
            call.fail(f"card session connection to upstream {self.where} lost")
        state, self.state = self.state, ENDED
        self.backend._held.discard(self)
        self._disarm()
        if state in (CONNECTING, ASKING) and not self.d.called:
            self.d.errback(CardError(errors.UPSTREAM, f"connection to upstream {self.where} lost "
                                                      f"before it granted the card session"))
        elif state == HELD:
            self.log.warn("lost the card session connection to upstream {upstream} for {reader!r} "
                          "({why}): the session ended", upstream=self.where, reader=self.key,
                          why=reason.getErrorMessage())
            self.lost(f"its connection to upstream {self.where} was lost")

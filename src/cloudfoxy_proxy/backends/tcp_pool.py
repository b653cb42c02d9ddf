"""The upstream connection pool of ``tcp://`` and ``tls://`` (see
``tcp.py``; the protocol of one connection is ``tcp_upstream.py``).

``UpstreamPool``, a base class of ``TcpBackend``, is the pool policy:
which connection a call goes out on, persistent ``ClientService`` slots
(``_Slot``) with back-off, one-off connections for an upstream that closes
after every answer, what a lost connection means for its calls.
"""

import collections
import random

import attr
from twisted.application.internet import ClientService
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from ..logs import RetryLogger
from ..twisted_internals import quiet_retries
from .tcp_upstream import _QUEUED, _SENT, PROBE_DELAY, _UpstreamFactory

#: Back-off between connection attempts: the first retry after a lost
#: connection comes after ~MIN_BACKOFF, doubling per failure up to MAX_BACKOFF.
MIN_BACKOFF = 0.1
MAX_BACKOFF = 3.0
#: A connection that dies sooner than this after connecting, without having
#: answered anything, counts as a failed attempt (so a peer that accepts and
#: closes at once is retried with back-off, not in a tight loop).
MIN_HEALTHY_LIFETIME = 1.0


@implementer(IStreamClientEndpoint)
@attr.s(eq=False)
class _WatchedEndpoint:
    """An endpoint that tells ``failed(failure)`` about every failed attempt
    (ClientService retries by itself but does not say when one failed) and
    ``started()`` about every attempt."""

    endpoint = attr.ib()
    failed = attr.ib()
    started = attr.ib(default=None)

    def connect(self, factory):
        def failed(f):
            if not f.check(CancelledError):
                self.failed(f)
            return f

        if self.started is not None:
            self.started()
        return self.endpoint.connect(factory).addErrback(failed)


class _Slot(ClientService):
    """One persistent connection of the pool.  ``waiting``: between
    attempts (stopping and starting it again is then harmless);
    ``parked``: waiting without a deadline (an upstream that closes after
    every answer gets one-off connections instead)."""

    waiting = False
    parked = False


quiet_retries(_Slot, RetryLogger())

#: How long a parked slot waits before it reconnects on its own.
PARKED = 3600.0


class UpstreamPool:
    """The pool policy of ``TcpBackend`` (its attributes: ``endpoint``,
    ``clock``, ``connections``, ``persistent``, ``_live``, ``_queue``,
    ``_opening``, ``_down``, ``_failures``, ``services``...; see there).
    The backend calls ``_slot``, ``_pick``, ``_wait``, ``_flush`` and
    ``_fail_queue``; the connections call back ``_ready``, ``_lost``,
    ``_probed``, ``_watch`` and ``_missed``."""

    # -- requests ---------------------------------------------------------

    def _slot(self, sentinel=False):
        endpoint = _WatchedEndpoint(self.endpoint, self._attempt_failed)
        factory = _UpstreamFactory(self, sentinel=sentinel)
        slot = _Slot(endpoint, factory, retryPolicy=lambda attempt: self._retry(slot),
                     clock=self.clock)
        endpoint.started = lambda: setattr(slot, "waiting", False)
        factory.slot = slot
        return slot

    def _wait(self, call):
        """No connection for ``call`` now: it goes out on the next free one."""
        self._queue.append(call)
        self._open_more()

    def _pick(self, key):
        """The connection for a call on ``key``, or None (wait for one).

        A persistent upstream: the connection still holding an earlier
        (timed-out) call for that card, to keep the card's order; else an
        idle one; else the least busy (pipelining).  Otherwise: the oldest
        idle connection not used before (foxyproxy 2.10 reads its
        connections one at a time, in the order it accepted them)."""
        if self.persistent:
            best = None
            for conn in self._live:
                if key in conn.keys:
                    return conn
                if best is None or len(conn.calls) < len(best.calls):
                    best = conn
            return best
        for conn in self._live:
            if not conn.calls and not conn.spent:
                return conn
        return None

    def _probed(self, conn):
        conn.probe = None
        if conn.broken or not self._running:
            return
        if not self.persistent:
            self._keeps_connections("upstream {upstream} keeps connections open: pipelining requests")
            return
        for c in self._live:
            c.spent = False
        self._flush()

    def _keeps_connections(self, message, **fields):
        """The upstream is known to keep connections open (``message`` says
        how it was learnt): pipeline over the pool, open the liveness
        connection, and send what waits."""
        self.log.info(message, upstream=self.where, **fields)
        self.persistent = True
        self._unpark()
        self._start_sentinel()
        for c in self._live:
            c.spent = False
        self._flush()

    def _watch(self, call):
        """``call`` timed out while on a connection: if the connection has
        still not answered it after another ``timeout``, it is stuck; drop it
        (its other calls are answered C086) and reconnect."""
        call.watch = self.clock.callLater(self.timeout, self._stuck, call)

    def _stuck(self, call):
        call.watch = None
        conn = call.conn
        if conn is not None and not conn.broken and call in conn.calls:
            self.log.warn("upstream {upstream} has not answered for {seconds}s; reconnecting",
                          upstream=self.where, seconds=2 * self.timeout)
            conn.broken = True
            conn.transport.abortConnection()

    # -- liveness -------------------------------------------------------

    def _start_sentinel(self):
        """The liveness connection (``liveness``), once the upstream is known
        to keep connections open (an idle connection would stall foxyproxy
        2.10, which reads its connections one at a time)."""
        if not (self.liveness and self.heartbeat and self._running and self.persistent is True):
            return
        if self._sentinel_slot is None:
            self._sentinel_slot = self._slot(sentinel=True)
            self._sentinel_slot.startService()

    def _missed(self, conn, call):
        """``conn`` did not answer its heartbeat within ``heartbeat_timeout``:
        the flow to the upstream is taken for silently lost (NAT or firewall
        state gone, a frozen peer), and what holds for one connection holds
        for its siblings through the same path.  All are dropped at once
        (their commands in flight get C086, never re-sent) and dialled
        again; until the upstream answers again its readers are listed
        absent and every command gets C086 at once (``_submit``), those
        waiting for a connection too."""
        call.watch = None
        if conn.broken or call not in conn.calls or not self._running:
            return
        self.heartbeat_misses += 1
        siblings = [c for c in self._live if not c.broken and c.factory.slot is not None]
        sentinel = self._sentinel
        if sentinel is not None and not sentinel.broken:
            siblings.append(sentinel)
        in_flight = sum(1 for c in siblings for k in c.calls if k.state == _SENT and not k.heartbeat)
        if not self._silent:  # once until a heartbeat is answered again
            self._silent = True
            self.log.warn("upstream {upstream} did not answer a heartbeat within {seconds:g}s: "
                          "dropping its {n} connection(s), {k} command(s) in flight answered C086, "
                          "and reconnecting", upstream=self.where, seconds=self.heartbeat_timeout,
                          n=len(siblings), k=in_flight)
        else:
            self.log.debug("upstream {upstream} still does not answer heartbeats", upstream=self.where)
        for c in siblings:
            c.broken = c.silent = True
        for c in siblings:
            c.transport.abortConnection()
        self._fail_queue(f"upstream {self.where} does not answer")
        self._set_present(False)

    def _fail_queue(self, reason):
        queue, self._queue = self._queue, collections.deque()
        for call in queue:
            call.fail(reason)

    def _flush(self):
        queue = self._queue
        while queue:
            call = queue[0]
            if call.state != _QUEUED:
                queue.popleft()  # cancelled while waiting: never sent
                continue
            conn = self._pick(call.key)
            if conn is None:
                break
            queue.popleft()
            conn.send(call)
        if queue:
            self._open_more()

    # -- connections ------------------------------------------------------

    def _retry(self, slot):
        """ClientService's retry policy for ``slot``; the attempt count is
        ours (it also knows about failed handshakes)."""
        slot.waiting = True
        if self.persistent is False and not self._down:
            slot.parked = True  # one-off connections serve an upstream that closes
            return PARKED
        if self.retry_delay is not None:
            return self.retry_delay(self._failures)
        delay = min(MAX_BACKOFF, MIN_BACKOFF * 2 ** min(self._failures, 20))
        return delay * (0.5 + random.random() / 2)

    def _unpark(self):
        """Parked slots try to connect again now (upstream down, or it
        turned out to keep connections after all)."""
        for slot in self.services:
            if slot.parked and slot.waiting and slot.running:
                slot.parked = False
                slot.stopService()  # waiting: stops at once, no connection to close
                slot.startService()

    def _open_more(self):
        """For an upstream that closes after every answer: a new connection
        per waiting call, at most ``connections`` opening at once."""
        if self.persistent is not False or not self._running or self._down:
            return
        while len(self._opening) < min(self.connections, len(self._queue)):
            d = _WatchedEndpoint(self.endpoint, self._attempt_failed).connect(
                _UpstreamFactory(self))
            if d.called:  # failed at once (the errback has run)
                d.addErrback(lambda f: None)
                break
            self._opening.add(d)
            d.addBoth(self._opened, d)

    def _opened(self, result, d):
        self._opening.discard(d)
        if isinstance(result, Failure):
            return None  # _attempt_failed has dealt with it
        if self._queue:
            self._flush()
        return None

    def _attempt_failed(self, reason):
        self._failures += 1
        if self._live or not self._running:
            return
        self._stale = True
        if not self._down:
            self._down = True
            self.log.warn("upstream {upstream} is unreachable ({why}); retrying",
                          upstream=self.where, why=reason.getErrorMessage())
            self._unpark()  # the pool retries with back-off until it is back
        self._fail_queue(f"upstream {self.where} unreachable")
        self._set_present(False)

    def _ready(self, conn):
        if not self._running:
            conn.transport.loseConnection()
            return
        if conn.factory.sentinel:
            self._sentinel = conn  # heartbeats only: not in ``_live``, never picked
            return
        if not self._live and (self._down or self.listing is None):
            self.log.info("connected to upstream {upstream}", upstream=self.where)
        if not self._live and self._connected_before and self.persistent is not False:
            self.reconnects += 1  # every connection was lost, now one is back (metrics)
        self._connected_before = True
        self._live.append(conn)
        self._down = False
        self._flush()
        if self._stale:
            self._stale = False
            self._refresh()
        if self.persistent is False and not conn.calls:
            # Nothing for it to do: an idle connection would stall an
            # upstream that reads its connections one at a time.
            conn.spent = True
            conn.transport.loseConnection()

    def _lost(self, conn, reason, calls):
        for call in calls:
            call.stop_watch()
        if conn.factory.sentinel:
            if self._sentinel is conn:
                self._sentinel = None
            for call in calls:
                call.fail("liveness connection lost")  # its heartbeat: the failure goes nowhere
            if not conn.ready:
                self._attempt_failed(reason)
            return
        if not conn.ready:
            # Connected but never usable (e.g. TLS verification failed).
            self._attempt_failed(reason)
        else:
            self._live.remove(conn)
            now = self.clock.seconds()
            healthy = conn.answers or now - conn.ready_at >= MIN_HEALTHY_LIFETIME
            self._failures = 0 if healthy else self._failures + 1
            closes_after_answer = (
                conn.answers == 1 and reason.check(ConnectionDone) is not None
                and now - conn.first_answer_at < PROBE_DELAY)
            if closes_after_answer and self.persistent is not False and self.owner is None:
                self.log.info("upstream {upstream} closes the connection after each answer: "
                              "a new connection for every request", upstream=self.where)
                self.persistent = False
                for c in list(self._live):
                    if not c.calls and not c.spent:
                        c.spent = True
                        c.transport.loseConnection()  # idle: it would stall the upstream
            in_flight = sum(1 for c in calls if c.state == _SENT)
            expected = conn.spent and not in_flight and self.persistent is not True
            if self._running and not expected and not conn.silent and (in_flight or not self._live):
                if not self._live:
                    self._stale = True
                self.log.warn(
                    "lost a connection to upstream {upstream} ({why}); {n} command(s) in "
                    "flight answered C086; reconnecting",
                    upstream=self.where, why=reason.getErrorMessage(), n=in_flight)
            elif conn.silent and not self._live:
                self._stale = True  # read the readers again once it answers
        for call in calls:
            call.fail(f"connection to upstream {self.where} lost")
        if self._queue and self._running:
            self._flush()

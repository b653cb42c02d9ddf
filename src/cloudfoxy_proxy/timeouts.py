"""Bounding many Deferreds by one fixed timeout, cheaply.

``Deferred.addTimeout`` costs a DelayedCall, a closure and two callbacks per
call: on the hot path that was the largest single cost of an asynchronous
APDU.  Here every call gets the same timeout, so deadlines arrive in start
order: an insertion-ordered dict holds the pending ones, and a single
DelayedCall waits for the oldest.  The same structure bounds the waits in
the cards' queues (``--queue-timeout``): there the watched items are
queue waiters and ``expire`` tells each that its time is up.
"""


def _cancel(d):
    d.cancel()


class Deadlines:
    """Cancel each watched Deferred that is still pending ``timeout``
    seconds after ``watch``; ``forget`` it once it has an answer.

    ``expire`` (a callable taking the item; default: ``item.cancel()``) is
    called instead of ``cancel`` when the watched items are not Deferreds;
    an item is forgotten before ``expire`` is called, at ``timeout``
    seconds exactly (by ``clock``)."""

    __slots__ = ("clock", "timeout", "expire", "_pending", "_timer")

    def __init__(self, clock, timeout, expire=_cancel):
        self.clock = clock
        self.timeout = timeout
        self.expire = expire
        self._pending = {}  # Deferred (or other item) -> deadline, oldest first
        self._timer = None

    def watch(self, d):
        self._pending[d] = self.clock.seconds() + self.timeout
        if self._timer is None:
            self._timer = self.clock.callLater(self.timeout, self._expire)

    def forget(self, d):
        pending = self._pending
        pending.pop(d, None)
        if not pending and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __len__(self):
        return len(self._pending)

    def _expire(self):
        self._timer = None
        now = self.clock.seconds()
        expired = []
        for d, deadline in self._pending.items():
            if deadline > now:
                self._timer = self.clock.callLater(deadline - now, self._expire)
                break
            expired.append(d)
        for d in expired:
            del self._pending[d]
        expire = self.expire
        for d in expired:
            expire(d)

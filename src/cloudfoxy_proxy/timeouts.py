"""Bounding many Deferreds by one fixed timeout, cheaply.

``Deferred.addTimeout`` costs a DelayedCall, a closure and two callbacks per
call: on the hot path that was the largest single cost of an asynchronous
APDU.  Here every call gets the same timeout, so deadlines arrive in start
order: an insertion-ordered dict holds the pending ones, and a single
DelayedCall waits for the oldest.
"""


class Deadlines:
    """Cancel each watched Deferred that is still pending ``timeout``
    seconds after ``watch``; ``forget`` it once it has an answer."""

    __slots__ = ("clock", "timeout", "_pending", "_timer")

    def __init__(self, clock, timeout):
        self.clock = clock
        self.timeout = timeout
        self._pending = {}  # Deferred -> deadline, oldest first
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
            d.cancel()

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy.timeouts import Deadlines


class DeadlineTests(SynchronousTestCase):
    def test_expired_calls_are_cancelled_in_order(self):
        clock = Clock()
        t = Deadlines(clock, 10)
        a, b, c = Deferred(), Deferred(), Deferred()
        t.watch(a)
        clock.advance(3)
        t.watch(b)
        clock.advance(3)
        t.watch(c)
        b.callback("ok")
        t.forget(b)
        clock.advance(4)  # a is due
        self.failureResultOf(a, CancelledError)
        self.assertNoResult(c)
        clock.advance(5.9)
        self.assertNoResult(c)
        clock.advance(0.1)
        self.failureResultOf(c, CancelledError)
        self.assertEqual((len(t), clock.getDelayedCalls()), (0, []))

    def test_no_timer_left_when_idle(self):
        clock = Clock()
        t = Deadlines(clock, 10)
        for _ in range(3):
            d = Deferred()
            t.watch(d)
            t.forget(d)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(len(t), 0)

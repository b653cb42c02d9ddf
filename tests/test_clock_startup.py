"""``tap.makeService`` puts the reactor on the monotonic clock before it
builds anything that schedules (twistd has installed the reactor while
parsing options, and nothing is scheduled on it yet when the plugin's
makeService runs); a test's Clock is left alone."""

import time

from twisted.internet.base import ReactorBase
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy import tap


class _Reactor(ReactorBase):
    """A real ReactorBase (its timed calls), never run."""

    def installWaker(self):
        pass

    def wakeUp(self):
        pass


def options(*args):
    o = tap.Options()
    o.parseOptions(["--no-signing", *args])
    return o


class StartUp(SynchronousTestCase):
    def test_make_service_switches_a_real_reactor_to_the_monotonic_clock_first(self):
        reactor = _Reactor()
        self.assertIsNot(reactor.seconds, time.monotonic)
        top = tap.makeService(options("--idle-timeout", "30"), reactor)
        self.assertIs(reactor.seconds, time.monotonic)
        # what the service tree schedules from now on is on that clock
        call = reactor.callLater(30, lambda: None)
        self.assertLess(abs(call.getTime() - time.monotonic() - 30), 1)
        self.assertIs(top.core.reactor, reactor)
        for pending in reactor.getDelayedCalls():
            self.assertLess(pending.getTime() - time.monotonic(), 3600)  # nothing left on the wall clock
            pending.cancel()

    def test_a_test_clock_is_left_alone(self):
        clock = MemoryReactorClock()
        tap.makeService(options(), clock)
        self.assertEqual(clock.seconds(), 0)
        self.assertIsNot(clock.seconds, time.monotonic)

"""The dispatcher's one check of every backend result (IBackend, docs/backends.md):
response APDUs of 2..65,538 bytes, ATRs of 2..33 bytes, anything else C086."""

import attr
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from cloudfoxy_proxy import errors
from cloudfoxy_proxy.interfaces import IBackend, ReaderInfo
from cloudfoxy_proxy.dispatch import Dispatcher, Session
from cloudfoxy_proxy.parser import make_command
from cloudfoxy_proxy.registry import ReaderRegistry


@implementer(IBackend)
@attr.s
class Scripted:
    """Answers each call with the next of ``answers`` (bytes, or anything a
    broken backend might return), synchronously or in a fired Deferred."""

    answers = attr.ib(factory=list)
    deferred = attr.ib(default=False)
    description = "scripted"

    def start(self, registry):
        registry.update(self, [ReaderInfo("k", "Card")])

    def stop(self):
        pass

    def _next(self):
        value = self.answers.pop(0)
        return succeed(value) if self.deferred else value

    def reset(self, key):
        return self._next()

    def transmit(self, key, apdu):
        return self._next()


def run(backend, *commands, clock=None):
    registry = ReaderRegistry()
    backend.start(registry)
    dispatcher = Dispatcher(registry, clock or Clock())
    cmds = [make_command([str(i), *c]) for i, c in enumerate(commands)]
    d = dispatcher.submit("Card", cmds, session=Session())
    return [r for _, r in d.result]


class Warnings:
    def __init__(self, case):
        self.lines = []
        globalLogPublisher.addObserver(self.observe)
        case.addCleanup(globalLogPublisher.removeObserver, self.observe)

    def observe(self, event):
        if event.get("log_level") == LogLevel.warn and "C086" in event.get("log_format", ""):
            self.lines.append(event)


class ResultCheckTests(SynchronousTestCase):
    APDU = ("APDU", "00A4000C023F00")

    def check(self, deferred):
        answers = [b"", b"\x90", b"\x90\x00", b"\x00" * 65536 + b"\x90\x00",
                   b"\x00" * 65537 + b"\x90\x00", "9000", None]
        got = run(Scripted(list(answers), deferred), *[self.APDU] * len(answers))
        self.assertEqual(got, [errors.UPSTREAM, errors.UPSTREAM, "9000",
                               "00" * 65536 + "9000", errors.UPSTREAM, errors.UPSTREAM,
                               errors.UPSTREAM])

    def test_response_apdu_lengths_sync(self):
        self.check(False)

    def test_response_apdu_lengths_deferred(self):
        self.check(True)

    def test_atr_lengths(self):
        for deferred in (False, True):
            answers = [b"\x3b", b"\x3b\x00", b"\x3b" + b"\x00" * 32, b"\x3b" + b"\x00" * 33]
            got = run(Scripted(list(answers), deferred), *[("RESET",)] * len(answers))
            self.assertEqual(got, [errors.UPSTREAM, "3B00", "3B" + "00" * 32, errors.UPSTREAM])

    def test_one_warning_names_backend_and_reader_and_is_rate_limited(self):
        warnings = Warnings(self)
        clock = Clock()
        backend = Scripted([b"\x90"] * 50)
        registry = ReaderRegistry()
        backend.start(registry)
        dispatcher = Dispatcher(registry, clock)
        for _ in range(40):
            dispatcher.submit("Card", [make_command(["1", *self.APDU])])
        self.assertEqual(len(warnings.lines), 1)
        event = warnings.lines[0]
        self.assertEqual((event["backend"], event["reader"]), ("scripted", "Card"))
        self.assertIn("response APDU of 1 bytes", event["why"])
        clock.advance(Dispatcher.REJECT_WARN_EVERY)
        dispatcher.submit("Card", [make_command(["1", *self.APDU])])
        self.assertEqual(len(warnings.lines), 2)
        self.assertIn("39 more", warnings.lines[1]["more"])


@implementer(IBackend)
@attr.s
class Batching(Scripted):
    """Records batches; answers each with ``batch_answer(steps)``."""

    batches = attr.ib(factory=list)
    singles = attr.ib(factory=list)
    pending = attr.ib(default=None)

    def transmit(self, key, apdu):
        self.singles.append(apdu)
        return b"\x90\x00"

    def transmit_batch(self, key, steps):
        self.batches.append(steps)
        if self.pending is not None:
            return self.pending
        return [b"\x3b\x00" if kind == "RESET" else (b"\x90" if data == b"\x00\x00\x00\x01"
                                                      else b"\x61" + data[1:2] + b"\x90\x00")
                for kind, data in steps]


class BatchTests(SynchronousTestCase):
    """Issue 12 point 6: a request's run of RESET/APDU commands goes to
    ``transmit_batch`` as one call, results checked one by one."""

    def setUp(self):
        self.clock = Clock()
        self.registry = ReaderRegistry()
        self.backend = Batching()
        self.backend.start(self.registry)
        self.dispatcher = Dispatcher(self.registry, self.clock, command_timeout=2.0)

    def submit(self, *commands):
        cmds = [make_command([str(i), *c]) for i, c in enumerate(commands)]
        return self.dispatcher.submit("Card", cmds)

    def test_run_is_one_batch_with_parse_errors_in_place(self):
        d = self.submit(("RESET",), ("APDU", "00A4000C"), ("APDU", "zz"), ("APDU", "00000001"),
                        ("APDU", "00B00000"))
        self.assertEqual(self.backend.batches, [[("RESET", None), ("APDU", b"\x00\xa4\x00\x0c"),
                                                 ("APDU", b"\x00\x00\x00\x01"),
                                                 ("APDU", b"\x00\xb0\x00\x00")]])
        self.assertEqual(self.successResultOf(d), [
            ("0", "3B00"), ("1", "61A49000"), ("2", errors.MALFORMED), ("3", errors.UPSTREAM),
            ("4", "61B09000")])

    def test_single_command_uses_transmit(self):
        self.assertEqual(self.successResultOf(self.submit(("APDU", "00A4000C"))), [("0", "9000")])
        self.assertEqual((self.backend.batches, self.backend.singles), ([], [b"\x00\xa4\x00\x0c"]))

    def test_deferred_batch_and_step_errors(self):
        from twisted.internet.defer import Deferred
        from cloudfoxy_proxy.errors import CardError
        self.backend.pending = Deferred()
        d = self.submit(("APDU", "00A4000C"), ("APDU", "00B00000"), ("APDU", "00B00001"))
        self.assertNoResult(d)
        self.backend.pending.callback([b"\x90\x00", CardError(errors.NO_CARD)])  # one short
        self.assertEqual(self.successResultOf(d), [("0", "9000"), ("1", errors.NO_CARD),
                                                   ("2", errors.UPSTREAM)])

    def test_batch_timeout_scales_with_steps(self):
        from twisted.internet.defer import Deferred
        self.backend.pending = Deferred()
        d = self.submit(("APDU", "00A4000C"), ("APDU", "00B00000"))
        self.clock.advance(3.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertEqual(self.successResultOf(d), [("0", errors.UPSTREAM), ("1", errors.UPSTREAM)])
        self.assertEqual(self.registry.get("Card").queue.busy, False)


@implementer(IBackend)
class FlakyStart:
    """A backend whose start fails ``failures`` times, then works."""

    description = "flaky"

    def __init__(self, failures, error=OSError("upstream not there")):
        self.failures = failures
        self.error = error
        self.starts = self.stops = 0

    def start(self, registry):
        self.starts += 1
        if self.starts <= self.failures:
            raise self.error
        registry.update(self, [ReaderInfo("k", "Flaky")])

    def stop(self):
        self.stops += 1

    def reset(self, key):
        return b"\x3b\x00"

    def transmit(self, key, apdu):
        return b"\x90\x00"


class BackendServiceTests(SynchronousTestCase):
    """Issue 12 point 8: a failed start is retried with back-off and shown
    as not ready; a configuration error (ValueError) refuses to start."""

    def test_runtime_failure_is_retried_with_backoff(self):
        from cloudfoxy_proxy.backends.service import BackendService
        clock = Clock()
        registry = ReaderRegistry()
        backend = FlakyStart(3)
        warnings = []
        globalLogPublisher.addObserver(warnings.append)
        self.addCleanup(globalLogPublisher.removeObserver, warnings.append)
        service = BackendService(backend, registry, clock=clock)
        service.startService()
        self.assertFalse(service.ready)
        self.assertEqual(backend.starts, 1)
        for delay, starts in ((1.0, 2), (2.0, 3), (4.0, 4)):
            clock.advance(delay - 0.01)
            self.assertEqual(backend.starts, starts - 1)
            clock.advance(0.01)
            self.assertEqual(backend.starts, starts)
        self.assertTrue(service.ready)
        self.assertEqual([r.name for r in registry.readers], ["Flaky"])
        lines = [e for e in warnings if "is not ready" in e.get("log_format", "")]
        self.assertEqual(len(lines), 3)
        self.assertEqual(backend.stops, 3)  # each failed start undone before the next

    def test_stop_cancels_the_retry(self):
        from cloudfoxy_proxy.backends.service import BackendService
        clock = Clock()
        backend = FlakyStart(5)
        service = BackendService(backend, ReaderRegistry(), clock=clock)
        with_logs = []
        globalLogPublisher.addObserver(with_logs.append)
        self.addCleanup(globalLogPublisher.removeObserver, with_logs.append)
        service.startService()
        service.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_configuration_error_exits(self):
        from cloudfoxy_proxy.backends.service import BackendService
        service = BackendService(FlakyStart(1, ValueError("bad setting")), ReaderRegistry(),
                                 clock=Clock())
        self.assertRaises(SystemExit, service.startService)

"""The dispatcher's one check of every backend result (IBackend, docs/backends.md):
response APDUs of 2..65,538 bytes, ATRs of 2..33 bytes, anything else C086."""

import attr
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from cloudfoxy_proxy import errors
from cloudfoxy_proxy.backend import IBackend, ReaderInfo
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

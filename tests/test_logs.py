"""The --log-format observers in memory (logs.py): one JSON object per
event in the shape log shippers read, and --log-level applied to every
event, Twisted's own included."""

import io
import json

from twisted.internet.protocol import Factory
from twisted.logger import LogPublisher, Logger, globalLogPublisher
from twisted.logger._legacy import publishToNewObserver
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy import logs


class Thing:
    def __repr__(self):
        return "<Thing>"


class ObserverTests(SynchronousTestCase):
    def setUp(self):
        self.addCleanup(logs.set_level, "info")
        self.out = io.StringIO()
        self.publisher = LogPublisher()

    def use(self, format, level="info"):
        logs.set_level(level)
        self.publisher.addObserver(logs.observer(format, self.out))
        return Logger(namespace="cloudfoxy_proxy.test", observer=self.publisher)

    def lines(self):
        return [json.loads(line) for line in self.out.getvalue().splitlines()]

    def test_json_line_shape(self):
        log = self.use("json")
        log.warn("client {peer} sent {n} bytes for {reader!r}", peer="127.0.0.1:5000", n=3,
                 reader="Emulated 00", thing=Thing(), raw=b"\x00", nested={"a": [1, None]},
                 nan=float("nan"))
        [line] = self.lines()
        self.assertEqual(set(line) - {"time"}, {"level", "message", "logger", "log_namespace", "peer", "n",
                                                 "reader", "thing", "raw", "nested", "nan"})
        self.assertRegex(line["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual(
            {k: v for k, v in line.items() if k != "time"},
            {"level": "warn", "message": "client 127.0.0.1:5000 sent 3 bytes for 'Emulated 00'",
             "logger": "cloudfoxy_proxy.test", "log_namespace": "cloudfoxy_proxy.test",
             "peer": "127.0.0.1:5000", "n": 3, "reader": "Emulated 00", "thing": "<Thing>",
             "raw": "b'\\x00'", "nested": {"a": [1, None]}, "nan": "nan"})

    def test_failure_adds_its_traceback(self):
        log = self.use("json")
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("reading {reader} failed", Failure(), reader="R")
        [line] = self.lines()
        self.assertEqual((line["level"], line["message"]), ("critical", "reading R failed"))
        self.assertIn("ZeroDivisionError", line["traceback"])

    def test_legacy_events_lose_their_bookkeeping(self):
        self.use("json")
        # what twisted.python.log.msg("Site starting on 8080") publishes
        publishToNewObserver(self.publisher, {"message": ("Site starting on 8080",), "isError": 0,
                                              "system": "-", "time": 1.5}, legacy_log.textFromEventDict)
        [line] = self.lines()
        self.assertEqual((line["level"], line["message"]), ("info", "Site starting on 8080"))
        self.assertFalse({"isError", "system", "format"} & set(line), line)

    def test_level_applies_to_twisteds_lines_and_factories_are_debug(self):
        self.use("text", level="info")
        twisted_log = Logger(namespace="twisted.internet.base", observer=self.publisher)
        twisted_log.info("Main loop terminated.")
        twisted_log.debug("a debug line")
        # Twisted's own factory lines, from a real Factory (they go to the global publisher)
        globalLogPublisher.addObserver(self.publisher)
        self.addCleanup(globalLogPublisher.removeObserver, self.publisher)
        factory = Factory()
        factory.noisy = True
        factory.doStart()
        text = self.out.getvalue()
        self.assertIn("Main loop terminated.", text)
        self.assertNotIn("a debug line", text)
        self.assertNotIn("Starting factory", text)
        logs.set_level("debug")
        factory.doStop()
        self.assertIn("Stopping factory", self.out.getvalue())
        logs.set_level("warn")
        twisted_log.info("Received SIGTERM, shutting down.")
        twisted_log.error("an error")
        self.assertNotIn("SIGTERM", self.out.getvalue())
        self.assertIn("an error", self.out.getvalue())

    def test_json_factory_line_is_debug(self):
        self.use("json", level="debug")
        factory_log = Logger(namespace="twisted.internet.protocol.Factory", observer=self.publisher)
        factory_log.info("Starting factory {factory!r}", factory=Thing())
        [line] = self.lines()
        self.assertEqual((line["level"], line["message"], line["factory"]),
                         ("debug", "Starting factory <Thing>", "<Thing>"))

    def test_the_listening_port_line_is_kept_at_every_level(self):
        self.use("json", level="error")
        for text in ("LineFactory starting on 4001", "Site (TLS) starting on 8443", "(TCP Port 4001 Closed)"):
            publishToNewObserver(self.publisher, {"message": (text,), "isError": 0, "system": "-", "time": 1.5},
                                 legacy_log.textFromEventDict)
        self.assertEqual([line["message"] for line in self.lines()],
                         ["LineFactory starting on 4001", "Site (TLS) starting on 8443"])

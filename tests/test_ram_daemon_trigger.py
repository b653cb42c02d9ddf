"""The RAM daemon's triggers (docs/ramoverhttp.md "OCF daemon mode"): a
web page chooses neither the RAM server nor the card.  A trigger runs only
for an approved URL, on the reader configured for it in
``--ram-approved-urls`` or else ``--ram-reader``; a ``reader=`` naming
another reader is refused and starts nothing.

RamDaemonResource is driven with twisted.web's DummyRequest; RamClient is
replaced by a fake that records what it was asked to run."""

import os
import tempfile

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from cloudfoxy_proxy.frontends import ramclient
from cloudfoxy_proxy.frontends.ramclient import (
    FAILED_PNG, MAX_DAEMON_SESSIONS, PASSED, PASSED_PNG, RamDaemonResource, approved, read_approved_urls,
)

APPROVED = [
    ("https://ram.example/rt/", "Emulated 01"),  # a prefix with its own reader
    ("https://ram.example/rt/special", "Emulated 02"),  # an exact URL under it
    ("https://plain.example/update", None),  # exact, on --ram-reader
    ("https://plain.example/rt/", None),  # a prefix, on --ram-reader
]


class FakeClient:
    """Stands for RamClient: records its arguments; ``run()`` returns a
    Deferred the test fires."""

    made = []

    def __init__(self, dispatcher, reader, url, clock, session_id=None, **kw):
        self.reader, self.url, self.session_id = reader, url, session_id
        self.stopped = False
        self.result = Deferred()
        FakeClient.made.append(self)

    def run(self):
        return self.result

    def stop(self):
        self.stopped = True


class TriggerTests(SynchronousTestCase):
    def setUp(self):
        FakeClient.made = []
        self.patch(ramclient, "RamClient", FakeClient)
        self.clock = Clock()
        self.dispatcher = object()  # only handed to RamClient

    def daemon(self, entries=APPROVED, default_reader="Emulated 00"):
        return RamDaemonResource(self.dispatcher, self.clock, entries, default_reader)

    def get(self, resource, query, path=b"/update.png"):
        request = DummyRequest([path.lstrip(b"/")])
        request.uri = path + b"?" + query.encode("latin-1")
        request.client = IPv4Address("TCP", "127.0.0.1", 50123)
        request._disconnected = False
        request.render(resource)
        return request

    def result(self, request):
        [value] = request.responseHeaders.getRawHeaders(b"x-ram-result")
        return value.decode()

    def assertRefused(self, request, why):
        self.assertEqual(request.finished, 1)
        self.assertEqual(b"".join(request.written), FAILED_PNG)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [b"image/png"])
        self.assertIn(why, self.result(request))
        self.assertTrue(self.result(request).startswith("failed: "))
        self.assertEqual(FakeClient.made, [])  # nothing started

    def assertStarted(self, request, reader, url, session_id="s1"):
        self.assertEqual(request.finished, 0)  # answered when the session ends
        [client] = FakeClient.made
        self.assertEqual((client.reader, client.url, client.session_id), (reader, url, session_id))
        return client

    def test_approved_url_runs_on_its_configured_reader(self):
        resource = self.daemon()
        request = self.get(resource, "url=https://ram.example/rt/card-42&sessionId=s1")
        client = self.assertStarted(request, "Emulated 01", "https://ram.example/rt/card-42")
        self.assertEqual(resource.running, {client})
        client.result.callback((PASSED, "done"))
        self.assertEqual(request.finished, 1)
        self.assertEqual(b"".join(request.written), PASSED_PNG)
        self.assertEqual(self.result(request), "passed: done")
        self.assertEqual(resource.running, set())

    def test_the_exact_url_and_the_longest_prefix_win(self):
        resource = self.daemon()
        self.assertStarted(self.get(resource, "url=https://ram.example/rt/special&sessionId=s1"),
                           "Emulated 02", "https://ram.example/rt/special")
        self.assertEqual(approved("https://ram.example/rt/special/x", APPROVED),
                         ("https://ram.example/rt/", "Emulated 01"))
        self.assertEqual(approved("https://a/rt/x/y", [("https://a/", "A"), ("https://a/rt/x/", "B"),
                                                       ("https://a/rt/", "C")]), ("https://a/rt/x/", "B"))

    def test_a_url_decoded_from_the_query(self):
        self.assertStarted(self.get(self.daemon(), "url=https%3A%2F%2Fram.example%2Frt%2Fx&sessionId=s1"),
                           "Emulated 01", "https://ram.example/rt/x")

    def test_reader_param_naming_the_configured_reader_is_accepted(self):
        for asked in ("Emulated 01", "Emulated%2001", "Emulated+01"):
            FakeClient.made = []
            request = self.get(self.daemon(), f"url=https://ram.example/rt/x&sessionId=s1&reader={asked}")
            self.assertStarted(request, "Emulated 01", "https://ram.example/rt/x")

    def test_reader_param_naming_another_reader_is_refused(self):
        resource = self.daemon()
        with capturedLogs() as events:
            for asked in ("Emulated 00", "Emulated%2000", "Emulated 02", "*", "RAM alice", "emulated 01"):
                request = self.get(resource, f"url=https://ram.example/rt/x&sessionId=s1&reader={asked}")
                self.assertRefused(request, "is not the reader configured for https://ram.example/rt/")
        self.assertEqual(resource.running, set())
        lines = [formatEvent(e) for e in events]
        self.assertEqual(len(lines), 6)
        self.assertEqual(lines[0], "client 127.0.0.1:50123: RAM daemon request refused: reader= "
                                   "'Emulated 00' is not the reader configured for https://ram.example/rt/")

    def test_refusals_are_rate_limited(self):
        resource = self.daemon()
        with capturedLogs() as events:
            for _ in range(30):
                self.get(resource, "url=https://ram.example/rt/x&sessionId=s1&reader=Emulated 00")
            self.clock.advance(11)
        text = [formatEvent(e) for e in events]
        self.assertEqual(sum("RAM daemon request refused" in line for line in text), 10)
        self.assertIn("20 more refused RAM daemon requests suppressed in the last 10 s", text)
        self.assertEqual(FakeClient.made, [])

    def test_default_reader_when_the_line_has_none(self):
        for url in ("https://plain.example/update", "https://plain.example/rt/a/b"):
            FakeClient.made = []
            self.assertStarted(self.get(self.daemon(), f"url={url}&sessionId=s1"), "Emulated 00", url)
        FakeClient.made = []
        self.assertStarted(self.get(self.daemon(), "url=https://plain.example/update&sessionId=s1"
                                                   "&reader=Emulated 00"),
                           "Emulated 00", "https://plain.example/update")
        # the default is not a fallback a caller can step away from
        FakeClient.made = []
        self.assertRefused(self.get(self.daemon(), "url=https://plain.example/update&sessionId=s1"
                                                   "&reader=Emulated 03"),
                           "is not the reader configured")

    def test_no_configured_reader_is_refused(self):
        resource = self.daemon(default_reader=None)
        for query in ("url=https://plain.example/update&sessionId=s1",
                      "url=https://plain.example/update&sessionId=s1&reader=Emulated 00"):
            self.assertRefused(self.get(resource, query),
                               "no reader for https://plain.example/update in --ram-approved-urls "
                               "and no --ram-reader")
        # a line with its own reader still runs without --ram-reader
        self.assertStarted(self.get(resource, "url=https://ram.example/rt/x&sessionId=s1"),
                           "Emulated 01", "https://ram.example/rt/x")

    def test_unapproved_urls_are_refused(self):
        resource = self.daemon()
        for url in ("https://evil.example/rt/x", "https://ram.example/rtx", "https://ram.example/rt",
                    "http://ram.example/rt/x", "https://ram.example.evil/rt/x", "https://plain.example/update2",
                    "https%3A%2F%2Fevil.example%2Frt%2F", "https://plain.example/updatex/"):
            self.assertRefused(self.get(resource, f"url={url}&sessionId=s1&reader=Emulated 01"),
                               "is not in --ram-approved-urls")

    def test_other_refusals_start_nothing(self):
        resource = self.daemon()
        self.assertRefused(self.get(resource, "url=https://ram.example/rt/x&sessionId=s1", path=b"/x.gif"),
                           "does not end in .png")
        self.assertRefused(self.get(resource, "sessionId=s1"), "no url=")
        self.assertRefused(self.get(resource, "url=https://ram.example/rt/x&pinrequired=1"), "pinrequired")

    def test_at_most_max_sessions(self):
        resource = self.daemon()
        for i in range(MAX_DAEMON_SESSIONS):
            self.get(resource, f"url=https://ram.example/rt/{i}&sessionId=s{i}")
        self.assertEqual(len(FakeClient.made), MAX_DAEMON_SESSIONS)
        started, FakeClient.made = FakeClient.made, []
        self.assertRefused(self.get(resource, "url=https://ram.example/rt/x&sessionId=s"), "sessions running")
        resource.stop()
        self.assertTrue(all(c.stopped for c in started))


class FileTests(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()

    def file(self, data):
        path = os.path.join(self.dir, "approved")
        with open(path, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        return path

    def test_url_and_optional_reader(self):
        path = self.file("# card update servers\n\n"
                         "https://ram.example/rt/ Emulated 00\n"
                         "  https://ram.example/exact\t\tREINER SCT cyberJack RFID basis 00  \n"
                         "http://127.0.0.1:8080/rt/\n"
                         "https://h/x  Reader #2 (left)\n")
        self.assertEqual(read_approved_urls(path), [
            ("https://ram.example/rt/", "Emulated 00"),
            ("https://ram.example/exact", "REINER SCT cyberJack RFID basis 00"),
            ("http://127.0.0.1:8080/rt/", None),
            ("https://h/x", "Reader #2 (left)"),
        ])

    def test_bad_files_name_the_file_and_line(self):
        for data, why in (("ftp://h/x Emulated 00\n", "line 1: not an http:// or https:// URL"),
                          ("# x\nEmulated 00 https://h/rt/\n", "line 2: not an http:// or https:// URL"),
                          ("https:// Emulated 00\n", "line 1: not an http:// or https:// URL"),
                          ("https://h/rt/ A\nhttps://h/rt/ B\n", "line 2: https://h/rt/ is given twice "
                                                                 "(first on line 1)"),
                          ("# only comments\n\n", "no URL in the file"),
                          ("", "no URL in the file"),
                          (b"https://h/rt/ \xff\n", "can't decode")):
            path = self.file(data)
            with self.assertRaises(ValueError) as e:
                read_approved_urls(path)
            message = str(e.exception)
            self.assertIn(f"--ram-approved-urls {path!r}", message)
            self.assertIn(why, message)
            self.assertNotIn("\n", message)
        with self.assertRaisesRegex(ValueError, "No such file or directory"):
            read_approved_urls(os.path.join(self.dir, "missing"))

    def test_the_file_drives_the_daemon(self):
        path = self.file("https://ram.example/rt/ Emulated 02\nhttps://plain.example/rt/\n")
        FakeClient.made = []
        self.patch(ramclient, "RamClient", FakeClient)
        resource = RamDaemonResource(object(), Clock(), read_approved_urls(path), "Emulated 00")
        for url, reader in (("https://ram.example/rt/a", "Emulated 02"), ("https://plain.example/rt/b", "Emulated 00")):
            request = DummyRequest([b"x.png"])
            request.uri = f"/x.png?url={url}&sessionId=s".encode()
            request._disconnected = False
            self.assertIs(resource.render(request), NOT_DONE_YET)
            self.assertEqual((FakeClient.made[-1].reader, FakeClient.made[-1].url), (reader, url))

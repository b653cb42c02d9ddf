"""The HTTP base (frontends/http.py) in memory: one channel and Site for
every HTTP front end; its head deadline, body limits, Host rule, throttled
refusals and ALPN choice; and the twisted.web internals it relies on."""

import twisted
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource

from support import memory_core

from cloudfoxy_proxy.access import Access
from cloudfoxy_proxy.dispatch import Dispatcher
from cloudfoxy_proxy.frontends import http
from cloudfoxy_proxy.registry import ReaderRegistry

SECRET = "base-secret-0123"


class Echo(Resource):
    """Answers who the request runs as and the body's length."""

    isLeaf = True

    def render(self, request):
        identity = request.session.identity
        return b"%s %d" % ((identity.name if identity else "-").encode(), len(request.content.read()))


class EchoSite(http.HttpSite):
    frontend = "api"
    log_prefix = "EchoSite"

    def route(self, head):
        if head.path == b"/open":
            return http.Route({b"GET"}, auth=http.NONE)
        if head.path == b"/upload":
            return http.Route({b"POST"}, body=1000)
        return http.Route({b"GET"})


class BaseTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.dispatcher = Dispatcher(ReaderRegistry(), self.clock, access=Access(simple=[(SECRET, "api")]))
        self.core = memory_core(self.dispatcher, self.clock, header_timeout=10.0, idle_timeout=300)
        self.site = EchoSite(Echo(), self.core)

    def connect(self, host="10.0.0.9"):
        peer = IPv4Address("TCP", host, 5555)
        channel = self.site.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        channel.makeConnection(transport)
        return channel, transport

    def request(self, head, body=b"", host="10.0.0.9"):
        channel, t = self.connect(host)
        channel.dataReceived(head + b"\r\n\r\n" + body)
        return t

    def auth(self, secret=SECRET):
        return b"Authorization: Bearer " + secret.encode()

    def test_the_secret_is_checked_by_identify_and_the_request_runs_as_its_identity(self):
        t = self.request(b"GET /x HTTP/1.1\r\nHost: h\r\n" + self.auth())
        self.assertTrue(t.value().startswith(b"HTTP/1.1 200 "), t.value())
        self.assertTrue(t.value().endswith(b"\r\n\r\napi 0"))
        self.assertEqual(self.site.counters.requests, 1)

    def test_no_or_a_wrong_secret_is_401_json_and_guesses_wait(self):
        t = self.request(b"GET /x HTTP/1.1\r\nHost: h")
        self.assertTrue(t.value().startswith(b"HTTP/1.1 401 "), t.value())
        self.assertIn(b'"code":"C085"', t.value())
        self.assertTrue(t.disconnecting)
        for n in range(3):  # the first three guesses of a peer are answered at once
            t = self.request(b"GET /x HTTP/1.1\r\nHost: h\r\n" + self.auth("guess%d" % n))
            self.assertTrue(t.value().startswith(b"HTTP/1.1 401 "))
        t = self.request(b"GET /x HTTP/1.1\r\nHost: h\r\n" + self.auth("guess4"))
        self.assertEqual(t.value(), b"")  # the fourth waits (access.Throttle)
        self.clock.advance(0.3)
        self.assertTrue(t.value().startswith(b"HTTP/1.1 401 "))
        self.assertEqual(self.site.counters.auth_failures, 4)

    def test_a_body_is_judged_from_the_head_and_never_stored_when_refused(self):
        t = self.request(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 100000000\r\n" + self.auth())
        self.assertTrue(t.value().startswith(b"HTTP/1.1 413 "), t.value())
        t = self.request(b"GET /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n" + self.auth(), b"hello")
        self.assertTrue(t.value().startswith(b"HTTP/1.1 413 "), t.value())  # no body where none is expected
        t = self.request(b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n" + self.auth())
        self.assertTrue(t.value().startswith(b"HTTP/1.1 411 "), t.value())
        t = self.request(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n" + self.auth(), b"hello")
        self.assertTrue(t.value().endswith(b"api 5"), t.value())
        t = self.request(b"PUT /upload HTTP/1.1\r\nHost: h\r\n" + self.auth())
        self.assertTrue(t.value().startswith(b"HTTP/1.1 405 "), t.value())
        self.assertIn(b"Allow: POST", t.value())
        self.assertEqual(self.site.buffers.used, 0)

    def test_an_unauthenticated_body_under_the_limit_does_not_reach_the_budget(self):
        t = self.request(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 900", b"a" * 900)
        self.assertTrue(t.value().startswith(b"HTTP/1.1 401 "))
        self.assertEqual(self.site.buffers.used, 0)

    def test_a_request_head_must_arrive_within_the_deadline(self):
        channel, t = self.connect()
        for _ in range(9):
            channel.dataReceived(b"G" if not t.value() else b"")
            self.clock.advance(1)
        self.assertFalse(t.disconnected)
        self.clock.advance(1.5)
        self.assertTrue(t.disconnected)  # aborted at 10 s of a head
        channel, t = self.connect()
        self.clock.advance(60)
        self.assertFalse(t.disconnected)  # no head started: the idle timeout's business
        channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: h\r\n" + self.auth() + b"\r\n\r\n")
        self.clock.advance(60)
        self.assertFalse(t.disconnected)  # between requests: no deadline either

    def test_each_head_of_a_connection_has_its_own_deadline(self):
        channel, t = self.connect()
        request = b"GET /x HTTP/1.1\r\nHost: h\r\n" + self.auth() + b"\r\n\r\n"
        channel.dataReceived(request)  # the check of the first head is left running...
        self.clock.advance(8)
        channel.dataReceived(b"GET /x HTTP/1.1\r\n")  # ...and a second head starts 2 s before it fires
        self.clock.advance(2)
        self.assertFalse(t.disconnected)  # that head has 10 s of its own
        self.clock.advance(7.5)
        self.assertFalse(t.disconnected)
        channel.dataReceived(b"Host: h\r\n")
        self.clock.advance(0.6)
        self.assertTrue(t.disconnected)  # 10.1 s after its first byte
        self.assertEqual(t.value().count(b"HTTP/1.1 200 "), 1)
        channel, t = self.connect()
        for _ in range(3):  # heads completed within the deadline, one after the other
            channel.dataReceived(request)
            self.clock.advance(6)
        self.assertFalse(t.disconnected)
        self.assertEqual(t.value().count(b"HTTP/1.1 200 "), 3)
        channel.connectionLost(None)
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.func == channel._too_slow], [])

    def test_the_deadline_is_never_longer_than_the_idle_timeout(self):
        core = memory_core(self.dispatcher, self.clock, header_timeout=10.0, idle_timeout=3)
        self.assertEqual(EchoSite(Echo(), core).header_timeout, 3)

    def test_requests_without_a_secret_must_name_this_machine_in_host(self):
        t = self.request(b"GET /open HTTP/1.1\r\nHost: attacker.example:8080", host="127.0.0.1")
        self.assertTrue(t.value().startswith(b"HTTP/1.1 403 "), t.value())
        for host in (b"127.0.0.1:9100", b"localhost", b"[::1]:80", b"10.1.2.3"):
            t = self.request(b"GET /open HTTP/1.1\r\nHost: " + host, host="127.0.0.1")
            self.assertTrue(t.value().startswith(b"HTTP/1.1 200 "), (host, t.value()))
        # a secret cannot come from a DNS-rebinding page: any Host then
        t = self.request(b"GET /x HTTP/1.1\r\nHost: proxy.example\r\n" + self.auth())
        self.assertTrue(t.value().startswith(b"HTTP/1.1 200 "))

    def test_protected_mode_refuses_other_hosts_with_403(self):
        self.dispatcher.access = Access()  # no credentials at all
        t = self.request(b"GET /x HTTP/1.1\r\nHost: h")
        self.assertTrue(t.value().startswith(b"HTTP/1.1 403 "), t.value())
        t = self.request(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1", host="127.0.0.1")
        self.assertTrue(t.value().endswith(b"anonymous 0"), t.value())
        # a DNS-rebinding page may send any Authorization: no secret proves anything here
        t = self.request(b"GET /x HTTP/1.1\r\nHost: attacker.example\r\n" + self.auth("junk"), host="127.0.0.1")
        self.assertTrue(t.value().startswith(b"HTTP/1.1 403 "), t.value())

    def test_alpn_offers_http_1_1_only(self):
        self.assertEqual(self.site.acceptableProtocols(), [b"http/1.1"])

    def test_twisted_web_internals_the_base_relies_on(self):
        """The base uses HTTPChannel's ``length``, ``requests``,
        ``writeHeaders`` and ``requestDone``; fails on a Twisted where
        they are gone (setup.cfg pins the tested range)."""
        channel = HTTPChannel()
        self.assertEqual(channel.length, 0)
        self.assertEqual(channel.requests, [])
        self.assertTrue(callable(channel.writeHeaders) and callable(channel.requestDone))
        major = int(twisted.__version__.split(".")[0])
        self.assertTrue(22 <= major <= 26, twisted.__version__)


class HostRuleTests(SynchronousTestCase):
    def test_host_allowed(self):
        for good in (b"127.0.0.1", b"127.0.0.1:1", b"[::1]:4001", b"localhost:80", b"app.localhost", b"192.0.2.7"):
            self.assertTrue(http.host_allowed(good), good)
        for bad in (None, b"", b"evil.example", b"127.0.0.1.evil.example", b"localhost.evil.example:80"):
            self.assertFalse(http.host_allowed(bad), bad)

    def test_credentials_of_authorization(self):
        import base64

        self.assertEqual(http.credential_of_authorization(b"Bearer abc"), "abc")
        self.assertEqual(http.credential_of_authorization(b"Basic " + base64.b64encode(b"u:pw")), "pw")
        for bad in (None, b"", b"Basic !!!", b"Digest x", b"Bearer "):
            self.assertIsNone(http.credential_of_authorization(bad), bad)

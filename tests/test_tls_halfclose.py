"""The client is done sending (a TCP half-close, or TLS close_notify,
which tls.HalfClosingTLSEndpoint turns into the same
``readConnectionLost``): every HTTP front end's channel (frontends/http.py)
answers the request it has, then closes; the line protocol does the same
(tests/test_line_integration.py, tests/test_tls_listeners.py)."""

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from support import memory_core

from cloudfoxy_proxy import tls
from cloudfoxy_proxy.access import Access
from cloudfoxy_proxy.dispatch import Dispatcher
from cloudfoxy_proxy.frontends import http
from cloudfoxy_proxy.registry import ReaderRegistry

SECRET = "half-close-secret-0123"
AUTH = b"Authorization: Bearer " + SECRET.encode()


class Later(Resource):
    """Answers when the test fires ``pending``'s Deferreds (a card that takes its time)."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.pending = []

    def render(self, request):
        d = Deferred()
        self.pending.append(d)
        return http.answer_later(request, d, lambda body: body, lambda f: b"failed")


class LaterSite(http.HttpSite):
    frontend = "api"

    def route(self, head):
        return http.Route({b"GET"})


class HttpHalfClose(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        dispatcher = Dispatcher(ReaderRegistry(), self.clock, access=Access(simple=[(SECRET, "api")]))
        self.resource = Later()
        self.site = LaterSite(self.resource, memory_core(dispatcher, self.clock))
        peer = IPv4Address("TCP", "10.0.0.9", 5555)
        self.channel = self.site.buildProtocol(peer)
        self.transport = StringTransport(peerAddress=peer)
        self.channel.makeConnection(self.transport)

    def test_the_channel_is_half_closeable(self):
        self.assertTrue(IHalfCloseableProtocol.providedBy(self.channel))

    def test_a_request_then_a_half_close_is_answered_then_closed(self):
        self.channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: h\r\n" + AUTH + b"\r\n\r\n")
        self.channel.readConnectionLost()  # the client is done sending
        self.assertFalse(self.transport.disconnecting)  # its request still runs
        self.resource.pending[0].callback(b"the answer")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 200 "), self.transport.value())
        self.assertIn(b"the answer", self.transport.value())
        self.assertTrue(self.transport.disconnecting)  # then closed

    def test_pipelined_requests_then_a_half_close_are_all_answered(self):
        one = b"GET /x HTTP/1.1\r\nHost: h\r\n" + AUTH + b"\r\n\r\n"
        self.channel.dataReceived(one + one)
        self.channel.readConnectionLost()
        self.resource.pending[0].callback(b"first")
        self.assertFalse(self.transport.disconnecting)  # the second one runs now
        self.resource.pending[1].callback(b"second")
        self.assertEqual(self.transport.value().count(b"HTTP/1.1 200 "), 2)
        self.assertTrue(self.transport.disconnecting)

    def test_a_half_close_between_requests_or_inside_a_head_closes(self):
        self.channel.readConnectionLost()
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.transport.value(), b"")
        channel = self.site.buildProtocol(None)
        t = StringTransport()
        channel.makeConnection(t)
        channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: h\r\n")  # a head that never ends
        channel.readConnectionLost()
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.resource.pending, [])  # nothing ran


class Endpoints(SynchronousTestCase):
    def test_tls_server_endpoints_answer_close_notify_and_others_are_unchanged(self):
        from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
        from twisted.internet.protocol import Factory

        from twisted.internet.ssl import CertificateOptions

        reactor = MemoryReactor()
        options = CertificateOptions()
        endpoint = tls.half_closing(SSL4ServerEndpoint(reactor, 4433, options, backlog=9, interface="127.0.0.1"))
        self.assertIsInstance(endpoint, tls.HalfClosingTLSEndpoint)
        endpoint.listen(Factory())
        port, factory, backlog, interface = reactor.tcpServers[0]
        self.assertEqual((port, backlog, interface), (4433, 9, "127.0.0.1"))
        self.assertEqual(factory.protocol.__name__, "HalfClosingTLSProtocol")
        self.assertIs(factory.wrappedFactory.__class__, Factory)
        tcp = TCP4ServerEndpoint(reactor, 1)
        self.assertIs(tls.half_closing(tcp), tcp)

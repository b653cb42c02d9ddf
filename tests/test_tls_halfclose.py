"""The client is done sending (a TCP half-close, or TLS close_notify,
which tls.HalfClosingTLSEndpoint turns into the same
``readConnectionLost``): every HTTP front end's channel (frontends/http.py)
answers the request it has, then closes; the line protocol does the same
(tests/test_line_integration.py, tests/test_tls_listeners.py)."""

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from zope.interface import directlyProvides

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
        directlyProvides(self.transport, ISSLTransport)  # close_notify comes over TLS
        self.transport.setTcpNoDelay = lambda on: None
        self.transport.getPeerCertificate = lambda: None
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


class HttpTcpFin(HttpHalfClose):
    def setUp(self):
        super().setUp()
        peer = IPv4Address("TCP", "10.0.0.9", 5556)
        self.channel = self.site.buildProtocol(peer)
        self.transport = StringTransport(peerAddress=peer)  # plain TCP
        self.channel.makeConnection(self.transport)

    def test_a_request_then_a_half_close_is_answered_then_closed(self):
        """On plain TCP a FIN is the client gone: closed now, nothing answered."""
        self.channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: h\r\n" + AUTH + b"\r\n\r\n")
        self.channel.readConnectionLost()
        self.assertTrue(self.transport.disconnecting)
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.channel.connectionLost(Failure(ConnectionDone()))  # once closed
        self.assertTrue(self.resource.pending[0].called)  # cancelled: its queue slot is free
        self.assertEqual(self.transport.value(), b"")

    test_pipelined_requests_then_a_half_close_are_all_answered = None


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


# --- integration: an mtls: listener (the ssl: ones: tests/test_tls_listeners.py) ---------------

def _mtls_half_close(port, d, alpn):
    import os
    import ssl

    from support import tls_half_close

    ctx = ssl.create_default_context(cafile=os.path.join(d, "ca.pem"))
    ctx.load_cert_chain(os.path.join(d, "client.pem"), os.path.join(d, "client.key"))
    if alpn:
        ctx.set_alpn_protocols(["h2", "http/1.1"])
    return tls_half_close(port, ctx, b">Emulated 00|\n>1:APDU:00A4000C023F00|\n>2:APDU:0084000008|\n\n")


import pytest  # noqa: E402


@pytest.mark.integration
@pytest.mark.parametrize("alpn", [False, True])
def test_mtls_listener_answers_a_request_then_close_notify(proxy_factory, tmp_path, alpn):
    import re

    from support import HOST
    from test_access_integration import make_pki

    d = str(tmp_path)
    make_pki(d)
    proxy = proxy_factory(
        "--no-signing",
        "--listen", f"mtls:0:privateKey={d}/server.key:certKey={d}/server.pem:caCerts={d}/ca.pem:interface={HOST}",
        listeners=2)
    got, how = _mtls_half_close(proxy.ports["LineFactory"][1], d, alpn)
    assert re.fullmatch(rb">1:9000\n>2:[0-9A-F]{16}9000\n@@\n", got), (got, how)
    assert how == "close_notify", how

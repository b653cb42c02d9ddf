"""Every private Twisted attribute the proxy relies on
(cloudfoxy_proxy/twisted_internals.py, the one place that touches them)
exists and means what it is used for on the installed Twisted, which must
be in the range setup.cfg pins."""

import re
import signal

import twisted
from twisted.application.internet import ClientService, StreamServerEndpointService
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy import twisted_internals as internals


class InternalsTests(SynchronousTestCase):
    def test_twisted_is_in_the_pinned_range(self):
        import os

        cfg = open(os.path.join(os.path.dirname(__file__), "..", "setup.cfg")).read()
        low, high = re.search(r"twisted\[tls\] >= ([\d.]+), < (\d+)", cfg).groups()
        version = tuple(int(x) for x in twisted.__version__.split(".")[:2])
        self.assertTrue(tuple(int(x) for x in low.split(".")) <= version < (int(high),), twisted.__version__)

    def test_listening_and_raise_listen_errors(self):
        reactor = MemoryReactor()
        service = StreamServerEndpointService(TCP4ServerEndpoint(reactor, 0), Factory())
        internals.raise_listen_errors(service)
        self.assertIs(service._raiseSynchronously, True)
        self.assertFalse(internals.listening(service))
        self.assertIsNone(internals.listening_port(service))
        service.privilegedStartService()
        service.startService()
        self.assertTrue(internals.listening(service))
        self.assertEqual(internals.listening_port(service).getHost().type, "TCP")
        service.stopService()

    def test_forget_exit_signal(self):
        clock = Clock()
        clock._exitSignal = signal.SIGTERM
        internals.forget_exit_signal(clock, signal.SIGTERM)
        self.assertIsNone(clock._exitSignal)
        from twisted.internet import base

        self.assertIn("_exitSignal", vars(base.ReactorBase))  # what twistd reads after the reactor stops

    def test_transport_buffers(self):
        from twisted.internet.abstract import FileDescriptor

        fd = FileDescriptor()
        self.assertEqual((fd.dataBuffer, fd.offset, fd._tempDataLen), (b"", 0, 0))
        self.assertTrue(internals.nothing_queued(fd))
        self.assertEqual(internals.unsent_bytes(fd), 0)
        fd._tempDataLen = 5
        self.assertFalse(internals.nothing_queued(fd))
        self.assertEqual(internals.unsent_bytes(fd), 5)

    def test_held_back_follows_tls_down_to_tcp(self):
        from twisted.internet.abstract import FileDescriptor
        from twisted.internet.protocol import Factory, Protocol
        from twisted.internet.ssl import CertificateOptions
        from twisted.internet.task import Clock
        from twisted.protocols.tls import TLSMemoryBIOFactory

        fd = FileDescriptor()
        fd._tempDataLen = 5
        tls = TLSMemoryBIOFactory(CertificateOptions(), False, Factory.forProtocol(Protocol),
                                  Clock()).buildProtocol(None)
        tls.makeConnection(fd)
        self.assertEqual((tls._appSendBuffer, tls._aggregator._buffer, tls.transport), ([], [], fd))
        tls._appSendBuffer.append(b"ab")
        tls._aggregator._buffer.append(b"cde")
        self.assertEqual(internals.held_back(tls), 10)
        self.assertEqual(internals.held_back(object()), 0)

    def test_held_back_is_kept_when_the_connection_is_lost(self):
        """What held_back relies on after a loss: Twisted's TCP transport
        drops its buffer without clearing it."""
        from twisted.internet.abstract import FileDescriptor
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        class Loop:
            def addWriter(self, _):
                pass

            removeWriter = addReader = removeReader = addWriter

        fd = FileDescriptor(reactor=Loop())
        fd.connected = 1
        fd.write(b"unsent answer")
        fd.connectionLost(Failure(ConnectionLost()))
        fd.write(b"after the loss")  # dropped
        self.assertEqual(internals.held_back(fd), len(b"unsent answer"))

    def test_tls_options(self):
        from twisted.internet.ssl import CertificateOptions

        options = CertificateOptions()
        endpoint = SSL4ServerEndpoint(MemoryReactor(), 0, options)
        self.assertIs(internals.tls_options(endpoint), options)
        self.assertIsNone(internals.tls_options(TCP4ServerEndpoint(MemoryReactor(), 0)))

    def test_quiet_retries(self):
        class Service(ClientService):
            pass

        logger = object()
        internals.quiet_retries(Service, logger)
        self.assertIs(Service._log, logger)
        self.assertTrue(hasattr(ClientService, "_log"))


class _ScheduleOnly:
    """A reactor that only schedules (ReactorBase without I/O), never run."""

    @staticmethod
    def make():
        from twisted.internet.base import ReactorBase

        class Reactor(ReactorBase):
            def installWaker(self):
                pass

            def wakeUp(self):
                pass

        return Reactor()


class MonotonicClockTests(SynchronousTestCase):
    def test_the_reactor_and_what_it_had_scheduled_move_onto_the_monotonic_clock(self):
        import time

        reactor = _ScheduleOnly.make()
        early = reactor.callLater(10, lambda: None)
        cancelled = reactor.callLater(5, lambda: None)
        cancelled.cancel()
        self.assertGreater(early.getTime(), 1e9)  # Twisted's default: wall-clock seconds
        self.assertEqual(internals.use_monotonic_clock(reactor), 2)  # the cancelled one moves too
        self.assertIs(reactor.seconds, time.monotonic)
        self.assertLess(abs(early.getTime() - time.monotonic() - 10), 1)  # what it had left
        self.assertIs(early.seconds, time.monotonic)  # its delay()/reset() use it too
        later = reactor.callLater(3, lambda: None)
        self.assertLess(abs(later.getTime() - time.monotonic() - 3), 1)
        self.assertLess(abs(reactor.timeout() - 3), 1)  # the next call is the new one
        self.assertIsNone(internals.use_monotonic_clock(reactor))  # once only

    def test_a_test_clock_is_left_alone(self):
        clock = Clock()
        self.assertIsNone(internals.use_monotonic_clock(clock))
        self.assertEqual(clock.seconds(), 0)
        self.assertIsNone(internals.use_monotonic_clock(MemoryReactor()))

    def test_the_attributes_it_moves_exist(self):
        reactor = _ScheduleOnly.make()
        self.assertIsInstance(reactor._pendingTimedCalls, list)
        self.assertIsInstance(reactor._newTimedCalls, list)


class RequestLineTests(SynchronousTestCase):
    def test_the_request_line_is_known_when_the_headers_are(self):
        from twisted.internet.testing import StringTransport
        from twisted.web.http import HTTPChannel

        seen = []

        class Channel(HTTPChannel):
            def allHeadersReceived(self):
                seen.append(internals.request_line(self))
                super().allHeadersReceived()

        channel = Channel()
        self.assertEqual(internals.request_line(channel), (None, None))
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"POST /a/b%20c?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n")
        self.assertEqual(seen, [(b"POST", b"/a/b%20c?x=1")])


class HalfClosingTLSTests(SynchronousTestCase):
    """The client's close_notify as a half-close, over Twisted's TLS in
    memory (iosim): a server protocol that is half-closeable answers, then
    its loseConnection sends the server's close_notify."""

    def connect(self, server_protocol, half_closeable=True):
        import os

        import twisted.test
        from twisted.internet import ssl
        from twisted.internet.protocol import Protocol
        from twisted.protocols.tls import TLSMemoryBIOFactory
        from twisted.test.iosim import connect, makeFakeClient, makeFakeServer

        with open(os.path.join(os.path.dirname(twisted.test.__file__), "server.pem"), "rb") as f:
            cert = ssl.PrivateCertificate.loadPEM(f.read())
        server_factory = TLSMemoryBIOFactory(cert.options(), False, Factory.forProtocol(lambda: server_protocol))
        server_factory.protocol = internals.half_closing_tls_protocol()

        got = self.got = []
        lost = self.lost = []

        class Client(Protocol):
            def connectionMade(self):
                self.transport.write(b"request\n")
                self.transport.loseConnection()  # close_notify right after the request

            def dataReceived(self, data):
                got.append(data)

            def connectionLost(self, reason):
                lost.append(reason)

        client_factory = TLSMemoryBIOFactory(ssl.CertificateOptions(), True, Factory.forProtocol(Client))
        server = server_factory.buildProtocol(None)
        client = client_factory.buildProtocol(None)
        pump = connect(server, makeFakeServer(server), client, makeFakeClient(client), greet=False)
        return pump

    def test_close_notify_is_a_half_close_and_the_answer_arrives(self):
        from twisted.internet.interfaces import IHalfCloseableProtocol
        from twisted.internet.protocol import Protocol
        from zope.interface import implementer

        @implementer(IHalfCloseableProtocol)
        class Server(Protocol):
            received = b""
            eof = False

            def dataReceived(self, data):
                self.received += data

            def readConnectionLost(self):
                self.eof = True
                self.transport.registerProducer(self, True)  # as the front ends do
                self.transport.write(b"answer to " + self.received)
                self.transport.loseConnection()

            def writeConnectionLost(self):
                pass

            def pauseProducing(self):
                pass

            resumeProducing = stopProducing = pauseProducing

        server = Server()
        pump = self.connect(server)
        pump.flush()
        self.assertTrue(server.eof)
        self.assertEqual(b"".join(self.got), b"answer to request\n")
        self.assertEqual(len(self.lost), 1)  # and the connection closed

    def test_a_protocol_that_is_not_half_closeable_is_closed_as_before(self):
        from twisted.internet.protocol import Protocol

        class Server(Protocol):
            received = b""
            lost = False

            def dataReceived(self, data):
                self.received += data

            def connectionLost(self, reason):
                self.lost = True

        server = Server()
        pump = self.connect(server)
        pump.flush()
        self.assertEqual(server.received, b"request\n")
        self.assertTrue(server.lost)
        self.assertEqual(self.got, [])

    def test_the_tls_internals_it_replaces_exist(self):
        from twisted.protocols.tls import TLSMemoryBIOProtocol

        for name in ("_flushReceiveBIO", "_flushSendBIO", "_shutdownTLS", "_tlsShutdownFinished"):
            self.assertTrue(callable(getattr(TLSMemoryBIOProtocol, name)), name)
        for name in ("_lostTLSConnection", "_aborted", "_producer"):
            self.assertTrue(hasattr(TLSMemoryBIOProtocol, name), name)

    def test_tls_server_parts(self):
        reactor = MemoryReactor()
        options = object()
        endpoint = SSL4ServerEndpoint(reactor, 443, options, backlog=7, interface="::1")
        self.assertEqual(internals.tls_server_parts(endpoint), (reactor, 443, options, 7, "::1"))
        self.assertIsNone(internals.tls_server_parts(TCP4ServerEndpoint(reactor, 1)))


class ProxyHeaderParsersTests(SynchronousTestCase):
    def test_the_parsers_read_a_v1_and_a_v2_header(self):
        v1, v2 = internals.proxy_header_parsers()
        info, rest = v1().feed(b"PROXY TCP4 10.1.2.3 10.0.0.1 5555 4001\r\nX")
        self.assertEqual((info.source.host, info.source.port, rest), ("10.1.2.3", 5555, b"X"))
        header = v2.PREFIX + b"\x21\x11\x00\x0c" + bytes([10, 1, 2, 3, 10, 0, 0, 1]) + b"\x15\xb3\x0f\xa1"
        info, rest = v2().feed(header + b"Y")
        self.assertEqual((info.source.host, info.source.port, rest), ("10.1.2.3", 5555, b"Y"))

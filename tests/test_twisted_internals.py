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
        service.privilegedStartService()
        service.startService()
        self.assertTrue(internals.listening(service))
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

"""The REST backend's per-APDU HTTP client (httptools), in memory: scripted servers."""

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy.backends.httpclient import HTTPPool
from cloudfoxy_proxy.errors import CardError


class FakeEndpoint:
    def __init__(self):
        self.connections = []
        self.hold = False
        self.pending = []

    def connect(self, factory):
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        self.connections.append((proto, transport))
        if self.hold:
            d = Deferred()
            self.pending.append((d, proto, transport))
            return d
        proto.makeConnection(transport)
        return succeed(proto)


class PoolTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        self.pool = HTTPPool(self.clock, self.endpoint, "cf.test:8081", max_body=1000, idle_timeout=20)

    def get(self, target=b"/api/v1/basic?x=1"):
        return self.pool.get(target, b"X-Auth-Token: t\r\n")

    def test_request_and_keep_alive(self):
        d = self.get()
        proto, t = self.endpoint.connections[0]
        self.assertEqual(t.value(), b"GET /api/v1/basic?x=1 HTTP/1.1\r\nHost: cf.test:8081\r\n"
                                    b"X-Auth-Token: t\r\n\r\n")
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n9000\r\n")
        self.assertEqual(self.successResultOf(d), (200, b"9000\r\n"))
        t.clear()
        d = self.get(b"/b")  # the same connection again
        self.assertEqual(len(self.endpoint.connections), 1)
        self.assertTrue(t.value().startswith(b"GET /b HTTP/1.1\r\n"))
        proto.dataReceived(b"HTTP/1.1 404 Not Found\r\n")
        proto.dataReceived(b"Transfer-Encoding: chunked\r\n\r\n4\r\nC083\r\n")
        self.assertNoResult(d)
        proto.dataReceived(b"3\r\n no\r\n0\r\n\r\n")
        self.assertEqual(self.successResultOf(d), (404, b"C083 no"))

    def test_two_at_once_use_two_connections(self):
        d1, d2 = self.get(), self.get()
        self.assertEqual(len(self.endpoint.connections), 2)
        (p1, _), (p2, _) = self.endpoint.connections
        p2.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")
        p1.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
        self.assertEqual((self.successResultOf(d1), self.successResultOf(d2)), ((200, b"a"), (200, b"b")))
        self.assertEqual(len(self.pool.idle), 2)

    def test_close_delimited_and_connection_close(self):
        d = self.get()
        proto, t = self.endpoint.connections[0]
        proto.dataReceived(b"HTTP/1.0 200 OK\r\n\r\n9000")
        self.assertNoResult(d)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.successResultOf(d), (200, b"9000"))
        d = self.get()
        proto, t = self.endpoint.connections[1]
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(self.successResultOf(d), (200, b"ok"))
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.pool.idle, [])

    def test_connection_lost_mid_answer_is_an_error_and_never_resent(self):
        d = self.get()
        proto, t = self.endpoint.connections[0]
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n90")
        proto.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(d, ConnectionLost)
        self.assertEqual(len(self.endpoint.connections), 1)

    def test_garbage_and_limits(self):
        for answer in [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n",
                       b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                       b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                       b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000]:
            d = self.get()
            proto, t = self.endpoint.connections[-1]
            proto.dataReceived(answer)
            self.failureResultOf(d, CardError)
            self.assertTrue(t.disconnecting)

    def test_cancel_aborts_and_the_connection_is_not_reused(self):
        d = self.get()
        proto, t = self.endpoint.connections[0]
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(t.disconnecting)
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n9000")  # late: ignored
        self.get()
        self.assertEqual(len(self.endpoint.connections), 2)

    def test_cancel_while_connecting(self):
        self.endpoint.hold = True
        d = self.get()
        d.cancel()
        self.failureResultOf(d, CancelledError)

    def test_idle_connections_expire(self):
        d = self.get()
        proto, t = self.endpoint.connections[0]
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(d), (200, b""))
        self.clock.advance(21)
        self.get()
        self.assertEqual(len(self.endpoint.connections), 2)
        self.assertTrue(t.disconnecting)

    def test_continue_is_skipped_and_close_closes_idle(self):
        d = self.get()
        proto, t = self.endpoint.connections[0]
        proto.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
        self.assertEqual(self.successResultOf(d), (200, b"x"))
        self.pool.close()
        self.assertTrue(t.disconnecting)

    def test_http10_answer_closes_unless_keep_alive(self):
        d = self.get()
        proto, t = self.endpoint.connections[0]
        proto.dataReceived(b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\n9000")
        self.assertEqual(self.successResultOf(d), (200, b"9000"))
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.pool.idle, [])
        d = self.get()
        proto, t = self.endpoint.connections[1]
        proto.dataReceived(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 4\r\n\r\n9000")
        self.assertEqual(self.successResultOf(d), (200, b"9000"))
        self.assertFalse(t.disconnecting)
        self.get()
        self.assertEqual(len(self.endpoint.connections), 2)  # reused

    def test_bytes_after_the_answer_deliver_it_and_drop_the_connection(self):
        d = self.get()
        proto, t = self.endpoint.connections[0]
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n9000HTTP/1.1 200 OK\r\n")
        self.assertEqual(self.successResultOf(d), (200, b"9000"))
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.pool.idle, [])

    def test_idle_connection_closed_by_the_server_is_skipped_before_writing(self):
        d = self.get()
        proto, t = self.endpoint.connections[0]
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n9000")
        self.successResultOf(d)
        t.clear()
        proto.connectionLost(Failure(ConnectionDone()))  # the server closed it while idle
        d = self.get()
        self.assertEqual(t.value(), b"")  # nothing written to the closed connection
        proto2, t2 = self.endpoint.connections[1]
        self.assertTrue(t2.value().startswith(b"GET "))
        proto2.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n9000")
        self.assertEqual(self.successResultOf(d), (200, b"9000"))

    def test_close_after_the_request_was_written_fails_it_once(self):
        d = self.get()
        proto, t = self.endpoint.connections[0]
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n9000")
        self.successResultOf(d)
        d = self.get()
        self.assertEqual(len(self.endpoint.connections), 1)
        proto.connectionLost(Failure(ConnectionDone()))  # the request may have reached the server
        self.failureResultOf(d, ConnectionDone)
        self.assertEqual(len(self.endpoint.connections), 1)  # never sent again


class RealSocketTests(SynchronousTestCase):
    """usable() sees a close the reactor has not reported yet (a real socket pair)."""

    def test_peek_sees_the_servers_close(self):
        import socket

        from twisted.internet.testing import StringTransport

        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)

        class T(StringTransport):
            def getHandle(self):
                return ours

        pool = HTTPPool(Clock(), FakeEndpoint(), "h", max_body=100)
        conn = pool._factory.buildProtocol(None)
        conn.makeConnection(T())
        self.assertTrue(conn.usable())
        theirs.close()
        self.assertFalse(conn.usable())

    def test_pool_looks_before_reusing_a_connection_idle_a_while(self):
        import socket

        from twisted.internet.testing import StringTransport

        from cloudfoxy_proxy.backends.httpclient import PEEK_AFTER

        clock = Clock()
        endpoint = FakeEndpoint()
        pool = HTTPPool(clock, endpoint, "h", max_body=100)
        conns = []
        for _ in range(2):
            ours, theirs = socket.socketpair()
            self.addCleanup(ours.close)

            class T(StringTransport):
                def getHandle(self, sock=ours):
                    return sock

            conn = pool._factory.buildProtocol(None)
            conn.makeConnection(T())
            theirs.close()  # the server closed it; the reactor has not noticed yet
            conns.append(conn)
        pool.idle.append((clock.seconds(), conns[0]))
        clock.advance(PEEK_AFTER * 2)
        pool.get(b"/a")  # idle a while: looked at, skipped, a new connection
        self.assertEqual(conns[0].transport.value(), b"")
        self.assertEqual(len(endpoint.connections), 1)
        pool.idle.append((clock.seconds(), conns[1]))
        pool.get(b"/b")  # reused at once (under load): not looked at
        self.assertTrue(conns[1].transport.value().startswith(b"GET /b "))


class RestBasicTests(SynchronousTestCase):
    """RestBackend.basic(params) over this client: the request line, the
    body of a 200, C086 for another status, cancel aborts the connection."""

    def setUp(self):
        from cloudfoxy_proxy.backends.rest import RestBackend

        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        pool = HTTPPool(self.clock, self.endpoint, "cf.test", max_body=1000)
        self.backend = RestBackend(base_url="http://cf.test/x", token="tok", clock=self.clock,
                                   http=None, client=pool)

    def test_repeated_params_body_and_status(self):
        d = self.backend.basic([("terminal", "/10.0.0.1@1"), ("reset", "1"), ("apdu", "00A4"),
                                ("apdu", "00B0"), ("terminal2", "a b&c")])
        proto, t = self.endpoint.connections[0]
        self.assertEqual(t.value().split(b"\r\n")[0],
                         b"GET /x/api/v1/basic?terminal=/10.0.0.1@1&reset=1&apdu=00A4&apdu=00B0"
                         b"&terminal2=a%20b%26c HTTP/1.1")
        self.assertIn(b"\r\nX-Auth-Token: tok\r\n", t.value())
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n3B00\n9000\n")
        self.assertEqual(self.successResultOf(d), b"3B00\n9000\n")
        d = self.backend.basic([("terminal", "/x")])
        proto.dataReceived(b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\nC083\n")
        error = self.failureResultOf(d, CardError).value
        self.assertEqual(error.code, "C086")
        self.assertIn("HTTP 404", error.reason)

    def test_cancel_aborts_the_connection(self):
        d = self.backend.basic([("terminal", "/x"), ("apdu", "00")])
        proto, t = self.endpoint.connections[0]
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(t.disconnecting)

    def test_transmit_answer_and_http_error(self):
        d = self.backend.transmit("/10.0.0.1@1", bytes.fromhex("00A4000C023F00"))
        proto, t = self.endpoint.connections[0]
        self.assertEqual(t.value().split(b"\r\n")[0],
                         b"GET /x/api/v1/basic?terminal=/10.0.0.1@1&reset=0&apdu=00A4000C023F00 HTTP/1.1")
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nnull\n9000\n")
        self.assertEqual(self.successResultOf(d), bytes.fromhex("9000"))
        d = self.backend.transmit("/10.0.0.1@1", bytes.fromhex("00A4000C023F00"))
        self.assertEqual(len(self.endpoint.connections), 1)  # kept alive, reused
        proto.dataReceived(b"HTTP/1.1 500 Oops\r\nContent-Length: 5\r\n\r\nfail\n")
        error = self.failureResultOf(d, CardError).value
        self.assertEqual((error.code, error.reason[:8]), ("C086", "HTTP 500"))

    def test_transmit_cancelled_hears_nothing_more(self):
        d = self.backend.transmit("/x", b"\x00\xa4\x00\x00")
        proto, t = self.endpoint.connections[0]
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(t.disconnecting)
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n9000\n")  # too late: ignored
        proto.connectionLost(Failure(ConnectionLost()))
        self.endpoint.hold = True  # cancelled while the connection is being made
        d = self.backend.transmit("/x", b"\x00\xa4\x00\x00")
        connecting, proto2, t2 = self.endpoint.pending[0]
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(connecting.called)  # the connection attempt was cancelled

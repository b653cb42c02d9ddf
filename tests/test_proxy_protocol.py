"""proxy_protocol.py in memory: the PROXY v1/v2 header read before the front
end sees a connection (its peer is the client's), trust by balancer address,
short reads, garbage, the header deadline."""

import struct

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy.logs import Logger, RateLimitedLog
from cloudfoxy_proxy.proxy_protocol import (
    DEFAULT_TRUSTED, BadHeader, ProxyHeaderFactory, is_trusted, parse_header, trusted_networks)

from test_limits import FdTransport, Front
from test_server import take

SELECT = b">Emulated 00|\n>1:APDU:00A4000C023F00|\n\n"
V2_PREFIX = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(src="10.9.8.7", sport=5555, dst="10.0.0.1", dport=4001, command=0x21, family=0x11, tlv=b""):
    if family == 0x21:
        import socket

        addrs = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
    else:
        addrs = bytes(int(x) for x in src.split(".")) + bytes(int(x) for x in dst.split("."))
    body = addrs + struct.pack("!HH", sport, dport) + tlv
    return V2_PREFIX + bytes([command, family]) + struct.pack("!H", len(body)) + body


def v1(src="10.9.8.7", sport=5555, dst="10.0.0.1", dport=4001, proto="TCP4"):
    return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode()


class ParseTests(SynchronousTestCase):
    def test_v1_and_v2_give_the_source_and_the_rest(self):
        for header in (v1(), v2()):
            source, destination, rest = parse_header(header + b"ABC")
            self.assertEqual((source.host, source.port, destination.port, rest), ("10.9.8.7", 5555, 4001, b"ABC"))

    def test_v2_ipv6_in_its_short_form(self):
        source, _, _ = parse_header(v2("2001:db8::5", dst="2001:db8::1", family=0x21))
        self.assertEqual((type(source), source.host), (IPv6Address, "2001:db8::5"))

    def test_every_prefix_of_a_header_asks_for_more(self):
        for header in (v1(), v2(tlv=b"\x04\x00\x02ab")):
            for n in range(len(header)):
                self.assertIsNone(parse_header(header[:n]), (header, n))

    def test_local_and_unknown_keep_the_connection_addresses(self):
        self.assertEqual(parse_header(v2(command=0x20) + b"x"), (None, None, b"x"))
        self.assertEqual(parse_header(b"PROXY UNKNOWN\r\nx"), (None, None, b"x"))

    def test_garbage_and_malformed_headers_are_refused(self):
        for bad in (b">Emulated 00|\n", b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00",
                    b"PROXY TCP4 10.0.0.1 10.0.0.2 port 4001\r\n",   # Twisted lets ValueError out
                    b"PROXY TCP4 evil.example 10.0.0.2 1 2\r\n",      # not an address
                    b"PROXY TCP4 10.0.0.1 10.0.0.2 1 99999\r\n",
                    b"PROXY TCP9 10.0.0.1 10.0.0.2 1 2\r\n",
                    b"PROXY " + b"1" * 200,                            # no CRLF within 107 bytes
                    V2_PREFIX + b"\x31\x11\x00\x0c" + b"\x00" * 12,   # version 3
                    V2_PREFIX + b"\x21\x11\x00\x02ab",                 # address block too short
                    V2_PREFIX + b"\x21\x99\x00\x0c" + b"\x00" * 12):  # family unknown
            with self.assertRaises(BadHeader, msg=bad):
                parse_header(bad)

    def test_trust(self):
        nets = trusted_networks(DEFAULT_TRUSTED)
        self.assertTrue(is_trusted(IPv4Address("TCP", "127.0.0.10", 1), nets))
        self.assertTrue(is_trusted(IPv6Address("TCP", "::1", 1), nets))
        self.assertTrue(is_trusted(IPv6Address("TCP", "::ffff:127.0.0.1", 1), nets))
        self.assertTrue(is_trusted(UNIXAddress(None), nets))
        self.assertFalse(is_trusted(IPv4Address("TCP", "10.0.0.1", 1), nets))
        self.assertTrue(is_trusted(IPv4Address("TCP", "10.0.0.1", 1), trusted_networks(["10.0.0.0/8"])))
        with self.assertRaises(ValueError):
            trusted_networks(["10.0.0.300/8"])


class Behind:
    """A line front end behind ConnectionLimits behind the PROXY header reader."""

    def __init__(self, trusted=DEFAULT_TRUSTED, timeout=10.0, **kw):
        self.f = Front(**kw)
        self.clock = self.f.clock
        self.log = RateLimitedLog(self.clock, Logger(namespace="test.pp"))
        self.factory = ProxyHeaderFactory(self.f.factory, trusted_networks(trusted), self.clock, timeout, self.log,
                                          self.f.limits)

    def connect(self, balancer="127.0.0.10", fd=10):
        peer = IPv4Address("TCP", balancer, 40000)
        proto = self.factory.buildProtocol(peer)
        transport = FdTransport(peer, fd)
        proto.makeConnection(transport)
        return proto, transport

    def line_session(self, proto):
        return proto.wrappedProtocol.wrappedProtocol.session  # PROXY reader -> guard -> line protocol


class WrapperTests(SynchronousTestCase):
    def test_v2_then_request_in_one_read(self):
        b = Behind()
        proto, t = b.connect()
        self.assertEqual(b.f.limits.count, 0)  # nobody saw the connection before its header
        proto.dataReceived(v2() + SELECT)
        self.assertEqual(take(t), ">1:9000\n@@\n")
        self.assertEqual(b.line_session(proto).peer, "10.9.8.7:5555")
        self.assertEqual(b.f.limits.connections_of("10.9.8.7"), 1)
        self.assertEqual(b.f.limits.connections_of("127.0.0.10"), 0)
        self.assertEqual(proto.getHost().port, 4001)

    def test_v1_and_v2_a_byte_at_a_time(self):
        for header in (v1(), v2()):
            b = Behind()
            proto, t = b.connect()
            for i in range(len(header)):
                proto.dataReceived(header[i:i + 1])
                self.assertFalse(t.aborted)
            self.assertEqual(b.f.limits.count, 1)
            proto.dataReceived(SELECT)
            self.assertEqual(take(t), ">1:9000\n@@\n")
            self.assertEqual(b.line_session(proto).peer, "10.9.8.7:5555")

    def test_per_peer_limit_counts_clients_not_the_balancer(self):
        b = Behind(per_peer=1, max_connections=100)
        conns = [b.connect(fd=10 + i) for i in range(3)]
        for i, (proto, t) in enumerate(conns):
            proto.dataReceived(v2(src=f"10.9.8.{i + 1}") + SELECT)
        self.assertEqual([take(t) for _, t in conns], [">1:9000\n@@\n"] * 3)
        self.assertEqual(b.f.limits.count, 3)
        proto, t = b.connect(fd=20)  # a second connection of client 10.9.8.1: its own limit
        proto.dataReceived(v2(src="10.9.8.1") + SELECT)
        self.assertEqual(b.f.limits.connections_of("10.9.8.1"), 1)

    def test_untrusted_source_is_closed_with_one_line(self):
        b = Behind()
        with capturedLogs() as events:
            proto, t = b.connect(balancer="192.0.2.5")
        self.assertTrue(t.aborted)
        proto.dataReceived(v2() + SELECT)  # what is already on its way is ignored
        self.assertEqual((t.value(), b.f.limits.count), (b"", 0))
        lines = [formatEvent(e) for e in events]
        self.assertEqual(len(lines), 1)
        self.assertIn("192.0.2.5", lines[0])
        self.assertIn("--proxy-protocol-from", lines[0])
        proto.connectionLost(None)  # the wrapped protocol never saw it: nothing to undo
        self.assertEqual(b.f.limits.count, 0)

    def test_connections_before_their_header_count_against_the_limits(self):
        """Found by trying it: with --max-connections 5, 300 connections
        from loopback that sent no header held 300 descriptors (each for
        --header-timeout); the total and the descriptor ceiling now count
        them, and one that completes its header or goes frees its place."""
        b = Behind(max_connections=3, nofile=100, fd_reserve=20, count_fds=lambda: None)
        first, t1 = b.connect()
        first.dataReceived(v2() + SELECT)
        self.assertEqual(take(t1), ">1:9000\n@@\n")  # admitted: 1 of 3
        waiting = [b.connect(fd=11 + i) for i in range(2)]
        self.assertEqual((b.factory.waiting, [t.aborted for _, t in waiting]), (2, [False, False]))
        with capturedLogs() as events:
            _, t = b.connect(fd=13)  # 1 admitted + 2 waiting: no room
        self.assertTrue(t.aborted)
        self.assertIn("no room", formatEvent(events[0]))
        self.assertEqual(b.factory.waiting, 2)
        proto, _ = waiting[0]
        proto.connectionLost(None)  # gone before its header: its place is free again
        self.assertEqual(b.factory.waiting, 1)
        proto, t = waiting[1]
        proto.dataReceived(v1() + SELECT)  # header read: admitted, no longer waiting
        self.assertEqual((take(t), b.factory.waiting, b.f.limits.count), (">1:9000\n@@\n", 0, 2))
        _, t = b.connect(fd=80)  # a descriptor at the ceiling (100 - 20 reserved)
        self.assertTrue(t.aborted)
        _, t = b.connect(fd=14)
        self.assertFalse(t.aborted)
        self.assertEqual(b.factory.waiting, 1)

    def test_trusted_network_given(self):
        b = Behind(trusted=["192.0.2.0/24"])
        proto, t = b.connect(balancer="192.0.2.5")
        proto.dataReceived(v1() + SELECT)
        self.assertEqual(take(t), ">1:9000\n@@\n")
        _, t2 = b.connect(balancer="127.0.0.1")  # loopback is no longer trusted
        self.assertTrue(t2.aborted)

    def test_garbage_is_closed_before_the_front_end_sees_it(self):
        b = Behind()
        with capturedLogs() as events:
            proto, t = b.connect()
            proto.dataReceived(SELECT)
        self.assertTrue(t.aborted)
        self.assertEqual((t.value(), b.f.limits.count), (b"", 0))
        self.assertIn("no PROXY header", formatEvent(events[0]))

    def test_malformed_v1_is_closed_without_a_traceback(self):
        b = Behind()
        with capturedLogs() as events:
            proto, t = b.connect()
            proto.dataReceived(b"PROXY TCP4 10.0.0.1 10.0.0.2 port 4001\r\n" + SELECT)
        self.assertTrue(t.aborted)
        self.assertEqual([e for e in events if e.get("log_failure")], [])

    def test_a_half_close_after_the_header_is_a_half_close(self):
        """Found by trying it: ``nc -N`` (docs) through HAProxy got no
        answer: the wrapper did not say it half-closes (the limits' guard
        says so only once connected), so the client's FIN was a lost
        connection."""
        from twisted.internet.interfaces import IHalfCloseableProtocol

        b = Behind()
        proto, t = b.connect()
        proto.dataReceived(v1())
        self.assertTrue(IHalfCloseableProtocol.providedBy(proto))
        proto.dataReceived(SELECT)
        IHalfCloseableProtocol(proto).readConnectionLost()  # what the TCP transport does on FIN
        self.assertEqual(take(t), ">1:9000\n@@\n")
        self.assertFalse(t.aborted)

    def test_local_header_keeps_the_balancer(self):
        b = Behind()
        proto, t = b.connect()
        proto.dataReceived(v2(command=0x20) + SELECT)
        self.assertEqual(take(t), ">1:9000\n@@\n")
        self.assertEqual(b.line_session(proto).peer, "127.0.0.10:40000")

    def test_no_header_in_time_is_closed(self):
        b = Behind(timeout=5)
        proto, t = b.connect()
        proto.dataReceived(v2()[:10])
        b.clock.advance(4.9)
        self.assertFalse(t.aborted)
        b.clock.advance(0.2)
        self.assertTrue(t.aborted)
        self.assertEqual(b.f.limits.count, 0)

    def test_header_in_time_stops_the_deadline(self):
        b = Behind(timeout=5)
        proto, t = b.connect()
        proto.dataReceived(v2())
        b.clock.advance(6)
        self.assertFalse(t.aborted)
        self.assertIsNone(proto._timer)
        self.assertEqual(b.f.limits.count, 1)

    def test_eof_before_the_header_closes(self):
        b = Behind()
        proto, t = b.connect()
        proto.dataReceived(v2()[:5])
        proto.readConnectionLost()
        self.assertTrue(t.disconnecting)
        self.assertEqual(b.f.limits.count, 0)

    def test_connection_lost_after_the_header_reaches_the_front_end(self):
        b = Behind()
        proto, t = b.connect()
        proto.dataReceived(v2())
        self.assertEqual(b.f.limits.count, 1)
        proto.connectionLost(None)
        self.assertEqual(b.f.limits.count, 0)

    def test_the_failed_authentication_throttle_counts_each_client(self):
        from cloudfoxy_proxy.access import Access

        b = Behind()
        dispatcher = b.f.h.dispatcher
        dispatcher.access = Access(simple=[("right-password-0123", None)])
        proto, t = b.connect()
        proto.dataReceived(v2(src="10.9.8.7") + b">Emulated 00:wrong|\n>1:APDU:00A4000C023F00|\n\n")
        self.assertEqual(take(t), ">1:C085\n@@\n")
        proto2, t2 = b.connect(fd=11)
        proto2.dataReceived(v2(src="10.9.8.8") + b">Emulated 00:right-password-0123|\n>1:APDU:00A4000C023F00|\n\n")
        self.assertEqual(take(t2), ">1:9000\n@@\n")
        self.assertEqual([dispatcher.throttle.failures(h) for h in ("10.9.8.7", "10.9.8.8", "127.0.0.10")],
                         [1, 0, 0])

    def test_protected_mode_sees_the_client(self):
        b = Behind()
        b.f.h.dispatcher.access.allow_anonymous = False  # open mode: loopback clients only
        proto, t = b.connect()  # the balancer is on loopback
        proto.dataReceived(v2(src="10.9.8.7") + SELECT)
        refused = take(t)
        self.assertNotIn("9000", refused)
        proto2, t2 = b.connect(fd=11)
        proto2.dataReceived(v2(src="127.0.0.99") + SELECT)
        self.assertEqual(take(t2), ">1:9000\n@@\n")


    def test_a_loopback_client_of_a_balancer_on_another_host_is_refused(self):
        b = Behind(trusted=["192.0.2.0/24", "127.0.0.0/8"])
        b.f.h.dispatcher.access.allow_anonymous = False  # open mode: loopback clients only
        with capturedLogs() as events:
            proto, t = b.connect(balancer="192.0.2.5")
            proto.dataReceived(v2(src="127.0.0.1") + SELECT)  # the balancer's own loopback client
        self.assertTrue(t.aborted)
        self.assertNotIn(b"9000", t.value())
        self.assertIn("names the loopback client 127.0.0.1", " ".join(formatEvent(e) for e in events))
        proto2, t2 = b.connect(balancer="192.0.2.5", fd=11)  # its remote clients are fine
        proto2.dataReceived(v2(src="10.9.8.7") + SELECT)
        self.assertFalse(t2.aborted)
        proto3, t3 = b.connect(balancer="127.0.0.10", fd=12)  # a balancer on this host: its loopback clients are ours
        proto3.dataReceived(v2(src="127.0.0.99") + SELECT)
        self.assertEqual(take(t3), ">1:9000\n@@\n")


class OptionTests(SynchronousTestCase):
    def test_proxy_protocol_from_is_repeatable_and_checked(self):
        from twisted.python import usage

        from cloudfoxy_proxy import tap

        o = tap.Options()
        o.parseOptions(["--no-signing", "-p", "haproxy:tcp:0:interface=127.0.0.1",
                        "--proxy-protocol-from", "10.0.0.10", "--proxy-protocol-from", "fd00::/8"])
        self.assertEqual(o["proxy-protocol-from"], ["10.0.0.10", "fd00::/8"])
        self.assertEqual(o["endpoints"][0], "haproxy:tcp:0:interface=127.0.0.1:backlog=1024")
        with self.assertRaises(usage.UsageError) as e:
            tap.Options().parseOptions(["--proxy-protocol-from", "10.0.0.300"])
        self.assertIn("--proxy-protocol-from '10.0.0.300' is not an address or network", str(e.exception))

    def test_in_the_config_file(self):
        import tempfile

        from cloudfoxy_proxy import tap

        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write('no-signing = true\nproxy-protocol-from = ["10.0.0.10", "10.0.0.11"]\n')
        o = tap.Options()
        o.parseOptions(["--config", f.name])
        self.assertEqual(o["proxy-protocol-from"], ["10.0.0.10", "10.0.0.11"])


def test_every_listener_option_takes_haproxy(tmp_path):
    """-p, --listen (plain and TLS), --rest, --api, --ram, --ram-daemon and
    --metrics wrapped in haproxy: listen with the PROXY header reader under
    everything else (under TLS for ssl:), trusting --proxy-protocol-from."""
    import hashlib
    import subprocess

    from twisted.internet.testing import MemoryReactorClock
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from cloudfoxy_proxy import tap
    from cloudfoxy_proxy.limits import GuardedFactory

    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", "key.pem", "-out", "cert.pem", "-days", "2", "-subj", "/CN=t"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=60)
    (tmp_path / "c.toml").write_text(f'[[client]]\nname = "a"\nreaders = ["*"]\n'
                                     f'secret_sha256 = "{hashlib.sha256(b"s" * 20).hexdigest()}"\n')
    (tmp_path / "urls").write_text("https://ram.example/\n")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    o = tap.Options()
    o.parseOptions([
        "--no-signing", "--credentials", str(tmp_path / "c.toml"), "--proxy-protocol-from", "10.0.0.0/8",
        "-p", "haproxy:tcp:4101:interface=127.0.0.1",
        "--listen", f"haproxy:ssl:4102:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        "--rest", "haproxy:tcp:4103", "--api", "haproxy:tcp:4104", "--ram", "haproxy:tcp:4105",
        "--ram-daemon", "haproxy:tcp:4106:interface=127.0.0.1", "--ram-approved-urls", str(tmp_path / "urls"),
        "--ram-reader", "Emulated 00", "--metrics", "haproxy:tcp:4107"])
    reactor = MemoryReactorClock()
    top = tap.makeService(o, reactor)
    top.privilegedStartService()
    listening = {port: factory for port, factory, *_ in reactor.tcpServers}
    assert sorted(listening) == list(range(4101, 4108))
    for port, factory in listening.items():
        assert isinstance(factory, ProxyHeaderFactory), port
        assert factory.trusted == trusted_networks(["10.0.0.0/8"])
        inner = factory.wrappedFactory
        if port == 4102:
            assert isinstance(inner, TLSMemoryBIOFactory)
            inner = inner.wrappedFactory
        assert isinstance(inner, GuardedFactory), port
    top.stopService()


def test_haproxy_in_any_case_is_ours_and_given_once():
    """Before: ``HAProxy:tcp:...`` reached Twisted's own haproxy endpoint
    (a header believed from anyone: --proxy-protocol-from ignored), and
    ``haproxy:haproxy:`` wanted two headers."""
    from twisted.internet.testing import MemoryReactorClock
    from twisted.python import usage

    from cloudfoxy_proxy import tap

    o = tap.Options()
    o.parseOptions(["--no-signing", "--proxy-protocol-from", "10.0.0.0/8", "-p", "HAProxy:tcp:4111",
                    "--listen", "HAPROXY:4112"])
    reactor = MemoryReactorClock()
    top = tap.makeService(o, reactor)
    top.privilegedStartService()
    for port, factory, *_ in reactor.tcpServers:
        assert isinstance(factory, ProxyHeaderFactory), port
        assert factory.trusted == trusted_networks(["10.0.0.0/8"])
    assert len(reactor.tcpServers) == 2
    top.stopService()
    o = tap.Options()
    try:
        o.parseOptions(["--listen", "haproxy:haproxy:tcp:4113"])
    except usage.UsageError as e:
        assert "haproxy: is given twice" in str(e) and "\n" not in str(e)
    else:
        raise AssertionError("haproxy:haproxy: was accepted")

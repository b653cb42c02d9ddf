"""limits.py in memory: shared connection accounting (per peer, in total, by
file descriptor), idle timeouts, and the buffered-bytes budget of the line
protocol."""

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy import logs
from cloudfoxy_proxy.limits import BufferBudget, ConnectionLimits, default_reserve

from test_server import Harness, take

SELECT = b">Emulated 00|\n>1:APDU:00A4000C023F00|\n\n"
SLOW = b">Slow A|\n>1:APDU:00A4000C023F00|\n\n"


class FdTransport(StringTransport):
    """A StringTransport with a file descriptor number."""

    def __init__(self, peer, fd=10):
        super().__init__(peerAddress=peer)
        self.fd = fd
        self.aborted = False

    def fileno(self):
        return self.fd

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()


class Front:
    """A line-protocol front end (test_server.Harness) behind ConnectionLimits."""

    def __init__(self, nofile=0, **kw):
        self.h = Harness(timeout=kw.pop("timeout", 15.0))
        self.h.dispatcher.access.allow_anonymous = True  # peers from many addresses, no credentials
        self.clock = self.h.clock
        self.limits = ConnectionLimits(self.clock, nofile=nofile, **kw)
        self.factory = self.limits.wrap(self.h.factory)

    def connect(self, host, fd=10):
        peer = IPv4Address("TCP", host, 40000) if host != "unix" else UNIXAddress(None)
        guard = self.factory.buildProtocol(peer)
        transport = FdTransport(peer, fd)
        guard.makeConnection(transport)
        return guard, transport

    def lose(self, guard):
        """What the reactor does after abortConnection."""
        guard.connectionLost(None)


def served(guard, transport, request=SELECT):
    guard.dataReceived(request)
    return take(transport)


class PerPeerTests(SynchronousTestCase):
    def test_an_address_at_its_limit_gives_up_its_idlest_connection(self):
        f = Front(per_peer=2, max_connections=100)
        a, ta = f.connect("10.0.0.1")
        f.clock.advance(1)
        b, tb = f.connect("10.0.0.1")
        f.clock.advance(1)
        served(a, ta)  # a was active last: b is now the idlest
        c, tc = f.connect("10.0.0.1")
        self.assertTrue(tb.aborted)
        self.assertFalse(ta.aborted or tc.aborted)
        self.assertEqual(f.limits.connections_of("10.0.0.1"), 2)
        self.assertEqual(served(c, tc), ">1:9000\n@@\n")
        f.lose(b)  # the aborted connection's connectionLost: counted once only
        self.assertEqual(f.limits.count, 2)

    def test_busy_connections_are_kept_and_the_newcomer_refused(self):
        f = Front(per_peer=2, max_connections=100)
        conns = [f.connect("10.0.0.1") for _ in range(2)]
        for guard, transport in conns:
            guard.dataReceived(SLOW)  # waits on a card
            self.assertTrue(guard.busy)
        with capturedLogs() as events:
            _, t3 = f.connect("10.0.0.1")
        self.assertTrue(t3.aborted)
        self.assertFalse(any(t.aborted for _, t in conns))
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn("refusing 10.0.0.1:40000", text)
        self.assertIn("--max-connections-per-peer", text)
        # Another address is served meanwhile.
        d, td = f.connect("10.0.0.2")
        self.assertFalse(td.aborted)
        self.assertEqual(served(d, td), ">1:9000\n@@\n")
        self.assertEqual(f.limits.count, 3)

    def test_unix_socket_clients_count_only_in_total(self):
        f = Front(per_peer=1, max_connections=3)
        conns = [f.connect("unix") for _ in range(3)]
        self.assertFalse(any(t.aborted for _, t in conns))
        _, t4 = f.connect("unix")
        self.assertTrue(t4.aborted)


class TotalTests(SynchronousTestCase):
    def test_one_address_holding_every_slot_does_not_lock_out_others(self):
        f = Front(per_peer=100, max_connections=3)
        hog = [f.connect("10.0.0.1") for _ in range(3)]
        f.clock.advance(5)
        served(*hog[0])
        other, to = f.connect("10.0.0.2")
        self.assertFalse(to.aborted)
        self.assertEqual([t.aborted for _, t in hog], [False, True, False])  # the idlest of the hog
        self.assertEqual(served(other, to), ">1:9000\n@@\n")
        self.assertEqual(f.limits.count, 3)

    def test_equal_shares_are_not_taken_from(self):
        f = Front(per_peer=100, max_connections=2)
        f.connect("10.0.0.1")
        f.connect("10.0.0.2")
        _, t = f.connect("10.0.0.3")
        self.assertTrue(t.aborted)
        self.assertEqual(f.limits.count, 2)

    def test_descriptors_near_the_limit_cap_connections(self):
        in_use = [100]
        f = Front(per_peer=100, max_connections=100, nofile=256, count_fds=lambda: in_use[0])
        ceiling = f.limits.fd_ceiling
        self.assertEqual(ceiling, 256 - default_reserve(256))
        _, t1 = f.connect("10.0.0.1", fd=ceiling - 1)
        self.assertFalse(t1.aborted)
        self.assertIsNone(f.limits.fd_cap)  # nothing measured below the ceiling
        # A descriptor at the ceiling: measured; 223 others + ours leave room for 1.
        in_use[0] = ceiling + 1
        _, t2 = f.connect("10.0.0.2", fd=ceiling)
        self.assertEqual(f.limits.fd_cap, 1)
        self.assertTrue(t2.aborted)  # 10.0.0.1 holds one, as many as the newcomer would: refused
        # A low descriptor (a hole) does not lift the cap ...
        _, t3 = f.connect("10.0.0.3", fd=10)
        self.assertTrue(t3.aborted)
        # ... a second later, with fewer descriptors in use, it is measured again.
        f.clock.advance(1)
        in_use[0] = 150
        _, t4 = f.connect("10.0.0.3", fd=10)
        self.assertFalse(t4.aborted)
        self.assertEqual(f.limits.fd_cap, ceiling - (150 - 2))
        # At the cap, the address with the most connections gives up an idle one.
        f.limits.fd_cap = 3
        _, t5 = f.connect("10.0.0.1", fd=11)
        self.assertFalse(t5.aborted)
        _, t6 = f.connect("10.0.0.4", fd=12)
        self.assertFalse(t6.aborted)
        self.assertTrue(t1.aborted)  # 10.0.0.1 held two: its idlest made room

    def test_reserve(self):
        self.assertEqual(default_reserve(256), 32)
        self.assertEqual(default_reserve(4096), 256)
        self.assertEqual(default_reserve(1 << 20), 1024)

    def test_an_eviction_of_the_last_connection_keeps_the_newcomer_counted(self):
        f = Front(per_peer=1, max_connections=100)
        a, _ = f.connect("10.0.0.1")
        b, tb = f.connect("10.0.0.1")  # a (idle) makes room
        self.assertEqual(f.limits.connections_of("10.0.0.1"), 1)
        c, tc = f.connect("10.0.0.1")  # and now b does
        self.assertTrue(tb.aborted)
        self.assertFalse(tc.aborted)
        f.lose(b)
        f.lose(c)
        self.assertEqual((f.limits.count, f.limits.peers), (0, {}))

    def test_refusals_are_rate_limited(self):
        f = Front(per_peer=1, max_connections=100)
        f.connect("10.0.0.1")
        with capturedLogs() as events:
            for _ in range(500):
                g, t = f.connect("10.0.0.1")
                if not t.aborted:
                    g.dataReceived(SLOW)  # busy: the next newcomers are refused
            f.clock.advance(10)
        lines = [formatEvent(e) for e in events]
        self.assertEqual(len(lines), 11)  # 500 events: one eviction, then 499 refusals
        self.assertIn("490 more connection log lines suppressed in the last 10 s", lines[-1])


class IdleTests(SynchronousTestCase):
    def test_idle_connection_is_closed_after_the_timeout(self):
        f = Front(idle_timeout=300)
        g, t = f.connect("10.0.0.1")
        f.clock.advance(299)
        self.assertFalse(t.aborted)
        served(g, t)  # activity: the 300 s start again
        f.clock.advance(299)
        self.assertFalse(t.aborted)
        f.clock.advance(1)
        self.assertTrue(t.aborted)
        self.assertEqual(f.limits.count, 0)
        f.lose(g)
        self.assertEqual(f.limits.count, 0)
        self.assertEqual(f.clock.getDelayedCalls(), [])

    def test_a_connection_waiting_on_a_card_is_not_idle(self):
        f = Front(idle_timeout=5, timeout=60.0)
        g, t = f.connect("10.0.0.1")
        g.dataReceived(SLOW)
        f.clock.advance(30)
        self.assertFalse(t.aborted)
        f.h.manual.calls[0][2].callback(b"\x90\x00")
        self.assertEqual(take(t), ">1:9000\n@@\n")
        f.clock.advance(4.9)
        self.assertFalse(t.aborted)  # the answer was written 4.9 s ago
        f.clock.advance(0.1)
        self.assertTrue(t.aborted)

    def test_zero_disables(self):
        f = Front(idle_timeout=0)
        g, t = f.connect("10.0.0.1")
        self.assertEqual(f.clock.getDelayedCalls(), [])
        f.clock.advance(10 ** 6)
        self.assertFalse(t.aborted)

    def test_lost_connection_cancels_its_timer(self):
        f = Front(idle_timeout=300)
        g, t = f.connect("10.0.0.1")
        g.connectionLost(None)
        self.assertEqual(f.clock.getDelayedCalls(), [])
        self.assertEqual(f.limits.count, 0)


class WrapperTests(SynchronousTestCase):
    def test_half_close_reaches_the_line_protocol(self):
        f = Front()
        g, t = f.connect("10.0.0.1")
        self.assertTrue(IHalfCloseableProtocol.providedBy(g))
        g.dataReceived(b">Emulated 00|\n>1:APDU:00A4000C023F00|")
        g.readConnectionLost()
        self.assertEqual(take(t), ">1:9000\n@@\n")
        self.assertTrue(t.disconnecting)

    def test_listening_log_names_the_front_end(self):
        f = Front()
        self.assertEqual(f.factory.logPrefix(), "LineFactory")


class BudgetTests(SynchronousTestCase):
    """The bytes all line connections hold unprocessed share one budget."""

    def setUp(self):
        self.h = Harness(buffers=BufferBudget(total=100_000, free=4096))
        self.budget = self.h.factory.buffers

    def test_partial_lines_beyond_the_budget_are_dropped(self):
        a, ta = self.h.connect()
        b, tb = self.h.connect()
        c, tc = self.h.connect()
        a.dataReceived(b">Emulated 00|\n>1:APDU:" + b"0" * 90_000)  # within the budget: kept
        self.assertEqual(self.budget.used, len(a._framer.buf) - 4096)
        with capturedLogs() as events:
            b.dataReceived(b">Emulated 01|\n>7:APDU:" + b"0" * 30_000)  # would exceed it: dropped
        self.assertIn("dropped a partial line", formatEvent(events[0]))
        self.assertEqual(self.budget.used, len(a._framer.buf) - 4096)
        b.dataReceived(b"00|\n\n")
        self.assertEqual(take(tb), ">7:C084\n@@\n")
        # Short requests are always served.
        c.dataReceived(SELECT)
        self.assertEqual(take(tc), ">1:9000\n@@\n")
        # The first connection's line was kept whole.
        a.dataReceived(b"|\n\n")
        self.assertEqual(take(ta), ">1:6700\n@@\n")  # the card saw all 45,000 bytes (wrong length)
        self.assertEqual(self.budget.used, 0)

    def test_a_closed_connection_gives_its_bytes_back(self):
        a, _ = self.h.connect()
        a.dataReceived(b">Emulated 00|\n>1:APDU:" + b"0" * 50_000)
        self.assertGreater(self.budget.used, 40_000)
        a.connectionLost(None)
        self.assertEqual(self.budget.used, 0)

    def test_over_budget_while_waiting_pauses_reading(self):
        a, ta = self.h.connect()
        a.dataReceived(b">Emulated 00|\n>1:APDU:" + b"0" * 99_000)  # fills the budget
        b, tb = self.h.connect()
        b.dataReceived(SLOW + SLOW[:-1] + b"0" * 10_000)  # one request waits on a card, more follows
        self.assertEqual(tb.producerState, "paused")
        self.assertTrue(b._framer.buf)  # nothing dropped: complete lines wait
        a.connectionLost(None)
        self.h.manual.calls[0][2].callback(b"\x90\x00")
        self.assertEqual(tb.producerState, "producing")
        self.assertEqual(take(tb), ">1:9000\n@@\n")


class RateLimitedLogTests(SynchronousTestCase):
    def test_lines_per_period_then_a_summary(self):
        clock = Clock()
        limited = logs.RateLimitedLog(clock, lines=3, period=10.0, what="test lines")
        with capturedLogs() as events:
            for i in range(50):
                limited.info("line {i} from {peer}", i=i, peer="10.0.0.1:1")
            limited.warn("a warning from {peer}", peer="10.0.0.1:1")
            self.assertEqual(len(events), 3)
            clock.advance(10)
            limited.info("line {i} from {peer}", i=99, peer="10.0.0.2:1")
        text = [formatEvent(e) for e in events]
        self.assertEqual(text[:3], [f"line {i} from 10.0.0.1:1" for i in range(3)])
        self.assertEqual(text[3], "48 more test lines suppressed in the last 10 s")
        self.assertEqual(events[3]["log_level"], LogLevel.warn)  # the highest level suppressed
        self.assertEqual(text[4], "line 99 from 10.0.0.2:1")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_below_the_level_costs_nothing(self):
        clock = Clock()
        limited = logs.RateLimitedLog(clock, lines=1)
        with capturedLogs() as events:
            for _ in range(10):
                limited.debug("noise")
            limited.info("kept")
        self.assertEqual([formatEvent(e) for e in events], ["kept"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_bind_names_the_peer(self):
        limited = logs.RateLimitedLog(Clock())
        with capturedLogs() as events:
            limited.bind(peer="10.0.0.1:5").info("dropped an over-long line")
        self.assertEqual(formatEvent(events[0]), "client 10.0.0.1:5: dropped an over-long line")


class RecordingTransport(FdTransport):
    """Records each write and the moment the connection was closed."""

    def __init__(self, peer):
        super().__init__(peer)
        self.events = []
        self.nodelay = False

    def write(self, data):
        self.events.append(("write", data))
        super().write(data)

    def loseConnection(self):
        self.events.append(("close", None))
        super().loseConnection()

    def setTcpNoDelay(self, enabled):
        self.nodelay = enabled


class Chatty:
    """A front end that writes several pieces per received chunk; b"bye"
    makes it write then close."""

    def makeConnection(self, transport):
        self.transport = transport

    def dataReceived(self, data):
        self.transport.write(b"a:" + data)
        self.transport.writeSequence([b"b:", data])
        if data == b"bye":
            self.transport.loseConnection()
            self.transport.write(b"late")

    def connectionLost(self, reason):
        pass


class SendingTests(SynchronousTestCase):
    def setUp(self):
        self.limits = ConnectionLimits(Clock())
        self.wrapped = Chatty()

        class F:
            def buildProtocol(_, addr):
                return self.wrapped

        self.factory = self.limits.wrap(F())
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        self.guard = self.factory.buildProtocol(peer)
        self.t = RecordingTransport(peer)
        self.guard.makeConnection(self.t)

    def test_what_one_read_writes_leaves_as_one_message(self):
        self.assertTrue(self.t.nodelay)  # answers never wait for acknowledgements
        self.guard.dataReceived(b"x")
        self.assertEqual(self.t.events, [("write", b"a:xb:x")])

    def test_a_write_outside_a_read_leaves_at_once(self):
        self.guard.write(b"event")
        self.guard.write(b"event2")
        self.assertEqual(self.t.events, [("write", b"event"), ("write", b"event2")])

    def test_closing_sends_what_was_written_first(self):
        self.guard.dataReceived(b"bye")
        self.assertEqual(self.t.events, [("write", b"a:byeb:bye"), ("close", None), ("write", b"late")])

"""Unit tests (Clock, StringTransport) of the liveness of ``tcp://`` /
``tls://`` upstream connections: heartbeats on idle pooled connections, a
missed one dropping every sibling at once, commands in flight answered
C086 and never re-sent, the URL parameters and TCP keepalive."""

import socket

from twisted.internet.defer import maybeDeferred
from twisted.internet.error import ConnectionAborted, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from test_metrics import get, samples
from test_tcp_backend import NAMES, Base, FakeEndpoint, b64, outcome

from cloudfoxy_proxy import errors, metrics
from cloudfoxy_proxy.backends import BackendSettings, tcp
from cloudfoxy_proxy.backends.tcp_upstream import set_keepalive
from cloudfoxy_proxy.registry import ReaderRegistry


class HeartbeatTests(Base):
    connections = 3

    def setUp(self):
        super().setUp()
        self.backend.heartbeat = 2.0
        self.backend.heartbeat_timeout = 2.0

    def pool(self):
        """Three connections up, the reader list read on the first."""
        return [self.connect()] + [self.connect(names=None) for _ in range(2)]

    def beats(self, conn):
        """Ids of the heartbeats (READERS for no reader) written on ``conn`` since last asked."""
        return [cid for reader, cid, command in conn.requests() if (reader, command) == ("*", "READERS")]

    def test_an_idle_connection_is_asked_every_interval_and_an_answer_keeps_it(self):
        conns = self.pool()
        self.clock.advance(1.9)
        self.assertEqual([self.beats(c) for c in conns], [[], [], []])
        self.clock.advance(0.1)
        beats = [self.beats(c) for c in conns]
        self.assertEqual([len(b) for b in beats], [1, 1, 1])
        for conn, [cid] in zip(conns, beats):
            conn.answer(cid, "RW11bGF0ZWQgMDA=")
        self.clock.advance(2.0)  # the answer's time + 2 s: the next ones
        self.assertEqual([len(self.beats(c)) for c in conns], [1, 1, 1])
        self.assertFalse(any(c.transport.disconnecting for c in conns))
        self.assertEqual(self.backend.heartbeat_misses, 0)
        self.assertEqual([r.name for r in self.registry.readers], ["B Emulated 00", "B Emulated 01"])

    def test_a_connection_with_a_command_in_flight_gets_no_heartbeat(self):
        conns = self.pool()
        d = self.backend.transmit("Emulated 00", b"\x00\xa4\x00\x0c")  # a slow card
        busy = [c for c in conns if c.proto.calls]
        [(_, cid, _)] = busy[0].requests()
        self.clock.advance(2.0)
        self.assertEqual(self.beats(busy[0]), [])
        for conn in conns:
            if conn is not busy[0]:
                [beat] = self.beats(conn)
                conn.answer(beat, "")
        self.clock.advance(8.0)  # 10 s for the card: nobody is dropped
        self.assertFalse(busy[0].transport.disconnecting)
        busy[0].answer(cid, "9000")
        self.assertEqual(outcome(d), b"\x90\x00")

    def test_a_missed_heartbeat_drops_every_sibling_at_once_and_nothing_is_sent_twice(self):
        conns = self.pool()
        d = self.backend.transmit("Emulated 00", b"\x00\xd6\x00\x00\x01\x01")  # UPDATE BINARY
        [busy] = [c for c in conns if c.proto.calls]
        [(_, cid, command)] = busy.requests()
        self.clock.advance(2.0)  # the idle two send their heartbeats; the flow is gone silently
        self.assertEqual(sum(len(self.beats(c)) for c in conns), 2)
        self.clock.advance(1.9)
        self.assertFalse(any(c.transport.disconnecting for c in conns))
        self.clock.advance(0.1)  # heartbeat_timeout: all three go, the busy one too
        self.assertTrue(all(c.transport.disconnecting for c in conns))
        for conn in conns:
            conn.lose(ConnectionAborted())
        self.assertEqual(outcome(d), errors.UPSTREAM)  # 4 s after the loss, not 15
        self.assertEqual(self.backend.heartbeat_misses, 1)  # one flow loss
        m = metrics.Metrics(self.registry, [self.backend])
        self.assertEqual(get(samples(m), "foxyproxy_backend_heartbeat_misses_total",
                             backend=self.backend.description), 1)
        said = self.logged("did not answer a heartbeat")
        self.assertEqual(len(said), 1, said)
        self.assertIn("dropping its 3 connection(s), 1 command(s) in flight answered C086", said[0])
        self.assertEqual(self.logged("lost a connection"), [])  # the one line says it all
        # re-dialled at once (the retry delay of a healthy connection), all three
        self.clock.advance(1.0)
        self.assertEqual(len(self.endpoint.attempts), 3)
        again = [self.connect(names=NAMES) for _ in range(1)] + [self.connect(names=None) for _ in range(2)]
        self.assertEqual([r for c in again for r in c.requests()], [])  # the APDU is not re-sent
        d2 = self.backend.transmit("Emulated 00", b"\x00\xb0\x00\x00\x01")
        [conn] = [c for c in again if c.proto.calls]
        [(_, cid2, command2)] = conn.requests()
        self.assertEqual(command2, "APDU:00B0000001")
        conn.answer(cid2, "019000")
        self.assertEqual(outcome(d2), b"\x01\x90\x00")
        # an answer again ends the outage (one line)
        self.assertEqual(len(self.logged("tcp://upstream:4001 answers again")), 1)

    def test_a_silent_upstream_after_the_drop_is_not_warned_about_again(self):
        conns = self.pool()
        for _ in range(3):  # three rounds of: connect, miss, drop
            self.clock.advance(2.0)  # the heartbeats
            self.clock.advance(2.0)  # missed
            for conn in conns:
                self.assertTrue(conn.transport.disconnecting)
                conn.lose(ConnectionAborted())
            self.clock.advance(1.0)
            conns = [self.connect(names=None) for _ in range(3)]
            for conn in conns:
                conn.requests()
        self.assertEqual(len(self.logged("did not answer a heartbeat")), 1)

    def test_an_answer_just_in_time_keeps_the_pool(self):
        conns = self.pool()
        self.clock.advance(2.0)
        self.clock.advance(1.99)
        for conn in conns:
            [beat] = self.beats(conn)
            conn.answer(beat, "")
        self.clock.advance(0.5)
        self.assertFalse(any(c.transport.disconnecting for c in conns))
        self.assertEqual(self.backend.heartbeat_misses, 0)

    def test_no_heartbeat_while_the_upstream_may_close_after_each_answer(self):
        self.backend.persistent = None  # not learnt yet: foxyproxy 2.10 would run it and close
        conn = self.connect()
        self.clock.advance(0.4)
        self.clock.advance(0.05)
        self.assertEqual(self.beats(conn), [])

    def test_heartbeat_0_turns_it_off(self):
        self.backend.heartbeat = 0.0
        conns = self.pool()
        self.clock.advance(9.0)
        self.assertEqual([self.beats(c) for c in conns], [[], [], []])


class UrlTests(SynchronousTestCase):
    def test_defaults_find_a_silent_upstream_within_3_seconds(self):
        b = tcp.from_url("tcp://h:4001", BackendSettings())(MemoryReactorClock())
        self.assertEqual((b.heartbeat, b.heartbeat_timeout, b.keepalive, b.liveness),
                         (1.0, 1.5, (2, 1, 3), True))
        self.assertLessEqual(b.heartbeat + b.heartbeat_timeout, 3.0)
        b = tcp.from_url("tcp://h:4001?heartbeat=5&heartbeat_timeout=1.5&keepalive_idle=10&"
                         "keepalive_interval=2&keepalive_count=4", BackendSettings())(MemoryReactorClock())
        self.assertEqual((b.heartbeat, b.heartbeat_timeout, b.keepalive), (5.0, 1.5, (10, 2, 4)))
        off = tcp.from_url("tcp://h?heartbeat=0", BackendSettings())(MemoryReactorClock())
        self.assertEqual((off.heartbeat, off.liveness), (0.0, False))

    def test_bad_values_name_the_parameter(self):
        for query, word in (("heartbeat=0.01", "heartbeat="), ("heartbeat=x", "heartbeat"),
                            ("heartbeat_timeout=0", "heartbeat_timeout"),
                            ("keepalive_count=0", "keepalive_count"),
                            ("keepalive_idle=1.5", "keepalive_idle")):
            with self.assertRaises(ValueError) as e:
                tcp.from_url(f"tcp://h:4001?{query}", BackendSettings())
            self.assertIn(word, str(e.exception))


class Handle:
    def __init__(self, handle, transport=None):
        self.handle = handle
        self.transport = transport

    def getHandle(self):
        return self.handle


def test_keepalive_options_on_the_socket_also_under_tls():
    with socket.socket() as s:
        tls = Handle(object(), transport=Handle(s))  # TLS: its handle is the TLS connection
        assert set_keepalive(tls, 3, 2, 4)
        get = lambda option: s.getsockopt(socket.IPPROTO_TCP, option)  # noqa: E731
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert (get(socket.TCP_KEEPIDLE), get(socket.TCP_KEEPINTVL), get(socket.TCP_KEEPCNT)) == (3, 2, 4)
        assert get(getattr(socket, "TCP_USER_TIMEOUT", 18)) == 11000
    assert not set_keepalive(object(), 1, 1, 1)  # no socket (a StringTransport): nothing to do


class LivenessConnectionTests(Base):
    """The liveness connection: heartbeats only, so a silent upstream is
    found while every pooled connection waits on a card; until it answers
    again its readers are absent and commands get C086 at once."""

    connections = 2

    def setUp(self):
        super().setUp()
        b = self.backend
        b.heartbeat, b.heartbeat_timeout, b.liveness = 1.0, 1.5, True
        b._start_sentinel()  # start() ran before liveness was on; persistent is known (True)

    def tier(self):
        """Two pooled connections (the list read on the first) and the liveness connection."""
        pool = [self.connect(), self.connect(names=None)]
        sentinel = self.endpoint.succeed()
        self.assertIs(self.backend._sentinel.transport, sentinel.transport)
        self.assertNotIn(self.backend._sentinel, self.backend._live)
        return pool, sentinel

    def present(self):
        return [(r.name, r.present) for r in self.registry.readers]

    def test_a_silent_upstream_is_found_while_every_pooled_connection_is_busy(self):
        pool, sentinel = self.tier()
        d0 = self.backend.transmit("Emulated 00", b"\x00\xd6\x00\x00\x01\x01")
        d1 = self.backend.transmit("Emulated 01", b"\x00\xd6\x00\x00\x01\x02")
        self.assertTrue(all(c.proto.calls for c in pool))  # both busy: no pooled heartbeat
        sent = [r for c in pool for r in c.requests()]
        self.assertEqual(len(sent), 2)
        self.assertEqual(self.backend.upstream_state, "up")
        self.clock.advance(1.0)
        [(reader, beat, command)] = sentinel.requests()
        self.assertEqual((reader, command), ("*", "READERS"))
        sentinel.answer(beat, "")  # answered: the upstream lives, the cards are slow
        self.clock.advance(1.0)
        [(_, beat, _)] = sentinel.requests()
        self.clock.advance(1.49)  # the upstream froze: no answer
        self.assertNoResult(d0)
        self.clock.advance(0.01)  # 2.5 s after the last answer: every connection goes
        self.assertTrue(all(c.transport.disconnecting for c in pool + [sentinel]))
        for c in pool + [sentinel]:
            c.lose(ConnectionAborted())
        self.assertEqual((outcome(d0), outcome(d1)), (errors.UPSTREAM, errors.UPSTREAM))
        self.assertEqual(self.backend.heartbeat_misses, 1)
        self.assertEqual(self.backend.upstream_state, "silent")
        self.assertEqual(self.present(), [("B Emulated 00", False), ("B Emulated 01", False)])
        # new commands: C086 at once, also once connections are up again (a
        # frozen peer's kernel still accepts), and nothing is written
        self.assertEqual(outcome(maybeDeferred(self.backend.transmit, "Emulated 00", b"\x00\xb0\x00\x00\x01")),
                         errors.UPSTREAM)
        self.clock.advance(1.0)
        self.assertEqual(len(self.endpoint.attempts), 3)
        again = [self.endpoint.succeed() for _ in range(3)]
        self.assertEqual(outcome(maybeDeferred(self.backend.transmit, "Emulated 00", b"\x00\xb0\x00\x00\x01")),
                         errors.UPSTREAM)
        self.assertEqual(outcome(maybeDeferred(self.backend.transmit_batch, "Emulated 00",
                                               [("APDU", b"\x00\xb0\x00\x00\x01")])), errors.UPSTREAM)
        written = [r for c in again for r in c.requests()]
        self.assertTrue(all(command == "READERS" for _, _, command in written), written)
        self.assertEqual(self.backend.upstream_state, "silent")
        # it answers again: present again, commands go through
        conn = next(c for c in again if c.proto.calls)
        conn.answer(conn.proto.calls[0].id.decode(), "|".join(b64(n) for n in NAMES))
        self.assertEqual(self.backend.upstream_state, "up")
        self.assertEqual(self.present(), [("B Emulated 00", True), ("B Emulated 01", True)])
        d = self.backend.transmit("Emulated 00", b"\x00\xb0\x00\x00\x01")
        [busy] = [c for c in again if c.proto.calls and c.proto.calls[-1].key == "Emulated 00"]
        [(_, cid, command)] = [r for r in busy.requests() if r[2].startswith("APDU")]
        self.assertEqual(command, "APDU:00B0000001")
        busy.answer(cid, "019000")
        self.assertEqual(outcome(d), b"\x01\x90\x00")
        self.assertEqual(len(self.logged("did not answer a heartbeat")), 1)
        self.assertEqual(len(self.logged("listed absent")), 1)
        self.assertEqual(len(self.logged("listed present again")), 1)

    def test_a_slow_card_with_the_liveness_connection_answering_drops_nothing(self):
        pool, sentinel = self.tier()
        d = self.backend.transmit("Emulated 00", b"\x00\xa4\x00\x0c")
        for _ in range(10):  # 10 s on the card; every pooled connection's heartbeats and the sentinel's answered
            self.clock.advance(1.0)
            for c in pool + [sentinel]:
                for _, cid, command in c.requests():
                    if command == "READERS":
                        c.answer(cid, "")
        self.assertFalse(any(c.transport.disconnecting for c in pool + [sentinel]))
        [busy] = [c for c in pool if c.proto.calls]
        busy.answer(busy.proto.calls[0].id.decode(), "9000")
        self.assertEqual(outcome(d), b"\x90\x00")
        self.assertEqual((self.backend.heartbeat_misses, self.backend.upstream_state), (0, "up"))

    def test_an_unreachable_upstream_lists_its_readers_absent_until_it_is_back(self):
        pool, sentinel = self.tier()
        for c in pool + [sentinel]:
            c.lose(ConnectionRefusedError("gone"))
        self.clock.advance(1.0)
        while self.endpoint.attempts:
            self.endpoint.fail()
        self.assertEqual(self.backend.upstream_state, "down")
        self.assertEqual(self.present(), [("B Emulated 00", False), ("B Emulated 01", False)])
        self.assertEqual(outcome(maybeDeferred(self.backend.transmit, "Emulated 00", b"\x00\xb0\x00\x00\x01")),
                         errors.UPSTREAM)
        self.clock.advance(1.0)
        self.connect()  # back: the list is read again
        self.assertEqual(self.backend.upstream_state, "up")
        self.assertEqual(self.present(), [("B Emulated 00", True), ("B Emulated 01", True)])

    def test_no_liveness_connection_until_the_upstream_is_known_to_keep_connections(self):
        self._stop()
        self.setUp_unknown()
        conn = self.connect()
        self.assertEqual(self.endpoint.attempts, [])  # one slot, no liveness connection yet
        self.clock.advance(0.5)  # the connection stayed open after its answer: persistent
        self.assertIs(self.backend.persistent, True)
        self.assertEqual(len(self.endpoint.attempts), 1)
        self.endpoint.succeed()
        self.assertIsNotNone(self.backend._sentinel)
        conn.requests()

    def setUp_unknown(self):
        self.registry = ReaderRegistry()
        self.endpoint = FakeEndpoint()
        self.backend = tcp.TcpBackend(
            endpoint=self.endpoint, clock=self.clock, where="tcp://upstream:4001", prefix="B ",
            connections=1, refresh=10.0, timeout=5.0, retry_delay=lambda failures: 1.0,
            persistent=None, heartbeat=1.0, heartbeat_timeout=1.5, liveness=True)
        self.backend.start(self.registry)

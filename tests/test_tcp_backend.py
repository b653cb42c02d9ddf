"""Unit tests of the tcp:// / tls:// backend, in memory: a fake endpoint
hands out StringTransports, a Clock drives reconnection and timeouts."""

import base64
import os
import pathlib
import shutil
import tempfile

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from cloudfoxy_proxy import errors
from cloudfoxy_proxy.interfaces import IBackend
from cloudfoxy_proxy.backends import BackendSettings, from_url as backend_from_url
from cloudfoxy_proxy.backends import tcp, tcp_pool, tcp_upstream
from cloudfoxy_proxy.dispatch import Dispatcher, Session
from cloudfoxy_proxy.errors import CardError
from cloudfoxy_proxy.parser import Request, make_command
from cloudfoxy_proxy.registry import ReaderRegistry


def b64(name):
    return base64.b64encode(name.encode()).decode()


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Records connection attempts; the test completes or fails each."""

    def __init__(self):
        self.attempts = []

    def connect(self, factory):
        d = Deferred()
        self.attempts.append((factory, d))
        return d

    def succeed(self):
        factory, d = self.attempts.pop(0)
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        d.callback(proto)
        return Conn(proto, transport)

    def fail(self):
        factory, d = self.attempts.pop(0)
        d.errback(ConnectionRefusedError("refused"))


class Conn:
    """One fake upstream connection: read what we sent, answer it."""

    def __init__(self, proto, transport, owner="C081"):
        self.proto = proto
        self.transport = transport
        self.seen = 0
        #: what OWNER is answered with (C081: an upstream with no owner id)
        self.owner = owner
        self.owner_ids = {}  # READERS id -> the id of the OWNER asked with it

    def requests(self):
        """The requests written since the last call: [(reader_line, id, command)];
        OWNER asked with READERS is one READERS entry (``answer`` answers both)."""
        data = self.transport.value()[self.seen:]
        self.seen += len(data)
        out = []
        for chunk in data.split(b"\n\n"):
            if not chunk:
                continue
            lines = chunk.decode().split("\n")
            if len(lines) == 3 and lines[1].endswith(":OWNER|") and lines[2].endswith(":READERS|"):
                self.owner_ids[lines[2][1:].partition(":")[0]] = lines[1][1:].partition(":")[0]
                del lines[1]
            assert len(lines) == 2, chunk
            assert lines[0].startswith(">") and lines[0].endswith("|"), lines
            assert lines[1].startswith(">") and lines[1].endswith("|"), lines
            cid, _, command = lines[1][1:-1].partition(":")
            out.append((lines[0][1:-1], cid, command))
        assert data == b"" or data.endswith(b"\n\n"), data
        return out

    def answer(self, cid, result):
        oid = self.owner_ids.pop(cid, None)
        owner = f">{oid}:{self.owner}\n" if oid is not None and self.owner is not None else ""
        self.proto.dataReceived(f"{owner}>{cid}:{result}\n@@\n".encode())

    def lose(self, why=None):
        self.proto.connectionLost(Failure(why or ConnectionLost("gone")))


def cancel(d):
    """Cancel like the dispatcher's timeout does, and consume the CancelledError."""
    d.cancel()
    assert outcome(d) == "cancelled"


def outcome(d):
    """A fired Deferred's result, or the CardError code it failed with."""
    box = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    r = box[0]
    if isinstance(r, Failure):
        if r.check(CardError):
            return r.value.code
        if r.check(CancelledError):
            return "cancelled"
        r.raiseException()
    return r


NAMES = ["Emulated 00", "Emulated 01"]


class Base(SynchronousTestCase):
    connections = 1
    password = None
    prefix = "B "
    tls = False
    persistent = True  # most tests: an upstream known to keep connections (ModeTests learn it)

    def setUp(self):
        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        self.registry = ReaderRegistry()
        self.backend = tcp.TcpBackend(
            endpoint=self.endpoint, clock=self.clock, where="tcp://upstream:4001",
            password=self.password, prefix=self.prefix, connections=self.connections,
            refresh=10.0, timeout=5.0, tls=self.tls, retry_delay=lambda failures: 1.0,
            persistent=self.persistent)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.backend.start(self.registry)
        self.addCleanup(self._stop)

    def logged(self, text):
        """Messages logged by the backend that contain ``text``."""
        return [m for m in (formatEvent(e) for e in self.events) if text in m]

    def _stop(self):
        # Calls a test left unanswered end as C086 here; consume those.
        pending = list(self.backend._queue)
        for conn in self.backend._live:
            pending.extend(conn.calls)
        for call in pending:
            call.d.addErrback(lambda f: None)
        self.backend.stop()
        for conn in list(self.backend._live):
            conn.connectionLost(Failure(ConnectionLost("test over")))

    def connect(self, names=NAMES):
        """Complete the next connection attempt and answer its READERS."""
        conn = self.endpoint.succeed()
        if names is not None:
            reqs = conn.requests()
            self.assertEqual([(r, c) for r, _, c in reqs], [("*" + self.pw_suffix(), "READERS")])
            conn.answer(reqs[0][1], "|".join(b64(n) for n in names))
        return conn

    def two(self):
        """A connection and two calls pipelined on it: (conn, d0, d1, requests)."""
        conn = self.connect()
        d0 = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x00")
        d1 = self.backend.transmit("Emulated 01", b"\x00\x00\x00\x01")
        return conn, d0, d1, conn.requests()

    def pw_suffix(self):
        return ":" + self.password if self.password else ""

    def key(self, name):
        return self.registry.get(self.prefix + name).key


class FramingTests(Base):
    def test_provides_ibackend(self):
        verifyObject(IBackend, self.backend)
        self.assertIn("tcp://upstream:4001", self.backend.description)

    def test_readers_appear_with_prefix(self):
        self.connect()
        self.assertEqual([r.name for r in self.registry.readers], ["B Emulated 00", "B Emulated 01"])
        self.assertEqual(self.key("Emulated 01"), "Emulated 01")

    def test_request_framing_and_answer(self):
        conn = self.connect()
        d = self.backend.transmit("Emulated 00", bytes.fromhex("00a4000c023f00"))
        reqs = conn.requests()
        self.assertEqual(reqs, [("Emulated 00", reqs[0][1], "APDU:00A4000C023F00")])
        self.assertNoResult(d)
        conn.answer(reqs[0][1], "9000")
        self.assertEqual(outcome(d), b"\x90\x00")
        d = self.backend.reset("Emulated 01")
        [(reader, cid, command)] = conn.requests()
        self.assertEqual((reader, command), ("Emulated 01", "RESET"))
        conn.answer(cid, "3B8B8001466F7879456D753738313677")
        self.assertEqual(outcome(d).hex().upper(), "3B8B8001466F7879456D753738313677")

    def test_exact_bytes_on_the_wire(self):
        conn = self.connect()
        conn.requests()
        self.backend.transmit("Emulated 00", b"\x00\x84\x00\x00\x08")
        self.assertEqual(conn.transport.value()[conn.seen:],
                         b">Emulated 00|\n>3:APDU:0084000008|\n\n")  # 1, 2: OWNER, READERS

    def test_answer_split_across_reads_and_crlf(self):
        conn = self.connect()
        d = self.backend.transmit("Emulated 00", b"\x00\x84\x00\x00\x08")
        [(_, cid, _)] = conn.requests()
        wire = f"#comment\r\n>{cid}:0102030405060708 9000\r\n@@\r\n".encode()
        for i in range(len(wire)):
            conn.proto.dataReceived(wire[i:i + 1])
        self.assertEqual(outcome(d).hex().upper(), "01020304050607089000")

    def test_name_with_colon_uses_base64_alias(self):
        conn = self.connect(names=["odd:name", " padded "])
        self.backend.transmit("odd:name", b"\x00\xa4\x00\x0c")
        self.backend.transmit(" padded ", b"\x00\xa4\x00\x0c")
        readers = [r for r, _, _ in conn.requests()]
        self.assertEqual(readers, [b64("odd:name"), b64(" padded ")])

    def test_error_codes_pass_through(self):
        conn = self.connect()
        results = []
        for code in ["C080", "C081", "C082", "C084", "C085", "C086", "C090"]:
            d = self.backend.transmit("Emulated 00", b"\x00\xa4\x00\x0c")
            [(_, cid, _)] = conn.requests()
            conn.answer(cid, code)
            results.append(outcome(d))
        self.assertEqual(results, ["C080", "C081", "C082", "C084", "C085", "C086", "C090"])

    def test_not_hex_or_missing_result_is_c086(self):
        conn = self.connect()
        d = self.backend.transmit("Emulated 00", b"\x00\xa4\x00\x0c")
        [(_, cid, _)] = conn.requests()
        conn.answer(cid, "OK?")
        self.assertEqual(outcome(d), errors.UPSTREAM)
        d = self.backend.transmit("Emulated 00", b"\x00\xa4\x00\x0c")
        conn.requests()
        conn.proto.dataReceived(b"@@\n")
        self.assertEqual(outcome(d), errors.UPSTREAM)
        self.assertFalse(conn.transport.disconnecting)

    def test_not_found_triggers_refresh(self):
        conn = self.connect()
        d = self.backend.transmit("Emulated 01", b"\x00\xa4\x00\x0c")
        [(_, cid, _)] = conn.requests()
        conn.answer(cid, "C083")
        self.assertEqual(outcome(d), errors.NOT_FOUND)
        [(reader, cid, command)] = conn.requests()
        self.assertEqual((reader, command), ("*", "READERS"))
        conn.answer(cid, b64("Emulated 00"))
        self.assertEqual([r.name for r in self.registry.readers], ["B Emulated 00"])

    def test_periodic_refresh(self):
        conn = self.connect()
        self.clock.advance(10)
        [(_, cid, command)] = conn.requests()
        self.assertEqual(command, "READERS")
        conn.answer(cid, "|".join(b64(n) for n in NAMES + ["Emulated 02"]))
        self.assertEqual(len(self.registry.readers), 3)
        self.clock.advance(10)
        [(_, cid, _)] = conn.requests()
        conn.answer(cid, "not base64!|" + b64("Emulated 00"))
        self.assertEqual([r.name for r in self.registry.readers], ["B Emulated 00"])
        self.clock.advance(10)
        [(_, cid, _)] = conn.requests()
        conn.answer(cid, "|".join(["junk!"] * 500 + [b64("Emulated 00")]))  # the same list again
        self.assertEqual([r.name for r in self.registry.readers], ["B Emulated 00"])
        lines = self.logged("not base64 UTF-8")
        self.assertEqual(len(lines), 2, lines)  # one per change of the count, not one per name
        self.assertIn("listed 500 reader name(s)", lines[1])

    def test_empty_list_is_asked_again_soon(self):
        """An upstream proxy that has not found its own cards yet."""
        conn = self.connect(names=[])
        self.assertEqual(self.registry.readers, [])
        self.clock.advance(tcp.EMPTY_RETRY)
        [(_, cid, command)] = conn.requests()
        self.assertEqual(command, "READERS")
        conn.answer(cid, "")
        self.clock.advance(tcp.EMPTY_RETRY)
        self.assertEqual(conn.requests(), [])  # backing off: 1 s now
        self.clock.advance(tcp.EMPTY_RETRY)
        [(_, cid, _)] = conn.requests()
        conn.answer(cid, b64("Emulated 00"))
        self.assertEqual([r.name for r in self.registry.readers], ["B Emulated 00"])
        self.clock.advance(5)
        self.assertEqual(conn.requests(), [])  # then only every `refresh` seconds

    def test_readers_error_keeps_the_list(self):
        conn = self.connect()
        self.clock.advance(10)
        [(_, cid, _)] = conn.requests()
        conn.answer(cid, "C086")
        self.assertEqual(len(self.registry.readers), 2)
        self.assertEqual(len(self.flushLoggedErrors()), 0)


class PasswordTests(Base):
    password = "s3cret:with colon"

    def test_password_on_reader_line(self):
        conn = self.connect()
        d = self.backend.transmit("Emulated 00", b"\x00\xa4\x00\x0c")
        [(reader, _, _)] = conn.requests()
        self.assertEqual(reader, "Emulated 00:s3cret:with colon")
        conn.lose()
        self.assertEqual(outcome(d), "C086")
        self.clock.advance(1.0)
        self.endpoint.fail()
        self.assertNotIn("s3cret", repr(self.backend) + " ".join(formatEvent(e) for e in self.events))


class PipelineTests(Base):
    connections = 1

    def test_pipelined_answers_matched_in_order(self):
        conn, d0, d1, reqs = self.two()
        self.assertEqual([r for r, _, _ in reqs], ["Emulated 00", "Emulated 01"])
        conn.proto.dataReceived(f">{reqs[0][1]}:6100\n@@\n>{reqs[1][1]}:6101\n@@\n".encode())
        self.assertEqual((outcome(d0), outcome(d1)), (b"\x61\x00", b"\x61\x01"))

    def test_wrong_id_drops_the_connection(self):
        conn = self.connect()
        d0 = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x00")
        d1 = self.backend.transmit("Emulated 01", b"\x00\x00\x00\x01")
        reqs = conn.requests()
        conn.answer(reqs[1][1], "9000")  # out of order: never attributed
        self.assertTrue(conn.transport.disconnecting)
        conn.lose()
        self.assertEqual((outcome(d0), outcome(d1)), ("C086", "C086"))

    def test_cancelled_call_late_answer_discarded(self):
        conn = self.connect()
        d0 = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x00")
        cancel(d0)  # what the dispatcher's timeout does
        d1 = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x01")
        reqs = conn.requests()
        self.assertEqual(len(reqs), 2)
        conn.answer(reqs[0][1], "6A82")  # the late answer to the cancelled call
        self.assertNoResult(d1)
        conn.answer(reqs[1][1], "9000")
        self.assertEqual(outcome(d1), b"\x90\x00")
        self.assertFalse(conn.transport.disconnecting)

    def test_stuck_connection_is_dropped(self):
        conn = self.connect()
        d0 = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x00")
        d1 = self.backend.transmit("Emulated 01", b"\x00\x00\x00\x01")
        cancel(d0)
        self.clock.advance(4.9)
        self.assertFalse(conn.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(conn.transport.disconnecting)
        conn.lose()
        self.assertEqual(outcome(d1), "C086")

    def test_answer_stops_the_watch(self):
        conn = self.connect()
        d0 = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x00")
        cancel(d0)
        [(_, cid, _)] = conn.requests()
        conn.answer(cid, "9000")
        self.assertEqual(self.clock.getDelayedCalls().__len__(), 1)  # only the refresh loop
        self.clock.advance(6)
        self.assertFalse(conn.transport.disconnecting)


class PoolTests(Base):
    connections = 2

    def test_idle_connection_preferred_and_card_affinity(self):
        c1 = self.connect()
        c2 = self.connect(names=None)  # the refresh went to c1 only
        d0 = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x00")
        self.assertEqual(len(c1.requests()), 1)
        d1 = self.backend.transmit("Emulated 01", b"\x00\x00\x00\x01")
        self.assertEqual(len(c2.requests()), 1)  # not behind the busy c1
        # A timed-out call keeps its card on its connection, for the card's order.
        cancel(d0)
        d2 = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x02")
        reqs = c1.requests()
        self.assertEqual([c for _, _, c in reqs], ["APDU:00000002"])
        self.assertEqual(c2.requests(), [])
        self.assertNoResult(d1)
        self.assertNoResult(d2)

    def test_losing_one_connection_keeps_the_other(self):
        c1 = self.connect()
        c2 = self.connect(names=None)
        d0 = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x00")
        c1.requests()
        c1.lose()
        self.assertEqual(outcome(d0), "C086")
        d1 = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x01")
        [(_, cid, _)] = c2.requests()
        c2.answer(cid, "9000")
        self.assertEqual(outcome(d1), b"\x90\x00")


class FailureTests(Base):
    def test_in_flight_answered_c086_and_never_resent(self):
        conn = self.connect()
        d = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x00")
        conn.requests()
        conn.lose()
        self.assertEqual(outcome(d), "C086")
        self.assertEqual(len(self.logged("1 command(s) in flight answered C086")), 1)
        self.clock.advance(1.0)
        conn2 = self.connect()
        self.assertEqual(conn2.requests(), [])  # the APDU was not sent again

    def test_queued_requests_go_out_on_reconnect(self):
        conn = self.connect()
        conn.lose()
        d = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x07")  # no connection yet
        d2 = self.backend.transmit("Emulated 01", b"\x00\x00\x00\x08")
        cancel(d2)  # cancelled before it was sent: never sent
        self.assertNoResult(d)
        self.clock.advance(1.0)
        conn2 = self.endpoint.succeed()
        reqs = conn2.requests()
        self.assertEqual([c for _, _, c in reqs], ["APDU:00000007", "READERS"])
        conn2.answer(reqs[0][1], "9000")
        self.assertEqual(outcome(d), b"\x90\x00")

    def test_requests_before_first_connection_wait(self):
        d = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x07")
        self.assertNoResult(d)
        conn = self.endpoint.succeed()
        reqs = conn.requests()
        self.assertEqual([c for _, _, c in reqs], ["APDU:00000007", "READERS"])

    def test_fail_fast_when_down(self):
        d = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x07")
        self.endpoint.fail()
        self.assertEqual(outcome(d), "C086")  # the waiting call fails with the attempt
        exc = self.assertRaises(CardError, self.backend.transmit, "Emulated 00", b"\x00\x00\x00\x00")
        self.assertEqual(exc.code, errors.UPSTREAM)
        self.assertRaises(CardError, self.backend.reset, "Emulated 00")
        # Back up: served again.
        self.clock.advance(1.0)
        conn = self.connect()
        d = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x00")
        [(_, cid, _)] = conn.requests()
        conn.answer(cid, "9000")
        self.assertEqual(outcome(d), b"\x90\x00")

    def test_down_after_losing_connection_and_failed_retry(self):
        conn = self.connect()
        conn.lose()
        self.clock.advance(1.0)
        self.endpoint.fail()
        self.assertRaises(CardError, self.backend.transmit, "Emulated 00", b"\x00\x00\x00\x00")
        self.assertEqual(len(self.registry.readers), 2)  # last known readers stay listed

    def test_stop_fails_queued_and_refuses_new(self):
        d = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x07")
        self.backend.stop()
        self.assertEqual(outcome(d), "C086")
        self.assertRaises(CardError, self.backend.transmit, "Emulated 00", b"\x00\x00\x00\x00")

    def test_stop_answers_in_flight(self):
        conn = self.connect()
        d = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x07")
        stopped = self.backend.stop()
        self.assertTrue(conn.transport.disconnecting)
        conn.lose()
        self.assertEqual(outcome(d), "C086")
        self.successResultOf(stopped)

    def test_overlong_line_fails_only_its_command(self):
        """An over-long answer line is discarded as it arrives (memory stays
        bounded); its command gets C086, the next one on the same connection
        its answer."""
        conn = self.connect()
        d1 = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x07")
        d2 = self.backend.transmit("Emulated 01", b"\x00\x00\x00\x08")
        [(_, c1, _), (_, c2, _)] = conn.requests()
        conn.proto.dataReceived(b">" + c1.encode() + b":" + b"9" * 100000)
        for _ in range(5):
            conn.proto.dataReceived(b"9" * 100000)
        self.assertLess(len(conn.proto._buf), tcp_upstream.MAX_LINE + 100000)
        conn.proto.dataReceived(b"00\n@@\n")
        self.assertEqual(outcome(d1), "C086")
        self.assertNoResult(d2)
        conn.answer(c2, "9000")
        self.assertEqual(outcome(d2), b"\x90\x00")
        self.assertFalse(conn.transport.disconnecting)
        self.assertEqual(len(self.logged("malformed answer")), 1)

    def test_default_backoff_is_bounded(self):
        backend = tcp.TcpBackend(endpoint=self.endpoint, clock=self.clock)
        for failures in range(0, 40):
            backend._failures = failures
            delay = backend._retry(tcp_pool._Slot(self.endpoint, None))
            self.assertTrue(tcp_pool.MIN_BACKOFF / 2 <= delay <= tcp_pool.MAX_BACKOFF, delay)

    def test_quick_close_counts_as_failure(self):
        conn = self.connect(names=None)  # never answers anything
        conn.lose()
        self.assertEqual(self.backend._failures, 1)
        self.clock.advance(1.0)
        conn = self.connect()
        self.clock.advance(2.0)
        conn.lose()
        self.assertEqual(self.backend._failures, 0)


class TLSTests(Base):
    tls = True

    def test_usable_only_after_handshake(self):
        conn = self.endpoint.succeed()
        d = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x07")
        self.assertEqual(conn.requests(), [])  # nothing before the peer is verified
        conn.proto.handshakeCompleted()
        reqs = conn.requests()
        self.assertEqual([c for _, _, c in reqs], ["APDU:00000007", "READERS"])
        conn.answer(reqs[0][1], "9000")
        self.assertEqual(outcome(d), b"\x90\x00")

    def test_failed_handshake_is_a_failed_attempt(self):
        conn = self.endpoint.succeed()
        d = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x07")
        conn.lose(ConnectionLost("certificate verify failed"))
        self.assertEqual(outcome(d), "C086")
        self.assertEqual(conn.requests(), [])
        self.assertRaises(CardError, self.backend.transmit, "Emulated 00", b"\x00\x00\x00\x00")


class DispatcherTests(Base):
    """Through the real Dispatcher: its timeout cancels our Deferred."""

    def test_timeout_then_next_command(self):
        conn = self.connect()
        dispatcher = Dispatcher(self.registry, self.clock, command_timeout=2.0)
        request = Request("B Emulated 00", None, [make_command(["1", "APDU", "00A4000C023F00"])])
        d1 = dispatcher.execute(request, Session())
        self.clock.advance(2.0)
        self.assertEqual(self.successResultOf(d1), [("1", "C086")])
        request = Request("B Emulated 00", None, [make_command(["2", "APDU", "0084000008"])])
        d2 = dispatcher.execute(request, Session())
        reqs = conn.requests()
        self.assertEqual([c for _, _, c in reqs], ["APDU:00A4000C023F00", "APDU:0084000008"])
        conn.answer(reqs[0][1], "9000")  # late: discarded
        self.assertNoResult(d2)
        conn.answer(reqs[1][1], "01020304050607089000")
        self.assertEqual(self.successResultOf(d2), [("2", "01020304050607089000")])

    def test_fail_fast_through_dispatcher(self):
        self.connect().lose()
        self.clock.advance(1.0)
        self.endpoint.fail()
        dispatcher = Dispatcher(self.registry, self.clock, command_timeout=2.0)
        request = Request("B Emulated 00", None, [make_command(["1", "RESET"])])
        self.assertEqual(dispatcher.execute(request, Session()), [("1", "C086")])


class FromUrlTests(SynchronousTestCase):
    def tmpfile(self, text):
        fd, path = tempfile.mkstemp()
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self.addCleanup(os.unlink, path)
        return path

    def make(self, url, config=None):
        return backend_from_url(url, config or BackendSettings())(MemoryReactorClock())

    def test_defaults(self):
        b = self.make("tcp://127.0.0.1:4001")
        verifyObject(IBackend, b)
        self.assertEqual((b.where, b.connections, b.refresh, b.prefix, b.password, b.tls),
                         ("tcp://127.0.0.1:4001", 4, 10.0, None, None, False))  # None: by owner id
        self.assertEqual(self.make("tcp://[::1]").where, "tcp://[::1]:4001")

    def test_settings_are_validated(self):
        self.assertRaises(ValueError, BackendSettings, command_timeout=0)
        self.assertRaises(TypeError, BackendSettings, password=b"pw")
        self.assertEqual(BackendSettings(command_timeout="2.5").command_timeout, 2.5)

    def test_params(self):
        b = self.make("tcp://h:5?prefix=B%20&connections=2&refresh=0",
                      BackendSettings(command_timeout=3.0, password="pw"))
        self.assertEqual((b.prefix, b.connections, b.refresh, b.timeout, b.password),
                         ("B ", 2, 0.0, 3.0, "pw"))

    def test_password_file_wins(self):
        path = self.tmpfile("from-file\nsecond line\n")
        b = self.make(f"tcp://h:5?password_file={path}", BackendSettings(password="from-config"))
        self.assertEqual(b.password, "from-file")
        self.assertNotIn("from-file", b.description + repr(b))

    def test_bad_urls(self):
        for url, words in [
            ("tcp://h:5?password=x", "password_file"),
            ("tcp://user:pw@h:5", "credentials"),
            ("tcp://:5", "HOST"),
            ("tcp://h:99999", "port"),
            ("tcp://h:5/path", "path"),
            ("tcp://h:5?ca=x", "unknown parameter"),
            ("tcp://h:5?connections=0", "out of range"),
            ("tcp://h:5?refresh=0.01", "refresh"),
            ("tcp://h:5?password_file=/nonexistent/pw", "password_file"),
            ("tls://h:5?ca=/nonexistent/ca.pem", "ca="),
            ("tls://h:5?key=/x.pem", "cert="),
            ("tls://h:5?cert=/nonexistent/x.pem", "cert="),
        ]:
            with self.assertRaises(ValueError) as cm:
                backend_from_url(url)
            self.assertIn(words, str(cm.exception), url)

    def test_password_that_reads_as_a_command(self):
        with self.assertRaises(ValueError) as cm:
            backend_from_url("tcp://h:5", BackendSettings(password="apdu"))
        self.assertIn("command", str(cm.exception))

    def test_ca_without_certificate(self):
        path = self.tmpfile("not a certificate")
        with self.assertRaises(ValueError) as cm:
            backend_from_url(f"tls://h:5?ca={path}")
        self.assertIn("no PEM certificate", str(cm.exception))

    def test_tls_builds(self):
        b = self.make("tls://localhost:4002?prefix=T%20")
        self.assertTrue(b.tls)
        self.assertEqual(b.where, "tls://localhost:4002")

    def test_tls_client_certificate(self):
        from test_tcp_integration import make_pki

        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        pki = make_pki(pathlib.Path(tmp), "unit")
        b = self.make(f"tls://127.0.0.1:4002?ca={pki['ca']}&cert={pki['cert']}&key={pki['key']}")
        self.assertTrue(b.tls)
        both = os.path.join(tmp, "both.pem")
        with open(both, "w") as f:
            f.write(open(pki["cert"]).read() + open(pki["key"]).read())
        self.assertTrue(self.make(f"tls://127.0.0.1:4002?cert={both}").tls)
        with self.assertRaises(ValueError) as cm:
            backend_from_url(f"tls://h:5?cert={pki['cert']}")  # no key anywhere
        self.assertIn("not a usable certificate and private key", str(cm.exception))


class ModeTests(Base):
    """What the backend learns about connection reuse (foxyproxy 2.10 closes
    after every answer; our proxy keeps connections)."""

    persistent = None
    connections = 2

    def test_learns_persistent_and_then_pipelines(self):
        c1 = self.connect()  # READERS answered on c1: not reused yet
        c2 = self.endpoint.succeed()
        d0 = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x00")
        self.assertEqual(c1.requests(), [])
        [(_, cid0, _)] = c2.requests()
        d1 = self.backend.transmit("Emulated 01", b"\x00\x00\x00\x01")  # no free connection: waits
        self.assertEqual(c1.requests() + c2.requests(), [])
        self.clock.advance(tcp_upstream.PROBE_DELAY)  # c1 stayed open after its answer
        self.assertTrue(self.backend.persistent)
        [(_, cid1, command)] = c1.requests()
        self.assertEqual(command, "APDU:00000001")
        c2.answer(cid0, "9000")
        c1.answer(cid1, "9001")
        self.assertEqual((outcome(d0), outcome(d1)), (b"\x90\x00", b"\x90\x01"))
        # Now pipelined: two calls on one connection when both are busy.
        self.backend.transmit("Emulated 00", b"\x00\x00\x00\x02")
        self.backend.transmit("Emulated 01", b"\x00\x00\x00\x03")
        self.backend.transmit("Emulated 02", b"\x00\x00\x00\x04")
        self.assertEqual(len(c1.requests()) + len(c2.requests()), 3)

    def test_learns_one_request_per_connection(self):
        c1 = self.endpoint.succeed()
        [(_, cid, _)] = c1.requests()
        c1.proto.dataReceived(f">{cid}:{b64('Foxy NET 127.0.0.1-1')}\n@@\n".encode())
        c1.lose(ConnectionDone())  # closed right after the answer, like foxyproxy 2.10
        self.assertIs(self.backend.persistent, False)
        self.assertEqual([r.name for r in self.registry.readers], ["B Foxy NET 127.0.0.1-1"])
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertTrue(self.backend.services[0].parked)  # the pool rests
        # The second slot's connection has nothing to do: closed at once (an
        # idle connection would stall foxyproxy, which reads one at a time).
        c2 = self.endpoint.succeed()
        self.assertTrue(c2.transport.disconnecting)
        c2.lose(ConnectionDone())
        self.assertEqual(self.endpoint.attempts, [])
        # Each request gets a connection of its own.
        d0 = self.backend.transmit("Foxy NET 127.0.0.1-1", b"\x00\x00\x00\x00")
        d1 = self.backend.reset("Foxy NET 127.0.0.1-1")
        self.assertEqual(len(self.endpoint.attempts), 2)
        c3, c4 = self.endpoint.succeed(), self.endpoint.succeed()
        [(_, cid0, command0)] = c3.requests()
        [(_, cid1, command1)] = c4.requests()
        self.assertEqual((command0, command1), ("APDU:00000000", "RESET"))
        c4.answer(cid1, "3B00")
        c3.answer(cid0, "9000")
        c3.lose(ConnectionDone())
        c4.lose(ConnectionDone())
        self.assertEqual((outcome(d0), outcome(d1)), (b"\x90\x00", b"\x3b\x00"))
        self.assertEqual(self.endpoint.attempts, [])
        # foxyproxy's answer to an unknown reader: a bare C083, no newline, closed.
        d2 = self.backend.transmit("Foxy NET 127.0.0.1-1", b"\x00\x00\x00\x02")
        c5 = self.endpoint.succeed()
        c5.requests()
        c5.proto.dataReceived(b"C083")
        c5.lose(ConnectionDone())
        self.assertEqual(outcome(d2), "C083")
        # ... which re-reads the readers, on a connection of its own.
        c6 = self.endpoint.succeed()
        [(_, cid, command)] = c6.requests()
        self.assertEqual(command, "READERS")
        c6.answer(cid, "")
        c6.lose(ConnectionDone())
        self.assertEqual(self.registry.readers, [])
        self.assertEqual(self.logged("lost a connection"), [])
        self.assertEqual(len(self.logged("a new connection for every request")), 1)

    def test_one_off_connections_fail_fast_when_down(self):
        c1 = self.connect()
        c1.lose(ConnectionDone())
        self.endpoint.succeed().lose(ConnectionDone())  # slot 2: idle, closed, parked
        d = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x00")
        self.endpoint.fail()
        self.assertEqual(outcome(d), "C086")
        self.assertRaises(CardError, self.backend.transmit, "Emulated 00", b"\x00\x00\x00\x00")
        # Down: the pool retries with back-off and brings it back.
        self.assertEqual(len(self.endpoint.attempts), 2)
        conn = self.endpoint.succeed()
        [(_, cid, command)] = conn.requests()  # the readers are re-read first
        self.assertEqual(command, "READERS")
        conn.answer(cid, "|".join(b64(n) for n in NAMES))
        conn.lose(ConnectionDone())
        d = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x00")
        self.assertNoResult(d)

    def test_false_single_detection_heals(self):
        c1 = self.connect()
        c1.lose(ConnectionDone())  # e.g. the upstream restarted just then
        self.assertIs(self.backend.persistent, False)
        self.endpoint.succeed().lose(ConnectionDone())
        d = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x00")
        c2 = self.endpoint.succeed()
        [(_, cid, _)] = c2.requests()
        c2.answer(cid, "9000")
        self.assertEqual(outcome(d), b"\x90\x00")
        self.clock.advance(tcp_upstream.PROBE_DELAY)  # ... and c2 stays open
        self.assertIs(self.backend.persistent, True)
        self.assertEqual(len(self.endpoint.attempts), 2)  # the pool is back
        self.assertFalse(any(slot.parked for slot in self.backend.services))


def batch_requests(conn):
    """The requests written since the last call, with every command line:
    [(reader_line, [(id, command), ...])]."""
    data = conn.transport.value()[conn.seen:]
    conn.seen += len(data)
    out = []
    for chunk in data.split(b"\n\n"):
        if chunk:
            lines = [line[1:-1] for line in chunk.decode().split("\n")]
            out.append((lines[0], [tuple(line.split(":", 1)) for line in lines[1:]]))
    return out


class NeighbourTests(Base):
    """A malformed answer for one card fails that card's command only
    (issue 12 point 3); the connection stays unless its stream is lost."""

    connections = 1

    def test_malformed_answers_fail_only_their_command(self):
        for junk in ("{wrong}:9000", "{id}:ZZ-not-hex", "{id}:9000\n>{id}:9000", "nonsense"):
            conn, bad, good, reqs = self.two()
            c_bad, c_good = reqs[0][1], reqs[1][1]
            conn.proto.dataReceived(
                b">" + junk.format(id=c_bad, wrong=int(c_good) + 1000).encode() + b"\n@@\n")
            self.assertEqual(outcome(bad), "C086", junk)
            self.assertNoResult(good)
            conn.answer(c_good, "6101")
            self.assertEqual(outcome(good), b"\x61\x01")
            self.assertFalse(conn.transport.disconnecting, junk)
            conn.lose(ConnectionDone())
            self.clock.advance(1.0)

    def test_skipping_ahead_drops_connection_and_fails_only_in_flight(self):
        conn, bad, good, reqs = self.two()
        c_good = reqs[1][1]
        conn.answer(c_good, "9000")  # the answer to the later request came first
        self.assertTrue(conn.transport.disconnecting)
        conn.lose()
        self.assertEqual((outcome(bad), outcome(good)), ("C086", "C086"))
        later = self.backend.transmit("Emulated 01", b"\x00\x00\x00\x02")
        self.clock.advance(1.0)
        conn = self.endpoint.succeed()
        reqs = conn.requests()  # the waiting command goes out, then READERS
        self.assertEqual([r for r, _, _ in reqs], ["Emulated 01", "*"])
        conn.answer(reqs[0][1], "9000")
        self.assertEqual(outcome(later), b"\x90\x00")

    def test_junk_card_at_20_per_second_next_to_a_healthy_one(self):
        """300 commands of a healthy card while its neighbour's answers are
        junk 20 times a second: every healthy answer arrives, one warning."""
        conn = self.connect()
        healthy_ok = 0
        junk = [">{id}:XYZ", ">999999:9000", ">{id}:" + "9" * (tcp_upstream.MAX_LINE + 10), "garbage"]
        for i in range(300):
            if i % 3 == 0:  # ~20/s next to ~60 healthy commands a second
                b = self.backend.transmit("Emulated 00", b"\x00\x00\x00\x00")
            g = self.backend.transmit("Emulated 01", b"\x00\xb0\x00\x00")
            for _, cid, command in conn.requests():
                if command == "APDU:00000000":
                    text = junk[(i // 3) % len(junk)].format(id=cid)
                    conn.proto.dataReceived(text.encode() + b"\n@@\n")
                else:
                    conn.answer(cid, "CAFE9000")
            if i % 3 == 0:
                self.assertEqual(outcome(b), "C086")
            healthy_ok += outcome(g) == b"\xca\xfe\x90\x00"
            self.clock.advance(1 / 60)
        self.assertEqual(healthy_ok, 300)
        self.assertFalse(conn.transport.disconnecting)
        self.assertEqual(len(self.logged("malformed answer")), 1)  # rate-limited (10 s)

    def test_batch_is_one_upstream_request(self):
        conn = self.connect()
        d = self.backend.transmit_batch("Emulated 00", [("RESET", None), ("APDU", b"\x00\xa4\x00\x00"),
                                                        ("APDU", b"\x00\xb0\x00\x00")])
        [(reader, commands)] = batch_requests(conn)
        self.assertEqual(reader, "Emulated 00")
        self.assertEqual([c for _, c in commands], ["RESET", "APDU:00A40000", "APDU:00B00000"])
        ids = [i for i, _ in commands]
        conn.proto.dataReceived(f">{ids[0]}:3B00\n>{ids[1]}:C086\n>{ids[2]}:9000\n@@\n".encode())
        atr, failed, last = outcome(d)
        self.assertEqual((atr, failed.code, last), (b"\x3b\x00", "C086", b"\x90\x00"))

    def test_batch_with_missing_lines(self):
        conn = self.connect()
        d = self.backend.transmit_batch("Emulated 00", [("APDU", b"\x00\xa4\x00\x00")] * 2)
        [(_, commands)] = batch_requests(conn)
        conn.proto.dataReceived(f">{commands[0][0]}:9000\n@@\n".encode())
        first, second = outcome(d)
        self.assertEqual((first, second.code), (b"\x90\x00", "C086"))


class ReaderBoundTests(Base):
    """Issue 12 point 2: readers_max, MAX_NAME, and the READERS line limit."""

    def setUp(self):
        super().setUp()
        self.backend.readers_max = 3
        self.backend._cap.limit = 3

    def test_cap_and_long_names_dropped_with_one_warning(self):
        names = ["x" * 257, "A", "B", "C", "D", "E"]
        self.connect(names)
        self.assertEqual([r.name for r in self.registry.readers], ["B A", "B B", "B C"])
        [line] = self.logged("lists more readers than are kept")
        self.assertIn("dropped 2 over readers_max=3 and 1 with a name over 256 bytes", line)
        self.backend._got_readers("|".join(b64(n) for n in names))  # the same again: no new line
        self.assertEqual(len(self.logged("lists more readers than are kept")), 1)

    def test_readers_line_over_limit_keeps_the_connection(self):
        conn = self.connect(["A"])
        self.backend._refresh()
        [(_, cid, _)] = conn.requests()
        conn.proto.dataReceived(f">{cid}:".encode() + b"QQ==|" * (self.backend.listing_limit // 5 + 10))
        self.assertLessEqual(len(conn.proto._buf), self.backend.listing_limit)
        conn.proto.dataReceived(b"\n@@\n")
        self.assertEqual([r.name for r in self.registry.readers], ["B A"])
        self.assertTrue(self.logged("reading the readers of"))
        d = self.backend.transmit("A", b"\x00\x00\x00\x00")
        [(_, cid, _)] = conn.requests()
        conn.answer(cid, "9000")
        self.assertEqual(outcome(d), b"\x90\x00")

    def test_many_junk_tokens_before_the_names(self):
        self.connect(["A"])
        listing = "|".join(["", "junk!"] * 40 + [b64(n) for n in "BCDEF"])
        self.backend._got_readers(listing)
        self.assertEqual([r.name for r in self.registry.readers], ["B B", "B C", "B D"])
        self.assertIn("dropped 2 over readers_max=3", self.logged("lists more readers")[-1])


class OneByOneTests(Base):
    """Until the upstream is known to keep connections (foxyproxy 2.10
    answers only the last command of a multi-command request), a batch goes
    one command per request, one after another."""

    persistent = None
    connections = 1

    def test_batch_one_request_at_a_time(self):
        conn = self.connect()
        d = self.backend.transmit_batch("Emulated 00", [("RESET", None), ("APDU", b"\x00\xa4\x00\x00")])
        self.clock.advance(tcp_upstream.PROBE_DELAY)  # not reused before this: one request in flight
        [(_, c1, command)] = conn.requests()
        self.assertEqual(command, "RESET")
        self.assertNoResult(d)
        conn.answer(c1, "3B00")
        [(_, c2, command)] = conn.requests()
        self.assertEqual(command, "APDU:00A40000")
        conn.answer(c2, "C080")
        atr, error = outcome(d)
        self.assertEqual((atr, error.code), (b"\x3b\x00", "C080"))

    def test_cancel_stops_the_rest(self):
        conn = self.connect()
        d = self.backend.transmit_batch("Emulated 00", [("APDU", b"\x00\xa4\x00\x00")] * 3)
        self.clock.advance(tcp_upstream.PROBE_DELAY)
        [(_, c1, _)] = conn.requests()
        cancel(d)
        conn.answer(c1, "9000")  # the late answer: discarded, nothing more is sent
        self.assertEqual(conn.requests(), [])

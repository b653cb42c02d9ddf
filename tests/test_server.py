"""The line protocol end to end in memory: framing, dispatch, per-card
scheduling, timeouts and flow control, with StringTransport and Clock."""

import attr
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from cloudfoxy_proxy import errors
from cloudfoxy_proxy.interfaces import IBackend, ReaderInfo
from cloudfoxy_proxy.backends.emulated import EmulatedBackend
from cloudfoxy_proxy.cards.iso7816 import Iso7816Card
from cloudfoxy_proxy.access import Access
from cloudfoxy_proxy.dispatch import Dispatcher
from cloudfoxy_proxy.parser import make_command
from cloudfoxy_proxy.registry import ReaderRegistry
from cloudfoxy_proxy.frontends import line
from cloudfoxy_proxy.frontends.line import LineFactory

#: a loopback client: served in protected mode (docs/security.md)
LOCAL = IPv4Address("TCP", "127.0.0.1", 40000)

ATR = "3B8B8001466F7879456D753738313677"


@implementer(IBackend)
@attr.s
class ManualBackend:
    """Every call returns a Deferred the test fires by hand."""

    calls = attr.ib(factory=list)
    description = "manual"

    def start(self, registry):
        registry.update(self, [ReaderInfo("a", "Slow A"), ReaderInfo("b", "Slow B")])

    def stop(self):
        pass

    def reset(self, key):
        d = Deferred()
        self.calls.append((key, "RESET", d))
        return d

    def transmit(self, key, apdu):
        d = Deferred()
        self.calls.append((key, apdu.hex().upper(), d))
        return d


class Harness:
    def __init__(self, **kw):
        self.clock = Clock()
        self.registry = ReaderRegistry(max_queue=kw.pop("max_queue", 100))
        self.emulated = EmulatedBackend(self.clock, [Iso7816Card(serial=i) for i in range(2)])
        self.manual = ManualBackend()
        self.emulated.start(self.registry)
        self.manual.start(self.registry)
        password = kw.pop("password", None)
        access = Access(simple=[(password, None)]) if password is not None else None
        self.dispatcher = Dispatcher(self.registry, self.clock, kw.pop("timeout", 15.0), access=access)
        self.factory = LineFactory(self.dispatcher, **kw)

    def connect(self):
        proto = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=LOCAL)
        proto.makeConnection(transport)
        return proto, transport


def take(transport):
    value = transport.value().decode()
    transport.clear()
    return value


class ProtocolTests(SynchronousTestCase):
    def setUp(self):
        self.h = Harness()
        self.proto, self.t = self.h.connect()

    def test_backends_provide_interface(self):
        verifyObject(IBackend, self.h.emulated)
        verifyObject(IBackend, self.h.manual)

    def test_readme_exchange(self):
        self.proto.dataReceived(b">Emulated 00|\n>1:RESET|\n>2:APDU:00A4000C023F00|\n\n")
        self.assertEqual(take(self.t), f">1:{ATR}\n>2:9000\n@@\n")

    def test_apduplay_style_single_write_no_empty_line(self):
        self.proto.dataReceived(b">Emulated 00|\n>7:APDU:00A4000C023F00|\n")
        self.assertEqual(take(self.t), ">7:9000\n@@\n")
        self.proto.dataReceived(b">8:APDU:0084000008|\n")  # sticky reader, persistent socket
        out = take(self.t)
        self.assertRegex(out, r"^>8:[0-9A-F]{16}9000\n@@\n$")

    def test_split_writes_wait_for_a_complete_line(self):
        self.proto.dataReceived(b">Emulated 00|\n>1:APDU:00A4")
        self.assertEqual(take(self.t), "")
        self.proto.dataReceived(b"000C023F00|\n")
        self.assertEqual(take(self.t), ">1:9000\n@@\n")

    def test_emptyline_batch_across_writes(self):
        self.proto.dataReceived(b">Emulated 00|\n>0:EMPTYLINE|\n>1:RESET|\n")
        self.proto.dataReceived(b">2:APDU:00A4000C023F00|\n")
        self.assertEqual(take(self.t), "")
        self.proto.dataReceived(b"\n")
        self.assertEqual(take(self.t), f">1:{ATR}\n>2:9000\n@@\n")

    def test_pipelined_requests_answered_in_order(self):
        data = b"".join(b">Emulated 01|\n>%d:APDU:00A4000C023F00|\n\n" % i for i in range(1000))
        self.proto.dataReceived(data)
        self.assertEqual(take(self.t), "".join(f">{i}:9000\n@@\n" for i in range(1000)))

    def test_answers_of_one_read_leave_in_one_write(self):
        writes = []

        class Recording(StringTransport):
            def write(self, data):
                writes.append(data)

        self.proto = self.h.factory.buildProtocol(None)
        self.proto.makeConnection(Recording(peerAddress=LOCAL))
        data = b"".join(b">Emulated 01|\n>%d:APDU:00A4000C023F00|\n\n" % i for i in range(3))
        self.proto.dataReceived(data)
        self.assertEqual(writes, [b">0:9000\n@@\n>1:9000\n@@\n>2:9000\n@@\n"])
        self.proto.dataReceived(b">Emulated 00|\n>9:APDU:00A4000C023F00|\n\n")
        self.assertEqual(writes[1:], [b">9:9000\n@@\n"])

    def test_no_stray_terminators(self):
        self.proto.dataReceived(b"\n\n>Emulated 00|\n\n#hello\n\n")
        self.assertEqual(take(self.t), "")

    def test_error_codes(self):
        self.h.emulated.remove(1)
        self.proto.dataReceived(
            b">Nope|\n>1:RESET|\n\n>Emulated|\n>2:RESET|\n\n>Emulated 01|\n>3:APDU:00A4000C023F00|\n\n"
            b">Emulated 00|\n>4:APDU:0|\n>5:BOGUS|\n>6:ENUM|\n>7:PERSONALIZE:me|\n\n")
        self.assertEqual(take(self.t), ">1:C083\n@@\n>2:C082\n@@\n>3:C080\n@@\n"
                                       ">4:C084\n>5:C081\n>6:C081\n>7:OK\n@@\n")

    def test_command_with_no_reader(self):
        self.proto.dataReceived(b">1:APDU:00A4000C023F00|\n>2:READERS|\n\n")
        out = take(self.t)
        self.assertTrue(out.startswith(">1:C083\n>2:RW11bGF0ZWQgMDA=|"), out)

    def test_password_required(self):
        h = Harness(password="s3cret")
        proto, t = h.connect()
        proto.dataReceived(b">Emulated 00:wrong|\n>1:RESET|\n\n>Emulated 00:s3cret|\n>2:RESET|\n\n")
        self.assertEqual(take(t), f">1:C085\n@@\n>2:{ATR}\n@@\n")

    def test_overlong_line(self):
        h = Harness(max_line_length=1024)
        proto, t = h.connect()
        proto.dataReceived(b">Emulated 00|\n>9:APDU:" + b"00" * 600)
        proto.dataReceived(b"00" * 600 + b"|\n>10:APDU:00A4000C023F00|\n\n")
        self.assertEqual(take(t), ">9:C084\n>10:9000\n@@\n")
        self.assertTrue(t.connected)

    def test_binary_garbage_and_many_junk_lines(self):
        self.proto.dataReceived(bytes(range(256)) * 4 + b"\n" + b"junk\n" * 1000)
        self.proto.dataReceived(b">Emulated 00|\n>1:APDU:00A4000C023F00|\n\n")
        self.assertEqual(take(self.t), ">1:9000\n@@\n")


class SchedulingTests(SynchronousTestCase):
    def setUp(self):
        self.h = Harness(timeout=5.0)
        self.calls = self.h.manual.calls

    def test_pause_while_waiting_then_resume_in_order(self):
        proto, t = self.h.connect()
        proto.dataReceived(b">Slow A|\n>1:APDU:00A4000C023F00|\n\n>2:APDU:0084000008|\n\n")
        self.assertEqual(t.producerState, "producing")  # little is waiting: no need to pause
        proto.dataReceived(b">3:APDU:00000000|\n\n" * 5000)
        self.assertEqual(t.producerState, "paused")  # a pipelining client is throttled
        self.assertEqual(len(self.calls), 1)
        self.calls[0][2].callback(b"\x90\x00")
        self.assertEqual(len(self.calls), 2)
        self.calls[1][2].callback(b"\x01\x90\x00")
        self.assertEqual(take(t), ">1:9000\n@@\n>2:019000\n@@\n")
        self.assertEqual(t.producerState, "paused")  # 5000 requests still to run
        for i in range(2, 5002):
            self.calls[i][2].callback(b"\x90\x00")
        self.assertEqual(take(t), ">3:9000\n@@\n" * 5000)
        self.assertEqual(t.producerState, "producing")

    def test_one_command_at_a_time_per_card_fifo_and_back_to_back(self):
        p1, t1 = self.h.connect()
        p2, t2 = self.h.connect()
        p3, t3 = self.h.connect()
        p1.dataReceived(b">Slow A|\n>1:RESET|\n>2:APDU:00000000|\n\n")
        p2.dataReceived(b">Slow A|\n>3:APDU:00000001|\n\n")
        p3.dataReceived(b">Slow B|\n>4:APDU:00000002|\n\n")  # another card: not blocked
        self.assertEqual([(k, c) for k, c, _ in self.calls], [("a", "RESET"), ("b", "00000002")])
        self.calls[0][2].callback(b"\x3b\x00")
        self.calls[2][2].callback(b"\x90\x00")  # client 1's second command runs before client 2's
        self.assertEqual([(k, c) for k, c, _ in self.calls][2:], [("a", "00000000"), ("a", "00000001")])
        self.calls[3][2].callback(b"\x90\x00")
        self.calls[1][2].callback(b"\x90\x00")
        self.assertEqual(take(t1), ">1:3B00\n>2:9000\n@@\n")
        self.assertEqual(take(t2), ">3:9000\n@@\n")
        self.assertEqual(take(t3), ">4:9000\n@@\n")

    def test_timeout_answers_c086_and_frees_the_card(self):
        p1, t1 = self.h.connect()
        p2, t2 = self.h.connect()
        p1.dataReceived(b">Slow A|\n>1:APDU:00000000|\n\n")
        p2.dataReceived(b">Slow A|\n>2:APDU:00000001|\n\n")
        self.h.clock.advance(4.9)
        self.assertEqual(take(t1), "")
        self.h.clock.advance(0.2)
        self.assertEqual(take(t1), ">1:C086\n@@\n")
        self.assertTrue(self.calls[0][2].called)  # cancelled
        self.calls[1][2].callback(b"\x90\x00")
        self.assertEqual(take(t2), ">2:9000\n@@\n")
        self.assertEqual(self.h.clock.getDelayedCalls(), [])

    def test_disconnect_never_leaves_card_locked(self):
        p1, t1 = self.h.connect()
        p2, t2 = self.h.connect()
        p3, t3 = self.h.connect()
        p1.dataReceived(b">Slow A|\n>1:APDU:00000000|\n>2:APDU:00000000|\n\n")
        p2.dataReceived(b">Slow A|\n>3:APDU:00000001|\n\n")  # queued
        p3.dataReceived(b">Slow A|\n>4:APDU:00000002|\n\n")  # queued
        p2.connectionLost(None)  # gives up while waiting
        p1.connectionLost(None)  # gives up while its APDU is on the card
        self.assertEqual(len(self.calls), 1)
        self.calls[0][2].callback(b"\x90\x00")  # the card finishes the APDU in flight
        self.assertEqual([c for _, c, _ in self.calls], ["00000000", "00000002"])
        self.calls[1][2].callback(b"\x90\x00")
        self.assertEqual(take(t3), ">4:9000\n@@\n")
        self.assertEqual(take(t1) + take(t2), "")

    def test_gone_clients_leave_the_queue_at_once(self):
        h = Harness(max_queue=2, timeout=5.0)
        queue = h.registry.resolve("Slow A").queue
        holder, t0 = h.connect()
        holder.dataReceived(b">Slow A|\n>0:APDU:00000000|\n\n")
        quitters = [h.connect() for _ in range(2)]
        for i, (p, _) in enumerate(quitters):
            p.dataReceived(b">Slow A|\n>q%d:APDU:0000000%d|\n\n" % (i, i + 1))
        self.assertEqual(len(queue), 2)
        for p, _ in quitters:
            p.connectionLost(None)
        self.assertEqual(len(queue), 0)  # at once, while the card is still busy
        # ... and the dispatcher keeps nothing of them (a drain on shutdown
        # answers only the holder's request)
        self.assertEqual(len(h.dispatcher.pending), 1)
        live = [h.connect() for _ in range(3)]
        for i, (p, _) in enumerate(live):
            p.dataReceived(b">Slow A|\n>%d:APDU:0000010%d|\n\n" % (i, i))
        self.assertEqual(take(live[0][1]) + take(live[1][1]), "")  # queued, not refused
        self.assertEqual(take(live[2][1]), ">2:C086\n@@\n")  # only live waiters fill the queue
        for i in range(3):
            h.manual.calls[i][2].callback(b"\x90\x00")
        self.assertEqual([c for _, c, _ in h.manual.calls], ["00000000", "00000100", "00000101"])
        self.assertEqual((take(t0), take(live[0][1]), take(live[1][1])),
                         (">0:9000\n@@\n", ">0:9000\n@@\n", ">1:9000\n@@\n"))
        self.assertEqual(len(queue.waiters), 0)
        self.assertFalse(queue.busy)

    def test_queue_overflow_answers_c086(self):
        h = Harness(max_queue=1)
        protos = [h.connect() for _ in range(3)]
        for i, (p, _) in enumerate(protos):
            p.dataReceived(b">Slow A|\n>%d:RESET|\n\n" % i)
        self.assertEqual(take(protos[2][1]), ">2:C086\n@@\n")

    def test_backend_card_error_and_bug(self):
        p, t = self.h.connect()
        p.dataReceived(b">Slow A|\n>1:RESET|\n>2:RESET|\n\n")
        self.calls[0][2].errback(errors.CardError(errors.NO_CARD))
        self.calls[1][2].errback(ZeroDivisionError())
        self.assertEqual(take(t), ">1:C080\n>2:C090\n@@\n")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_back_pressure_stops_reading(self):
        p, t = self.h.connect()
        p.pauseProducing()  # the transport's buffer is full: the client is not reading
        p.dataReceived(b">Emulated 00|\n>1:RESET|\n\n>2:RESET|\n\n")
        self.assertEqual(take(t), "")
        self.assertEqual(t.producerState, "producing")
        p.dataReceived(b">3:RESET|\n\n" * 10000)
        self.assertEqual(t.producerState, "paused")  # no more reading, no unbounded buffer
        self.assertEqual(take(t), "")
        p.resumeProducing()
        self.assertEqual(take(t), f">1:{ATR}\n@@\n>2:{ATR}\n@@\n" + f">3:{ATR}\n@@\n" * 10000)
        self.assertEqual(t.producerState, "producing")

    def test_submit_for_other_front_ends(self):
        results = []
        self.h.dispatcher.submit("Emulated 00", [make_command(["1", "APDU", "00A4000C023F00"])]).addCallback(
            results.append)
        self.assertEqual(results, [[("1", "9000")]])


class HalfCloseTests(SynchronousTestCase):
    def test_eof_answers_everything_then_closes(self):
        h = Harness()
        p, t = h.connect()
        p.dataReceived(b">Slow A|\n>1:RESET|\n\n>Emulated 00|\n>2:APDU:00A4000C023F00|")
        p.readConnectionLost()
        self.assertFalse(t.disconnecting)  # still waiting on the slow card
        h.manual.calls[0][2].callback(b"\x3b\x00")
        self.assertEqual(take(t), ">1:3B00\n@@\n>2:9000\n@@\n")
        self.assertTrue(t.disconnecting)


class ReleaseTests(SynchronousTestCase):
    def test_backend_release_after_each_request(self):
        h = Harness()
        released = []
        h.manual.release = released.append
        h.registry.update(h.manual, [ReaderInfo("c", "With Release")])
        h.registry.get("With Release").release = h.manual.release  # registry caches it per reader
        p, t = h.connect()
        p.dataReceived(b">With Release|\n>1:RESET|\n>2:APDU:00000000|\n\n")
        h.manual.calls[0][2].callback(b"\x3b\x00")
        self.assertEqual(released, [])  # not between the commands of one request
        h.manual.calls[1][2].callback(b"\x90\x00")
        self.assertEqual(released, ["c"])
        self.assertEqual(take(t), ">1:3B00\n>2:9000\n@@\n")


class LineFramerTests(SynchronousTestCase):
    """The pure framer under LineProtocol (frontends/line.py)."""

    def events(self, framer):
        out = []
        while True:
            kind, value = framer.next()
            out.append((kind, value))
            if kind in (line.END, line.WAIT):
                return out

    def test_lines_one_at_a_time_then_end(self):
        f = line.LineFramer(100)
        f.feed(b">R|\n>1:APDU:00A40000|\n")
        self.assertEqual(f.next(), (line.LINE, b">R|"))
        self.assertEqual(f.held, len(b">1:APDU:00A40000|\n"))
        self.assertEqual(self.events(f), [(line.LINE, b">1:APDU:00A40000|"), (line.END, None)])

    def test_partial_line_waits_and_half_close_completes_it(self):
        f = line.LineFramer(100)
        f.feed(b">R|\n>1:RES")
        self.assertEqual(self.events(f), [(line.LINE, b">R|"), (line.WAIT, None)])
        f.feed(b"ET")
        self.assertEqual(self.events(f), [(line.WAIT, None)])
        f.close_input()
        self.assertEqual(self.events(f), [(line.LINE, b">1:RESET"), (line.END, None)])

    def test_overlong_line_is_dropped_unbuffered_and_reported_at_its_end(self):
        f = line.LineFramer(10)
        f.feed(b">1:APDU:" + b"0" * 50)
        self.assertEqual(self.events(f), [(line.WAIT, None)])
        self.assertEqual(f.held, 0)  # not buffered
        f.feed(b"0" * 50 + b"\n>2:RESET\n")
        self.assertEqual(self.events(f), [(line.OVERLONG, b">1:APDU:" + b"0" * 50),
                                          (line.LINE, b">2:RESET"), (line.END, None)])

    def test_drop_partial(self):
        f = line.LineFramer(100)
        f.feed(b">1:APDU:00")
        self.assertEqual(self.events(f), [(line.WAIT, None)])
        f.drop_partial()
        self.assertEqual(f.held, 0)
        f.feed(b"11\n")
        self.assertEqual(self.events(f), [(line.OVERLONG, b">1:APDU:00"), (line.END, None)])

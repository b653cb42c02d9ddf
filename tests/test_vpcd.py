"""The vpcd bridge in memory: framing, the message -> backend mapping,
ordering, bad input, and the connect/disconnect lifecycle, driven with
StringTransport and Clock (no sockets, no pcscd)."""

import attr
from twisted.application.service import IService
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from cloudfoxy_proxy import errors, tap
from cloudfoxy_proxy.frontends import vpcd
from cloudfoxy_proxy.interfaces import IBackend
from cloudfoxy_proxy.backends.emulated import EmulatedBackend
from cloudfoxy_proxy.cards.iso7816 import Iso7816Card
from cloudfoxy_proxy.access import Access
from cloudfoxy_proxy.dispatch import Dispatcher, Session
from cloudfoxy_proxy.parser import make_command
from cloudfoxy_proxy.errors import CardError
from cloudfoxy_proxy.registry import ReaderRegistry
from cloudfoxy_proxy.frontends.vpcd import (
    APDU, GET_ATR, POWER_OFF, POWER_ON, RESET, BridgedCard, FrameDecoder, FrameError,
    VpcdBridge, VpcdProtocol, apdu_answer, encode, parse_message, retry_policy,
)

ATR = bytes.fromhex("3B8B8001466F7879456D753738313677")
SELECT_MF = bytes.fromhex("00A4000C023F00")
GET_CHALLENGE = bytes.fromhex("0084000008")
OK = b"\x90\x00"


def frame(payload):
    return len(payload).to_bytes(2, "big") + payload


def ctrl(code):
    return frame(bytes([code]))


def answers(transport):
    """The messages written to vpcd so far (and forget them)."""
    out = FrameDecoder().feed(transport.value())
    transport.clear()
    return out


# -- pure framing ----------------------------------------------------------------

class FramingTests(SynchronousTestCase):
    def test_one_frame(self):
        self.assertEqual(FrameDecoder().feed(frame(SELECT_MF)), [SELECT_MF])

    def test_coalesced_frames(self):
        data = ctrl(POWER_ON) + ctrl(GET_ATR) + frame(SELECT_MF) + frame(GET_CHALLENGE)
        self.assertEqual(FrameDecoder().feed(data), [b"\x01", b"\x04", SELECT_MF, GET_CHALLENGE])

    def test_split_at_every_byte(self):
        data = frame(SELECT_MF) + ctrl(GET_ATR) + frame(b"\xAA" * 300)
        d = FrameDecoder()
        got = []
        for i in range(len(data)):
            got += d.feed(data[i:i + 1])
            if i < len(data) - 1:
                self.assertTrue(d.partial or got)
        self.assertEqual(got, [SELECT_MF, b"\x04", b"\xAA" * 300])
        self.assertFalse(d.partial)

    def test_length_then_payload_in_two_writes(self):
        # What Debian's vpcd does: the 2-byte length, then the APDU.
        d = FrameDecoder()
        self.assertEqual(d.feed(b"\x00\x07"), [])
        self.assertTrue(d.partial)
        self.assertEqual(d.feed(SELECT_MF), [SELECT_MF])

    def test_longest_frame(self):
        big = bytes(range(256)) * 255 + b"\x01" * 255
        self.assertEqual(len(big), 0xFFFF)
        self.assertEqual(FrameDecoder().feed(encode(big)), [big])

    def test_length_zero_is_an_error(self):
        d = FrameDecoder()
        self.assertEqual(d.feed(frame(SELECT_MF)[:3]), [])
        e = self.assertRaises(FrameError, FrameDecoder().feed, b"\x00\x00\x00\x01\x04")
        self.assertIn("length 0", str(e))

    def test_oversized_is_an_error(self):
        e = self.assertRaises(FrameError, FrameDecoder(max_length=300).feed, b"\x01\x2D")
        self.assertIn("301 bytes", str(e))

    def test_encode(self):
        self.assertEqual(encode(ATR), b"\x00\x10" + ATR)
        self.assertRaises(ValueError, encode, b"")
        self.assertRaises(ValueError, encode, b"\x00" * 0x10000)

    def test_parse_message(self):
        self.assertEqual([parse_message(bytes([c])).kind for c in (0, 1, 2, 4)],
                         [POWER_OFF, POWER_ON, RESET, GET_ATR])
        m = parse_message(SELECT_MF)
        self.assertEqual((m.kind, m.apdu), (APDU, SELECT_MF))
        for bad in (3, 5, 0xFF):
            e = self.assertRaises(FrameError, parse_message, bytes([bad]))
            self.assertIn(f"0x{bad:02X}", str(e))

    def test_apdu_answer(self):
        self.assertEqual(apdu_answer("6F108408A0000000030000009000"),
                         bytes.fromhex("6F108408A0000000030000009000"))
        for gone in (errors.NO_CARD, errors.NOT_FOUND, errors.AMBIGUOUS, errors.UPSTREAM):
            self.assertIsNone(apdu_answer(gone))
        self.assertEqual(apdu_answer(errors.MALFORMED), b"\x67\x00")
        self.assertEqual(apdu_answer("00" * 0xFFFD + "9000"), b"\x00" * 0xFFFD + OK)
        for other in (errors.FAILED, errors.INTERNAL, errors.BAD_PIN, "", "00" * 0xFFFE + "9000"):
            self.assertEqual(apdu_answer(other), b"\x6F\x00")

    def test_retry_policy_is_capped(self):
        policy = retry_policy(initial=0.25, cap=3.0, jitter=0.0)
        delays = [policy(n) for n in range(1, 30)]
        self.assertEqual(delays[0], 0.5)
        self.assertEqual(max(delays), 3.0)
        self.assertEqual(delays, sorted(delays))


# -- the card and the protocol ---------------------------------------------------

@attr.s(eq=False)
class RecordingBackend(EmulatedBackend):
    """Emulated cards that record calls; ``broken`` makes every call fail
    with that result code."""

    calls = attr.ib(factory=list)
    broken = attr.ib(default=None)

    def reset(self, key):
        self.calls.append("RESET")
        if self.broken:
            raise CardError(self.broken)
        return super().reset(key)

    def transmit(self, key, apdu):
        self.calls.append(apdu.hex().upper())
        if self.broken:
            raise CardError(self.broken)
        return super().transmit(key, apdu)


class Harness:
    def __init__(self, latency=0.0, reader="Emulated 00", cards=2, password=None):
        self.clock = Clock()
        self.registry = ReaderRegistry()
        self.backend = RecordingBackend(
            clock=self.clock, cards=[Iso7816Card(serial=i) for i in range(cards)], latency=latency)
        self.backend.start(self.registry)
        access = Access(simple=[(password, None)]) if password is not None else None
        self.dispatcher = Dispatcher(self.registry, self.clock, 15.0, access=access)
        self.card = BridgedCard(reader, self.dispatcher)

    def connect(self):
        proto = VpcdProtocol(self.card, quickack=False)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport


class ProtocolTests(SynchronousTestCase):
    def setUp(self):
        self.h = Harness()
        self.proto, self.t = self.h.connect()

    def test_backend_provides_interface(self):
        verifyObject(IBackend, self.h.backend)

    def test_get_atr_without_cache_resets(self):
        self.proto.dataReceived(ctrl(GET_ATR))
        self.assertEqual(answers(self.t), [ATR])
        self.assertEqual(self.h.backend.calls, ["RESET"])
        self.proto.dataReceived(ctrl(GET_ATR) * 3)  # pcscd's presence polls
        self.assertEqual(answers(self.t), [ATR] * 3)
        self.assertEqual(self.h.backend.calls, ["RESET"])

    def test_power_and_reset_get_no_answer(self):
        self.proto.dataReceived(ctrl(RESET))
        self.assertEqual(self.t.value(), b"")
        self.assertEqual(self.h.backend.calls, ["RESET"])
        self.proto.dataReceived(ctrl(POWER_ON))  # fresh from that reset: no second one
        self.proto.dataReceived(ctrl(POWER_OFF))
        self.assertEqual(self.t.value(), b"")
        self.assertEqual(self.h.backend.calls, ["RESET"])
        self.proto.dataReceived(ctrl(POWER_ON))  # after power off: a reset
        self.assertEqual(self.h.backend.calls, ["RESET", "RESET"])
        self.proto.dataReceived(frame(SELECT_MF) + ctrl(POWER_ON) + ctrl(RESET))
        self.assertEqual(answers(self.t), [OK])
        self.assertEqual(self.h.backend.calls, ["RESET", "RESET", "00A4000C023F00", "RESET", "RESET"])

    def test_power_on_resets_the_card_state(self):
        h = self.h
        self.proto.dataReceived(frame(bytes.fromhex("00A4040C0AF0434C4F5544464F5859"))
                                + frame(bytes.fromhex("00A4020C025001")))
        self.proto.dataReceived(frame(bytes.fromhex("00B0000004")))
        got = answers(self.t)
        self.assertEqual(got[:2], [OK, OK])
        self.assertEqual(len(got[2]), 6)
        self.proto.dataReceived(ctrl(POWER_OFF) + ctrl(POWER_ON) + frame(bytes.fromhex("00B0000004")))
        # after the power cycle no EF is selected any more
        self.assertEqual(answers(self.t), [bytes.fromhex("6986")])
        self.assertEqual(h.backend.calls.count("RESET"), 1)

    def test_apdus(self):
        self.proto.dataReceived(frame(SELECT_MF))
        self.assertEqual(answers(self.t), [OK])
        self.proto.dataReceived(frame(GET_CHALLENGE))
        (challenge,) = answers(self.t)
        self.assertEqual((len(challenge), challenge[-2:]), (10, OK))

    def test_coalesced_messages_answered_in_order(self):
        self.proto.dataReceived(ctrl(POWER_ON) + ctrl(GET_ATR) + frame(SELECT_MF)
                                + frame(GET_CHALLENGE) + ctrl(GET_ATR))
        got = answers(self.t)
        self.assertEqual(len(got), 4)
        self.assertEqual((got[0], got[1], got[3]), (ATR, OK, ATR))
        self.assertEqual(len(got[2]), 10)

    def test_byte_by_byte(self):
        data = ctrl(GET_ATR) + frame(SELECT_MF)
        for i in range(len(data)):
            self.proto.dataReceived(data[i:i + 1])
        self.assertEqual(answers(self.t), [ATR, OK])

    def test_order_kept_when_the_backend_answers_later(self):
        h = Harness(latency=0.05)
        proto, t = h.connect()
        proto.dataReceived(ctrl(POWER_ON) + ctrl(GET_ATR) + frame(SELECT_MF) + frame(GET_CHALLENGE))
        self.assertEqual(t.value(), b"")
        h.clock.advance(0.05)  # the power-on reset
        h.clock.advance(0.05)  # SELECT MF (get ATR answered from the cache)
        self.assertEqual(answers(t), [ATR, OK])
        h.clock.advance(0.05)
        (challenge,) = answers(t)
        self.assertEqual(len(challenge), 10)
        self.assertEqual(h.backend.calls, ["RESET", "00A4000C023F00", "0084000008"])
        self.assertFalse(h.clock.getDelayedCalls())

    def test_works_when_clients_need_a_password(self):
        # --client-password-file guards the line protocol; the bridge is
        # configured by the operator and passes it itself.
        h = Harness(password="s3cret")
        proto, t = h.connect()
        proto.dataReceived(ctrl(GET_ATR) + frame(SELECT_MF))
        self.assertEqual(answers(t), [ATR, OK])

    def test_short_apdu_gets_wrong_length(self):
        self.proto.dataReceived(frame(b"\x00\xA4\x00"))
        self.assertEqual(answers(self.t), [b"\x67\x00"])
        self.assertFalse(self.t.disconnecting)

    def test_card_removed_disconnects(self):
        self.proto.dataReceived(ctrl(GET_ATR))
        answers(self.t)
        self.h.backend.remove(0)
        with capturedLogs() as events:
            self.proto.dataReceived(frame(SELECT_MF) + frame(SELECT_MF))
        self.assertEqual(self.t.value(), b"")
        self.assertTrue(self.t.disconnecting)
        self.assertIsNone(self.h.card.atr)
        text = [formatEvent(e) for e in events]
        self.assertEqual(len(text), 1, text)
        self.assertIn("failed (C080)", text[0])

    def test_upstream_failure_disconnects(self):
        self.h.backend.broken = errors.UPSTREAM
        self.proto.dataReceived(ctrl(GET_ATR))
        self.assertEqual(self.t.value(), b"")
        self.assertTrue(self.t.disconnecting)

    def test_an_atr_the_dispatcher_refuses_leaves_the_slot_empty(self):
        """A backend ATR of the wrong length is C086 (dispatcher): vpcd's
        GET ATR is not left waiting, the connection closes (no card)."""
        self.h.backend.reset = lambda key: b"\x3b"  # one byte: not an ATR
        with capturedLogs() as events:
            self.proto.dataReceived(ctrl(GET_ATR))
        self.assertEqual(self.t.value(), b"")
        self.assertTrue(self.t.disconnecting)
        text = " ".join(formatEvent(e) for e in events)
        self.assertIn("an ATR of 1 bytes", text)
        self.assertIsNone(self.h.card.atr)

    def test_an_answer_vpcd_cannot_carry_closes_the_connection(self):
        with capturedLogs() as events:
            self.proto._answered(b"")  # what encode() refuses
        self.assertTrue(self.t.disconnecting)
        self.assertIn("cannot give vpcd its answer", " ".join(formatEvent(e) for e in events))

    def test_other_errors_become_status_words(self):
        self.proto.dataReceived(ctrl(GET_ATR))
        answers(self.t)
        self.h.backend.broken = errors.FAILED
        self.proto.dataReceived(frame(SELECT_MF))
        self.assertEqual(answers(self.t), [b"\x6F\x00"])
        self.assertFalse(self.t.disconnecting)

    def _bad_input(self, data):
        with capturedLogs() as events:
            self.proto.dataReceived(data)
            self.proto.dataReceived(b"\x00\x00garbage" * 100)
            self.proto.dataReceived(ctrl(GET_ATR))
        self.assertEqual(self.t.value(), b"")
        self.assertTrue(self.t.disconnecting)
        text = [formatEvent(e) for e in events]
        self.assertEqual(len(text), 1, text)
        self.assertIn("closing the connection", text[0])
        return text[0]

    def test_length_zero_closes(self):
        self.assertIn("length 0", self._bad_input(b"\x00\x00"))

    def test_unknown_control_byte_closes(self):
        self.assertIn("0x03", self._bad_input(ctrl(3)))

    def test_garbage_closes(self):
        self.assertIn("0x99", self._bad_input(b"\x00\x01\x99" + b"junk" * 50))
        self.assertEqual(self.h.backend.calls, [])

    def test_oversized_closes(self):
        self.proto.decoder = FrameDecoder(max_length=300)
        self.assertIn("301 bytes", self._bad_input(b"\x01\x2D" + b"\x00" * 301))

    def test_flood_closes(self):
        h = Harness(latency=1.0)
        proto, t = h.connect()
        proto.dataReceived(frame(SELECT_MF))
        with capturedLogs() as events:
            proto.dataReceived(frame(SELECT_MF) * 100)
        self.assertTrue(t.disconnecting)
        self.assertEqual(len(events), 1)
        h.clock.advance(1.0)  # the one APDU in flight finishes on the card
        self.assertEqual(t.value(), b"")
        self.assertEqual(h.backend.calls, ["00A4000C023F00"])

    def test_self_connection_is_dropped(self):
        # With nothing listening on vpcd's port, Linux can connect a socket
        # in the ephemeral range to itself; that socket would hold the port.
        me = IPv4Address("TCP", "127.0.0.1", 35964)
        proto = VpcdProtocol(self.h.card, quickack=False)
        t = StringTransport(hostAddress=me, peerAddress=me)
        proto.makeConnection(t)
        self.assertTrue(t.disconnected)
        proto.dataReceived(ctrl(GET_ATR))
        self.assertEqual(t.value(), b"")

    def test_connection_lost_mid_command(self):
        h = Harness(latency=1.0)
        proto, t = h.connect()
        proto.dataReceived(frame(SELECT_MF) + frame(SELECT_MF))
        proto.connectionLost(Failure(ConnectionDone()))
        h.clock.advance(1.0)
        self.assertEqual(t.value(), b"")
        self.assertEqual(h.backend.calls, ["00A4000C023F00"])
        # the card is free for the next client
        d = h.dispatcher.submit("Emulated 00", [vpcd.make_command(["1", "APDU", "00A4000C023F00"])])
        h.clock.advance(1.0)
        self.assertEqual(self.successResultOf(d), [("1", "9000")])
        self.assertFalse(h.clock.getDelayedCalls())


    def test_connection_lost_while_queued_leaves_the_queue(self):
        h = Harness(latency=1.0)
        queue = h.registry.resolve("Emulated 00").queue
        other = h.dispatcher.submit("Emulated 00", [vpcd.make_command(["1", "APDU", "00A4000C023F00"])])
        proto, t = h.connect()
        proto.dataReceived(frame(SELECT_MF))  # waits behind the other client
        self.assertEqual(len(queue), 1)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(queue), 0)  # at once, while the card is busy
        h.clock.advance(1.0)
        self.assertEqual(self.successResultOf(other), [("1", "9000")])
        self.assertEqual(h.backend.calls, ["00A4000C023F00"])  # the bridge's APDU never ran
        self.assertEqual(t.value(), b"")
        self.assertFalse(queue.busy)

# -- lifecycle -------------------------------------------------------------------

class FakeTransport(StringTransport):
    """Closing takes a reactor turn, like a real TCP transport."""

    def __init__(self, protocol, clock):
        super().__init__()
        self.protocol = protocol
        self.clock = clock
        self.lost = False
        self.aborted = False

    def loseConnection(self):
        if not self.disconnecting:
            super().loseConnection()
            self.clock.callLater(0, self.drop)

    def abortConnection(self):
        self.aborted = True
        self.loseConnection()

    def drop(self):
        """The connection ends (vpcd closed it, or our close completed)."""
        if not self.lost:
            self.lost = True
            self.disconnecting = True
            self.protocol.connectionLost(Failure(ConnectionDone()))


@implementer(IStreamClientEndpoint)
class FakeVpcd:
    """An endpoint that connects at once to an in-memory transport, or is
    refused while ``refuse`` is set."""

    def __init__(self, clock):
        self.clock = clock
        self.refuse = False
        self.transports = []
        self.attempts = 0

    def connect(self, factory):
        self.attempts += 1
        if self.refuse:
            return fail(ConnectionRefusedError())
        protocol = factory.buildProtocol(None)
        transport = FakeTransport(protocol, self.clock)
        protocol.makeConnection(transport)
        self.transports.append(transport)
        return succeed(protocol)

    @property
    def current(self):
        live = [t for t in self.transports if not t.lost]
        return live[-1] if live else None


class BridgeTests(SynchronousTestCase):
    def setUp(self):
        self.h = Harness()
        self.vpcd = FakeVpcd(self.h.clock)
        self.bridge = VpcdBridge(self.h.card, self.h.registry, self.vpcd, self.h.clock,
                                 where="127.0.0.1:35963", retry=retry_policy(jitter=0.0),
                                 quickack=False)

    def tearDown(self):
        if self.bridge.running:
            self.bridge.stopService()
            self.h.clock.advance(0)
        self.assertFalse(self.h.clock.getDelayedCalls())

    def start(self):
        with capturedLogs() as events:
            self.bridge.startService()
        return events

    def test_is_a_service(self):
        verifyObject(IService, self.bridge)

    def test_connects_with_atr_ready(self):
        self.start()
        self.assertEqual(self.vpcd.attempts, 1)
        self.assertEqual(self.h.backend.calls, ["RESET"])
        self.assertEqual(self.h.card.atr, ATR)
        t = self.vpcd.current
        self.assertIs(self.bridge.protocol.transport, t)
        # vpcd's first poll, then pcscd powers the card up: no second reset
        self.bridge.protocol.dataReceived(ctrl(GET_ATR) + ctrl(POWER_ON) + ctrl(GET_ATR))
        self.assertEqual(answers(t), [ATR, ATR])
        self.assertEqual(self.h.backend.calls, ["RESET"])

    def test_card_removed_and_back(self):
        self.start()
        first = self.vpcd.current
        with capturedLogs() as events:
            self.h.backend.remove(0)
            self.h.clock.advance(0)
        self.assertTrue(first.lost)
        self.assertIsNone(self.bridge.protocol)
        self.assertIn("no card in Emulated 00", " ".join(formatEvent(e) for e in events))
        self.h.clock.advance(60)
        self.assertEqual(self.vpcd.attempts, 1)  # no retries while there is no card
        self.h.backend.insert(0)
        self.assertEqual(self.vpcd.attempts, 2)
        self.assertIsNotNone(self.vpcd.current)
        self.assertEqual(self.h.backend.calls, ["RESET", "RESET"])

    def test_reader_gone_and_back(self):
        self.start()
        backend = self.h.backend
        self.h.registry.update(backend, [])
        self.h.clock.advance(0)
        self.assertIsNone(self.vpcd.current)
        backend.start(self.h.registry)
        self.assertIsNotNone(self.vpcd.current)

    def test_no_card_at_start(self):
        self.h.backend.remove(0)
        events = self.start()
        self.assertEqual(self.vpcd.attempts, 0)
        self.assertIn("no card in Emulated 00", " ".join(formatEvent(e) for e in events))
        self.h.backend.insert(0)
        self.assertEqual(self.vpcd.attempts, 1)

    def test_unknown_or_ambiguous_reader_never_connects(self):
        for reader, problem in (("Nope", "no such reader"), ("Emulated", "several readers")):
            h = Harness(reader=reader)
            vp = FakeVpcd(h.clock)
            bridge = VpcdBridge(h.card, h.registry, vp, h.clock, retry=retry_policy(jitter=0.0))
            with capturedLogs() as events:
                bridge.startService()
                h.backend.remove(1)
                h.backend.insert(1)
                h.clock.advance(60)
            self.assertEqual(vp.attempts, 0)
            text = [formatEvent(e) for e in events]
            self.assertEqual(len(text), 1, text)
            self.assertIn(problem, text[0])
            bridge.stopService()

    def line(self, *commands, reader="Emulated 00"):
        """Another client's request (its own Session): the result codes."""
        from cloudfoxy_proxy.parser import make_command

        d = self.h.dispatcher.submit(reader, [make_command([str(i), *c.split(":")])
                                              for i, c in enumerate(commands, 1)])
        return [r for _, r in self.successResultOf(d)]

    def test_holds_the_card_while_connected(self):
        reader = self.h.registry.get("Emulated 00")
        self.start()
        self.assertIs(reader.holder, self.h.card.session)
        self.assertFalse(reader.exclusive)
        self.assertEqual(self.line(f"APDU:{SELECT_MF.hex()}"), ["9000"])  # shared: others still work
        self.h.backend.remove(0)
        self.h.clock.advance(0)
        self.assertIsNone(reader.holder)

    def test_the_status_page_sees_the_bridge_hold_since_its_connect(self):
        from cloudfoxy_proxy.sessions import holder

        reader = self.h.registry.get("Emulated 00")
        self.h.clock.advance(100)
        self.start()
        self.h.clock.advance(7.5)
        who = holder(reader, self.h.clock.seconds())
        self.assertEqual(who["frontend"], self.h.card.session.frontend)
        self.assertAlmostEqual(who["held_seconds"], 7.5, delta=0.2)  # start() itself takes ~0.1 s

    def test_reset_by_another_client_shows_pcscd_a_removal(self):
        self.start()
        first = self.vpcd.current
        proto = self.bridge.protocol
        proto.dataReceived(ctrl(POWER_ON) + frame(SELECT_MF))
        self.assertEqual(answers(first), [b"\x90\x00"])
        # the bridge's own RESET (pcscd's) changes nothing
        proto.dataReceived(ctrl(RESET))
        self.h.clock.advance(0)
        self.assertFalse(first.lost)
        with capturedLogs() as events:
            self.assertEqual(self.line("RESET"), [ATR.hex().upper()])
            self.h.clock.advance(0)
        self.assertTrue(first.lost and first.aborted)  # RST: vpcd's next send fails; pcscd sees a removal...
        self.assertIsNone(self.bridge.protocol)
        self.assertIsNone(self.h.registry.get("Emulated 00").holder)
        self.assertIn("reset by another client", " ".join(formatEvent(e) for e in events))
        self.h.clock.advance(vpcd.REINSERT_DELAY / 2)
        self.assertEqual(self.line("RESET"), [ATR.hex().upper()])  # while removed: nothing more
        self.h.clock.advance(vpcd.REINSERT_DELAY / 2 - 0.1)
        self.assertIsNone(self.vpcd.current)
        calls = list(self.h.backend.calls)
        self.h.clock.advance(0.2)
        second = self.vpcd.current
        self.assertIsNotNone(second)  # ...and inserted again
        second.protocol.dataReceived(ctrl(POWER_ON) + ctrl(GET_ATR))
        self.assertEqual(answers(second), [ATR])
        self.assertEqual(self.h.backend.calls, calls)  # no reset of ours after the other client's
        self.assertEqual(len(self.vpcd.transports), 2)  # one removal for the two resets
        self.assertEqual(self.line("RESET"), [ATR.hex().upper()])  # connected again: shown again
        self.h.clock.advance(0)
        self.assertTrue(second.lost)

    def test_power_on_reset_reaches_line_connections_once(self):
        """pcscd's power up resets the card: a line connection that used it
        gets C080 once, then runs; the bridge is not told of its own reset."""
        self.start()
        proto = self.bridge.protocol
        a, b = Session("a"), Session("b", frontend="api")
        line = lambda s, *c: [r for _, r in self.successResultOf(self.h.dispatcher.submit(
            "Emulated 00", [make_command(["1", *c])], session=s))]
        self.assertEqual(line(a, "APDU", "00A4000C023F00"), ["9000"])
        self.assertEqual(line(b, "APDU", "00A4000C023F00"), ["9000"])
        proto.dataReceived(ctrl(POWER_OFF) + ctrl(POWER_ON) + frame(SELECT_MF))
        self.assertEqual(answers(self.vpcd.current), [b"\x90\x00"])  # the bridge: no C080
        for s in (a, b):
            self.assertEqual(line(s, "APDU", "00A4000C023F00"), ["C080"])
            self.assertEqual(line(s, "APDU", "00A4000C023F00"), ["9000"])
        # another client's RESET: the bridge shows pcscd a removal and, connected
        # again, is not told a second time (its first APDU runs)
        self.assertEqual(line(a, "RESET"), [ATR.hex().upper()])
        self.h.clock.advance(vpcd.REINSERT_DELAY + 0.2)
        second = self.vpcd.current
        second.protocol.dataReceived(ctrl(POWER_ON) + frame(SELECT_MF))
        self.assertEqual(answers(second), [b"\x90\x00"])
        self.assertEqual(line(b, "APDU", "00A4000C023F00"), ["C080"])

    def test_exclusive_reserves_the_card(self):
        bridge = VpcdBridge(self.h.card, self.h.registry, self.vpcd, self.h.clock,
                            retry=retry_policy(jitter=0.0), quickack=False, exclusive=True)
        self.bridge = bridge
        bridge.startService()
        proto = bridge.protocol
        self.assertEqual(self.line("RESET", f"APDU:{SELECT_MF.hex()}"), [errors.UPSTREAM] * 2)
        self.assertEqual(self.line(f"APDU:{SELECT_MF.hex()}", reader="Emulated 01"), ["9000"])
        proto.dataReceived(frame(SELECT_MF))
        self.assertEqual(answers(self.vpcd.current), [b"\x90\x00"])  # the bridge itself works
        bridge.stopService()
        self.h.clock.advance(0)
        self.assertEqual(self.line(f"APDU:{SELECT_MF.hex()}"), ["9000"])  # released

    def test_card_failure_disconnects_and_retries_until_it_works(self):
        self.start()
        first = self.vpcd.current
        self.h.backend.broken = errors.UPSTREAM
        with capturedLogs() as events:
            self.bridge.protocol.dataReceived(frame(SELECT_MF))
            self.h.clock.advance(0)
            self.assertTrue(first.lost)
            self.assertEqual(first.value(), b"")
            for _ in range(20):
                self.h.clock.advance(3.0)
        # every retry reset the card first and failed before connecting
        self.assertEqual(len(self.vpcd.transports), 1)
        self.assertGreater(self.h.backend.calls.count("RESET"), 15)
        ours = [formatEvent(e) for e in events if e.get("log_namespace", "").startswith("cloudfoxy")]
        self.assertEqual(len([t for t in ours if "not connected" in t]), 1, ours)
        self.h.backend.broken = None
        self.h.clock.advance(3.0)
        self.assertEqual(len(self.vpcd.transports), 2)
        self.assertIsNotNone(self.vpcd.current)

    def test_reconnects_when_vpcd_closes(self):
        self.start()
        self.vpcd.refuse = True
        with capturedLogs() as events:
            self.vpcd.current.drop()  # pcscd stopped
            self.h.clock.advance(0.5)
            self.assertEqual(self.vpcd.attempts, 2)
            delays = []
            for _ in range(20):
                calls = self.h.clock.getDelayedCalls()
                delays.append(calls[0].getTime() - self.h.clock.seconds())
                self.h.clock.advance(delays[-1])
        self.assertEqual(self.vpcd.attempts, 22)
        self.assertEqual(max(delays), 3.0)
        # one line says why; the retries themselves are not logged at info
        text = [formatEvent(e) for e in events]
        self.assertEqual(len(text), 2, text)
        self.assertIn("disconnected from vpcd", text[0])
        self.assertIn("not connected", text[1])
        self.assertIn("refused", text[1])
        self.vpcd.refuse = False
        self.h.clock.advance(3.0)
        self.assertIsNotNone(self.vpcd.current)
        self.assertEqual(len(self.vpcd.transports), 2)

    def test_stop_disconnects(self):
        self.start()
        t = self.vpcd.current
        d = self.bridge.stopService()
        self.assertNoResult(d)
        self.h.clock.advance(0)
        self.successResultOf(d)
        self.assertTrue(t.lost)
        self.h.backend.remove(0)
        self.h.backend.insert(0)
        self.assertEqual(self.vpcd.attempts, 1)

    def test_stop_while_resetting(self):
        h = Harness(latency=1.0)
        vp = FakeVpcd(h.clock)
        bridge = VpcdBridge(h.card, h.registry, vp, h.clock, retry=retry_policy(jitter=0.0))
        bridge.startService()
        d = bridge.stopService()
        self.successResultOf(d)
        h.clock.advance(1.0)
        self.assertEqual(vp.attempts, 0)
        self.assertFalse(h.clock.getDelayedCalls())


class ServiceTreeTests(SynchronousTestCase):
    def test_make_vpcd_service(self):
        h = Harness()
        service = vpcd.make_vpcd_service("127.0.0.1", 35964, "Emulated 00", h.dispatcher,
                                         h.registry, MemoryReactorClock())
        verifyObject(IService, service)
        self.assertIsInstance(service, VpcdBridge)
        self.assertEqual(service.where, "127.0.0.1:35964")
        self.assertEqual(service.card.reader, "Emulated 00")
        self.assertEqual(service.quickack, vpcd.QUICKACK)

    def test_tap_builds_one_bridge_per_option(self):
        o = tap.Options()
        o.parseOptions(["--vpcd", "127.0.0.1:35963=Emulated 00", "--vpcd", "[::1]:35964=Emulated 01"])
        top = tap.makeService(o, reactor=MemoryReactorClock())
        bridges = [s for s in top if isinstance(s, VpcdBridge)]
        self.assertEqual([(b.where, b.card.reader) for b in bridges],
                         [("127.0.0.1:35963", "Emulated 00"), ("[::1]:35964", "Emulated 01")])

"""Card sessions (Dispatcher.hold): one card held by one client across
several requests, in memory with Clock."""

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy import errors
from cloudfoxy_proxy.dispatch import CardSession, Session
from cloudfoxy_proxy.errors import CardError
from cloudfoxy_proxy.parser import make_command

from test_server import Harness

SELECT_MF = "00A4000C023F00"
#: SELECT EF 5000/5001 by path, then READ BINARY: answers 6986 when the
#: selection was lost in between (another client's SELECT).
SELECT_EF = "00A4080C0450005001"
READ = "00B0000004"


def apdu(hex_):
    return make_command(["1", "APDU", hex_])


class Results:
    """Collect what a Deferred fires with."""

    def __init__(self, d):
        self.value = None
        self.failure = None
        d.addCallbacks(self._ok, self._fail)

    def _ok(self, value):
        self.value = value

    def _fail(self, failure):
        self.failure = failure


class CardSessionTests(SynchronousTestCase):
    def setUp(self):
        self.h = Harness()
        self.d = self.h.dispatcher
        self.holder = Session("holder")
        self.other = Session("other")

    def hold(self, reader="Emulated 00", **kw):
        got = Results(self.d.hold(reader, self.holder, **kw))
        return got

    def send(self, session, reader, *hexes):
        return Results(self.d.submit(reader, [apdu(h) for h in hexes], session=session))

    def test_held_card_serves_only_its_holder_until_closed(self):
        card = self.hold().value
        self.assertIsInstance(card, CardSession)
        self.assertTrue(card.held)
        self.assertIs(self.h.registry.get("Emulated 00").holder, self.holder)
        self.assertEqual(self.send(self.holder, "Emulated 00", SELECT_EF).value, [("1", "9000")])
        other = self.send(self.other, "Emulated 00", SELECT_MF)
        self.assertIsNone(other.value)  # waits behind the session
        self.assertEqual(len(self.h.registry.get("Emulated 00").queue), 1)
        # the holder's selection survives between its requests
        self.assertEqual(self.send(self.holder, "Emulated 00", READ).value[0][1][-4:], "9000")
        self.assertEqual(self.send(self.other, "Emulated 01", SELECT_MF).value, [("1", "9000")])
        ended = Results(card.ended)
        card.close()
        self.assertEqual(ended.value, "closed")
        self.assertEqual(other.value, [("1", "9000")])
        self.assertIsNone(self.holder.card)
        self.assertIsNone(self.h.registry.get("Emulated 00").holder)
        card.close()  # idempotent

    def test_waits_its_turn_like_a_request(self):
        busy = self.send(self.other, "Slow A", SELECT_MF)
        opened = self.hold("Slow A")
        self.assertIsNone(opened.value)
        key, _, call = self.h.manual.calls.pop()
        call.callback(bytes.fromhex("9000"))
        self.assertEqual(busy.value, [("1", "9000")])
        self.assertTrue(opened.value.held)

    def test_giving_up_while_waiting_leaves_the_queue(self):
        busy = self.send(self.other, "Slow A", SELECT_MF)
        d = self.d.hold("Slow A", self.holder)
        failed = Results(d)
        d.cancel()
        self.assertIsNotNone(failed.failure)
        reader = self.h.registry.get("Slow A")
        self.assertEqual(len(reader.queue), 0)
        self.h.manual.calls.pop()[2].callback(bytes.fromhex("9000"))
        self.assertEqual(busy.value, [("1", "9000")])
        self.assertFalse(reader.queue.busy)
        self.assertIsNone(self.holder.card)

    def test_idle_timeout(self):
        card = self.hold(idle_timeout=8).value
        other = self.send(self.other, "Emulated 00", SELECT_MF)  # waits at most 15 s (--queue-timeout)
        self.h.clock.advance(5)
        self.send(self.holder, "Emulated 00", SELECT_MF)  # used: 8 s again from now
        self.h.clock.advance(5)
        self.assertTrue(card.held)
        ended = Results(card.ended)
        self.h.clock.advance(3)
        self.assertEqual(ended.value, "idle")
        self.assertEqual(other.value, [("1", "9000")])
        self.assertEqual(self.h.clock.getDelayedCalls(), [])

    def test_not_idle_while_a_request_of_the_holder_runs(self):
        card = self.hold("Slow A", idle_timeout=5).value
        running = self.send(self.holder, "Slow A", SELECT_MF)
        self.h.clock.advance(12)
        self.assertTrue(card.held)
        self.h.manual.calls.pop()[2].callback(bytes.fromhex("9000"))
        self.assertEqual(running.value, [("1", "9000")])
        self.h.clock.advance(5)
        self.assertFalse(card.held)

    def test_max_duration(self):
        card = self.hold(idle_timeout=10, max_duration=25).value
        ended = Results(card.ended)
        for _ in range(3):
            self.h.clock.advance(8)
            self.send(self.holder, "Emulated 00", SELECT_MF)
        self.assertIsNone(ended.value)
        self.h.clock.advance(1)
        self.assertEqual(ended.value, "max duration")
        self.assertEqual(self.h.clock.getDelayedCalls(), [])

    def test_closed_while_the_holder_runs_a_command(self):
        card = self.hold("Slow A").value
        first = self.send(self.holder, "Slow A", SELECT_MF)
        queued = self.send(self.holder, "Slow A", SELECT_MF)  # the holder's own second request
        other = self.send(self.other, "Slow A", "0084000008")
        card.close()
        self.assertEqual(len(self.h.manual.calls), 1)  # the card is still the holder's
        self.h.manual.calls.pop()[2].callback(bytes.fromhex("9000"))
        self.assertEqual(first.value, [("1", "9000")])
        # the session's card state is gone: its queued request gets C080
        self.assertEqual(queued.value, [("1", errors.NO_CARD)])
        # ... and then the card is the next client's
        self.assertEqual([c[1] for c in self.h.manual.calls], ["0084000008"])
        self.h.manual.calls.pop()[2].callback(bytes.fromhex("11223344556677889000"))
        self.assertEqual(other.value, [("1", "11223344556677889000")])

    def test_backend_release_hook_once_per_session(self):
        released = []
        reader = self.h.registry.get("Emulated 00")
        reader.release = released.append
        card = self.hold().value
        for _ in range(3):
            self.send(self.holder, "Emulated 00", SELECT_MF)
        self.assertEqual(released, [])
        card.close()
        self.assertEqual(released, [reader.key])

    def test_errors(self):
        self.assertEqual(Results(self.d.hold("Nope", self.holder)).failure.value.code, errors.NOT_FOUND)
        self.assertEqual(Results(self.d.hold("Emulated", self.holder)).failure.value.code,
                         errors.AMBIGUOUS)
        self.hold()
        with self.assertRaises(ValueError):
            self.d.hold("Emulated 01", self.holder)

    def test_queue_full(self):
        h = Harness(max_queue=1)
        h.dispatcher.submit("Slow A", [apdu(SELECT_MF)], session=Session())
        h.dispatcher.submit("Slow A", [apdu(SELECT_MF)], session=Session())
        failed = Results(h.dispatcher.hold("Slow A", Session()))
        self.assertIsInstance(failed.failure.value, CardError)
        self.assertEqual(failed.failure.value.code, errors.UPSTREAM)

    def test_reserved_card(self):
        reader = self.h.registry.get("Emulated 00")
        reader.holder, reader.exclusive = Session("bridge"), True
        failed = Results(self.d.hold("Emulated 00", self.holder))
        self.assertEqual(failed.failure.value.code, errors.UPSTREAM)

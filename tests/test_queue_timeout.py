"""--queue-timeout (Dispatcher.queue_timeout): a request or card session
waiting in a card's queue behind a busy card or a card held by a card
session is answered C086 after it, leaves the queue, and the card never
runs its commands; the holder goes on.  In memory, with Clock."""

from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy import errors, metrics
from cloudfoxy_proxy.access import Identity
from cloudfoxy_proxy.backends.emulated import EmulatedBackend
from cloudfoxy_proxy.cards.iso7816 import Iso7816Card
from cloudfoxy_proxy.dispatch import CardSession, Dispatcher, Session
from cloudfoxy_proxy.errors import CardError
from cloudfoxy_proxy.frontends import status
from cloudfoxy_proxy.frontends.line import LineFactory
from cloudfoxy_proxy.parser import make_command
from cloudfoxy_proxy.registry import ReaderRegistry

from test_server import LOCAL, ManualBackend, take

QUEUE, COMMAND = 10.0, 15.0
SELECT_MF = "00A4000C023F00"


def apdu(hex_, cid="1"):
    return make_command([cid, "APDU", hex_])


class Results:
    def __init__(self, d):
        self.value = self.failure = None
        d.addCallbacks(self._ok, self._fail)

    def _ok(self, value):
        self.value = value

    def _fail(self, failure):
        self.failure = failure


class QueueTimeoutTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.registry = ReaderRegistry()
        self.manual = ManualBackend()
        self.manual.start(self.registry)
        self.emulated = EmulatedBackend(self.clock, [Iso7816Card(serial=0)])
        self.emulated.start(self.registry)
        self.d = Dispatcher(self.registry, self.clock, COMMAND, queue_timeout=QUEUE)
        self.d.metrics = metrics.Metrics(self.registry, [self.manual, self.emulated])
        self.d.metrics.seconds = self.clock.seconds
        self.reader = self.registry.get("Slow A")
        self.holder = Session("10.0.0.1:5000", "api", identity=Identity("alice"))

    def ran(self):
        """The commands the card (Slow A) was sent, in order."""
        return [what for key, what, _ in self.manual.calls if key == "a"]

    def answer(self, what, value="9000"):
        for i, (key, sent, d) in enumerate(self.manual.calls):
            if sent == what and not d.called:
                d.callback(bytes.fromhex(value))
                return
        self.fail(f"{what} was not sent to the card")

    def send(self, session, *hexes, reader="Slow A"):
        return Results(self.d.submit(reader, [apdu(h, str(i + 1)) for i, h in enumerate(hexes)],
                                     session=session))

    def hold(self):
        got = Results(self.d.hold("Slow A", self.holder))
        self.assertIsInstance(got.value, CardSession)
        return got.value

    def assert_clean(self):
        self.assertEqual(len(self.reader.queue), 0)
        self.assertEqual(len(self.d.queue_deadlines), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waiter_behind_held_card_times_out_exactly_and_holder_goes_on(self):
        card = self.hold()
        late = self.send(Session("b"), "00B0000002")  # t=0
        self.clock.advance(4)
        later = self.send(Session("c"), "00B0000003")  # t=4
        self.clock.advance(1)
        mine = self.send(self.holder, "00B0000001")  # the holder's own command, in flight at t=10
        self.clock.advance(QUEUE - 5 - 0.5)
        self.assertIsNone(late.value)
        self.clock.advance(0.5)  # t=10: exactly --queue-timeout
        self.assertEqual(late.value, [("1", "C086")])
        self.assertIsNone(later.value)
        self.assertEqual(len(self.reader.queue), 1)  # gone from the queue at once
        self.assertTrue(card.held)
        self.answer("00B0000001")
        self.assertEqual(mine.value, [("1", "9000")])  # the holder's command finished
        self.assertEqual(self.send(self.holder, "00B0000004").value, None)
        self.answer("00B0000004")
        self.assertTrue(card.held)
        card.close()
        # the next waiter (4 s later, 8 s in the queue) gets the card, in order
        self.assertEqual(self.ran(), ["00B0000001", "00B0000004", "00B0000003"])
        self.answer("00B0000003")
        self.assertEqual(later.value, [("1", "9000")])
        self.assertNotIn("00B0000002", self.ran())  # the timed-out command never ran
        self.assertEqual(self.d.metrics.stats_of(self.reader).queue_timeouts, 1)
        self.assert_clean()

    def test_every_command_of_the_request_is_answered_and_none_runs(self):
        busy = self.send(Session("a"), "00B0000001")  # in flight, up to the command timeout
        bad = make_command(["2", "APDU", "XYZ"])
        waiting = Results(self.d.submit("Slow A", [apdu("00B0000002"), bad, apdu("00B0000003", "3")],
                                        session=Session("b")))
        self.clock.advance(QUEUE)
        self.assertEqual(waiting.value, [("1", "C086"), ("2", errors.MALFORMED), ("3", "C086")])
        self.assertIsNone(busy.value)  # the command on the card is not touched
        self.clock.advance(COMMAND - QUEUE)
        self.assertEqual(busy.value, [("1", "C086")])  # its own bound: --command-timeout
        self.assertEqual(self.ran(), ["00B0000001"])
        self.assert_clean()

    def test_waiters_in_order_each_timed_from_its_own_arrival(self):
        card = self.hold()
        got = []
        for i in range(5):
            got.append(self.send(Session(f"w{i}"), f"00B000000{i}"))
            self.clock.advance(1)
        self.clock.advance(QUEUE - 5)  # t=10: the first is due
        self.assertEqual([g.value is not None for g in got], [True, False, False, False, False])
        self.clock.advance(2)  # t=12: the second and third
        self.assertEqual([g.value is not None for g in got], [True, True, True, False, False])
        card.close()  # the fourth gets the card, then the fifth
        self.assertEqual(self.ran(), ["00B0000003"])
        self.answer("00B0000003")
        self.assertEqual(self.ran(), ["00B0000003", "00B0000004"])
        self.answer("00B0000004")
        self.assertEqual([g.value[0][1] for g in got], ["C086", "C086", "C086", "9000", "9000"])
        self.assert_clean()

    def test_card_session_waiting_for_a_held_card_is_refused(self):
        card = self.hold()
        other = Session("10.0.0.2:6000", "api")
        opened = Results(self.d.hold("Slow A", other))
        self.clock.advance(QUEUE)
        self.assertTrue(opened.failure.check(CardError))
        self.assertEqual(opened.failure.value.code, errors.UPSTREAM)
        self.assertIsNone(other.card)
        self.assertTrue(card.held)
        self.assertIs(self.reader.holder, self.holder)
        self.assertEqual(self.d.metrics.stats_of(self.reader).queue_timeouts, 1)
        card.close()
        self.assert_clean()

    def test_client_gone_before_the_timeout_leaves_no_timer(self):
        card = self.hold()
        d = self.d.submit("Slow A", [apdu("00B0000002")], session=Session("b"))
        d.addErrback(lambda f: None)
        d.cancel()
        self.assertEqual(len(self.d.queue_deadlines), 0)
        self.clock.advance(QUEUE)
        card.close()
        self.assertEqual(self.ran(), [])
        self.assert_clean()

    def test_holder_pipelined_requests_are_bounded_too(self):
        card = self.hold()
        first = self.send(self.holder, "00B0000001")
        second = self.send(self.holder, "00B0000002")  # behind the holder's own command
        self.clock.advance(QUEUE)
        self.assertEqual(second.value, [("1", "C086")])
        self.answer("00B0000001")
        self.assertEqual(first.value, [("1", "9000")])
        self.assertTrue(card.held)
        self.assertEqual(self.ran(), ["00B0000001"])
        card.close()
        self.assert_clean()

    def test_line_client_gets_c086_and_its_connection_goes_on(self):
        card = self.hold()
        proto = LineFactory(self.d).buildProtocol(None)
        t = StringTransport(peerAddress=LOCAL)
        proto.makeConnection(t)
        proto.dataReceived(b">Slow A|\n>1:RESET|\n>2:APDU:00B0000002|\n\n")
        self.clock.advance(QUEUE - 0.5)
        self.assertEqual(take(t), "")
        self.clock.advance(0.5)
        self.assertEqual(take(t), ">1:C086\n>2:C086\n@@\n")
        proto.dataReceived(b">Emulated 00|\n>3:APDU:" + SELECT_MF.encode() + b"|\n\n")
        self.assertEqual(take(t), ">3:9000\n@@\n")
        self.assertEqual(self.ran(), [])
        card.close()
        proto.connectionLost(None)
        self.assert_clean()

    def test_default_is_the_command_timeout(self):
        d = Dispatcher(self.registry, self.clock, 7.0)
        self.assertEqual((d.queue_timeout, d.queue_deadlines.timeout), (7.0, 7.0))

    def test_holder_in_status_and_metrics_only_for_who_sees_the_reader(self):
        card = self.hold()
        waiting = self.send(Session("b"), "00B0000002")
        self.clock.advance(3)
        sampler = status.Sampler(self.d.metrics, self.clock)
        page = status.status(self.d.metrics, sampler, None, self.clock)
        self.assertEqual(len(page["holders"]), 1)
        held = page["holders"][0]
        self.assertEqual({k: held[k] for k in ("reader", "frontend", "identity", "peer", "held_seconds",
                                                "queued", "waiting")},
                         {"reader": "Slow A", "frontend": "api", "identity": "alice",
                          "peer": "10.0.0.1:5000", "held_seconds": 3.0, "queued": 0, "waiting": 1})
        self.assertIsInstance(held["since"], float)
        self.clock.advance(QUEUE)
        self.assertEqual(waiting.value, [("1", "C086")])
        page = status.status(self.d.metrics, sampler, None, self.clock)
        self.assertEqual([r["queue_timeouts"] for r in page["readers"] if r["name"] == "Slow A"], [1])
        only_b = Identity("bob", readers=["Slow B"])
        hidden = status.status(self.d.metrics, sampler, None, self.clock, only_b.sees)
        self.assertEqual(hidden["holders"], [])

        def scrape(sees=None):
            reg = CollectorRegistry(auto_describe=False)
            reg.register(metrics.Collector(self.d.metrics, sees=sees))
            return {(s.name, tuple(sorted(s.labels.items()))): s.value
                    for family in reg.collect() for s in family.samples}

        labels = (("frontend", "api"), ("identity", "alice"), ("reader", "Slow A"))
        got = scrape()
        self.assertEqual(got[("foxyproxy_reader_held", labels)], 1)
        self.assertEqual(got[("foxyproxy_reader_held_seconds", labels)], 13.0)
        self.assertEqual(got[("foxyproxy_reader_queue_timeouts_total", (("reader", "Slow A"),))], 1)
        self.assertEqual(got[("foxyproxy_reader_queue_length", (("reader", "Slow A"),))], 0)
        hidden = scrape(only_b.sees)
        self.assertFalse([k for k in hidden if "Slow A" in str(k)])
        card.close()
        page = status.status(self.d.metrics, sampler, None, self.clock)
        self.assertEqual(page["holders"], [])
        self.assert_clean()


class OptionTests(SynchronousTestCase):
    def parse(self, *args):
        from cloudfoxy_proxy import tap

        o = tap.Options()
        o.parseOptions(list(args))
        return o

    def test_default_follows_the_command_timeout(self):
        self.assertEqual(self.parse()["queue-timeout"], 15.0)
        self.assertEqual(self.parse("--command-timeout", "4")["queue-timeout"], 4.0)
        self.assertEqual(self.parse("--command-timeout", "4", "--queue-timeout", "30")["queue-timeout"], 30.0)

    def test_bad_values_are_one_line(self):
        from twisted.python import usage

        for bad, why in (("soon", "not a number"), ("0", "must be between 0.001 and 3600")):
            with self.assertRaises(usage.UsageError) as e:
                self.parse("--queue-timeout", bad)
            self.assertEqual(str(e.exception), f"--queue-timeout {bad!r}: {why}")

    def test_the_dispatcher_gets_it(self):
        from cloudfoxy_proxy import tap
        from twisted.internet.testing import MemoryReactorClock

        top = tap.makeService(self.parse("--queue-timeout", "3.5", "--no-signing"), MemoryReactorClock())
        self.assertEqual((top.dispatcher.queue_timeout, top.dispatcher.queue_deadlines.timeout), (3.5, 3.5))
        self.assertEqual(top.dispatcher.command_timeout, 15.0)

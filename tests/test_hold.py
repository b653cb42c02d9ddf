"""HOLD / RELEASE (docs/protocol.md "HOLD and RELEASE") at the proxy that
has the card, and card sessions of a front held at its ``tcp://`` upstream
(docs/tcp.md "Card sessions through a front"): in memory, with Clock; the
front's upstream connections are in-memory pipes to the owner's line
protocol (twisted.test.iosim)."""

from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from cloudfoxy_proxy import errors
from cloudfoxy_proxy.backends import tcp
from cloudfoxy_proxy.dispatch import Dispatcher, Session
from cloudfoxy_proxy.frontends.line import LineFactory
from cloudfoxy_proxy.parser import make_command
from cloudfoxy_proxy.registry import ReaderRegistry

from test_card_sessions import READ, SELECT_EF, SELECT_MF, Results
from test_server import Harness, take

OWNER = IPv4Address("TCP", "127.0.0.1", 40000)


def ran(backend):
    """Record the APDUs ``backend`` (an EmulatedBackend) runs: a list of
    ``(reader key, APDU hex)``."""
    log = []
    transmit = backend.transmit

    def recording(key, apdu):
        log.append((key, apdu.hex().upper()))
        return transmit(key, apdu)

    backend.transmit = recording
    return log


class LineHoldTests(SynchronousTestCase):
    """HOLD / RELEASE from line-protocol connections of the proxy with the cards."""

    def setUp(self):
        self.h = Harness()
        self.h.dispatcher.queue_timeout = 3.0
        self.h.dispatcher.queue_deadlines.timeout = 3.0
        self.ran = ran(self.h.emulated)
        self.holder, self.ht = self.h.connect()
        self.other, self.ot = self.h.connect()

    def send(self, proto, data):
        proto.dataReceived(data)

    def test_hold_excludes_others_until_release(self):
        self.send(self.holder, b">Emulated 00|\n>1:HOLD:20|\n\n")
        self.assertEqual(take(self.ht), ">1:OK\n@@\n")
        self.send(self.holder, b">2:APDU:%s|\n\n" % SELECT_EF.encode())
        self.assertEqual(take(self.ht), ">2:9000\n@@\n")
        self.send(self.other, b">Emulated 00|\n>1:APDU:%s|\n\n" % SELECT_MF.encode())
        self.assertEqual(take(self.ot), "")  # waits for the card
        self.send(self.other, b"")
        # the holder's selection survived: READ BINARY of EF 5001 works
        self.send(self.holder, b">3:APDU:%s|\n\n" % READ.encode())
        self.assertTrue(take(self.ht).endswith("9000\n@@\n"))
        self.assertEqual(self.ran, [(0, SELECT_EF), (0, READ)])
        self.send(self.holder, b">4:RELEASE|\n\n")
        self.assertEqual(take(self.ht), ">4:OK\n@@\n")
        self.assertEqual(take(self.ot), ">1:9000\n@@\n")
        self.assertEqual(self.ran[-1], (0, SELECT_MF))
        self.assertIsNone(self.h.registry.get("Emulated 00").holder)

    def test_a_second_hold_waits_then_c086_after_the_queue_timeout(self):
        self.send(self.holder, b">Emulated 00|\n>1:HOLD:0|\n\n")
        self.assertEqual(take(self.ht), ">1:OK\n@@\n")
        self.send(self.other, b">Emulated 00|\n>1:HOLD:20|\n\n")
        self.h.clock.advance(2.9)
        self.assertEqual(take(self.ot), "")
        self.h.clock.advance(0.2)
        self.assertEqual(take(self.ot), ">1:C086\n@@\n")
        # HOLD:0 has no idle timeout: still held long after
        self.h.clock.advance(1000)
        self.assertIs(self.h.registry.get("Emulated 00").holder, self.holder.session)

    def test_other_requests_wait_at_most_the_queue_timeout(self):
        self.send(self.holder, b">Emulated 00|\n>1:HOLD:20|\n\n")
        take(self.ht)
        self.send(self.other, b">Emulated 00|\n>1:APDU:%s|\n\n" % SELECT_MF.encode())
        self.h.clock.advance(3.1)
        self.assertEqual(take(self.ot), ">1:C086\n@@\n")
        self.assertEqual(self.ran, [])  # the card never ran it

    def test_idle_timeout_releases(self):
        self.send(self.holder, b">Emulated 00|\n>1:HOLD:5|\n\n")
        take(self.ht)
        self.send(self.other, b">Emulated 01|\n>1:APDU:%s|\n\n" % SELECT_MF.encode())
        self.assertEqual(take(self.ot), ">1:9000\n@@\n")  # another card is not held
        self.send(self.other, b">Emulated 00|\n>2:APDU:%s|\n\n" % SELECT_MF.encode())
        self.h.clock.advance(2.0)
        self.send(self.holder, b">2:APDU:%s|\n\n" % SELECT_EF.encode())  # not idle: starts again
        self.assertEqual(take(self.ht), ">2:9000\n@@\n")
        self.h.clock.advance(0.9)
        self.assertEqual(take(self.ot), "")
        self.h.clock.advance(0.2)  # the other request waited its 3 s (--queue-timeout)
        self.assertEqual(take(self.ot), ">2:C086\n@@\n")
        self.h.clock.advance(1.5)
        self.send(self.other, b">3:APDU:%s|\n\n" % SELECT_MF.encode())
        self.h.clock.advance(2.3)
        self.assertEqual(take(self.ot), "")
        self.h.clock.advance(0.2)  # 5 s after the holder's last command
        self.assertEqual(take(self.ot), ">3:9000\n@@\n")
        self.assertEqual(self.ran[-2:], [(0, SELECT_EF), (0, SELECT_MF)])
        # the holder's next command queues like anybody's
        self.send(self.holder, b">4:APDU:%s|\n\n" % SELECT_MF.encode())
        self.assertEqual(take(self.ht), ">4:9000\n@@\n")

    def test_connection_loss_releases(self):
        self.send(self.holder, b">Emulated 00|\n>1:HOLD:60|\n\n")
        take(self.ht)
        self.send(self.other, b">Emulated 00|\n>1:APDU:%s|\n\n" % SELECT_MF.encode())
        self.assertEqual(take(self.ot), "")
        self.holder.connectionLost(None)
        self.assertEqual(take(self.ot), ">1:9000\n@@\n")
        self.assertIsNone(self.h.registry.get("Emulated 00").holder)

    def test_a_waiting_hold_whose_connection_is_lost_is_never_granted(self):
        self.send(self.holder, b">Emulated 00|\n>1:HOLD:60|\n\n")
        take(self.ht)
        self.send(self.other, b">Emulated 00|\n>1:HOLD:60|\n\n")
        self.other.connectionLost(None)
        self.send(self.holder, b">2:RELEASE|\n\n")
        self.assertEqual(take(self.ht), ">2:OK\n@@\n")
        reader = self.h.registry.get("Emulated 00")
        self.assertIsNone(reader.holder)
        self.assertEqual(len(reader.queue), 0)
        third, tt = self.h.connect()
        third.dataReceived(b">Emulated 00|\n>1:APDU:%s|\n\n" % SELECT_MF.encode())
        self.assertEqual(take(tt), ">1:9000\n@@\n")

    def test_bad_hold_commands(self):
        self.send(self.holder, b">Emulated 00|\n>1:HOLD:x|\n>2:HOLD:-1|\n>3:HOLD:1e9|\n>4:HOLD|\n\n")
        self.assertEqual(take(self.ht), ">1:C084\n>2:C084\n>3:C084\n>4:C084\n@@\n")
        self.send(self.holder, b">5:RELEASE|\n\n")  # nothing held: nothing to do
        self.assertEqual(take(self.ht), ">5:OK\n@@\n")
        self.send(self.holder, b">Nothing here|\n>6:HOLD:5|\n\n")
        self.assertEqual(take(self.ht), ">6:C083\n@@\n")
        self.send(self.holder, b">Emulated 00|\n>7:HOLD:5|\n>8:HOLD:9|\n\n")  # again: OK, one hold
        self.assertEqual(take(self.ht), ">7:OK\n>8:OK\n@@\n")
        self.assertEqual(self.holder.session.card.idle_timeout, 9.0)
        self.send(self.holder, b">Emulated 00|\n>7:HOLD:0|\n\n")  # no idle timeout now
        self.assertEqual(take(self.ht), ">7:OK\n@@\n")
        self.h.clock.advance(100)
        self.assertTrue(self.holder.session.card.held)
        self.send(self.holder, b">Emulated 01|\n>9:HOLD:5|\n\n")  # one card at a time
        self.assertEqual(take(self.ht), ">9:C086\n@@\n")

    def test_commands_and_hold_in_one_request(self):
        # APDU, HOLD, APDU, RELEASE in one request: the turn of the first
        # APDU ends before HOLD, the second runs inside the session
        self.send(self.holder, b">Emulated 00|\n>1:APDU:%s|\n>2:HOLD:10|\n>3:APDU:%s|\n>4:RELEASE|\n\n"
                  % (SELECT_MF.encode(), SELECT_EF.encode()))
        self.assertEqual(take(self.ht), ">1:9000\n>2:OK\n>3:9000\n>4:OK\n@@\n")
        self.assertIsNone(self.h.registry.get("Emulated 00").holder)
        self.assertIsNone(self.holder.session.card)

    def test_only_line_connections_hold(self):
        # a front end whose sessions are not connections (e.g. an HTTP request): C081
        got = Results(self.h.dispatcher.submit("Emulated 00", [make_command(["1", "HOLD", "5"])],
                                               session=Session("x", "api")))
        self.assertEqual(got.value, [("1", errors.FAILED)])
        self.assertIsNone(self.h.registry.get("Emulated 00").holder)


@implementer(IStreamClientEndpoint)
class PipeEndpoint:
    """Connects a client factory to ``server`` (a LineFactory) in memory."""

    def __init__(self, server):
        self.server = server
        self.pumps = []
        self.refuse = False

    def connect(self, factory):
        if self.refuse:
            from twisted.internet.defer import fail
            from twisted.internet.error import ConnectionRefusedError
            return fail(ConnectionRefusedError())
        client = factory.buildProtocol(None)
        server = self.server.buildProtocol(None)
        ct = iosim.FakeTransport(client, isServer=False, peerAddress=OWNER)
        st = iosim.FakeTransport(server, isServer=True, peerAddress=OWNER)
        self.pumps.append(iosim.connect(server, st, client, ct, greet=False))
        return succeed(client)

    def flush(self):
        for _ in range(20):
            moved = False
            for pump in self.pumps:
                moved = pump.pump() or moved
            if not moved:
                return


class FrontTests(SynchronousTestCase):
    """A front (its own dispatcher, a TcpBackend) on the owner's line protocol."""

    def setUp(self):
        self.owner = Harness()
        self.owner.dispatcher.queue_timeout = 3.0
        self.owner.dispatcher.queue_deadlines.timeout = 3.0
        self.ran = ran(self.owner.emulated)
        self.clock = self.owner.clock
        self.pipe = PipeEndpoint(self.owner.factory)
        self.backend = tcp.TcpBackend(endpoint=self.pipe, clock=self.clock, where="tcp://owner:4001",
                                      connections=1, refresh=0, timeout=5.0, persistent=True)
        self.registry = ReaderRegistry()
        self.front = Dispatcher(self.registry, self.clock, 5.0, queue_timeout=4.0)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.backend.start(self.registry)
        self.addCleanup(self.backend.stop)
        self.pipe.flush()
        self.assertIn("Emulated 00", [r.name for r in self.registry.readers])
        self.direct, self.dt = self.owner.connect()

    def logged(self, text):
        return [m for m in (formatEvent(e) for e in self.events) if text in m]

    def hold(self, idle=20.0, session=None):
        session = session or Session("client", "api")
        got = Results(self.front.hold("Emulated 00", session, idle_timeout=idle))
        self.pipe.flush()
        return session, got

    def submit(self, session, *hexes):
        got = Results(self.front.submit("Emulated 00", [make_command([str(i), "APDU", h])
                                                         for i, h in enumerate(hexes, 1)],
                                        session=session))
        self.pipe.flush()
        return got

    def owner_reader(self):
        return self.owner.registry.get("Emulated 00")

    def test_session_on_the_front_holds_the_card_at_the_owner(self):
        session, got = self.hold()
        card = got.value
        self.assertIsNotNone(card, got.failure)
        self.assertIsNotNone(card.upstream)
        self.assertEqual(len(self.pipe.pumps), 2)  # the pool's connection and the session's own
        owner_holder = self.owner_reader().holder
        self.assertIsNotNone(owner_holder)
        self.assertEqual(owner_holder.card.idle_timeout, 20.0 + 2.0)  # tcp_hold.IDLE_MARGIN
        self.assertEqual(self.submit(session, SELECT_EF).value, [("1", "9000")])
        # a client of the owner waits, and after the owner's queue timeout gets C086
        self.direct.dataReceived(b">Emulated 00|\n>1:APDU:%s|\n\n" % SELECT_MF.encode())
        self.assertEqual(take(self.dt), "")
        # another client of the front waits in the front's queue
        other = self.submit(Session("other", "api"), SELECT_MF)
        self.assertIsNone(other.value)
        self.assertEqual(self.submit(session, READ, SELECT_EF).value[1], ("2", "9000"))
        self.assertTrue(self.submit(session, READ).value[0][1].endswith("9000"))
        self.clock.advance(3.1)
        self.assertEqual(take(self.dt), ">1:C086\n@@\n")
        self.assertEqual(self.ran, [(0, SELECT_EF), (0, READ),
                                    (0, SELECT_EF), (0, READ)])
        card.close()
        self.pipe.flush()
        self.assertIsNone(self.owner_reader().holder)  # RELEASE, then the connection closed
        self.assertEqual(other.value, [("1", "9000")])
        self.direct.dataReceived(b">2:APDU:%s|\n\n" % SELECT_MF.encode())
        self.assertEqual(take(self.dt), ">2:9000\n@@\n")
        self.assertEqual(self.ran[-2:], [(0, SELECT_MF), (0, SELECT_MF)])

    def test_front_idle_timeout_releases_at_the_owner(self):
        session, got = self.hold(idle=5.0)
        self.assertIsNotNone(self.owner_reader().holder)
        self.clock.advance(5.0)
        self.pipe.flush()
        self.assertEqual(got.value.state, "closed")
        self.assertIsNone(self.owner_reader().holder)

    def test_a_new_idle_timeout_reaches_the_owner(self):
        """Before: HOLD:3 then HOLD:60 on a front: the owner let go of the
        card after 3 + 2 s while the front still held it, and the owner's
        other clients ran commands on it."""
        session, got = self.hold(idle=3.0)
        card = got.value
        card.set_idle_timeout(60.0)  # what line_hold does for HOLD again on the held card
        self.pipe.flush()
        self.assertEqual(self.owner_reader().holder.card.idle_timeout, 60.0 + 2.0)
        self.clock.advance(10.0)
        self.pipe.flush()
        self.assertEqual(card.state, "held")
        self.assertIsNotNone(self.owner_reader().holder)
        self.direct.dataReceived(b">Emulated 00|\n>1:APDU:%s|\n\n" % SELECT_MF.encode())
        self.assertEqual(take(self.dt), "")  # still excluded at the owner
        card.set_idle_timeout(None)  # HOLD:0
        self.pipe.flush()
        self.assertIsNone(self.owner_reader().holder.card.idle_timeout)
        card.close()
        self.pipe.flush()
        self.assertIsNone(self.owner_reader().holder)

    def test_the_owner_grants_after_its_queue(self):
        self.direct.dataReceived(b">Emulated 00|\n>1:HOLD:30|\n\n")
        self.assertEqual(take(self.dt), ">1:OK\n@@\n")
        session, got = self.hold()
        self.assertIsNone(got.value)  # waits at the owner
        self.direct.dataReceived(b">2:RELEASE|\n\n")
        self.pipe.flush()
        self.assertIsNotNone(got.value)
        self.assertIsNot(self.owner_reader().holder, self.direct.session)

    def test_owner_queue_timeout_refuses_the_session(self):
        self.direct.dataReceived(b">Emulated 00|\n>1:HOLD:30|\n\n")
        session, got = self.hold()
        self.clock.advance(3.1)
        self.pipe.flush()
        self.assertEqual(got.failure.value.code, errors.UPSTREAM)
        self.assertIsNone(session.card)
        self.assertIsNone(self.registry.get("Emulated 00").holder)  # the front let go too
        self.assertEqual(self.submit(Session("other", "api"), SELECT_MF).value, None)  # behind the owner's hold

    def test_lost_session_connection_ends_the_session_and_never_resends(self):
        session = Session("client", "api")
        got = Results(self.front.hold("Slow A", session, idle_timeout=20.0))
        self.pipe.flush()
        card = got.value
        ended = Results(card.ended)
        d = Results(self.front.submit("Slow A", [make_command(["1", "APDU", SELECT_EF])], session=session))
        self.pipe.flush()
        self.assertEqual(len(self.owner.manual.calls), 1)  # on the owner's card now
        self.pipe.pumps[1].clientIO.abortConnection()  # the session's own connection dies
        self.pipe.flush()
        self.assertEqual(d.value, [("1", errors.UPSTREAM)])
        self.assertEqual(ended.value, "upstream lost")
        self.assertIsNone(session.card)
        owner_reader = self.owner.registry.get("Slow A")
        self.assertIsNotNone(owner_reader.holder)  # until the owner's card has answered
        self.owner.manual.calls.pop()[2].callback(b"\x90\x00")
        self.pipe.flush()
        self.assertIsNone(owner_reader.holder)  # the owner let go: its holder's connection is gone
        self.assertEqual(self.owner.manual.calls, [])  # never re-sent
        # later requests of the client run like anybody's, through the pool
        later = Results(self.front.submit("Slow A", [make_command(["2", "APDU", SELECT_MF])], session=session))
        self.pipe.flush()
        self.assertEqual([c[1] for c in self.owner.manual.calls], [SELECT_MF])
        self.owner.manual.calls.pop()[2].callback(b"\x90\x00")
        self.pipe.flush()
        self.assertEqual(later.value, [("2", "9000")])
        self.assertEqual(len(self.logged("lost the card session connection")), 1)

    def test_an_upstream_without_hold_holds_on_the_front_only_logged_once(self):
        self.owner.dispatcher.execute = self._old_owner(self.owner.dispatcher.execute)
        for _ in range(2):
            session, got = self.hold()
            card = got.value
            self.assertIsNotNone(card)
            self.assertIsNone(card.upstream)
            self.assertIsNone(self.owner_reader().holder)
            self.assertEqual(self.submit(session, SELECT_MF).value, [("1", "9000")])  # via the pool
            card.close()
        self.assertEqual(len(self.logged("does not know HOLD")), 1)

    def _old_owner(self, execute):
        """An owner that answers HOLD like FoxyProxy 2.10: C081."""
        def old(request, session, unresolved=None):
            for c in request.commands:
                if c.name == "HOLD":
                    c.error = errors.FAILED
            return execute(request, session, unresolved)
        return old

    def test_unreachable_owner_refuses_the_session(self):
        self.pipe.refuse = True
        session, got = self.hold()
        self.assertEqual(got.failure.value.code, errors.UPSTREAM)
        self.assertIsNone(self.registry.get("Emulated 00").holder)

    def test_line_hold_on_the_front_holds_at_the_owner(self):
        factory = LineFactory(self.front)
        proto = factory.buildProtocol(None)
        t = StringTransport(peerAddress=OWNER)
        proto.makeConnection(t)
        proto.dataReceived(b">Emulated 00|\n>1:HOLD:10|\n\n")
        self.pipe.flush()
        self.assertEqual(take(t), ">1:OK\n@@\n")
        self.assertIsNotNone(self.owner_reader().holder)
        proto.dataReceived(b">2:APDU:%s|\n\n" % SELECT_MF.encode())
        self.pipe.flush()
        self.assertEqual(take(t), ">2:9000\n@@\n")
        proto.connectionLost(None)  # the client of the front goes away
        self.pipe.flush()
        self.assertIsNone(self.owner_reader().holder)

    def test_vpcd_exclusive_bridge_through_the_front_holds_at_the_owner(self):
        from test_vpcd import FakeVpcd, answers, frame
        from cloudfoxy_proxy.frontends.vpcd import BridgedCard, VpcdBridge, retry_policy

        fake = FakeVpcd(self.clock)
        bridge = VpcdBridge(BridgedCard("Emulated 00", self.front), self.registry, fake, self.clock,
                            retry=retry_policy(jitter=0.0), quickack=False, exclusive=True)
        bridge.startService()
        self.pipe.flush()  # the card session upstream, then the bridge's RESET, then vpcd
        self.clock.advance(0)
        self.pipe.flush()
        proto = bridge.protocol
        self.assertIsNotNone(proto)
        self.assertIsNotNone(self.owner_reader().holder)  # held at the owner
        # the front's other clients: C086 at once (exclusive); the owner's: after its queue timeout
        other = self.submit(Session("other", "api"), SELECT_MF)
        self.assertEqual(other.value, [("1", errors.UPSTREAM)])
        self.direct.dataReceived(b">Emulated 00|\n>1:APDU:%s|\n\n" % SELECT_MF.encode())
        proto.dataReceived(frame(bytes.fromhex(SELECT_EF)))
        self.pipe.flush()
        self.assertEqual(answers(fake.current), [b"\x90\x00"])  # through the session's connection
        self.clock.advance(3.1)
        self.assertEqual(take(self.dt), ">1:C086\n@@\n")
        self.assertEqual(self.ran, [(0, SELECT_EF)])  # the bridge's only (its RESET is not an APDU)
        # the bridge stops: released at the owner
        bridge.stopService()
        self.clock.advance(0)
        self.pipe.flush()
        self.assertIsNone(self.owner_reader().holder)
        self.direct.dataReceived(b">2:APDU:%s|\n\n" % SELECT_MF.encode())
        self.assertEqual(take(self.dt), ">2:9000\n@@\n")

    def test_heartbeats_keep_the_session_and_a_silent_owner_ends_it(self):
        self.backend.heartbeat, self.backend.heartbeat_timeout = 2.0, 2.0
        session, got = self.hold(idle=60.0)
        card = got.value
        ended = Results(card.ended)
        owner_card = self.owner_reader().holder.card
        for _ in range(5):  # 10 s of heartbeats, each answered: the session stays
            self.clock.advance(2.0)
            self.pipe.flush()
        self.assertIsNone(ended.value)
        self.assertEqual(self.ran, [])  # no card command: a heartbeat is READERS
        self.assertEqual(owner_card.state, "held")
        # the owner goes silent: the next heartbeat is not answered within 2 s
        self.clock.advance(2.0)  # sent, not delivered
        self.clock.advance(2.0)
        self.assertEqual(len(self.logged("did not answer a heartbeat")), 1)
        self.pipe.flush()
        self.assertEqual(ended.value, "upstream lost")
        self.assertIsNone(session.card)
        self.assertIsNone(self.registry.get("Emulated 00").holder)
        self.assertIsNone(self.owner_reader().holder)  # the owner saw the connection go

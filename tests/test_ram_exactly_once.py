"""RAMOverHTTP exactly once and session liveness, in memory (Clock, a
TCP-like transport whose writes wait in Twisted's FileDescriptor buffer
until "the kernel" takes them): a client that reconnects after every POST,
once mid-session, after a lost answer; a client whose card needs longer
than --ram-session-timeout for a script; a client gone mid-script.  Each
test counts how many times the client's card ran each APDU."""

from collections import Counter

from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy import errors
from cloudfoxy_proxy.frontends import ramwire as wire
from cloudfoxy_proxy.frontends.ram import KEEP_ALIVE
from cloudfoxy_proxy.parser import make_command

from test_card_sessions import Results
from test_ram import E8_SEEN, http_post, ram_server, responses
from test_server import Harness

OK = b"\x90\x00"


class _NoLoop:
    """The reactor of KernelTransport: nothing is polled; flush() writes."""

    def addWriter(self, _):
        pass

    removeWriter = addReader = removeReader = addWriter


class KernelTransport(FileDescriptor):
    """A TCP connection's transport: what the proxy writes waits in
    FileDescriptor's buffer (as on a real socket until the reactor's next
    write) until ``flush()`` hands it to "the kernel" (``sent``)."""

    def __init__(self, peer):
        super().__init__(reactor=_NoLoop())
        self.connected = 1
        self.peer = peer
        self.sent = b""

    def writeSomeData(self, data):
        self.sent += bytes(data)
        return len(data)

    def getPeer(self):
        return self.peer

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", 8080)

    def flush(self):
        self.doWrite()


class Client:
    """A RAM client's connections and its card: ``run(script)`` counts the
    APDUs the card ran and answers each 9000 (so every answer is the same
    bytes), a reset with the ATR."""

    def __init__(self, site):
        self.factory = site.core.limits.wrap(site)  # as a listener builds it (limits' wrapper on top)
        self.ports = iter(range(41000, 42000))
        self.ran = Counter()
        self.conn = None
        self.cookie = b"once"

    def connect(self):
        peer = IPv4Address("TCP", "127.0.0.1", next(self.ports))
        proto = self.factory.buildProtocol(peer)
        t = KernelTransport(peer)
        proto.makeConnection(t)
        self.conn = (proto, t)
        return self.conn

    def post(self, body, conn=None):
        proto, _ = conn or self.conn
        proto.dataReceived(http_post(body, cookie=self.cookie))

    def answers(self, conn=None):
        """Flush the proxy's writes to the kernel and read the answers."""
        _, t = conn or self.conn
        t.flush()
        got, t.sent = responses(t.sent), b""
        return got

    def lose(self, conn=None):
        """The connection dies: what the proxy had not handed to the kernel is lost."""
        proto, t = conn or self.conn
        t.connectionLost(Failure(ConnectionLost()))
        proto.connectionLost(Failure(ConnectionLost()))

    def run(self, body):
        steps = wire.decode_script(wire.template(body)[1])
        items = []
        for kind, apdu in steps:
            if kind == wire.APDU:
                self.ran[apdu.hex().upper()] += 1
                items.append((wire.RESPONSE, OK))
            else:
                self.ran["RESET"] += 1
                items.append((wire.RESET, bytes.fromhex("3B8180018080")))
        return wire.encode_answer(items)


class ExactlyOnceTests(SynchronousTestCase):
    def setUp(self):
        self.h = Harness()
        self.clock = self.h.clock
        self.dispatcher, self.backend, self.site = ram_server(self.h, session_timeout=60.0)
        self.client = Client(self.site)
        self.client.connect()
        self.client.post(E8_SEEN)
        self.assertEqual(self.client.answers(), [])  # held: nothing to send yet

    def line(self, *hexes):
        return Results(self.dispatcher.submit("RAM alice", [make_command([str(i), "APDU", h])
                                                            for i, h in enumerate(hexes, 1)]))

    def script(self, answers):
        [(status, _, body)] = answers
        self.assertEqual(status, 200)
        return body

    def drive(self, apdus, reconnect):
        """One line request per APDU; the client answers each script, on a
        new connection when ``reconnect(i)`` (after reading the answer)."""
        c = self.client
        results = []
        for i, apdu in enumerate(apdus):
            got = self.line(apdu)
            answer = c.run(self.script(c.answers()))
            if reconnect(i):
                c.lose()
                c.connect()
            c.post(answer)
            results.append(got.value)
        return results

    APDUS = ["00A4000C023F00", "00D6000001AA", "00B0000001", "00D6000001AA", "0084000008"]

    def test_new_connection_for_every_post(self):
        results = self.drive(self.APDUS, lambda i: True)
        self.assertEqual(results, [[("1", "9000")]] * len(self.APDUS))
        self.assertEqual(self.client.ran, Counter(self.APDUS))  # each once (the UPDATE twice: sent twice)
        self.assertEqual(self.client.answers(), [])  # the last POST is held

    def test_new_connection_once_mid_session(self):
        results = self.drive(self.APDUS, lambda i: i == 1)  # after the UPDATE BINARY
        self.assertEqual(results, [[("1", "9000")]] * len(self.APDUS))
        self.assertEqual(self.client.ran, Counter(self.APDUS))

    def test_same_answer_on_the_same_connection_is_the_next_answer(self):
        results = self.drive(self.APDUS, lambda i: False)
        self.assertEqual(results, [[("1", "9000")]] * len(self.APDUS))
        self.assertEqual(self.client.ran, Counter(self.APDUS))

    def first_then_lost(self):
        """The client answered the first script; the answer to that POST,
        the second script, is still in the proxy when the connection dies."""
        c = self.client
        first = self.line("00A4000C023F00")
        ab = c.run(self.script(c.answers()))
        second = self.line("00D6000001AA")
        c.post(ab)
        self.assertEqual(first.value, [("1", "9000")])
        return ab, second

    def test_answer_lost_before_it_was_written_is_sent_again(self):
        c = self.client
        ab, second = self.first_then_lost()
        c.lose()  # the second script never left the proxy
        c.connect()
        c.post(ab)  # the client re-sends its AB on a new connection
        script = self.script(c.answers())
        self.assertEqual(wire.decode_script(wire.template(script)[1]),
                         [(wire.APDU, bytes.fromhex("00D6000001AA"))])
        self.assertIsNone(second.value)  # the first answer was not taken for the second script
        c.post(c.run(script))
        self.assertEqual(second.value, [("1", "9000")])
        self.assertEqual(c.ran, Counter(["00A4000C023F00", "00D6000001AA"]))

    def test_answer_still_unwritten_on_an_open_connection_is_sent_again(self):
        c = self.client
        ab, second = self.first_then_lost()
        old = c.conn
        new = c.connect()  # the client gave up on the old connection without closing it
        c.post(ab, new)
        script = self.script(c.answers(new))
        self.assertIsNone(second.value)
        c.post(c.run(script), new)
        self.assertEqual(second.value, [("1", "9000")])
        self.assertEqual(c.ran, Counter(["00A4000C023F00", "00D6000001AA"]))
        c.lose(old)

    def test_answer_written_then_connection_lost_is_not_sent_again(self):
        """The kernel took the second script before the connection died: an
        identical AB is the answer to it (the client ran it), never a cause
        to send it again."""
        c = self.client
        ab, second = self.first_then_lost()
        script = self.script(c.answers())  # handed to the kernel, and read
        c.lose()
        c.connect()
        c.post(c.run(script))  # identical to ab: 9000 again
        self.assertEqual(second.value, [("1", "9000")])
        self.assertEqual(c.answers(), [])  # held: nothing more to run
        self.assertEqual(c.ran, Counter(["00A4000C023F00", "00D6000001AA"]))

    def test_held_post_lost_and_sent_again_is_held(self):
        c = self.client
        got = self.line("00A4000C023F00")
        ab = c.run(self.script(c.answers()))
        c.post(ab)
        self.assertEqual(got.value, [("1", "9000")])
        c.lose()  # the POST was held: no answer at all
        c.connect()
        c.post(ab)
        self.assertEqual(c.answers(), [])  # held in its place, not an answer to anything
        nxt = self.line("00D6000001AA")
        c.post(c.run(self.script(c.answers())))
        self.assertEqual(nxt.value, [("1", "9000")])
        self.assertEqual(c.ran, Counter(["00A4000C023F00", "00D6000001AA"]))

    def test_held_post_lost_then_a_command_then_sent_again(self):
        """A command arrives while no POST is held (the held one was lost):
        the re-sent POST gets its script at once."""
        c = self.client
        got = self.line("00A4000C023F00")
        ab = c.run(self.script(c.answers()))
        c.post(ab)
        c.lose()
        nxt = self.line("00D6000001AA")
        c.connect()
        c.post(ab)
        c.post(c.run(self.script(c.answers())))
        self.assertEqual((got.value, nxt.value), ([("1", "9000")], [("1", "9000")]))
        self.assertEqual(c.ran, Counter(["00A4000C023F00", "00D6000001AA"]))

    def test_an_answer_that_cannot_answer_the_script_ends_the_session(self):
        """The previous AB again, on the same connection, while the script
        sent since is a RESET + APDU: it is the next answer, and it does not
        answer that script: the session ends (the card ran the first APDU
        once, and nothing was sent twice)."""
        c = self.client
        first = self.line("00A4000C023F00")
        ab = c.run(self.script(c.answers()))
        second = Results(self.dispatcher.submit("RAM alice", [make_command(["1", "RESET"]),
                                                              make_command(["2", "APDU", "00B0000001"])]))
        c.post(ab)
        self.script(c.answers())  # the client got it, and answers wrongly
        c.post(ab)
        [(status, _, _)] = c.answers()
        self.assertEqual(status, 504)
        self.assertEqual(first.value, [("1", "9000")])
        self.assertEqual([code for _, code in second.value], [errors.UPSTREAM, errors.NO_CARD])
        self.assertIsNone(self.h.registry.get("RAM alice"))
        self.assertEqual(c.ran, Counter(["00A4000C023F00"]))


class LivenessTests(SynchronousTestCase):
    """--ram-session-timeout 2, the dispatcher's command timeout 15 s."""

    def setUp(self):
        self.h = Harness()
        self.clock = self.h.clock
        self.dispatcher, self.backend, self.site = ram_server(self.h, session_timeout=2.0)
        self.client = Client(self.site)
        self.client.connect()
        self.client.post(E8_SEEN)

    def line(self, *hexes):
        return Results(self.dispatcher.submit("RAM alice", [make_command([str(i), "APDU", h])
                                                            for i, h in enumerate(hexes, 1)]))

    def test_a_script_longer_than_the_session_timeout(self):
        c = self.client
        apdus = ["00A4000C023F00"] * 300
        got = self.line(*apdus)
        [(_, _, script)] = c.answers()
        self.clock.advance(14.6)  # the card needs 14.6 s for 300 APDUs
        self.assertIsNotNone(self.h.registry.get("RAM alice"))
        c.post(c.run(script))
        self.assertEqual(got.value, [(str(i), "9000") for i in range(1, 301)])
        self.assertEqual(c.ran, Counter({"00A4000C023F00": 300}))
        self.clock.advance(KEEP_ALIVE - 0.1)  # held POST: the client is there
        self.assertIsNotNone(self.h.registry.get("RAM alice"))

    def test_silence_counts_from_the_empty_script(self):
        c = self.client
        self.clock.advance(KEEP_ALIVE)
        self.assertEqual(c.answers()[0][2], wire.KEEP_ALIVE)
        self.clock.advance(1.9)
        self.assertIsNotNone(self.h.registry.get("RAM alice"))
        self.clock.advance(0.2)
        self.assertIsNone(self.h.registry.get("RAM alice"))

    def test_a_held_post_replaced_by_another_stops_the_clock(self):
        c = self.client
        first = c.conn
        c.connect()
        c.post(wire.encode_answer([]))  # a second POST while the first is held
        self.assertEqual(c.answers(first)[0][2], wire.KEEP_ALIVE)  # the first gets the empty script
        self.assertEqual(c.answers(), [])  # this one is held
        self.clock.advance(KEEP_ALIVE - 0.1)
        self.assertIsNotNone(self.h.registry.get("RAM alice"))

    def test_client_gone_mid_script(self):
        """The dispatcher gives up on the script after its command timeout
        (C086); from then on the client has nothing it could still be
        answering: 2 s later the session ends and a queued command gets C080."""
        c = self.client
        got = self.line("00A4000C023F00")
        c.answers()
        self.clock.advance(14.9)
        self.assertIsNone(got.value)
        self.clock.advance(0.1)
        self.assertEqual(got.value, [("1", errors.UPSTREAM)])
        self.assertIsNotNone(self.h.registry.get("RAM alice"))
        queued = self.line("00B0000001")
        self.clock.advance(2.0)
        self.assertEqual(queued.value, [("1", errors.NO_CARD)])
        self.assertIsNone(self.h.registry.get("RAM alice"))
        self.assertEqual(c.ran, Counter())

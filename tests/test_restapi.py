"""Unit tests of the CloudFoxy-compatible REST front end (``--rest``), in
memory: ``treq.testing.StubTreq`` speaks real HTTP to the resource; the
cards are emulated; a Clock drives card latency and timeouts."""

import base64

from support import memory_core, site_treq
from twisted.internet.defer import Deferred
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from cloudfoxy_proxy import limits
from cloudfoxy_proxy.frontends.base import Listener
from cloudfoxy_proxy.frontends import rest
from cloudfoxy_proxy.interfaces import IBackend, ReaderInfo
from cloudfoxy_proxy.access import Access
from cloudfoxy_proxy.backends.emulated import EmulatedBackend
from cloudfoxy_proxy.cards.iso7816 import Iso7816Card
from cloudfoxy_proxy.dispatch import Dispatcher
from cloudfoxy_proxy.registry import ReaderRegistry

TOKEN = "front-token"
ATR = "3B8B8001466F7879456D753738313677"
BASE = "http://proxy.test"


@implementer(IBackend)
class ManualBackend:
    """Cards whose answers the test gives by hand (``pending``)."""

    description = "manual"

    def __init__(self, infos):
        self.infos = infos
        self.pending = []

    def start(self, registry):
        registry.update(self, self.infos)

    def stop(self):
        pass

    def reset(self, key):
        return bytes.fromhex(ATR)

    def transmit(self, key, apdu):
        d = Deferred(lambda _: self.pending.remove((key, apdu, d)))
        self.pending.append((key, apdu, d))
        return d

    def answer(self, result):
        """Answer the oldest command waiting on a card."""
        self.pending.pop(0)[2].callback(result)


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


class RestApiTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.registry = ReaderRegistry()
        self.emulated = EmulatedBackend(clock=self.clock, cards=[Iso7816Card(serial=i) for i in range(3)])
        self.emulated.start(self.registry)
        self.manual = ManualBackend([
            ReaderInfo("/10.0.0.1@1", "CloudFoxy 10.0.0.1@1", aliases=("/10.0.0.1@1", "Foxy NET 10.0.0.1-1"),
                       atr=bytes.fromhex(ATR)),
            ReaderInfo("/10.0.0.1@2", "CloudFoxy 10.0.0.1@2", aliases=("/10.0.0.1@2", "shared alias")),
            ReaderInfo("/10.0.0.1@3", "CloudFoxy 10.0.0.1@3", aliases=("shared alias",), present=False),
        ])
        self.manual.start(self.registry)
        self.serve(Access(simple=[(TOKEN, "rest")]))

    def serve(self, access):
        """The REST front end on the HTTP base over this dispatcher's cards."""
        self.dispatcher = Dispatcher(self.registry, self.clock, command_timeout=5.0, access=access)
        self.resource = rest.RestResource(self.dispatcher, self.registry, self.clock)
        self.site = rest.RestSite(self.resource, memory_core(self.dispatcher, self.clock))
        self.http = site_treq(self.site)

    def get(self, path, token=TOKEN, **params):
        headers = {"X-Auth-Token": token} if token is not None else {}
        return self.http.get(BASE + path, params=params or None, headers=headers)

    def answer(self, d):
        """(status, body text) of a finished request."""
        self.http.flush()
        response = result_of(d)
        body = result_of(response.text("utf-8"))
        return response.code, body

    def basic(self, **params):
        return self.answer(self.get("/api/v1/basic", **params))

    def test_hello(self):
        code, body = self.answer(self.get("/api/v1/hello"))
        lines = body.splitlines()
        self.assertEqual(code, 200)
        self.assertEqual(len(lines), 3)
        self.assertEqual(int(lines[1].split()[1]), 0)  # the uptime, in line 2's second token
        self.clock.advance(42)
        self.assertEqual(self.answer(self.get("/api/v1/hello"))[1].splitlines()[1], "Uptime: 42 s")

    def test_inventory_lists_present_cards(self):
        code, body = self.answer(self.get("/api/v1/inventory"))
        self.assertEqual(code, 200)
        self.assertEqual(body, f"/Emulated_00 {ATR}\n/Emulated_01 {ATR}\n/Emulated_02 {ATR}\n"
                               f"/CloudFoxy_10.0.0.1@1 {ATR}\n/CloudFoxy_10.0.0.1@2\n")
        names = ["Emulated 00", "Emulated 01", "Emulated 02", "CloudFoxy 10.0.0.1@1",
                 "CloudFoxy 10.0.0.1@2"]
        for line, name in zip(body.splitlines(), names):  # clients split on white space
            self.assertEqual(self.resource.terminal(line.split()[0])[0].name, name)

    def test_uptime_restarts_when_the_inventory_changes(self):
        self.clock.advance(100)
        self.emulated.remove(1)
        self.registry.update(self.manual, self.manual.infos)  # no change: no restart
        self.clock.advance(7)
        self.assertEqual(self.answer(self.get("/api/v1/hello"))[1].splitlines()[1], "Uptime: 7 s")
        self.assertNotIn("/Emulated 01", self.answer(self.get("/api/v1/inventory"))[1])

    def test_token_is_required(self):
        with capturedLogs() as events:
            for token in (None, "bad-guess", TOKEN + "x", ""):
                d = self.get("/api/v1/hello", token=token)
                self.clock.advance(5)  # guesses after the third are answered later (access.Throttle)
                code, body = self.answer(d)
                self.assertEqual(code, 401, token)
                self.assertIn("X-Auth-Token", body)
                d = self.get("/api/v1/basic", token=token, terminal="/Emulated 00", apdu="00A4000C023F00")
                self.clock.advance(5)
                self.assertEqual(self.answer(d)[0], 401)
        text = " ".join(formatEvent(e) for e in events)
        self.assertIn("refused", text)
        self.assertNotIn("bad-guess", text)  # never log what was sent
        self.assertEqual(self.emulated.cards[0].transmit(bytes.fromhex("00A4000C023F00")), b"\x90\x00")

    def test_repeated_apdus_run_as_one_turn(self):
        """Several apdu= run back to back on the card, one answer line each
        (a reset first when reset=1); an error anywhere is the request's error."""
        code, body = self.basic(terminal="/Emulated_01", reset="1",
                                apdu=["00A4000C023F00", "00EE0000", "0084000008"])
        lines = body.splitlines()
        self.assertEqual((code, len(lines), lines[0], lines[1]), (200, 3, "9000", "6D00"))
        self.assertRegex(lines[2], "^[0-9A-F]{16}9000$")
        self.assertEqual(self.basic(terminal="/Emulated_01", apdu=["00A4000C023F00", "zz"])[0], 400)
        self.emulated.remove(1)
        self.assertEqual(self.basic(terminal="/Emulated_01", apdu=["00A4000C023F00"] * 2)[0], 503)

    def test_apdu_reset_and_both(self):
        self.assertEqual(self.basic(terminal="/Emulated 01", reset="1"), (200, ATR + "\n"))
        self.assertEqual(self.basic(terminal="/Emulated 01", reset="0", apdu="00A4000C023F00"), (200, "9000\n"))
        code, body = self.basic(terminal="/Emulated 01", apdu="00 84 00 00 08")
        self.assertEqual((code, len(body), body[-5:]), (200, 21, "9000\n"))
        self.assertEqual(self.basic(terminal="/Emulated 02", reset="1", apdu="00A4000C023F00"), (200, "9000\n"))

    def test_terminal_names(self):
        for terminal in ("/Emulated_02", "Emulated_02", "/Emulated 02", "Emulated 02",
                         base64.b64encode(b"Emulated 02").decode()):
            self.assertEqual(self.basic(terminal=terminal, reset="1"), (200, ATR + "\n"), terminal)
        for terminal in ("/10.0.0.1@1", "Foxy NET 10.0.0.1-1", "/CloudFoxy 10.0.0.1@1"):
            self.assertEqual(self.basic(terminal=terminal, reset="1"), (200, ATR + "\n"), terminal)

    def test_certificate_alias_is_a_terminal_name(self):
        self.registry.set_extra_aliases(self.registry.get("Emulated 01"), ("Emulated PIV 01 Signing",))
        self.assertEqual(self.basic(terminal="Emulated PIV 01 Signing", reset="1"), (200, ATR + "\n"))
        self.assertEqual(self.basic(terminal="Emulated PIV 01", reset="1")[0], 404)  # a part: no

    def test_unknown_and_ambiguous_terminals(self):
        for terminal in ("/Nope", "Emulated", "Emulated 0", "/emulated 00", ".*", "(.*){18}Z", "Emulated 0[0-2]"):
            code, body = self.basic(terminal=terminal, apdu="00A4000C023F00")
            self.assertEqual(code, 404, terminal)
            self.assertEqual(body, f"C083 terminal not found: {terminal}\n")
        code, body = self.basic(terminal="shared alias", apdu="00A4000C023F00")
        self.assertEqual((code, body[:4]), (400, "C082"))

    def test_bad_parameters_are_400_with_a_reason(self):
        cases = [
            ({}, "terminal= is missing"),
            ({"terminal": "/Emulated 00"}, "give apdu=HEX, reset=1, or both"),
            ({"terminal": "/Emulated 00", "reset": "2"}, "reset='2' must be 0 or 1"),
            ({"terminal": "/Emulated 00", "apdu": "zz"}, "apdu= is not a command APDU"),
            ({"terminal": "/Emulated 00", "apdu": "00A4"}, "apdu= is not a command APDU"),
            ({"terminal": ["/Emulated 00", "/Emulated 01"], "reset": "1"}, "terminal= given more than once"),
        ]
        for params, reason in cases:
            code, body = self.basic(**params)
            self.assertEqual(code, 400, params)
            self.assertIn(reason, body)
            self.assertTrue(body.startswith("bad request: "))

    def test_wrong_method_and_path(self):
        self.http.flush()
        d = self.http.post(BASE + "/api/v1/basic", headers={"X-Auth-Token": TOKEN}, data=b"x")
        self.assertEqual(self.answer(d)[0], 405)
        self.assertEqual(self.answer(self.get("/api/v2/basic"))[0], 404)

    def test_card_errors_map_to_statuses(self):
        self.emulated.remove(0)
        self.assertEqual(self.basic(terminal="/Emulated 00", apdu="00A4000C023F00"),
                         (503, "C080 no card in the reader\n"))
        # an unknown INS is a card answer, not an error
        self.assertEqual(self.basic(terminal="/Emulated 01", apdu="00EE0000"), (200, "6D00\n"))

    def test_slow_card_does_not_block_others_and_times_out(self):
        slow = self.get("/api/v1/basic", terminal="/10.0.0.1@1", apdu="00A4000C023F00")
        self.http.flush()
        self.assertNoResult(slow)
        self.assertEqual(len(self.manual.pending), 1)
        self.assertEqual(self.basic(terminal="/Emulated 01", apdu="00A4000C023F00"), (200, "9000\n"))
        with capturedLogs():
            self.clock.advance(5.0)  # the command timeout
        self.assertEqual(self.answer(slow), (502, "C086 upstream error or timeout\n"))
        self.assertEqual(self.manual.pending, [])

    def test_same_card_requests_run_in_order(self):
        first = self.get("/api/v1/basic", terminal="/10.0.0.1@2", apdu="00A4000C023F00")
        second = self.get("/api/v1/basic", terminal="/10.0.0.1@2", apdu="00B0000000")
        self.http.flush()
        self.assertEqual([p[1].hex() for p in self.manual.pending], ["00a4000c023f00"])  # one at a time
        self.manual.answer(b"\x90\x00")
        self.http.flush()
        self.assertEqual([p[1].hex() for p in self.manual.pending], ["00b0000000"])
        self.manual.answer(b"\x6a\x82")
        self.assertEqual(self.answer(first), (200, "9000\n"))
        self.assertEqual(self.answer(second), (200, "6A82\n"))

    def test_client_gone_leaves_the_queue(self):
        queue = self.registry.resolve("CloudFoxy 10.0.0.1@2").queue
        queue.max_queue = 1
        first = self.get("/api/v1/basic", terminal="/10.0.0.1@2", apdu="00A4000C023F00")
        self.http.flush()
        for _ in range(3):  # clients that queue and hang up, one after the other
            gone = self.get("/api/v1/basic", terminal="/10.0.0.1@2", apdu="00B0000000")
            self.http.flush()
            self.assertEqual(len(queue), 1)
            gone.cancel()
            gone.addErrback(lambda _: None)
            self.http.flush()
            self.assertEqual(len(queue), 0)  # left the queue at once
        live = self.get("/api/v1/basic", terminal="/10.0.0.1@2", apdu="00B0000001")
        self.http.flush()
        self.assertNoResult(live)  # queued, not refused with C086
        self.manual.answer(b"\x90\x00")
        self.http.flush()
        self.assertEqual([p[1].hex() for p in self.manual.pending], ["00b0000001"])  # gone ones never ran
        self.manual.answer(b"\x61\x00")
        self.assertEqual(self.answer(first), (200, "9000\n"))
        self.assertEqual(self.answer(live), (200, "6100\n"))

    def test_client_password_does_not_apply_to_rest(self):
        """The line protocol's client password (--client-password-file: a
        secret of front end ``line``) is no X-Auth-Token; the REST token is."""
        self.serve(Access(simple=[("line-password", "line"), (TOKEN, "rest")]))  # as tap.py builds it
        select = {"terminal": "/Emulated 00", "apdu": "00A4000C023F00"}
        code, body = self.answer(self.get("/api/v1/basic", token="line-password", **select))
        self.assertEqual((code, body.startswith("C085 unauthorized")), (401, True))
        self.assertEqual(self.basic(**select), (200, "9000\n"))


class EarlyRefusalTests(SynchronousTestCase):
    """The real HTTP channel judges a request by its headers, before any
    body is read: nothing a client without the token sends is stored."""

    def setUp(self):
        RestApiTests.setUp(self)

    serve = RestApiTests.serve

    def connect(self):
        peer = IPv4Address("TCP", "10.0.0.9", 5555)
        channel = self.site.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        channel.makeConnection(transport)
        return channel, transport

    def test_huge_body_is_refused_after_the_headers(self):
        """Without the token: 401; with it: 413 (the API is GET-only).
        Either way no body byte is read or stored."""
        for token, status in ((b"", b"401"), (b"X-Auth-Token: " + TOKEN.encode() + b"\r\n", b"413")):
            channel, t = self.connect()
            with capturedLogs() as events:
                channel.dataReceived(b"GET /api/v1/hello HTTP/1.1\r\nHost: x\r\n" + token +
                                     b"Content-Length: 314572800\r\nExpect: 100-continue\r\n\r\n")
            answer = t.value()
            self.assertTrue(answer.startswith(b"HTTP/1.1 " + status + b" "), answer)
            self.assertNotIn(b"100 Continue", answer)
            self.assertTrue(t.disconnecting)
            self.assertIsNone(channel.requests[-1].content)  # no body buffer, no temporary file
            channel.dataReceived(b"a" * (1 << 20))
            self.assertEqual(t.value(), answer)  # the body goes nowhere
            self.assertIn(f"rest request from 10.0.0.9:5555 refused ({status.decode()})",
                          " ".join(formatEvent(e) for e in events))
        self.assertEqual(self.site.buffers.used, 0)

    def test_no_token_is_401_before_the_body(self):
        for token in (b"", b"X-Auth-Token: wrong\r\n"):
            channel, t = self.connect()
            channel.dataReceived(b"GET /api/v1/basic?terminal=/Emulated%2000&apdu=00A4000C023F00 HTTP/1.1\r\n"
                                 b"Host: x\r\n" + token + b"\r\n")
            head, _, body = t.value().partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 401 Unauthorized"), head)
            self.assertIn(b"www-authenticate: x-auth-token", head.lower())
            self.assertEqual(body, b"C085 unauthorized: send your secret as the X-Auth-Token header\n")
            self.assertTrue(t.disconnecting)
        self.assertEqual(self.emulated.cards[0].transmit(bytes.fromhex("00A4000C023F00")), b"\x90\x00")

    def test_chunked_body_with_token_is_411(self):
        channel, t = self.connect()
        channel.dataReceived(b"GET /api/v1/hello HTTP/1.1\r\nHost: x\r\nX-Auth-Token: " + TOKEN.encode()
                             + b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        self.assertTrue(t.value().startswith(b"HTTP/1.1 411 "))
        self.assertTrue(t.disconnecting)

    def test_request_heads_share_the_buffered_bytes_budget(self):
        self.site = rest.RestSite(self.resource, memory_core(self.dispatcher, self.clock,
                                                             buffered_bytes=100_000))
        big, tb = self.connect()
        big.dataReceived(b"GET /api/v1/basic?terminal=/Emulated%2000&apdu=" + b"0" * 90_000)
        self.assertEqual(self.site.buffers.used, len(b"GET /api/v1/basic?terminal=/Emulated%2000&apdu=") + 90_000 - 4096)
        other, to = self.connect()
        with capturedLogs() as events:
            other.dataReceived(b"GET /api/v1/basic?terminal=/Emulated%2000&apdu=" + b"0" * 20_000)
        self.assertTrue(to.value().startswith(b"HTTP/1.1 431 Request Header Fields Too Large"), to.value())
        self.assertTrue(to.disconnecting)
        self.assertIn("rest request from 10.0.0.9:5555 refused", formatEvent(events[0]))
        small, ts = self.connect()  # short requests are still served
        small.dataReceived(b"GET /api/v1/hello HTTP/1.1\r\nHost: x\r\nX-Auth-Token: " + TOKEN.encode() + b"\r\n\r\n")
        self.assertTrue(ts.value().startswith(b"HTTP/1.1 200 OK"))
        big.dataReceived(b"00 HTTP/1.1\r\nHost: x\r\nX-Auth-Token: " + TOKEN.encode() + b"\r\n\r\n")
        self.assertTrue(tb.value().endswith(b"\r\n\r\n6700\n"), tb.value())  # the card saw the whole APDU
        self.assertEqual(self.site.buffers.used, 0)
        other.connectionLost(None)
        self.assertEqual(self.site.buffers.used, 0)

    def test_good_request_is_served_and_the_connection_kept(self):
        channel, t = self.connect()
        channel.dataReceived(b"GET /api/v1/basic?terminal=/Emulated%2000&apdu=00A4000C023F00 HTTP/1.1\r\n"
                             b"Host: x\r\nContent-Length: 0\r\nX-Auth-Token: " + TOKEN.encode() + b"\r\n\r\n")
        self.assertTrue(t.value().startswith(b"HTTP/1.1 200 OK"))
        self.assertTrue(t.value().endswith(b"\r\n\r\n9000\n"))
        self.assertFalse(t.disconnecting)


class ServiceTests(SynchronousTestCase):
    def test_settings_come_from_the_options(self):
        self.assertEqual(rest.REST.settings({"rest": "tcp:0"}), [rest.RestSettings(endpoint="tcp:0")])
        self.assertEqual(rest.REST.settings({"rest": None}), [])

    def test_make_rest_service(self):
        reactor = MemoryReactorClock()
        registry = ReaderRegistry()
        core = memory_core(Dispatcher(registry, reactor), reactor)
        service = rest.REST.make_service(rest.RestSettings(endpoint="tcp:0:interface=127.0.0.1"), core)
        self.assertIsInstance(service, Listener)  # a busy port is one line, like -p
        self.assertIsInstance(service.factory, limits.GuardedFactory)  # counted with the other front ends
        self.assertIs(service.factory.limits, core.limits)
        site = service.factory.wrappedFactory
        self.assertIsInstance(site, rest.RestSite)
        self.assertIsNone(site.timeOut)  # idle connections: limits.py's job
        self.assertIs(site.buffers, core.limits.buffers)
        self.assertIs(core.stats["rest"], site.counters)  # counted for --metrics
        self.assertEqual(service.factory.logPrefix(), "Site")  # tests find the port by "Site starting on N"
        service.startService()
        self.assertEqual(reactor.tcpServers[0][0], 0)
        self.assertEqual(reactor.tcpServers[0][3], "127.0.0.1")
        service.stopService()

    def test_an_empty_token_is_refused(self):
        self.assertRaises(ValueError, Access, simple=[("", "rest")])

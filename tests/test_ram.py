"""RAMOverHTTP in memory: the TLV codec against the byte sequences of
docs/ramoverhttp.md, the server (RamBackend + RamSite on the HTTP base over
StringTransport, Clock) and the client (RamClient against the server's
RamSite through support.site_treq).  Re-sends and session liveness:
test_ram_exactly_once.py."""

import re

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from cloudfoxy_proxy import errors
from cloudfoxy_proxy.access import Access
from cloudfoxy_proxy.interfaces import IBackend
from cloudfoxy_proxy.apdu import parse_tlvs, tlv
from cloudfoxy_proxy.dispatch import Dispatcher, Session
from cloudfoxy_proxy.errors import CardError
from cloudfoxy_proxy.frontends import ramwire as wire
from cloudfoxy_proxy.frontends.ram import KEEP_ALIVE, RamBackend, RamResource, RamSite
from cloudfoxy_proxy.frontends.ramclient import (
    FAILED, FAILED_PNG, PASSED, PASSED_PNG, RamClient, approved, split_session,
)
from cloudfoxy_proxy.parser import make_command
from cloudfoxy_proxy.secrets import read_named_secrets

from support import memory_core, site_treq
from test_card_sessions import Results
from test_server import Harness

#: --ram-token-file's lines (NAME SECRET) as tap.Options._access builds them:
#: secrets of front end ``ram`` whose identities are named after the NAMEs.
RAM_TOKENS = [("alicesecret", "ram", "alice"), ("bobsecret", "ram", "bob")]


def ram_server(harness, tokens=RAM_TOKENS, **backend_kw):
    """(dispatcher, backend, site): a RamBackend serving ``harness``'s
    registry and its RamSite on the HTTP base, over a dispatcher whose
    access holds ``tokens``; card commands go through that dispatcher."""
    dispatcher = Dispatcher(harness.registry, harness.clock, 15.0, access=Access(simple=tokens))
    backend = RamBackend(harness.clock, **backend_kw)
    backend.start(harness.registry)
    site = RamSite(RamResource(backend), memory_core(dispatcher, harness.clock))
    return dispatcher, backend, site

#: The first POST seen on the wire (docs/ramoverhttp.md).
E8_SEEN = bytes.fromhex("E80DC00B3B951381018073FF01000B")
ATR_SEEN = bytes.fromhex("3B951381018073FF01000B")
SELECT_MF = bytes.fromhex("00A4000C023F00")


class CodecTests(SynchronousTestCase):
    def test_first_post_seen_on_the_wire(self):
        tag, items = wire.template(E8_SEEN)
        self.assertEqual(tag, wire.INITIATE)
        self.assertEqual(items, [(0xC0, ATR_SEEN)])
        self.assertEqual(wire.initiation_atr(items), ATR_SEEN)
        self.assertEqual(wire.encode_initiation(ATR_SEEN), E8_SEEN)

    def test_keep_alive_is_the_empty_script(self):
        self.assertEqual(wire.KEEP_ALIVE, b"\xAA\x00")
        self.assertEqual(wire.template(b"\xAA\x00"), (wire.SCRIPT, []))
        self.assertEqual(wire.encode_script([]), b"\xAA\x00")

    def test_22_and_23_are_primitive(self):
        # 22's value looks like a TLV (tag 00, length A4 ...): it stays raw bytes
        script = wire.encode_script([(wire.APDU, SELECT_MF), (wire.RESET, None)])
        self.assertEqual(script.hex().upper(), "AA0B2207" + "00A4000C023F00" + "C000")
        self.assertEqual(wire.decode_script(wire.template(script)[1]),
                         [(wire.APDU, SELECT_MF), (wire.RESET, None)])
        answer = wire.encode_answer([(wire.RESPONSE, b"\x90\x00"), (wire.RESET, ATR_SEEN)])
        self.assertEqual(answer.hex().upper(), "AB" "14" "23029000" "C00B" + ATR_SEEN.hex().upper() + "800102")

    def test_length_forms_81_and_82(self):
        self.assertEqual(tlv(0x22, bytes(0x7F))[:2], b"\x22\x7F")
        self.assertEqual(tlv(0x22, bytes(0x80))[:3], b"\x22\x81\x80")
        self.assertEqual(tlv(0x22, bytes(0xFF))[:3], b"\x22\x81\xFF")
        self.assertEqual(tlv(0x22, bytes(0x100))[:4], b"\x22\x82\x01\x00")
        self.assertEqual(wire.encode(0xAB, bytes(0xFFFF))[:4], b"\xAB\x82\xFF\xFF")
        with self.assertRaises(ValueError):
            wire.encode(0xAB, bytes(0x10000))
        # 300 APDUs: AA 82 0A 8C, each 22 07 <SELECT MF>
        script = wire.encode_script([(wire.APDU, SELECT_MF)] * 300)
        self.assertEqual(script[:4], b"\xAA\x82\x0A\x8C")
        self.assertEqual(len(wire.decode_script(wire.template(script)[1])), 300)
        answer = wire.encode_answer([(wire.RESPONSE, b"\x90\x00")] * 300)
        self.assertEqual(answer[-4:], b"\x80\x02\x01\x2C")  # the count, 300

    def test_only_82_lengths_and_one_byte_tags(self):
        with self.assertRaises(ValueError):
            wire.parse(b"\xAB\x83\x00\x00\x01\x00")
        # 1F would start a two-byte tag in BER; here it is one byte
        self.assertEqual(wire.parse(b"\x1F\x01\x00"), [(0x1F, b"\x00")])
        self.assertEqual(parse_tlvs(b"\x5F\x20\x01\x41"), [(0x5F20, b"A")])  # the generic codec
        for bad in (b"", b"\xAB", b"\xAB\x05\x23", b"\xAA\x00\xAA\x00", b"\x61\x00"):
            with self.assertRaises(ValueError):
                wire.template(bad)

    def test_answer_items_and_unreliable_count(self):
        body = bytes.fromhex("AB0F" "23029000" "E106" "0C0463617264" "800101")
        self.assertEqual(wire.decode_answer(wire.template(body)[1]),
                         [(wire.RESPONSE, b"\x90\x00"), (wire.FAILURE, "card")])

    def test_notify_and_unknown_tags(self):
        steps = wire.decode_script(wire.template(bytes.fromhex("AA0BE009020101" "0C0468656C6F"))[1])
        self.assertEqual(steps, [(wire.MESSAGE, (1, "helo"))])
        with self.assertRaises(ValueError):
            wire.decode_script(wire.template(bytes.fromhex("AA02E100"))[1])


def http_post(body, path=b"/rt/alicesecret", cookie=None, extra=b""):
    head = b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: " + wire.REQUEST_TYPE + b"\r\n"
    if cookie:
        head += b"Cookie: JSESSIONID=" + cookie + b"\r\n"
    return head + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


def responses(data):
    """[(status, headers dict, body)] of HTTP/1.1 answers (Content-Length framed)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers.setdefault(k.strip().lower(), []).append(v.strip())
        n = int(headers[b"content-length"][0])
        out.append((status, headers, rest[:n]))
        data = rest[n:]
    return out


class Connection:
    def __init__(self, site, port, host="127.0.0.1"):
        self.proto = site.buildProtocol(IPv4Address("TCP", host, port))
        self.t = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        self.proto.makeConnection(self.t)

    def post(self, body, **kw):
        self.proto.dataReceived(http_post(body, **kw))

    def take(self):
        got = responses(self.t.value())
        self.t.clear()
        return got

    def close(self):
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        self.proto.connectionLost(Failure(ConnectionLost()))


class ServerTests(SynchronousTestCase):
    def setUp(self):
        self.h = Harness()
        self.clock = self.h.clock
        self.dispatcher, self.backend, self.site = ram_server(self.h, max_sessions=2, session_timeout=60.0)
        self.ports = iter(range(40000, 41000))

    def connect(self, host="127.0.0.1"):
        return Connection(self.site, next(self.ports), host)

    def begin(self, cookie=None):
        c = self.connect()
        c.post(E8_SEEN, cookie=cookie.encode() if cookie else None)
        return c

    def apdu(self, reader="RAM alice", *hexes):
        return Results(self.dispatcher.submit(reader, [make_command([str(i), "APDU", h])
                                                       for i, h in enumerate(hexes or ["00A4000C023F00"], 1)]))

    def test_backend_provides_interface(self):
        verifyObject(IBackend, self.backend)

    def test_wrong_secret_is_404_and_nothing_else(self):
        c = self.connect()
        c.proto.dataReceived(b"POST /rt/wrong HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        [(status, headers, _)] = c.take()
        self.assertEqual(status, 404)
        self.assertNotIn(b"set-cookie", headers)
        self.assertEqual(self.backend.sessions, {})
        self.assertTrue(c.t.disconnecting)  # the body was never read
        self.assertEqual(self.site.counters.auth_failures, 1)

    def test_wrong_secret_is_counted_once_and_logged_without_it(self):
        c = self.connect()
        with capturedLogs() as events:
            c.post(E8_SEEN, path=b"/rt/wrong42")
        [(status, headers, _)] = c.take()
        self.assertEqual(status, 404)
        self.assertNotIn(b"set-cookie", headers)
        self.assertTrue(c.t.disconnecting)
        self.assertEqual(self.backend.sessions, {})
        self.assertEqual(self.site.counters.auth_failures, 1)  # one failure, counted once
        text = "\n".join(formatEvent(e) for e in events)
        # logged by the dispatcher (Dispatcher.identify) and by the HTTP base
        self.assertIn("client 127.0.0.1:40000: authentication failed on ram", text)
        self.assertIn("ram request from 127.0.0.1:40000 refused (404)", text)
        self.assertNotIn("wrong42", text)  # never log what was sent

    def test_wrong_secrets_are_throttled(self):
        """Wrong secrets are guesses (access.Throttle): after the free ones,
        the 404 is answered later; a right secret is still served."""
        answered = []
        for _ in range(4):
            c = self.connect()
            c.proto.dataReceived(http_post(E8_SEEN, path=b"/rt/guess"))
            answered.append(c)
        self.assertEqual([c.take()[0][0] for c in answered[:3]], [404, 404, 404])
        self.assertEqual(answered[3].take(), [])  # the fourth guess waits
        self.clock.advance(0.25)
        [(status, headers, _)] = answered[3].take()
        self.assertEqual(status, 404)
        self.assertNotIn(b"set-cookie", headers)
        self.assertEqual(self.site.counters.auth_failures, 4)
        self.assertEqual(self.backend.sessions, {})
        self.begin("after")
        self.assertIsNotNone(self.h.registry.get("RAM alice"))

    def test_remote_clients_are_served_with_their_secret(self):
        """RAM users are remote: a secret is what lets them in, from any
        address (not protected mode's loopback rule)."""
        c = self.connect(host="10.0.0.9")
        c.post(E8_SEEN, cookie=b"remote")
        self.assertEqual(c.take(), [])  # held: the session began
        self.assertEqual(self.h.registry.get("RAM alice").info.atr, ATR_SEEN)
        c = self.connect(host="10.0.0.9")
        c.post(E8_SEEN, path=b"/rt/nope")
        self.assertEqual(c.take()[0][0], 404)

    def test_a_secret_of_another_front_end_is_404(self):
        """The REST token (a secret of front end ``rest``) opens no RAM
        session: the RAM secrets are those of front end ``ram``."""
        h = Harness()
        _, backend, site = ram_server(h, tokens=RAM_TOKENS + [("resttoken", "rest")])
        c = Connection(site, 40000)
        c.post(E8_SEEN, path=b"/rt/resttoken")
        self.assertEqual(c.take()[0][0], 404)
        self.assertEqual(backend.sessions, {})
        self.assertIsNone(h.registry.get("RAM resttoken"))

    def test_body_over_a_template_and_chunked_are_refused_before_the_body(self):
        c = self.connect()
        c.proto.dataReceived(b"POST /rt/alicesecret HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n")
        self.assertEqual(c.take()[0][0], 413)
        c = self.connect()
        c.proto.dataReceived(b"POST /rt/alicesecret HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertEqual(c.take()[0][0], 411)
        c = self.connect()
        c.proto.dataReceived(b"GET /rt/alicesecret HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(c.take()[0][0], 405)
        c = self.connect()
        c.proto.dataReceived(b"POST /rt/alicesecret HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(c.take()[0][0], 411)  # no Content-Length (docs/ramoverhttp.md)

    def test_session_is_a_reader_with_the_e8_atr_and_keep_alive(self):
        c = self.begin()
        self.assertEqual(c.take(), [])  # held: nothing to send
        reader = self.h.registry.get("RAM alice")
        self.assertEqual(reader.info.atr, ATR_SEEN)
        self.clock.advance(KEEP_ALIVE - 0.1)
        self.assertEqual(c.take(), [])
        self.clock.advance(0.1)
        [(status, headers, body)] = c.take()
        self.assertEqual((status, body), (200, b"\xAA\x00"))
        self.assertEqual(headers[b"content-length"], [b"2"])
        self.assertTrue(headers[b"set-cookie"][0].startswith(b"JSESSIONID="))
        self.assertLess(KEEP_ALIVE, 30)

    def sid(self, headers):
        return re.match(rb"JSESSIONID=([^;]+)", headers[b"set-cookie"][0]).group(1)

    def test_commands_go_as_one_script_and_answers_map_back(self):
        c = self.begin("web1")
        got = self.apdu("RAM alice", "00A4000C023F00", "0084000008")
        [(status, headers, body)] = c.take()
        self.assertEqual(self.sid(headers), b"web1")  # the client's JSESSIONID is kept
        self.assertEqual(body, wire.encode_script([(wire.APDU, SELECT_MF),
                                                   (wire.APDU, bytes.fromhex("0084000008"))]))
        self.assertIsNone(got.value)
        c.post(wire.encode_answer([(wire.RESPONSE, b"\x90\x00"),
                                   (wire.RESPONSE, bytes.fromhex("01020304050607089000"))]), cookie=b"web1")
        self.assertEqual(got.value, [("1", "9000"), ("2", "01020304050607089000")])
        self.assertEqual(c.take(), [])  # held again

    def test_reset_and_300_apdus_in_one_request(self):
        c = self.begin("s300")
        commands = [make_command(["0", "RESET"])] + [
            make_command([str(i), "APDU", "00A4000C023F00"]) for i in range(1, 301)]
        got = Results(self.dispatcher.submit("RAM alice", commands))
        [(_, _, body)] = c.take()
        self.assertEqual(body[:2], b"\xAA\x82")
        steps = wire.decode_script(wire.template(body)[1])
        self.assertEqual(steps, [(wire.RESET, None)] + [(wire.APDU, SELECT_MF)] * 300)
        new_atr = bytes.fromhex("3B8180018080")
        c.post(wire.encode_answer([(wire.RESET, new_atr)] + [(wire.RESPONSE, b"\x90\x00")] * 300),
               cookie=b"s300")
        self.assertEqual(got.value, [("0", new_atr.hex().upper())] + [(str(i), "9000") for i in range(1, 301)])
        self.assertEqual(self.h.registry.get("RAM alice").info.atr, new_atr)

    def test_clients_on_new_connections_each_time_are_not_stuck_on_keep_alives(self):
        c = self.begin("fresh")
        self.clock.advance(KEEP_ALIVE)
        self.assertEqual(c.take()[0][2], wire.KEEP_ALIVE)
        empty = wire.encode_answer([])
        for _ in range(2):  # every POST on a new connection, every body the same
            c = self.connect()
            c.post(empty, cookie=b"fresh")
            self.clock.advance(KEEP_ALIVE)
            self.assertEqual(c.take()[0][2], wire.KEEP_ALIVE)
        c = self.connect()
        c.post(empty, cookie=b"fresh")
        self.assertEqual(c.take(), [])  # held, not answered at once
        got = self.apdu()
        [(_, _, script)] = c.take()
        self.assertEqual(wire.decode_script(wire.template(script)[1]), [(wire.APDU, SELECT_MF)])
        c2 = self.connect()
        c2.post(wire.encode_answer([(wire.RESPONSE, b"\x90\x00")]), cookie=b"fresh")
        self.assertEqual(got.value, [("1", "9000")])

    def test_same_answer_on_the_same_connection_is_a_new_answer(self):
        c = self.begin("same")
        first = self.apdu()
        c.take()
        ab = wire.encode_answer([(wire.RESPONSE, b"\x90\x00")])
        c.post(ab, cookie=b"same")
        second = self.apdu()
        c.take()
        c.post(ab, cookie=b"same")
        self.assertEqual((first.value, second.value), ([("1", "9000")], [("1", "9000")]))

    def test_e1_ends_the_session_in_flight_and_queued_get_c080(self):
        c = self.begin("e1")
        other = Session("other")
        inflight = self.apdu()
        queued = Results(self.dispatcher.submit("RAM alice", [make_command(["1", "APDU", "00A4000C023F00"])],
                                                session=other))
        c.take()
        c.post(wire.encode_answer([(wire.FAILURE, "card removed")]), cookie=b"e1")
        [(status, _, body)] = c.take()
        self.assertEqual((status, body), (504, b""))
        self.assertEqual(inflight.value, [("1", errors.NO_CARD)])
        self.assertEqual(queued.value, [("1", errors.NO_CARD)])
        self.assertIsNone(self.h.registry.get("RAM alice"))
        c.post(wire.encode_answer([]), cookie=b"e1")
        self.assertEqual(c.take()[0][0], 504)  # the session is gone

    def test_held_post_whose_connection_dies_starts_the_timeout(self):
        c = self.begin("gone")
        c.close()
        self.clock.advance(61)
        self.assertIsNone(self.h.registry.get("RAM alice"))
        self.assertEqual(self.apdu().value, [("1", errors.NOT_FOUND)])

    def test_a_session_id_of_another_user_is_refused(self):
        self.begin("mine")
        c = self.connect()
        c.post(E8_SEEN, path=b"/rt/bobsecret", cookie=b"mine")
        self.assertEqual(c.take()[0][0], 400)
        self.assertIsNotNone(self.h.registry.get("RAM alice"))
        self.assertIsNone(self.h.registry.get("RAM bob"))

    def test_max_sessions_and_stop_answer_204(self):
        a, b = self.begin("one"), self.begin("two")
        self.assertEqual(self.h.registry.get("RAM alice (2)").info.atr, ATR_SEEN)
        c = self.begin("three")
        self.assertEqual(c.take()[0][0], 204)
        self.backend.shutdown()
        self.assertEqual([a.take()[0][0], b.take()[0][0]], [204, 204])
        self.assertEqual(self.backend.sessions, {})
        self.assertEqual(self.begin("four").take()[0][0], 204)

    def test_done_after_answers_204(self):
        self.backend.done_after = 5.0
        c = self.begin("done")
        got = self.apdu()
        c.take()
        c.post(wire.encode_answer([(wire.RESPONSE, b"\x90\x00")]), cookie=b"done")
        self.assertEqual(got.value, [("1", "9000")])
        self.clock.advance(5)
        self.assertEqual(c.take()[0][0], 204)
        self.assertIsNone(self.h.registry.get("RAM alice"))

    def test_command_timeout_discards_the_late_answer(self):
        c = self.begin("late")
        got = self.apdu()
        c.take()
        self.clock.advance(15)  # the dispatcher's command timeout
        self.assertEqual(got.value, [("1", errors.UPSTREAM)])
        c.post(wire.encode_answer([(wire.RESPONSE, b"\x90\x00")]), cookie=b"late")
        self.assertEqual(c.take(), [])  # held; the late answer went nowhere


class ClientTests(SynchronousTestCase):
    """RamClient against the RamSite of another dispatcher, through site_treq."""

    def setUp(self):
        self.server = Harness()
        self.client = Harness()
        self.dispatcher, self.backend, site = ram_server(self.server, tokens=RAM_TOKENS[:1])
        self.stub = site_treq(site)

    def run_client(self, url="http://h/rt/alicesecret", **kw):
        client = RamClient(self.client.dispatcher, "Emulated 00", url, self.client.clock,
                           http=self.stub, **kw)
        return client, Results(client.run())

    def test_session_drives_the_card_and_ends_with_204(self):
        client, outcome = self.run_client(session_id="page1")
        self.stub.flush()
        reader = self.server.registry.get("RAM alice")
        self.assertEqual(reader.info.atr, self.client.registry.get("Emulated 00").info.atr
                         or reader.info.atr)
        self.assertIs(self.client.registry.get("Emulated 00").holder, client.session)
        got = Results(self.dispatcher.submit("RAM alice", [
            make_command(["1", "APDU", "00A4000C023F00"]), make_command(["2", "APDU", "0084000008"]),
            make_command(["3", "RESET"])]))
        self.stub.flush()
        self.assertEqual(got.value[0], ("1", "9000"))
        self.assertRegex(got.value[1][1], "^[0-9A-F]{16}9000$")
        self.assertEqual(got.value[2][1], reader.info.atr.hex().upper())
        self.backend.shutdown()
        self.stub.flush()
        self.assertEqual(outcome.value, (PASSED, "done"))
        self.assertIsNone(self.client.registry.get("Emulated 00").holder)

    def test_wrong_secret_fails_and_releases_the_card(self):
        client, outcome = self.run_client("http://h/rt/nope")
        self.stub.flush()
        self.assertEqual(outcome.value[0], FAILED)
        self.assertIn("404", outcome.value[1])
        self.assertIsNone(self.client.registry.get("Emulated 00").holder)

    def test_unknown_reader_fails(self):
        client = RamClient(self.client.dispatcher, "No such", "http://h/rt/alicesecret",
                           self.client.clock, http=self.stub)
        outcome = Results(client.run())
        self.assertEqual(outcome.value[0], FAILED)
        self.assertIn(errors.NOT_FOUND, outcome.value[1])


class HelperTests(SynchronousTestCase):
    def test_pngs_are_valid(self):
        import zlib

        for png, side in ((PASSED_PNG, 24), (FAILED_PNG, 12)):
            self.assertEqual(png[:8], b"\x89PNG\r\n\x1a\n")
            self.assertEqual(int.from_bytes(png[16:20], "big"), side)
            n = int.from_bytes(png[33:37], "big")
            self.assertEqual(png[37:41], b"IDAT")
            self.assertEqual(len(zlib.decompress(png[41:41 + n])), side * (1 + 3 * side))

    def test_approved_urls(self):
        urls = ["https://ex.org/rt/", "http://127.0.0.1:1/rt/x"]
        self.assertTrue(approved("https://ex.org/rt/anything", urls))
        self.assertTrue(approved("http://127.0.0.1:1/rt/x", urls))
        self.assertFalse(approved("http://127.0.0.1:1/rt/xy", urls))
        self.assertFalse(approved("https://ex.org/rtx", urls))

    def test_split_session(self):
        self.assertEqual(split_session("http://h/rt/a?session=abc"), ("http://h/rt/a", "abc"))
        self.assertEqual(split_session("http://h/rt/a"), ("http://h/rt/a", None))

    def test_named_secrets(self):
        import os
        import tempfile

        d = tempfile.mkdtemp()
        path = os.path.join(d, "t")
        for text, error in (("", "no NAME SECRET"), ("alice\n", "no secret"),
                            ("a s\nb s\n", "same secret"), ("a s\na t\n", "given twice")):
            with open(path, "w") as f:
                f.write(text)
            with self.assertRaisesRegex(ValueError, error):
                read_named_secrets("--ram-token-file", path)
        with open(path, "w") as f:
            f.write("# users\nalice s1\n\nbob s2\n")
        self.assertEqual(read_named_secrets("--ram-token-file", path), {"alice": "s1", "bob": "s2"})


class ErrorsTests(SynchronousTestCase):
    def test_ended_session_is_c080(self):
        backend = RamBackend(Harness().clock)
        with self.assertRaises(CardError) as e:
            backend.transmit(("x", 0), SELECT_MF)
        self.assertEqual(e.exception.code, errors.NO_CARD)


class OptionsTests(SynchronousTestCase):
    def setUp(self):
        import tempfile

        self.dir = tempfile.mkdtemp()

    def file(self, name, text):
        import os

        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def parse(self, *args):
        from cloudfoxy_proxy import tap

        o = tap.Options()
        o.parseOptions(list(args))
        return o

    def test_ram_needs_tokens_without_empty_secrets(self):
        from twisted.python import usage

        with self.assertRaisesRegex(usage.UsageError, "--ram needs --ram-token-file"):
            self.parse("--ram", "tcp:0")
        with self.assertRaisesRegex(usage.UsageError, "line 1: expected NAME SECRET \\(no secret\\)"):
            self.parse("--ram", "tcp:0", "--ram-token-file", self.file("t", "alice\n"))
        with self.assertRaisesRegex(usage.UsageError, "URL path characters"):
            self.parse("--ram", "tcp:0", "--ram-token-file", self.file("t", "alice a/b\n"))
        o = self.parse("--ram", "8080", "--ram-token-file", self.file("t", "alice s1\n"))
        self.assertEqual(o["ram"], "tcp:8080:backlog=1024")
        self.assertEqual(o["ram-tokens"], {"alice": "s1"})
        self.assertEqual((o["ram-max-sessions"], o["ram-session-timeout"], o["ram-done-after"]),
                         (100, 60.0, 0.0))

    def test_ram_connect_and_daemon(self):
        from twisted.python import usage

        o = self.parse("--ram-connect", "https://h/rt/x?session=abc=Emulated 00",
                       "--ram-connect", "http://h:1/rt/y=RAM alice")
        self.assertEqual(o["ram-connect"], [("https://h/rt/x?session=abc", "Emulated 00"),
                                            ("http://h:1/rt/y", "RAM alice")])
        with self.assertRaisesRegex(usage.UsageError, "expected URL=READER"):
            self.parse("--ram-connect", "ftp://h/x=Emulated 00")
        config = self.file("c.toml", 'ram-connect = ["http://h/rt/z=Emulated 01"]\n')
        self.assertEqual(self.parse("--config", config)["ram-connect"], [("http://h/rt/z", "Emulated 01")])
        o = self.parse("--ram-approved-urls", self.file("u", "# ok\nhttps://h/rt/\nhttps://h/x Emulated 01\n"),
                       "--ram-reader", "E")
        self.assertEqual(o["ram-daemon"], "tcp:27001:interface=127.0.0.1:backlog=1024")
        self.assertEqual(o["ram-approved-url-list"], [("https://h/rt/", None), ("https://h/x", "Emulated 01")])
        with self.assertRaisesRegex(usage.UsageError, "needs --ram-approved-urls"):
            self.parse("--ram-daemon", "tcp:0")
        with self.assertRaisesRegex(usage.UsageError, "no URL in the file"):
            self.parse("--ram-approved-urls", self.file("u", "# none\n"))

    def test_service_tree(self):
        from twisted.internet.testing import MemoryReactorClock

        from cloudfoxy_proxy import tap
        from cloudfoxy_proxy.backends.service import BackendService
        from cloudfoxy_proxy.frontends.ramclient import RamConnectService

        o = self.parse("--ram", "tcp:0", "--ram-token-file", self.file("t", "alice s1\n"),
                       "--ram-connect", "http://127.0.0.1:1/rt/s1=Emulated 00",
                       "--ram-approved-urls", self.file("u", "http://127.0.0.1:1/rt/\n"),
                       "--ram-daemon", "tcp:0", "--metrics", "tcp:0")
        top = tap.makeService(o, MemoryReactorClock())
        self.assertIn("ram", top.core.dispatcher.metrics.frontends)
        rams = [s.backend for s in top if isinstance(s, BackendService) and isinstance(s.backend, RamBackend)]
        self.assertEqual(len(rams), 1)
        self.assertIn(rams[0], top.core.backends)
        self.assertEqual([d for d in (getattr(s, "description", None) for s in top) if d],
                         ["tcp:4001:backlog=1024", "tcp:0:backlog=1024", "tcp:0:backlog=1024",
                          "tcp:0:backlog=1024"])
        connects = [s for s in top if isinstance(s, RamConnectService)]
        self.assertEqual([(c.url, c.reader) for c in connects], [("http://127.0.0.1:1/rt/s1", "Emulated 00")])


class DaemonTests(SynchronousTestCase):
    """The daemon's refusals, in memory: nothing starts, the failed image."""

    def test_unapproved_pin_and_missing_values_get_the_failed_image(self):
        from treq.testing import StubTreq

        from cloudfoxy_proxy.frontends.ramclient import RamDaemonResource

        h = Harness()
        resource = RamDaemonResource(h.dispatcher, h.clock, ["http://127.0.0.1:9/rt/"], "Emulated 00")
        stub = StubTreq(resource)
        for query, why in (("url=http://evil.example/rt/x&sessionId=s", "not in --ram-approved-urls"),
                           ("url=http://127.0.0.1:9/rt/x&sessionId=s&pinrequired=1", "pinrequired"),
                           ("sessionId=s", "no url=")):
            got = Results(stub.get(f"http://127.0.0.1:27001/update.png?{query}"))
            stub.flush()
            response = got.value
            self.assertEqual(response.code, 200)
            self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"image/png"])
            self.assertEqual(response.headers.getRawHeaders(b"cache-control"), [b"no-store"])
            self.assertIn(why, response.headers.getRawHeaders(b"x-ram-result")[0].decode())
            body = Results(response.content())
            stub.flush()
            self.assertEqual(body.value, FAILED_PNG)
            self.assertEqual(resource.running, set())
            self.assertIsNone(h.registry.get("Emulated 00").holder)  # the card was never held

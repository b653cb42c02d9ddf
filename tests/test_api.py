"""Unit tests of the HTTP/JSON API (``--api``), in memory: ``treq.testing.StubTreq``
speaks real HTTP to the resource, a Clock drives card latency and session
timeouts, ``StringTransport`` carries the channel's refusals."""

import base64
import hashlib
import json

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.hashes import SHA256
from support import memory_core, site_treq
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy import errors
from cloudfoxy_proxy.access import Access, full_access, load_credentials
from cloudfoxy_proxy.backends.emulated import EmulatedBackend
from cloudfoxy_proxy.cards.iso7816 import Iso7816Card
from cloudfoxy_proxy.cards.piv import PivCard
from cloudfoxy_proxy.signing.index import CertIndex
from cloudfoxy_proxy.dispatch import Dispatcher, Session
from cloudfoxy_proxy.frontends import api, jsonapi, websocket
from cloudfoxy_proxy.registry import ReaderRegistry
from test_restapi import result_of

TOKEN = "api-token"
BASE = "http://proxy.test"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ATR = "3B8B8001466F7879456D753738313677"
GET_CHALLENGE = "0084000008"


class ApiCase(SynchronousTestCase):
    cards = 2

    def setUp(self):
        self.clock = Clock()
        self.registry = ReaderRegistry()
        self.backend = EmulatedBackend(clock=self.clock, cards=[Iso7816Card(serial=i) for i in range(self.cards)])
        self.backend.start(self.registry)
        self.serve(Dispatcher(self.registry, self.clock, command_timeout=5.0, access=Access(simple=[(TOKEN, "api")])))

    def serve(self, dispatcher, **limits):
        """The API on the HTTP base over ``dispatcher``, as --api builds it."""
        self.dispatcher = dispatcher
        self.core = memory_core(dispatcher, self.clock, **limits)
        self.site = api.API.site(api.ApiSettings(endpoint="tcp:0", cors_origins=["http://app.test"]), self.core)
        self.resource = self.site.resource
        self.http = site_treq(self.site)

    #: every (method, path, status) answered in this module, for the OpenAPI test
    seen = set()

    def call(self, method, path, body=None, headers=AUTH, raw=None):
        """(status, JSON or text body, response headers) of a finished request."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        d = self.http.request(method, BASE + path, data=data, headers=headers)
        self.http.flush()
        if not d.called:  # a throttled guess (access.Throttle) is answered later
            self.clock.advance(5)
            self.http.flush()
        response = result_of(d)
        text = result_of(response.text("utf-8"))
        try:
            content = json.loads(text)
        except ValueError:
            content = text
        self.seen.add((method, path, response.code))
        return response.code, content, response.headers


class ReadersAndTransmit(ApiCase):
    def test_readers(self):
        code, body, headers = self.call("GET", "/api/v1/readers")
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(body, {"readers": [
            {"name": f"Emulated 0{i}", "aliases": [], "present": True, "atr": ATR,
             "backend": "emulated: 2 iso7816 cards", "queued": 0} for i in range(2)]})
        self.backend.remove(1)
        self.assertEqual(self.call("GET", "/api/v1/readers")[1]["readers"][1]["present"], False)

    def test_transmit_reset_and_apdus_in_one_turn(self):
        code, body, _ = self.call("POST", "/api/v1/readers/Emulated%2001/transmit",
                                  {"reset": True, "apdus": [GET_CHALLENGE, "00A4000C023F00"]})
        self.assertEqual(code, 200)
        self.assertEqual(body["atr"], ATR)
        self.assertEqual(len(body["responses"]), 2)
        self.assertRegex(body["responses"][0], "^[0-9A-F]{16}9000$")
        self.assertEqual(body["responses"][1], "9000")

    def test_reader_names_resolve_like_reader_lines(self):
        code, body, _ = self.call("POST", "/api/v1/readers/ated%2000/transmit", {"apdus": ["00A4000C023F00"]})
        self.assertEqual((code, body), (200, {"atr": None, "responses": ["9000"]}))

    def test_errors_are_json_with_result_codes(self):
        cases = [
            ("/api/v1/readers/Nobody/transmit", {"apdus": [GET_CHALLENGE]}, 404, errors.NOT_FOUND),
            ("/api/v1/readers/Emulated/transmit", {"apdus": [GET_CHALLENGE]}, 400, errors.AMBIGUOUS),
            ("/api/v1/readers/Emulated%2000/transmit", {"apdus": ["00"]}, 400, errors.MALFORMED),
            ("/api/v1/readers/Emulated%2000/transmit", {"apdus": "0084"}, 400, errors.MALFORMED),
            ("/api/v1/readers/Emulated%2000/transmit", {"reset": "yes"}, 400, errors.MALFORMED),
            ("/api/v1/readers/Emulated%2000/transmit", {}, 400, errors.MALFORMED),
            ("/api/v1/readers/Emulated%2000/transmit", [], 400, errors.MALFORMED),
        ]
        for path, body, status, code in cases:
            got = self.call("POST", path, body)
            self.assertEqual((got[0], got[1]["error"]["code"]), (status, code), (path, body))
            self.assertIsInstance(got[1]["error"]["message"], str)
        for raw in (b"{not json", b"\xef\xbb\xbf{}", b'{"apdus": ["00A4000C023F00"], "x": NaN}', b'{"a": "\xff"}'):
            got = self.call("POST", "/api/v1/readers/Emulated%2000/transmit", raw=raw)
            self.assertEqual((got[0], got[1]["error"]["code"]), (400, errors.MALFORMED), raw)
        # deeply nested JSON: 400, no traceback
        for path in ("/api/v1/readers/Emulated%2000/transmit", "/api/v1/sessions", "/api/v1.0/command",
                     "/api/v1/certificates/X/sign"):
            got = self.call("POST", path, raw=b"[" * 100000)
            self.assertEqual((got[0], got[1]["error"]["code"]), (400, errors.MALFORMED), path)

    def test_no_card_is_503(self):
        self.backend.remove(0)
        code, body, _ = self.call("POST", "/api/v1/readers/Emulated%2000/transmit", {"apdus": [GET_CHALLENGE]})
        self.assertEqual((code, body["error"]["code"]), (503, errors.NO_CARD))

    def test_upstream_timeout_is_502(self):
        self.backend.latency = 10.0  # longer than the command timeout
        d = self.http.post(BASE + "/api/v1/readers/Emulated%2000/transmit",
                           data=json.dumps({"apdus": [GET_CHALLENGE]}).encode(), headers=AUTH)
        self.clock.advance(5.1)
        self.http.flush()
        response = result_of(d)
        body = json.loads(result_of(response.text()))
        self.assertEqual((response.code, body["error"]["code"]), (502, errors.UPSTREAM))

    def test_unknown_route_and_method(self):
        self.assertEqual(self.call("GET", "/api/v1/nothing")[0], 404)
        code, body, _ = self.call("GET", "/api/v1/readers/Emulated%2000/transmit")
        self.assertEqual(code, 405)
        self.assertEqual(body["error"]["code"], errors.FAILED)


class Auth(ApiCase):
    def test_bearer_token_is_required(self):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": f"Bearer {TOKEN}x"}):
            code, body, h = self.call("GET", "/api/v1/readers", headers=headers)
            self.assertEqual(code, 401, headers)
            self.assertEqual(h.getRawHeaders("www-authenticate"), ['Bearer realm="cloudfoxy-proxy"'])
            self.assertEqual(body["error"]["code"], errors.BAD_PIN)
        self.assertEqual(self.call("GET", "/api/v1/readers", headers={"Authorization": f"bearer {TOKEN}"})[0], 200)

    def test_websocket_upgrade_with_a_wrong_token_is_a_json_401(self):
        upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": "MDEyMzQ1Njc4OWFiY2RlZg=="}
        code, body, h = self.call("GET", "/api/v1/ws", headers={**upgrade, "Authorization": "Bearer wrong"})
        self.assertEqual((code, body["error"]["code"]), (401, errors.BAD_PIN))
        self.assertEqual(h.getRawHeaders("www-authenticate"), ['Bearer realm="cloudfoxy-proxy"'])

    def test_identities_apply_to_every_route(self):
        """A --credentials client on the API: its readers only, its commands only."""
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write('[[client]]\nname = "web"\nsecret_sha256 = "%s"\nreaders = ["Emulated 00"]\n'
                    'commands = ["APDU"]\nfrontends = ["api"]\n'
                    '[[client]]\nname = "liner"\nsecret_sha256 = "%s"\nfrontends = ["line"]\n'
                    % (hashlib.sha256(b"web-secret").hexdigest(), hashlib.sha256(b"line-secret").hexdigest()))
        access = load_credentials(f.name)
        access.add_simple([(TOKEN, "api")])
        self.serve(Dispatcher(self.registry, self.clock, command_timeout=5.0, access=access))
        web = {"Authorization": "Bearer web-secret"}
        self.assertEqual([r["name"] for r in self.call("GET", "/api/v1/readers", headers=web)[1]["readers"]],
                         ["Emulated 00"])
        transmit = {"apdus": ["00A4000C023F00"]}
        self.assertEqual(self.call("POST", "/api/v1/readers/Emulated%2000/transmit", transmit, headers=web)[:2],
                         (200, {"atr": None, "responses": ["9000"]}))
        code, body, _ = self.call("POST", "/api/v1/readers/Emulated%2001/transmit", transmit, headers=web)
        self.assertEqual((code, body["error"]["code"]), (404, errors.NOT_FOUND))  # invisible, as if absent
        code, body, _ = self.call("POST", "/api/v1/readers/Emulated%2000/transmit", {"reset": True}, headers=web)
        self.assertEqual((code, body["error"]["code"]), (403, errors.BAD_PIN))  # RESET: not its command
        code, body, _ = self.call("GET", "/api/v1/readers", headers={"Authorization": "Bearer line-secret"})
        self.assertEqual((code, body["error"]["code"]), (401, errors.BAD_PIN))  # not allowed on the API
        self.assertEqual(len(self.call("GET", "/api/v1/readers")[1]["readers"]), 2)  # the API token: all


class Channel(SynchronousTestCase):
    """The channel judges a request after its headers: refused ones are
    answered in JSON and closed before any body byte is read."""

    def setUp(self):
        clock = Clock()
        registry = ReaderRegistry()
        EmulatedBackend(clock=clock, cards=[Iso7816Card(serial=0)]).start(registry)
        dispatcher = Dispatcher(registry, clock, access=Access(simple=[(TOKEN, "api")]))
        self.site = api.API.site(api.ApiSettings(endpoint="tcp:0"), memory_core(dispatcher, clock,
                                                                               buffered_bytes=1 << 20))
        self.budget = self.site.buffers

    def send(self, data):
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(data)
        return channel, transport

    def test_unauthorized_body_is_never_read(self):
        head = b"POST /api/v1/readers/Emulated%2000/transmit HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
        channel, transport = self.send(head)
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), out)
        self.assertIn(b'WWW-Authenticate: Bearer realm="cloudfoxy-proxy"', out.replace(b"www-authenticate", b"WWW-Authenticate"))
        self.assertEqual(json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]["code"], errors.BAD_PIN)
        self.assertTrue(transport.disconnecting)
        channel.dataReceived(b"x" * 100000)  # ignored
        self.assertEqual(self.budget.used, 0)
        self.assertEqual(self.site.counters.auth_failures, 0)  # no secret presented: not a guess

    def test_oversized_and_chunked_bodies_are_refused(self):
        auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
        _, t = self.send(b"POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\n" + auth
                         + b"Content-Length: %d\r\n\r\n" % (api.MAX_BODY + 1))
        self.assertTrue(t.value().startswith(b"HTTP/1.1 413 "))
        _, t = self.send(b"POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\n" + auth
                         + b"Transfer-Encoding: chunked\r\n\r\n")
        self.assertTrue(t.value().startswith(b"HTTP/1.1 411 "))

    def test_accepted_body_is_charged_to_the_budget_until_read(self):
        auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
        channel, t = self.send(b"POST /api/v1/readers/Emulated%2000/transmit HTTP/1.1\r\nHost: x\r\n" + auth
                               + b"Content-Length: 200000\r\n\r\n")
        self.assertEqual(self.budget.used, 200000 - self.budget.free)
        channel.dataReceived(b" " * 200000)
        self.assertEqual(self.budget.used, 0)
        self.assertIn(b"HTTP/1.1 400 ", t.value())  # blank JSON

    def test_preflight_and_websocket_upgrade_take_no_body_without_a_token(self):
        for head in (b"OPTIONS /api/v1/readers HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n\r\n",
                     b"GET /api/v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                     b"Content-Length: 50000\r\n\r\n"):
            _, t = self.send(head)
            self.assertTrue(t.value().startswith(b"HTTP/1.1 413 "), head)
            self.assertTrue(t.disconnecting)
        _, t = self.send(b"GET /api/v1/readers HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
        self.assertTrue(t.value().startswith(b"HTTP/1.1 401 "))  # only /api/v1/ws may upgrade without one

    def test_a_body_over_the_budget_is_503(self):
        auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
        _, t = self.send(b"POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\n" + auth
                         + b"Content-Length: %d\r\n\r\n" % (2 << 20))
        self.assertTrue(t.value().startswith(b"HTTP/1.1 503 "))
        self.assertEqual(self.budget.used, 0)


    def test_requests_are_counted_and_logged_only_at_debug_level(self):
        from twisted.logger import globalLogPublisher

        from cloudfoxy_proxy import logs

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.addCleanup(logs.set_level, "info")
        request = (b"GET /api/v1/readers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                   + b"\r\n\r\n")
        for level in ("info", "debug"):
            logs.set_level(level)
            _, transport = self.send(request)
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK"), transport.value())
        lines = [(e["method"], e["path"], e["code"]) for e in events if e.get("log_format", "").startswith("API {method}")]
        self.assertEqual((self.site.counters.requests, lines), (2, [("GET", "/api/v1/readers", 200)]))


class Cors(ApiCase):
    def test_preflight_of_an_allowed_origin(self):
        code, body, h = self.call("OPTIONS", "/api/v1/readers", headers={
            "Origin": "http://app.test", "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization"})
        self.assertEqual(code, 204)
        self.assertEqual(h.getRawHeaders("access-control-allow-origin"), ["http://app.test"])
        self.assertIn("Authorization", h.getRawHeaders("access-control-allow-headers")[0])
        self.assertIn("DELETE", h.getRawHeaders("access-control-allow-methods")[0])
        self.assertIsNone(h.getRawHeaders("access-control-allow-credentials"))

    def test_other_origins_get_no_cors_headers(self):
        code, _, h = self.call("OPTIONS", "/api/v1/readers", headers={"Origin": "http://evil.test"})
        self.assertEqual(code, 403)
        self.assertIsNone(h.getRawHeaders("access-control-allow-origin"))
        code, _, h = self.call("GET", "/api/v1/readers", headers=dict(AUTH, Origin="http://evil.test"))
        self.assertEqual(code, 200)
        self.assertIsNone(h.getRawHeaders("access-control-allow-origin"))
        code, _, h = self.call("GET", "/api/v1/readers", headers=dict(AUTH, Origin="http://app.test"))
        self.assertEqual(h.getRawHeaders("access-control-allow-origin"), ["http://app.test"])


class Sessions(ApiCase):
    def open(self, reader="Emulated 00", idle=5):
        return self.call("POST", "/api/v1/sessions", {"reader": reader, "idle_timeout": idle})

    def test_session_holds_the_card_until_deleted(self):
        code, body, _ = self.open()
        self.assertEqual(code, 200)
        sid = body["session"]
        # Another client's transmit waits in the card's queue.
        other = self.http.post(BASE + "/api/v1/readers/Emulated%2000/transmit",
                               data=json.dumps({"apdus": ["00A4000C023F00"]}).encode(), headers=AUTH)
        self.http.flush()
        waiting = []
        other.addCallback(waiting.append)
        self.assertEqual(waiting, [])
        self.assertEqual(self.call("GET", "/api/v1/readers")[1]["readers"][0]["queued"], 1)
        # The holder's transmit runs at once.
        code, body, _ = self.call("POST", "/api/v1/readers/Emulated%2000/transmit",
                                  {"session": sid, "apdus": ["00A4000C023F00"]})
        self.assertEqual((code, body["responses"]), (200, ["9000"]))
        code, body, _ = self.call("DELETE", f"/api/v1/sessions/{sid}")
        self.assertEqual((code, body), (200, {"session": sid, "closed": True}))
        self.http.flush()
        self.assertEqual(len(waiting), 1)
        self.assertEqual(waiting[0].code, 200)
        self.assertEqual(self.call("DELETE", f"/api/v1/sessions/{sid}")[0], 404)

    def test_idle_timeout_ends_the_session(self):
        sid = self.open(idle=2)[1]["session"]
        self.clock.advance(1.5)
        self.call("POST", "/api/v1/readers/Emulated%2000/transmit", {"session": sid, "apdus": ["00A4000C023F00"]})
        self.clock.advance(1.5)  # touched: not idle yet
        self.assertIn(sid, self.resource.sessions)
        self.clock.advance(1)
        self.assertNotIn(sid, self.resource.sessions)
        code, body, _ = self.call("POST", "/api/v1/readers/Emulated%2000/transmit",
                                  {"session": sid, "apdus": ["00A4000C023F00"]})
        self.assertEqual((code, body["error"]["code"]), (404, errors.NOT_FOUND))

    def test_session_conflict_is_409(self):
        sid = self.open()[1]["session"]
        code, body, _ = self.call("POST", "/api/v1/readers/Emulated%2001/transmit",
                                  {"session": sid, "apdus": ["00A4000C023F00"]})
        self.assertEqual(code, 409)
        self.assertIn("Emulated 00", body["error"]["message"])

    def test_bad_session_requests(self):
        self.assertEqual(self.open(reader="Nobody")[0], 404)
        self.assertEqual(self.open(idle=0)[0], 400)
        self.assertEqual(self.open(idle=True)[0], 400)
        self.assertEqual(self.call("POST", "/api/v1/sessions", {"reader": 5})[0], 400)
        self.assertEqual(self.resource.sessions, {})
        self.assertEqual(self.call("DELETE", "/api/v1/sessions/nope")[0], 404)


class Signing(ApiCase):
    def setUp(self):
        super().setUp()
        self.registry = ReaderRegistry()
        self.piv = EmulatedBackend(clock=self.clock, cards=[PivCard(serial=0)], prefix="PIV", kind="piv")
        dispatcher = Dispatcher(self.registry, self.clock, command_timeout=5.0, access=Access(simple=[(TOKEN, "api")]))
        dispatcher.signing = CertIndex(self.registry, self.clock, 5.0)
        dispatcher.signing.start()
        self.piv.start(self.registry)
        self.serve(dispatcher)
        self.call("GET", "/api/v1/certificates")  # the index probes the card

    def test_certificates_chain_and_sign(self):
        code, body, _ = self.call("GET", "/api/v1/certificates")
        self.assertEqual(code, 200)
        aliases = [c["alias"] for c in body["certificates"]]
        self.assertIn("Emulated PIV 00 Signing", aliases)
        self.assertEqual({c["reader"] for c in body["certificates"]}, {"PIV 00"})
        code, body, _ = self.call("GET", "/api/v1/certificates/Emulated%20PIV%2000%20Signing/chain")
        self.assertEqual(code, 200)
        cert = x509.load_der_x509_certificate(bytes.fromhex(body["chain"][0]))
        self.assertIn("Emulated PIV 00 Signing", cert.subject.rfc4514_string())
        digest = hashlib.sha256(b"hello").digest()
        code, body, _ = self.call("POST", "/api/v1/certificates/Emulated%20PIV%2000%20Signing/sign",
                                  {"digest": digest.hex(), "algorithm": "SHA256", "pin": "123456"})
        self.assertEqual(code, 200, body)
        key = cert.public_key()
        self.assertIsInstance(key, ec.EllipticCurvePublicKey)
        key.verify(bytes.fromhex(body["signature"]), digest, ec.ECDSA(Prehashed(SHA256())))

    def test_signing_errors(self):
        alias = "/api/v1/certificates/Emulated%20PIV%2000%20Signing"
        digest = hashlib.sha256(b"x").hexdigest()
        code, body, _ = self.call("POST", alias + "/sign", {"digest": digest, "pin": "000000"})
        self.assertEqual((code, body["error"]["code"]), (403, errors.BAD_PIN))
        self.assertEqual(self.call("POST", alias + "/sign", {"digest": digest})[0], 400)
        self.assertEqual(self.call("POST", alias + "/sign", {"digest": "abc", "pin": "123456"})[0], 400)
        self.assertEqual(self.call("GET", "/api/v1/certificates/Nobody/chain")[0], 404)
        self.assertEqual(self.call("POST", "/api/v1/certificates/Nobody/sign",
                                   {"digest": digest, "pin": "123456"})[0], 404)
        self.piv.remove(0)
        self.assertEqual(self.call("GET", "/api/v1/certificates/PIV%2000/chain")[0], 503)

    def test_foxyproxy_select(self):
        code, body, h = self.call("GET", "/api/v1.0/select/00")
        self.assertEqual(code, 200)
        self.assertEqual(h.getRawHeaders("content-type"), ["text/plain; charset=utf-8"])
        self.assertEqual(body.splitlines(), [
            "PIV 00 (CN=Emulated PIV 00 Authentication,O=CloudFoxy Emulated)",
            "PIV 00 (CN=Emulated PIV 00 Signing,O=CloudFoxy Emulated)"])
        self.assertEqual(self.call("GET", "/api/v1.0/select/zz")[1], "")
        self.assertEqual(self.call("GET", "/api/v1.0/select/x/0")[1], "PIV 00\n")
        self.assertEqual(self.call("GET", "/api/v1.0/select/x/abc")[0], 400)


class SigningPerIdentity(ApiCase):
    """CHAIN and the certificate routes choose among the identity's readers
    only: another reader answers like one that does not exist."""

    def setUp(self):
        super().setUp()
        import tempfile

        self.registry = ReaderRegistry()
        piv = EmulatedBackend(clock=self.clock, cards=[PivCard(serial=0), PivCard(serial=1)], prefix="PIV",
                              kind="piv")
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write('[[client]]\nname = "one"\nsecret_sha256 = "%s"\nreaders = ["PIV 00"]\n'
                    % hashlib.sha256(b"one-secret").hexdigest())
        dispatcher = Dispatcher(self.registry, self.clock, command_timeout=5.0, access=load_credentials(f.name))
        dispatcher.signing = CertIndex(self.registry, self.clock, 5.0)
        dispatcher.signing.start()
        piv.start(self.registry)
        self.serve(dispatcher)
        self.one = {"Authorization": "Bearer one-secret"}
        self.call("GET", "/api/v1/certificates", headers=self.one)  # the index probes the cards

    def test_another_readers_chain_is_not_there(self):
        code, body, _ = self.call("GET", "/api/v1/certificates/PIV%2000/chain", headers=self.one)
        self.assertEqual(code, 200)
        self.assertTrue(body["chain"])
        missing = self.call("GET", "/api/v1/certificates/PIV%2009/chain", headers=self.one)
        hidden = self.call("GET", "/api/v1/certificates/PIV%2001/chain", headers=self.one)
        self.assertEqual((hidden[0], hidden[1]["error"]["code"]), (404, errors.NOT_FOUND))
        self.assertEqual(hidden[1], dict(missing[1], error=dict(missing[1]["error"],
                                                                 message=hidden[1]["error"]["message"])))
        by_alias = self.call("GET", "/api/v1/certificates/PIV%20PIV%2001%20Signing/chain", headers=self.one)
        self.assertEqual((by_alias[0], by_alias[1]["error"]["code"]), (404, errors.NOT_FOUND))
        code, body, _ = self.call("GET", "/api/v1/certificates/PIV/chain", headers=self.one)
        self.assertEqual(code, 200)  # the pattern picks among its own readers: PIV 00 alone
        listed = self.call("GET", "/api/v1/certificates", headers=self.one)[1]["certificates"]
        self.assertEqual({c["reader"] for c in listed}, {"PIV 00"})


class FoxyProxy210(ApiCase):
    """Shapes recorded from foxyproxy 2.10.0's foxy_proxy_rest.py and
    client_thread.py: hello is ``{"result": true}``; command answers the
    worker's ``[{"response": [{"id", "line"}…]}]``; a request without
    ``data`` is Flask's ``{"error": 400, "text": …}``-style 400."""

    def test_hello(self):
        self.assertEqual(self.call("GET", "/api/v1.0/hello")[:2], (200, {"result": True}))

    def test_command(self):
        code, body, _ = self.call("POST", "/api/v1.0/command", {"data": {"reader": "Emulated 01", "commands": [
            {"nonce": "2", "line": "RESET"}, {"nonce": "3", "line": "APDU:00A4000C023F00"},
            {"id": "4", "line": "BOGUS"}, {"line": "RESET"}]}})
        self.assertEqual(code, 200)
        self.assertEqual(body, [{"response": [{"id": "2", "line": ATR}, {"id": "3", "line": "9000"},
                                              {"id": "4", "line": errors.FAILED}]}])
        code, body, _ = self.call("POST", "/api/v1.0/command", {"data": {"reader": "Nobody",
                                                                         "command": {"nonce": "1", "line": "RESET"}}})
        self.assertEqual((code, body), (200, [{"response": [{"id": "1", "line": errors.NOT_FOUND}]}]))

    def test_nonces_are_strings_or_numbers(self):
        deep = "[" * 1000 + "]" * 1000  # deeper than Python's recursion limit lets str() or json go
        raw = ('{"data": {"reader": "Emulated 01", "commands": [{"nonce": 5, "line": "APDU:00A4000C023F00"}, '
               '{"nonce": 1.5, "line": "APDU:00A4000C023F00"}, {"nonce": true, "line": "RESET"}, '
               '{"nonce": {"a": [1]}, "line": "RESET"}, {"nonce": %s, "line": "RESET"}, '
               '{"nonce": null, "line": "RESET"}]}}' % deep)  # all but the first two are skipped (no nonce)
        code, body, _ = self.call("POST", "/api/v1.0/command", raw=raw.encode())
        self.assertEqual((code, body), (200, [{"response": [{"id": "5", "line": "9000"},
                                                            {"id": "1.5", "line": "9000"}]}]))
        raw = '{"data": {"reader": "Emulated 01", "commands": [{"nonce": %s, "line": "RESET"}]}}' % deep
        code, body, _ = self.call("POST", "/api/v1.0/command", raw=raw.encode())
        self.assertEqual((code, body["error"]["code"]), (400, errors.MALFORMED))

    def test_reader_must_be_a_name(self):
        for reader in (5, None, {"name": "Emulated 01"}, ["Emulated 01"]):
            code, body, _ = self.call("POST", "/api/v1.0/command", {"data": {"reader": reader, "commands": [
                {"nonce": "1", "line": "APDU:00A4000C023F00"}]}})
            self.assertEqual((code, body["error"]["message"]), (400, "reader must be a reader name"), reader)

    def test_malformed_command(self):
        for body in ({}, {"data": {"commands": []}}, {"data": {"reader": "x"}}, [],
                     {"data": {"reader": "x", "commands": [{"line": "RESET"}]}}):
            code, answer, _ = self.call("POST", "/api/v1.0/command", body)
            self.assertEqual(code, 400, body)
            self.assertEqual(answer["error"]["code"], errors.MALFORMED)


class OpenApi(ApiCase):
    def test_description_is_served(self):
        code, body, _ = self.call("GET", "/api/v1/openapi.json")
        self.assertEqual(code, 200)
        self.assertEqual(body["openapi"], "3.0.3")

    def test_every_route_is_described(self):
        spec = json.loads(self.resource.openapi)
        described = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
        self.assertEqual(described, set(api.ApiResource.ROUTES))


class WebSocketMessages(ApiCase):
    """ApiWebSocket's message handling, with Autobahn's sendMessage captured."""

    def socket(self, identity=full_access("api")):
        ws = websocket.ApiWebSocket()
        ws.factory = self.resource.ws_factory
        ws.state = ws.STATE_OPEN
        ws.identity = identity
        ws.counters = self.site.counters
        ws.session = Session("test", "api", identity=identity)
        ws.inflight = {}
        ws.transport = StringTransport()
        ws.sent = []
        ws.sendMessage = lambda payload, isBinary=False: ws.sent.append(json.loads(payload))
        ws.sendClose = lambda code=None, reason=None: ws.sent.append(("close", code))
        return ws

    def say(self, ws, msg):
        ws.onMessage(json.dumps(msg).encode(), False)
        self.clock.advance(0)
        return ws.sent.pop() if ws.sent else None

    def test_transmit_and_errors(self):
        ws = self.socket()
        answer = self.say(ws, {"id": 7, "reader": "Emulated 00", "reset": True, "apdus": ["00A4000C023F00"]})
        self.assertEqual(answer, {"id": 7, "atr": ATR, "responses": ["9000"]})
        answer = self.say(ws, {"id": 8, "reader": "Nobody", "apdus": ["00A4000C023F00"]})
        self.assertEqual(answer["id"], 8)
        self.assertEqual(answer["error"]["code"], errors.NOT_FOUND)
        self.assertEqual(self.say(ws, {"id": 9})["error"]["code"], errors.MALFORMED)
        ws.onMessage(b"[]", False)
        self.assertEqual(ws.sent.pop()["error"]["code"], errors.MALFORMED)
        ws.onMessage(b"[" * 100000, False)  # deeply nested: an error answer, no traceback
        self.assertEqual(ws.sent.pop()["error"]["code"], errors.MALFORMED)
        for first in (b"[" * 4000, b"[]", b"not json", b"\xff", b'{"id": 1}'):  # before authenticating:
            ws = self.socket(identity=None)  # anything but {"auth": SECRET} closes with 4401
            ws.onMessage(first, False)
            self.assertEqual(ws.sent, [("close", 4401)], first)

    def test_ids_are_echoed_and_must_be_scalars(self):
        ws = self.socket()
        for mid in ("a\u2028\x01", 7, -0.5, 2 ** 63, None, "x" * 1000):
            answer = self.say(ws, {"id": mid, "reader": "Emulated 00", "apdus": ["00A4000C023F00"]})
            self.assertEqual(answer, {"id": mid, "atr": None, "responses": ["9000"]})
        for mid in ("true", "[1]", '{"a": 1}', "[" * 1000 + "]" * 1000):  # deeper than json.dumps goes
            ws.onMessage(('{"id": %s, "reader": "Emulated 00", "apdus": ["00A4000C023F00"]}' % mid).encode(), False)
            self.assertEqual(ws.sent.pop(), {"id": None, "error": {"code": errors.MALFORMED,
                                                                   "message": "id must be a string, a number or null"}})
        ws = self.socket(identity=None)  # before authenticating too: not authenticated by it, closed
        self.assertEqual(self.say(ws, {"id": [[1]], "auth": TOKEN}), ("close", 4401))
        self.assertIsNone(ws.identity)

    def test_auth_message(self):
        ws = self.socket(identity=None)
        self.assertEqual(self.say(ws, {"auth": "wrong"}), ("close", 4401))
        ws = self.socket(identity=None)
        self.assertEqual(self.say(ws, {"id": 1, "auth": TOKEN}), {"id": 1, "authenticated": True})
        self.assertEqual(self.say(ws, {"id": 2, "reader": "Emulated 00", "apdus": ["00A4000C023F00"]})["responses"],
                         ["9000"])

    def test_hold_and_release(self):
        ws = self.socket()
        self.assertEqual(self.say(ws, {"id": 1, "hold": "Emulated 00", "idle_timeout": 10}),
                         {"id": 1, "held": "Emulated 00"})
        self.assertEqual(self.say(ws, {"id": 2, "hold": "Emulated 01"})["error"]["message"],
                         "this connection holds a card already")
        other = self.dispatcher.submit("Emulated 00", api.transmit_commands(False, ["00A4000C023F00"]))
        self.assertFalse(other.called)  # queued behind the session
        self.assertEqual(self.say(ws, {"id": 3, "reader": "Emulated 00", "apdus": ["00A4000C023F00"]})["responses"],
                         ["9000"])
        self.say(ws, {"id": 4, "release": True})
        self.assertIn({"id": 4, "released": True}, ws.sent + [{"id": 4, "released": True}])
        self.assertTrue(other.called)
        self.assertEqual(result_of(other)[0][1], "9000")

    def test_transmit_that_waits_for_the_card(self):
        holder, ws = self.socket(), self.socket()
        self.say(holder, {"id": 1, "hold": "Emulated 00"})
        ws.onMessage(json.dumps({"id": 5, "reader": "Emulated 00", "reset": True,
                                 "apdus": ["00A4000C023F00"]}).encode(), False)
        ws.onMessage(json.dumps({"id": 6, "reader": "Emulated 00", "apdus": ["00EE0000"]}).encode(), False)
        self.assertEqual((ws.sent, len(ws.inflight)), ([], 2))  # queued behind the session: answered later
        self.say(holder, {"id": 2, "release": True})
        self.assertEqual(ws.sent, [{"atr": ATR, "responses": ["9000"], "id": 5},
                                   {"atr": None, "responses": ["6D00"], "id": 6}])
        self.assertEqual(ws.inflight, {})
        self.say(holder, {"id": 3, "hold": "Emulated 00"})
        ws.sent.clear()
        ws.onMessage(json.dumps({"id": 7, "reader": "Emulated 00", "apdus": ["00A4000C023F00"]}).encode(), False)
        self.registry.get("Emulated 00").backend.remove(0)  # the card goes while the request waits
        self.say(holder, {"id": 4, "release": True})
        self.assertEqual(ws.sent[-1]["id"], 7)
        self.assertEqual(ws.sent[-1]["error"]["code"], errors.NO_CARD, ws.sent[-1])  # the card is gone: C080

    def test_closing_releases_the_card(self):
        ws = self.socket()
        self.say(ws, {"id": 1, "hold": "Emulated 00"})
        ws.onClose(True, 1000, "bye")
        self.assertIsNone(self.registry.get("Emulated 00").holder)

    def test_events_and_slow_subscribers(self):
        ws = self.socket()
        answer = self.say(ws, {"id": 1, "subscribe": True})
        self.assertEqual((answer["subscribed"], len(answer["readers"])), (True, 2))
        self.backend.remove(1)
        self.assertEqual(ws.sent.pop(), {"event": "ejected", "reader": "Emulated 01"})
        self.backend.insert(1)
        self.assertEqual(ws.sent.pop(), {"event": "inserted", "reader": "Emulated 01", "atr": ATR})
        ws.dropped = []
        ws.dropConnection = lambda abort=False: ws.dropped.append(abort)
        ws.transport.dataBuffer = b"x" * (websocket.MAX_SUBSCRIBER_BACKLOG + 1)
        ws.transport.offset = 0
        ws.transport._tempDataLen = 0
        self.backend.remove(0)
        self.assertEqual(ws.dropped, [True])
        self.assertNotIn(ws, self.resource.events.subscribers)

    def test_first_message_secret_goes_through_identify(self):
        ws = self.socket(identity=None)
        ws.session = Session("10.0.0.7:1", "api", "10.0.0.7", counters=self.site.counters)
        self.assertEqual(self.say(ws, {"id": 1, "auth": "wrong"}), ("close", 4401))
        self.assertEqual(self.site.counters.auth_failures, 1)  # counted like every failed secret
        ws = self.socket(identity=None)
        ws.session = Session("10.0.0.7:2", "api", "10.0.0.7", counters=self.site.counters)
        self.assertEqual(self.say(ws, {"id": 2, "auth": TOKEN}), {"id": 2, "authenticated": True})
        self.assertEqual(ws.identity.name, "api")
        answer = self.say(ws, {"id": 3, "reader": "Emulated 00", "apdus": ["00A4000C023F00"]})
        self.assertEqual(answer, {"id": 3, "atr": None, "responses": ["9000"]})

    def test_events_name_only_the_readers_of_the_identity(self):
        from cloudfoxy_proxy.access import Identity

        ws = self.socket(identity=Identity("one", readers=["Emulated 01"]))
        subscribed = self.say(ws, {"id": 1, "subscribe": True})
        self.assertEqual([r["name"] for r in subscribed["readers"]], ["Emulated 01"])
        self.backend.remove(0)
        self.assertEqual(ws.sent, [])  # Emulated 00 is not its reader: no event
        self.backend.remove(1)
        self.assertEqual(ws.sent.pop(), {"event": "ejected", "reader": "Emulated 01"})

    def test_added_and_removed(self):
        got = []

        class Sub:
            def event(self, e, reader):
                got.append(e)

        self.resource.events.subscribers.add(Sub())
        extra = EmulatedBackend(clock=self.clock, cards=[Iso7816Card(serial=9)], prefix="New")
        extra.start(self.registry)
        self.assertEqual(got, [{"event": "added", "reader": "New 00", "present": True, "atr": ATR}])
        self.registry.update(extra, [])
        self.assertEqual(got[-1], {"event": "removed", "reader": "New 00"})


def client_frame(opcode, payload, fin=True, mask=b"\x37\xfa\x21\x3d"):
    """One masked client frame (RFC 6455 section 5.2; payloads under 126 bytes)."""
    assert len(payload) < 126
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + mask + masked


def server_messages(data):
    """The text payloads of the unmasked server frames in ``data``."""
    out = []
    while data:
        assert data[0] == 0x81, data  # FIN, text
        n, head = data[1], 2
        if n == 126:
            n, head = int.from_bytes(data[2:4], "big"), 4
        out.append(json.loads(data[head:head + n]))
        data = data[head + n:]
    return out


class WebSocketFrames(ApiCase):
    """Whole frames through Autobahn (ApiWebSocket's overrides of its
    per-message path): handshake, then masked client frames in, answers out."""

    def setUp(self):
        super().setUp()
        self.ws = self.resource.ws_factory.buildProtocol(None)
        # as the HTTP base hands it over: the upgrade request proved the token
        self.ws.upgrade = Session("127.0.0.1:1", "api", "127.0.0.1", identity=full_access("api"))
        self.transport = StringTransport()
        self.ws.makeConnection(self.transport)
        key = base64.b64encode(b"0123456789abcdef").decode()
        self.ws.dataReceived((f"GET /api/v1/ws HTTP/1.1\r\nHost: proxy.test\r\nUpgrade: websocket\r\n"
                              f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                              f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {TOKEN}\r\n\r\n").encode())
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 101 "), self.transport.value())
        self.transport.clear()

    def answers(self, *frames):
        self.ws.dataReceived(b"".join(frames))
        self.clock.advance(0)
        got = server_messages(self.transport.value())
        self.transport.clear()
        return got

    def test_one_message_one_frame(self):
        msg = json.dumps({"id": 1, "reader": "Emulated 00", "apdus": ["00A4000C023F00"]}).encode()
        self.assertEqual(self.answers(client_frame(1, msg)), [{"id": 1, "atr": None, "responses": ["9000"]}])
        self.assertEqual(self.transport.value(), b"")

    def test_a_message_in_fragments_and_two_messages_in_one_read(self):
        msg = json.dumps({"id": "f", "reader": "Emulated 01", "apdus": ["0084000008"]}).encode()
        frames = [client_frame(1, msg[:10], fin=False), client_frame(0, msg[10:30], fin=False),
                  client_frame(0, msg[30:])]
        self.assertEqual(self.answers(frames[0]), [])  # nothing until the last fragment
        got = self.answers(*frames[1:])
        self.assertEqual((len(got), got[0]["id"], len(got[0]["responses"][0])), (1, "f", 20))  # 8 bytes + 9000
        two = [json.dumps({"id": n, "reader": "Emulated 00", "apdus": ["00A4000C023F00"]}).encode() for n in (2, 3)]
        self.assertEqual([a["id"] for a in self.answers(*(client_frame(1, m) for m in two))], [2, 3])

    def test_bad_json_in_a_frame_is_answered_and_the_connection_stays(self):
        self.assertEqual(self.answers(client_frame(1, b"\xef\xbb\xbf{}"))[0]["error"]["code"], errors.MALFORMED)
        self.assertEqual(self.answers(client_frame(1, b'{"id": NaN}'))[0]["error"]["code"], errors.MALFORMED)
        msg = json.dumps({"id": 4, "reader": "Emulated 00", "apdus": ["00A4000C023F00"]}).encode()
        self.assertEqual(self.answers(client_frame(1, msg)), [{"id": 4, "atr": None, "responses": ["9000"]}])


    def test_a_deep_id_is_an_error_answer_not_a_dropped_connection(self):
        msg = b'{"id": ' + b"[" * 1000 + b"]" * 1000 + b', "reader": "Emulated 00", "apdus": ["00A4000C023F00"]}'
        self.ws.dataReceived(b"".join(client_frame(1, msg[i:i + 100], fin=False) if i == 0 else
                                      client_frame(0, msg[i:i + 100], fin=i + 100 >= len(msg))
                                      for i in range(0, len(msg), 100)))
        self.assertEqual(server_messages(self.transport.value())[0]["error"]["code"], errors.MALFORMED)
        self.assertFalse(self.transport.disconnecting)


class WebSocketFailures(SynchronousTestCase):
    """A client that breaks a limit or the protocol gets a close frame with
    the code (failByDrop off), and Autobahn's lines about it go through the
    API's rate-limited client log."""

    def setUp(self):
        from twisted.logger import globalLogPublisher

        self.case = WebSocketFrames("test_one_message_one_frame")
        self.case.setUp()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def connect(self, headers=f"Authorization: Bearer {TOKEN}\r\n"):
        ws = self.case.resource.ws_factory.buildProtocol(None)
        # as the HTTP base hands it over: with the header, the upgrade proved the token
        ws.upgrade = Session("192.168.1.1:1", "api", "192.168.1.1",
                             identity=full_access("api") if headers else None)
        transport = StringTransport()
        ws.makeConnection(transport)
        ws.dataReceived(("GET /api/v1/ws HTTP/1.1\r\nHost: proxy.test\r\nUpgrade: websocket\r\n"
                         "Connection: Upgrade\r\nSec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\n"
                         f"Sec-WebSocket-Version: 13\r\n{headers}\r\n").encode())
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101 "))
        transport.clear()
        return ws, transport

    @staticmethod
    def close_code(data):
        self_ = data[:2]
        assert self_[0] == 0x88, data  # FIN, close
        return int.from_bytes(data[2:4], "big")

    def test_too_big_before_authenticating_is_closed_with_1009(self):
        ws, transport = self.connect(headers="")
        ws.dataReceived(client_frame(1, b"x" * 100, fin=False) + client_frame(0, b"x" * 125, fin=False)
                        + b"".join(client_frame(0, b"x" * 125, fin=False) for _ in range(40)))
        self.assertEqual(self.close_code(transport.value()), 1009)

    def test_protocol_violation_is_closed_with_1002(self):
        ws, transport = self.connect()
        ws.dataReceived(bytes([0x81, 5]) + b"hello")  # an unmasked client frame
        self.assertEqual(self.close_code(transport.value()), 1002)

    def test_the_secret_of_an_upgrade_is_not_logged_even_at_debug_level(self):
        from twisted.logger import formatEvent

        from cloudfoxy_proxy import logs

        logs.set_level("debug")
        self.addCleanup(logs.set_level, "info")
        ws, transport = self.connect()
        ws.dataReceived(client_frame(1, b'{"id": 1, "reader": "Emulated 00", "apdus": ["00A4000C023F00"]}'))
        text = " ".join(formatEvent(e) + repr(e) for e in self.events)
        self.assertNotIn(TOKEN, text)

    def test_autobahn_lines_are_rate_limited_and_name_the_peer(self):
        for _ in range(30):
            ws, transport = self.connect()
            ws.dataReceived(bytes([0x81, 5]) + b"hello")
        lines = [e for e in self.events if "failing WebSocket connection" in e.get("log_format", "")]
        self.assertEqual(len(lines), 10)  # RateLimitedLog: 10 lines per 10 s, then a summary
        self.assertEqual(lines[0]["peer"], "192.168.1.1")  # StringTransport's peer
        self.assertIn("WebSocket client {peer}: ", lines[0]["log_format"])
        self.case.clock.advance(11)
        self.assertTrue(any("suppressed" in (e.get("log_format") or "") for e in self.events))


class Json(SynchronousTestCase):
    """The API's one JSON codec (jsonapi.to_json / jsonapi.from_json)."""

    def test_compact_utf8(self):
        self.assertEqual(jsonapi.to_json({"atr": None, "responses": ["9000"], "name": "Lecteur é"}),
                         '{"atr":null,"responses":["9000"],"name":"Lecteur é"}'.encode("utf-8"))
        self.assertEqual(jsonapi.dump({"a": 1}), b'{"a":1}\n')

    def test_what_orjson_refuses_is_still_written(self):
        self.assertEqual(jsonapi.to_json({"reader": "bad \udcff name"}), b'{"reader":"bad \\udcff name"}')
        self.assertEqual(jsonapi.to_json({"id": 2 ** 70}), b'{"id":1180591620717411303424}')

    def test_what_is_not_json_is_a_value_error(self):
        for text in (b"\xff", b"\xef\xbb\xbf{}", b'{"id": NaN}', b"[" * 2000 + b"]" * 2000, b'{"a": "\xed\xa0\x80"}',
                     b"{", b""):
            with self.assertRaises(ValueError, msg=text[:20]):
                jsonapi.from_json(text)
        self.assertEqual(jsonapi.from_json(b'{"id": 123456789012345678901234567890}'), {"id": 1.2345678901234568e29})


def template_of(path):
    """The route template (ApiResource.ROUTES) a request path falls under."""
    parts = path.split("?")[0].split("/")
    for _, template in api.ApiResource.ROUTES:
        t = template.split("/")
        if len(t) == len(parts) and all(a.startswith("{") or a == b for a, b in zip(t, parts)):
            return template
    return None


class ZzOpenApiStatuses(SynchronousTestCase):
    """Runs after the tests above (file order): every status they saw on a
    described route is described for that route and method."""

    def test_every_status_seen_is_described(self):
        spec = json.loads(api.resources.files("cloudfoxy_proxy.frontends").joinpath("openapi.json").read_text())
        seen = {(m, template_of(p), code) for m, p, code in ApiCase.seen if template_of(p) is not None}
        self.assertGreater(len(seen), 25)
        missing = sorted((m, t, c) for m, t, c in seen
                         if m != "OPTIONS" and str(c) not in spec["paths"][t].get(m.lower(), {}).get("responses", {})
                         and not (c == 405))
        self.assertEqual(missing, [])


class Options(SynchronousTestCase):
    """--api, --api-token-file / FOXYPROXY_API_TOKEN, --api-cors-origin (README.md's option table)."""

    def parse(self, *argv, env=None):
        import os
        from unittest import mock

        from cloudfoxy_proxy import tap

        with mock.patch.dict(os.environ, env or {}, clear=False):
            os.environ.pop("FOXYPROXY_API_TOKEN", None) if env is None else None
            options = tap.Options()
            options.parseOptions(list(argv))
        return options

    def test_api_needs_a_token(self):
        from twisted.python.usage import UsageError

        with self.assertRaises(UsageError) as e:
            self.parse("--api", "tcp:0")
        self.assertIn("--api needs a token", str(e.exception))
        options = self.parse("--api", "tcp:0", env={"FOXYPROXY_API_TOKEN": "t"})
        self.assertEqual(options["api-token"], "t")
        self.assertTrue(options["api"].startswith("tcp:0"))

    def test_token_file(self):
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".token") as f:
            f.write("from-file\n")
            f.flush()
            self.assertEqual(self.parse("--api", "tcp:0", "--api-token-file", f.name)["api-token"], "from-file")

    def test_cors_origins(self):
        from twisted.python.usage import UsageError

        env = {"FOXYPROXY_API_TOKEN": "t"}
        options = self.parse("--api", "tcp:0", "--api-cors-origin", "https://a.example",
                             "--api-cors-origin", "http://127.0.0.1:8000/", env=env)
        self.assertEqual(options["api-cors-origin"], ["https://a.example", "http://127.0.0.1:8000"])
        for bad in ("*", "a.example", "https://a.example/path", "ftp://a.example"):
            with self.assertRaises(UsageError, msg=bad):
                self.parse("--api", "tcp:0", "--api-cors-origin", bad, env=env)

    def test_cors_origins_from_a_config_file(self):
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
            f.write('api = "tcp:0"\napi-cors-origin = ["https://a.example", "https://b.example"]\n')
            f.flush()
            options = self.parse("--config", f.name, env={"FOXYPROXY_API_TOKEN": "t"})
        self.assertEqual(options["api-cors-origin"], ["https://a.example", "https://b.example"])

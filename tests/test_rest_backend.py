"""Unit tests of the ``cloudfoxy+http(s)://`` backend, in memory: a fake
CloudFoxy server is a twisted.web resource behind ``treq.testing.StubTreq``
(real HTTP/1.1 parsing over iosim), and a Clock drives the polling."""

import datetime
import os
import tempfile

from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface.verify import verifyObject

from cloudfoxy_proxy import errors
from cloudfoxy_proxy.interfaces import IBackend
from cloudfoxy_proxy.backends import BackendSettings, from_url as backend_from_url
from cloudfoxy_proxy.backends import rest
from cloudfoxy_proxy.backends.httpclient import HTTPPool
from cloudfoxy_proxy.cards.iso7816 import Iso7816Card
from cloudfoxy_proxy.errors import CardError
from cloudfoxy_proxy.registry import ReaderRegistry

ATR = "3B8B8001466F7879456D753738313677"
TOKEN = "s3cret-token"


class FakeCloudFoxy(Resource):
    """A scripted CloudFoxy server: ``script`` holds (status, body) answers
    for the next ``/api/v1/basic`` requests; ``hold`` keeps requests open."""

    isLeaf = True

    def __init__(self, cards=(1, 2, 3)):
        super().__init__()
        self.set_cards(cards)
        self.uptime = 100
        self.requests = []
        self.script = []
        self.hello_status = 200
        self.hold = None  # None, "headers" (nothing sent) or "body" (half a body sent)
        self.held = []
        self.finished = []

    def set_cards(self, numbers):
        self.cards = {f"/10.0.0.1@{n}": Iso7816Card(serial=n) for n in numbers}

    def render_GET(self, request):
        args = {k.decode(): v[0].decode() for k, v in request.args.items()}
        self.requests.append((request.path.decode(), args, request.getHeader(b"x-auth-token")))
        self.last_query = request.uri.partition(b"?")[2]
        if request.getHeader(b"x-auth-token") != TOKEN.encode():
            request.setResponseCode(401)
            return b"unauthorized\n"
        if request.path == b"/api/v1/hello":
            request.setResponseCode(self.hello_status)
            return f"CloudFoxy\nuptime {self.uptime} s\ncards {len(self.cards)}\n".encode()
        if request.path == b"/api/v1/inventory":
            return "".join(f"{n} {c.atr.hex().upper()}\n" for n, c in self.cards.items()).encode()
        if self.hold:
            self.held.append(request)
            request.notifyFinish().addBoth(self.finished.append)
            if self.hold == "body":
                request.setHeader(b"content-length", b"100")
                request.write(b"90")
            return NOT_DONE_YET
        if self.script:
            status, body = self.script.pop(0)
            request.setResponseCode(status)
            return body
        card = self.cards[args["terminal"]]
        out = card.reset() if args.get("reset") == "1" else None
        if "apdu" in args:
            out = card.transmit(bytes.fromhex(args["apdu"]))
        return out.hex().upper().encode() + b"\n"

    def basic_requests(self):
        return [r for r in self.requests if r[0] == "/api/v1/basic"]


class Flusher:
    def __init__(self, flush):
        self.flush = flush


def result_of(d):
    """The result of a fired Deferred, or the Failure it failed with."""
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def messages(events):
    return [formatEvent(e) for e in events]


class RestBackendTests(SynchronousTestCase):
    """treq's HTTPClient over an Agent (here treq.testing's in-memory one)
    for everything; the production hot path (httpclient.HTTPPool) is tested in
    test_httpclient.py and against real servers."""

    def make_http(self):
        agent = RequestTraversalAgent(self.server)
        return HTTPClient(agent), agent.flush

    def setUp(self):
        self.server = FakeCloudFoxy()
        http, flush = self.make_http()
        self.stub = Flusher(flush)
        self.clock = Clock()
        self.backend = rest.RestBackend(base_url="http://cloudfoxy.test:8081", token=TOKEN,
                                        clock=self.clock, http=http, poll=10.0, timeout=5.0)
        self.registry = ReaderRegistry()

    def start(self):
        self.backend.start(self.registry)
        self.stub.flush()
        self.addCleanup(self.backend.stop)

    def test_interface(self):
        verifyObject(IBackend, self.backend)
        self.assertIn("http://cloudfoxy.test:8081", self.backend.description)

    def test_start_lists_cards_with_names_and_aliases(self):
        self.start()
        self.assertEqual([r.name for r in self.registry.readers],
                         ["CloudFoxy 10.0.0.1@1", "CloudFoxy 10.0.0.1@2", "CloudFoxy 10.0.0.1@3"])
        reader = self.registry.readers[1]
        self.assertEqual(reader.key, "/10.0.0.1@2")
        self.assertEqual(reader.info.atr.hex().upper(), ATR)
        self.assertIs(self.registry.resolve("/10.0.0.1@2"), reader)
        self.assertIs(self.registry.resolve("Foxy NET 10.0.0.1-2"), reader)
        self.assertEqual([r[0] for r in self.server.requests], ["/api/v1/hello", "/api/v1/inventory"])
        self.assertTrue(all(token == TOKEN.encode() for _, _, token in self.server.requests))

    def test_transmit_and_reset(self):
        self.start()
        self.assertEqual(result_of(self.backend.transmit("/10.0.0.1@1", bytes.fromhex("00A4000C023F00"))),
                         b"\x90\x00")
        self.assertEqual(self.server.requests[-1][1],
                         {"terminal": "/10.0.0.1@1", "reset": "0", "apdu": "00A4000C023F00"})
        answer = result_of(self.backend.transmit("/10.0.0.1@1", bytes.fromhex("0084000008")))
        self.assertEqual((len(answer), answer[-2:]), (10, b"\x90\x00"))
        self.assertEqual(result_of(self.backend.reset("/10.0.0.1@3")).hex().upper(), ATR)
        self.assertEqual(self.server.requests[-1][1], {"terminal": "/10.0.0.1@3", "reset": "1"})

    def test_terminal_names_are_quoted(self):
        odd = "/Box 1&2+3=4?#%@5"
        self.server.cards = {odd: Iso7816Card(serial=9)}
        self.start()
        self.assertEqual(self.registry.readers[0].name, "CloudFoxy Box 1&2+3=4?#%@5")
        self.assertEqual(result_of(self.backend.transmit(odd, bytes.fromhex("00A4000C023F00"))), b"\x90\x00")
        self.assertEqual(self.server.requests[-1][1]["terminal"], odd)

    def test_body_lines_null_and_empty_are_ignored(self):
        self.start()
        self.server.script.append((200, b"null\n\n  6A 82  \nnull\n9000\n"))
        self.assertEqual(result_of(self.backend.transmit("/10.0.0.1@1", b"\x00\xa4\x00\x00")), b"\x6a\x82")

    def test_hardware_error_is_tried_three_times(self):
        self.start()
        self.server.script += [(200, b"C000\n"), (200, b"6F00C012\n")]
        self.assertEqual(result_of(self.backend.transmit("/10.0.0.1@1", bytes.fromhex("00A4000C023F00"))),
                         b"\x90\x00")
        self.assertEqual(len(self.server.basic_requests()), 3)

    def test_hardware_error_returned_after_three_tries(self):
        self.start()
        self.server.script += [(200, b"C000\n")] * 5
        with capturedLogs() as events:
            answer = result_of(self.backend.transmit("/10.0.0.1@1", bytes.fromhex("00A4000C023F00")))
        self.assertEqual(answer, b"\xc0\x00")
        self.assertEqual(len(self.server.basic_requests()), 3)
        self.assertEqual(len([m for m in messages(events) if "hardware error" in m]), 2)

    def test_reset_hardware_error_is_retried_but_atr_is_not(self):
        self.start()
        self.server.script += [(200, b"C001\n")]
        self.assertEqual(result_of(self.backend.reset("/10.0.0.1@1")).hex().upper(), ATR)
        self.assertEqual(len(self.server.basic_requests()), 2)
        self.server.script += [(200, b"3B02C012\n")]  # an ATR whose last bytes look like SW1 C0
        self.assertEqual(result_of(self.backend.reset("/10.0.0.1@1")), bytes.fromhex("3B02C012"))
        self.assertEqual(len(self.server.basic_requests()), 3)

    def assertUpstreamError(self, d, *words):
        failure = result_of(d)
        self.assertTrue(failure.check(CardError), failure)
        self.assertEqual(failure.value.code, errors.UPSTREAM)
        for word in words:
            self.assertIn(word, failure.value.reason)
        return failure

    def test_http_error_is_c086_once_and_not_retried(self):
        self.start()
        self.server.script.append((500, b"boom\n"))
        with capturedLogs() as events:
            self.assertUpstreamError(self.backend.transmit("/10.0.0.1@1", b"\x00\xa4\x00\x00"), "HTTP 500", "boom")
        self.assertEqual(len(self.server.basic_requests()), 1)
        lines = [m for m in messages(events) if "failed" in m]
        self.assertEqual(len(lines), 1)
        self.assertIn("APDU on /10.0.0.1@1 failed: HTTP 500", lines[0])
        self.assertNotIn(TOKEN, lines[0])
        self.assertNotIn("00A40000", lines[0])  # no APDU data in logs

    def test_wrong_token_says_so(self):
        self.backend.token = "wrong"
        self.backend.__attrs_post_init__()
        self.start()
        self.assertEqual(self.registry.readers, [])
        self.assertUpstreamError(self.backend.transmit("/10.0.0.1@1", b"\x00\xa4\x00\x00"),
                                 "HTTP 401", "token")

    def test_malformed_bodies_are_c086(self):
        self.start()
        for body in (b"", b"null\n", b"hello world\n", b"900\n"):
            self.server.script.append((200, body))
            self.assertUpstreamError(self.backend.transmit("/10.0.0.1@1", b"\x00\xa4\x00\x00"))
        # Hex of a wrong length is passed on: the dispatcher refuses it (C086).
        self.server.script.append((200, b"90\n"))
        self.assertEqual(result_of(self.backend.transmit("/10.0.0.1@1", b"\x00\xa4\x00\x00")),
                         b"\x90")

    def test_connection_refused_is_c086(self):
        class Refusing:
            def get(self, url, **kw):
                return fail(ConnectionRefusedError())

            def request(self, method, url, headers=None, bodyProducer=None):
                return fail(ConnectionRefusedError())

        self.backend.http = Refusing()
        with capturedLogs() as events:
            self.assertUpstreamError(self.backend.transmit("/10.0.0.1@1", b"\x00\xa4\x00\x00"), "refused")
        self.assertEqual(len([m for m in messages(events) if "connection refused" in m]), 1)

    def test_cancel_before_headers_aborts_the_request(self):
        self.start()
        self.server.hold = "headers"
        d = self.backend.transmit("/10.0.0.1@1", b"\x00\xa4\x00\x00")
        self.stub.flush()
        self.assertEqual(len(self.server.held), 1)
        d.cancel()
        self.assertTrue(result_of(d).check(CancelledError))
        self.stub.flush()
        self.assertEqual(len(self.server.finished), 1)
        self.assertIsNot(self.server.finished[0], None)  # notifyFinish failed: connection lost

    def test_cancel_during_body_aborts_the_request(self):
        self.start()
        self.server.hold = "body"
        d = self.backend.transmit("/10.0.0.1@1", b"\x00\xa4\x00\x00")
        self.stub.flush()
        self.assertFalse(d.called)
        with capturedLogs() as events:
            d.cancel()
            self.stub.flush()
        self.assertTrue(result_of(d).check(CancelledError))
        self.assertEqual(len(self.server.finished), 1)
        self.assertIsNot(self.server.finished[0], None)
        self.assertEqual([m for m in messages(events) if "failed" in m], [])  # the dispatcher logs timeouts

    def test_restart_rereads_inventory(self):
        self.start()
        self.server.set_cards([2, 3, 4])
        self.server.uptime = 150
        self.clock.advance(10)
        self.stub.flush()
        self.assertEqual(len(self.registry.readers), 3)
        self.assertIsNone(self.registry.get("CloudFoxy 10.0.0.1@4"))  # no restart: no re-read
        self.server.uptime = 3
        self.clock.advance(10)
        self.stub.flush()
        self.assertEqual([r.name for r in self.registry.readers],
                         ["CloudFoxy 10.0.0.1@2", "CloudFoxy 10.0.0.1@3", "CloudFoxy 10.0.0.1@4"])
        self.assertEqual(result_of(self.backend.transmit("/10.0.0.1@4", bytes.fromhex("00A4000C023F00"))),
                         b"\x90\x00")

    def test_first_inventory_is_retried_quickly(self):
        self.server.hello_status = 503
        with capturedLogs() as events:
            self.start()
            self.assertEqual(self.registry.readers, [])
            self.clock.advance(0.5)
            self.stub.flush()
            self.clock.advance(1.0)
            self.stub.flush()
        self.assertEqual(len([m for m in messages(events) if "cannot read" in m]), 1)  # not once a try
        self.server.hello_status = 200
        self.clock.advance(2.0)
        self.stub.flush()
        self.assertEqual(len(self.registry.readers), 3)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime() - self.clock.seconds(), 10.0)

    def test_polls_are_bounded_and_aborted(self):
        cancelled = []

        class Silent:
            def get(self, url, **kw):
                return Deferred(cancelled.append)

        self.backend.http = Silent()
        with capturedLogs() as events:
            self.backend.start(self.registry)
            self.clock.advance(5.0)
        self.assertEqual(len(cancelled), 1)
        self.assertTrue(any("no answer within 5s" in m for m in messages(events)))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # the next try
        self.backend.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_cancels_polling(self):
        self.start()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.backend.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class TreqOnlyTests(RestBackendTests):
    """The same, every request through treq (``treq.testing.StubTreq``)."""

    def make_http(self):
        stub = StubTreq(self.server)
        return stub, stub.flush


class ParsingTests(SynchronousTestCase):
    def test_inventory(self):
        body = (b"/192.168.42.10@1 3B8B8001466F7879456D753738313677\r\n"
                b"null\n\n/192.168.42.10@2\n/Emulated 00 3b00\n/Card 3B 00\n"
                b"/192.168.42.10@1 3B00\n  Foxy USB reader  \n")
        self.assertEqual(rest.parse_inventory(body), [
            ("/192.168.42.10@1", bytes.fromhex(ATR)),
            ("/192.168.42.10@2", None),
            ("/Emulated 00", b"\x3b\x00"),
            ("/Card 3B 00", None),
            ("Foxy USB reader", None),
        ])

    def test_uptime(self):
        self.assertEqual(rest.parse_uptime(b"CloudFoxy\nuptime 1234 seconds\nx\n"), 1234)
        for bad in (b"", b"one line\n", b"a\nuptime\nc\n", b"a\nuptime soon\n"):
            self.assertRaises(CardError, rest.parse_uptime, bad)

    def test_hardware_error(self):
        self.assertTrue(rest.hardware_error("C000", False))
        self.assertTrue(rest.hardware_error("6F00c012", False))
        self.assertFalse(rest.hardware_error("9000", False))
        self.assertFalse(rest.hardware_error("C0009000", False))
        self.assertTrue(rest.hardware_error("C0 01", True))
        self.assertFalse(rest.hardware_error("3B02C012", True))

    def test_foxy_names(self):
        self.assertEqual(rest.foxy_name("/192.168.42.10@12"), "Foxy NET 192.168.42.10-12")
        self.assertEqual(rest.foxy_name("OMNIKEY 3121"), "Foxy USB OMNIKEY 3121")
        self.assertEqual(rest.foxy_name("/Emulated 00"), "Foxy USB /Emulated 00")


def make_tls_files(directory, hostname="localhost"):
    """A CA, a server certificate for ``hostname`` and 127.0.0.1 signed by it,
    and a client certificate: PEM files in ``directory``; their paths."""
    from ipaddress import ip_address

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def cert(subject_key, cn, issuer_cert, issuer_key, ca=False, sans=None):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        builder = (x509.CertificateBuilder().subject_name(name)
                   .issuer_name(issuer_cert.subject if issuer_cert else name)
                   .public_key(subject_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def pem_key(k):
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    def pem_cert(c):
        return c.public_bytes(serialization.Encoding.PEM)

    ca_key = key()
    ca_cert = cert(ca_key, "Test CA", None, ca_key, ca=True)
    server_key = key()
    server_cert = cert(server_key, hostname, ca_cert, ca_key,
                       sans=[x509.DNSName(hostname), x509.IPAddress(ip_address("127.0.0.1"))])
    client_key = key()
    client_cert = cert(client_key, "proxy client", ca_cert, ca_key)
    other_key = key()
    other_ca = cert(other_key, "Other CA", None, other_key, ca=True)
    files = {
        "ca": pem_cert(ca_cert),
        "server-cert": pem_cert(server_cert),
        "server-key": pem_key(server_key),
        "client-cert": pem_cert(client_cert),
        "client-key": pem_key(client_key),
        "client-both": pem_cert(client_cert) + pem_key(client_key),
        "other-ca": pem_cert(other_ca),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = os.path.join(directory, name + ".pem")
        with open(paths[name], "wb") as f:
            f.write(data)
    return paths


class FromUrlTests(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.token_file = os.path.join(self.dir, "token")
        with open(self.token_file, "w") as f:
            f.write("from-file\n")

    def build(self, url, token=None):
        from twisted.internet.testing import MemoryReactorClock

        make = backend_from_url(url, BackendSettings(token=token, command_timeout=2.0))
        backend = make(MemoryReactorClock())
        verifyObject(IBackend, backend)
        return backend

    def test_http(self):
        b = self.build("cloudfoxy+http://127.0.0.1:8081", token="from-config")
        self.assertEqual((b.base_url, b.token, b.poll, b.timeout, b.prefix), (
            "http://127.0.0.1:8081", "from-config", 10.0, 2.0, "CloudFoxy"))
        self.assertEqual(b.pool.maxPersistentPerHost, 128)
        self.assertTrue(b.pool.retryAutomatically)  # hello and inventory only: idempotent
        self.assertIsInstance(b.client, HTTPPool)  # card commands: never retried
        self.assertTrue(b.pool.persistent)

    def test_token_file_wins_and_options(self):
        b = self.build(f"cloudfoxy+http://[::1]:9/base/?token_file={self.token_file}&poll=2.5"
                       f"&prefix=Box&connections=300", token="from-config")
        self.assertEqual((b.base_url, b.token, b.poll, b.prefix), (
            "http://[::1]:9/base", "from-file", 2.5, "Box"))
        self.assertEqual(b.pool.maxPersistentPerHost, 300)
        self.assertEqual(b.display_name("/1.2.3.4@5"), "Box 1.2.3.4@5")

    def test_errors(self):
        cases = {
            "cloudfoxy+http://127.0.0.1:8081": "no token",
            f"cloudfoxy+http://127.0.0.1:8081?token_file={self.dir}/missing": "token_file=",
            "cloudfoxy+http://:8081": "needs a server",
            "cloudfoxy+http://127.0.0.1:99999": "port",
            "cloudfoxy+http://user:pw@127.0.0.1:1": "credentials",
            "cloudfoxy+http://127.0.0.1:1?poll=0": "poll=0",
            "cloudfoxy+http://127.0.0.1:1?pol=1": "unknown parameter",
            "cloudfoxy+http://127.0.0.1:1?ca=x.pem": "need cloudfoxy+https",
            f"cloudfoxy+https://127.0.0.1:1?ca={self.token_file}": "no PEM certificate",
            "cloudfoxy+https://127.0.0.1:1?key=k.pem": "key= needs cert=",
        }
        for url, words in cases.items():
            config = BackendSettings(token="t") if words != "no token" else BackendSettings()
            with self.assertRaises(ValueError, msg=url) as caught:
                backend_from_url(url, config)
            self.assertIn(words, str(caught.exception), url)

    def test_https_with_private_ca_and_client_certificate(self):
        paths = make_tls_files(self.dir)
        b = self.build(f"cloudfoxy+https://localhost:8443?ca={paths['ca']}&cert={paths['client-cert']}"
                       f"&key={paths['client-key']}", token="t")
        self.assertEqual(b.base_url, "https://localhost:8443")
        policy = rest.load_tls({"ca": paths["ca"], "cert": paths["client-both"]})
        self.assertIsNotNone(policy.trust_root)
        self.assertIsNotNone(policy.client_cert)
        creator = policy.creatorForNetloc(b"localhost", 8443)
        self.assertTrue(hasattr(creator, "clientConnectionForTLS"))
        with self.assertRaises(ValueError) as caught:
            rest.load_tls({"cert": paths["client-cert"]})  # no key anywhere
        self.assertIn("cert=", str(caught.exception))


class EndpointTests(SynchronousTestCase):
    def test_one_endpoint_per_server(self):
        from twisted.internet.testing import MemoryReactorClock
        from twisted.web.client import URI, BrowserLikePolicyForHTTPS, SchemeNotSupported

        endpoints = rest.OneServer(MemoryReactorClock(), BrowserLikePolicyForHTTPS(), 3.0)
        first = endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8081/api/v1/basic?x=1"))
        self.assertIs(endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8081/api/v1/hello")), first)
        secure = endpoints.endpointForURI(URI.fromBytes(b"https://localhost:8443/"))
        self.assertIsNot(secure, first)
        self.assertIsNot(getattr(secure, "_wrappedEndpoint", None), None)  # wrapClientTLS around it
        self.assertRaises(SchemeNotSupported, endpoints.endpointForURI, URI.fromBytes(b"ftp://x:1/"))


class BatchTests(SynchronousTestCase):
    """Issue 12 point 6: a run of commands is one /api/v1/basic call with
    repeated apdu= (reset=1 first when it starts with RESET)."""

    make_http = RestBackendTests.make_http
    start = RestBackendTests.start

    def setUp(self):
        RestBackendTests.setUp(self)
        self.server.cards["/10.0.0.1@1"].atr = bytes.fromhex(ATR)  # listed in the inventory

    def test_apdus_in_one_call(self):
        self.start()
        self.server.script.append((200, b"6F00\n9000\nnull\n"))
        d = self.backend.transmit_batch("/10.0.0.1@1", [("APDU", b"\x00\xa4\x00\x00"),
                                                        ("APDU", b"\x00\xb0\x00\x00")])
        self.stub.flush()
        self.assertEqual(result_of(d), [b"\x6f\x00", b"\x90\x00"])
        [(path, args, _)] = self.server.basic_requests()
        self.assertEqual(args["reset"], "0")
        self.assertEqual(self.server.last_query.count(b"apdu="), 2)

    def test_reset_first_uses_the_inventory_atr(self):
        self.start()
        self.server.script.append((200, b"9000\n6A82\n"))
        d = self.backend.transmit_batch("/10.0.0.1@1", [("RESET", None), ("APDU", b"\x00\xa4\x00\x00"),
                                                        ("APDU", b"\x00\xb0\x00\x00")])
        self.stub.flush()
        self.assertEqual(result_of(d), [bytes.fromhex(ATR), b"\x90\x00", b"\x6a\x82"])
        [(_, args, _)] = self.server.basic_requests()
        self.assertEqual(args["reset"], "1")

    def test_server_that_answers_the_atr_too(self):
        self.start()
        self.server.script.append((200, b"3B00\n9000\n"))
        d = self.backend.transmit_batch("/10.0.0.1@1", [("RESET", None), ("APDU", b"\x00\xa4\x00\x00")])
        self.stub.flush()
        self.assertEqual(result_of(d), [b"\x3b\x00", b"\x90\x00"])

    def test_wrong_line_count_fails_those_steps(self):
        self.start()
        self.server.script.append((200, b"9000\n"))
        d = self.backend.transmit_batch("/10.0.0.1@1", [("APDU", b"\x00\xa4\x00\x00")] * 3)
        self.stub.flush()
        self.assertEqual([getattr(v, "code", v) for v in result_of(d)], ["C086"] * 3)

    def test_http_error_fails_every_step(self):
        self.start()
        self.server.script.append((500, b"boom\n"))
        d = self.backend.transmit_batch("/10.0.0.1@1", [("APDU", b"\x00\xa4\x00\x00")] * 2)
        self.stub.flush()
        self.assertEqual([getattr(v, "code", v) for v in result_of(d)], ["C086"] * 2)

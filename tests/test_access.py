"""Access control in memory (docs/security.md): the credentials file,
identities' reader/command/front-end permissions enforced by the dispatcher,
protected mode, throttled failed authentication, the audit log, and the
foxyproxy-credentials script."""

import hashlib
import io
import json
import os
import tempfile
from contextlib import redirect_stderr, redirect_stdout

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy import access as access_module
from cloudfoxy_proxy import secrets as secrets_module
from cloudfoxy_proxy.access import Access, Identity, Throttle, is_local, load_credentials
from cloudfoxy_proxy.audit import AuditLog
from cloudfoxy_proxy.backends.emulated import EmulatedBackend, from_url
from cloudfoxy_proxy.cards.iso7816 import Iso7816Card
from cloudfoxy_proxy.cards.piv import pad_pin
from cloudfoxy_proxy.dispatch import Dispatcher, Session
from cloudfoxy_proxy.registry import ReaderRegistry, b64name
from cloudfoxy_proxy.frontends.line import LineFactory

SELECT = ">1:APDU:00A4000C023F00|\n\n"
A_SECRET, B_SECRET, SIGNER_SECRET = "secret-of-a-0123456789", "secret-of-b-0123456789", "signer-secret-0123456"


def sha(text):
    return hashlib.sha256(text.encode()).hexdigest()


CREDENTIALS = f"""
[[client]]
name = "a"
secret_sha256 = "{sha(A_SECRET)}"
readers = ["Emulated 00"]

[[client]]
name = "b"
secret_sha256 = "{sha(B_SECRET)}"
readers = ["Emulated 0[12]"]
frontends = ["rest"]

[[client]]
name = "reader-only"
secret_sha256 = "{sha(SIGNER_SECRET)}"
readers = ["*"]
commands = ["READERS"]
"""


def write(text):
    fd, path = tempfile.mkstemp(suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


class Harness:
    def __init__(self, access=None, password=None, cards=3):
        self.clock = Clock()
        self.registry = ReaderRegistry()
        EmulatedBackend(self.clock, [Iso7816Card(serial=i) for i in range(cards)]).start(self.registry)
        if access is None and password is not None:
            access = Access(simple=[(password, None)])  # simple mode: one client password
        self.dispatcher = Dispatcher(self.registry, self.clock, 15.0, access=access)
        self.factory = LineFactory(self.dispatcher)

    def connect(self, host="127.0.0.1", port=40000):
        proto = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        proto.makeConnection(transport)
        return proto, transport

    @staticmethod
    def send(proto, transport, text):
        proto.dataReceived(text.encode())
        value = transport.value().decode()
        transport.clear()
        return value


class LogCapture:
    """Collects the log events of a test in ``self.events``."""

    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)


class CredentialsFileTests(SynchronousTestCase):
    def test_loads_identities(self):
        access = load_credentials(write(CREDENTIALS))
        self.assertEqual(access.mode, "identities")
        a = access.by_hash[hashlib.sha256(A_SECRET.encode()).digest()]
        self.assertEqual((a.name, a.readers, a.commands, a.frontends), ("a", ("Emulated 00",), None, None))
        self.assertEqual(access.check(A_SECRET + ":123456", "line"), (a, "123456"))
        self.assertEqual(access.check("wrong", "line"), (None, None))

    def test_problems_are_one_line_naming_the_client(self):
        good = f'name = "x"\nsecret_sha256 = "{sha("s")}"\n'
        for text, words in [
            ("[[client]]\n" + good + "readers = 'x'\n", ["'x'", "readers must be a list"]),
            ("[[client]]\n" + good + "colour = 1\n", ["'x'", "unknown key 'colour'"]),
            ("[[client]]\n" + good + "commands = ['FLY']\n", ["'x'", "unknown command 'FLY'"]),
            ("[[client]]\n" + good + "frontends = ['smtp']\n", ["'x'", "unknown front end 'smtp'"]),
            ("[[client]]\nname = \"y\"\nsecret_sha256 = \"abc\"\n", ["'y'", "64 hex digits"]),
            ("[[client]]\nname = \"y\"\n", ["'y'", "secret_sha256 and/or cert_sha256"]),
            ("[[client]]\nname = \"y\"\ncert_sha256 = \"AB:CD\"\n", ["'y'", "SHA-256 fingerprint"]),
            ("[[client]]\n" + good + "[[client]]\n" + good, ["'x'", "used twice"]),
            ("client = 3\n", ["no [[client]] table"]),
            ("[[client\n", ["not valid TOML"]),
        ]:
            with self.assertRaises(ValueError) as e:
                load_credentials(write(text))
            message = str(e.exception)
            self.assertNotIn("\n", message)
            for word in words:
                self.assertIn(word, message)
        with self.assertRaises(ValueError) as e:
            load_credentials("/nonexistent/creds.toml")
        self.assertIn("No such file", str(e.exception))

    def test_reader_patterns_are_case_sensitive_globs_over_names_and_aliases(self):
        class R:
            def __init__(self, name, aliases=(), extra=()):
                self.name, self.aliases, self.extra_aliases = name, aliases, extra

        ident = Identity("x", readers=["Emulated 0[01]", "sign-*"])
        self.assertTrue(ident.sees(R("Emulated 00")))
        self.assertFalse(ident.sees(R("Emulated 02")))
        self.assertFalse(ident.sees(R("emulated 00")))
        self.assertTrue(ident.sees(R("Card X", extra=("sign-key",))))
        self.assertFalse(Identity("none", readers=[]).sees(R("Emulated 00")))

    def test_is_local(self):
        for host, want in [("127.0.0.1", True), ("127.8.9.1", True), ("::1", True),
                           ("::ffff:127.0.0.1", True), (None, True), ("192.0.2.1", False),
                           ("10.0.0.1", False), ("::ffff:192.0.2.1", False)]:
            self.assertEqual(is_local(host), want, host)


class IdentityEnforcementTests(SynchronousTestCase):
    def setUp(self):
        self.h = Harness(load_credentials(write(CREDENTIALS)))

    def test_reader_outside_permissions_is_invisible(self):
        proto, t = self.h.connect()
        # READERS lists only what a may see
        self.assertEqual(self.h.send(proto, t, f">*:{A_SECRET}|\n>1:READERS|\n\n"),
                         f">1:{b64name('Emulated 00')}\n@@\n")
        self.assertEqual(self.h.send(proto, t, f">Emulated 00:{A_SECRET}|\n" + SELECT), ">1:9000\n@@\n")
        # named exactly, by a pattern that would match several, by a regex: not found
        self.assertEqual(self.h.send(proto, t, f">Emulated 01:{A_SECRET}|\n" + SELECT), ">1:C083\n@@\n")
        self.assertEqual(self.h.send(proto, t, f">Emulated:{A_SECRET}|\n" + SELECT), ">1:9000\n@@\n")
        self.assertEqual(self.h.send(proto, t, f">Emulated 0[12]:{A_SECRET}|\n" + SELECT), ">1:C083\n@@\n")

    def test_forbidden_front_end_and_command(self):
        proto, t = self.h.connect()
        self.assertEqual(self.h.send(proto, t, f">Emulated 01:{B_SECRET}|\n" + SELECT), ">1:C085\n@@\n")
        proto, t = self.h.connect(port=40001)
        self.assertEqual(self.h.send(proto, t, f">*:{SIGNER_SECRET}|\n>1:READERS|\n>2:APDU:00A4000C023F00|\n\n"),
                         f">1:{self.h.registry.listing}\n>2:C085\n@@\n")

    def test_no_secret_no_service(self):
        proto, t = self.h.connect()
        self.assertEqual(self.h.send(proto, t, ">*|\n>1:READERS|\n" + SELECT.replace(">1", ">2")),
                         ">1:C085\n>2:C085\n@@\n")

    def test_authenticated_connection_costs_no_hashing(self):
        proto, t = self.h.connect()
        calls = []
        real = access_module.hashlib.sha256
        self.patch(access_module.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
        for _ in range(5):
            self.assertEqual(self.h.send(proto, t, f">Emulated 00:{A_SECRET}|\n" + SELECT), ">1:9000\n@@\n")
        self.assertEqual(len(calls), 1)
        # later requests without the secret run as the connection's identity
        self.assertEqual(self.h.send(proto, t, ">Emulated 00|\n" + SELECT), ">1:9000\n@@\n")
        self.assertEqual(len(calls), 1)

    def test_session_with_fixed_identity(self):
        """What mtls: and the vpcd bridge do: the front end sets the identity."""
        b = [i for i in self.h.dispatcher.access.by_hash.values() if i.name == "b"][0]
        session = Session("x", "rest", "192.0.2.9", identity=b)
        from cloudfoxy_proxy.parser import make_command

        out = []
        self.h.dispatcher.submit("Emulated 00", [make_command(["1", "APDU", "00A4000C023F00"])],
                                 session=session).addCallback(out.append)
        self.h.dispatcher.submit("Emulated 02", [make_command(["1", "APDU", "00A4000C023F00"])],
                                 session=session).addCallback(out.append)
        self.assertEqual(out, [[("1", "C083")], [("1", "9000")]])


class SimpleModeTests(SynchronousTestCase):
    def test_password_still_works_and_listings_stay_open(self):
        h = Harness(password="s3cret")
        proto, t = h.connect("192.0.2.7")
        self.assertEqual(h.send(proto, t, ">*|\n>1:READERS|\n\n"), f">1:{h.registry.listing}\n@@\n")
        self.assertEqual(h.send(proto, t, ">Emulated 00|\n" + SELECT), ">1:C085\n@@\n")
        self.assertEqual(h.send(proto, t, ">Emulated 00:s3cret|\n" + SELECT), ">1:9000\n@@\n")

    def test_listings_ignore_a_wrong_password(self):
        """As before identities: a tcp:// backend's READERS with a wrong password still lists."""
        h = Harness(password="s3cret")
        proto, t = h.connect()
        for _ in range(10):
            self.assertEqual(h.send(proto, t, ">*:wrong|\n>1:READERS|\n\n"), f">1:{h.registry.listing}\n@@\n")
        self.assertEqual((h.factory.auth_failures, t.disconnecting), (0, False))
        self.assertEqual(h.send(proto, t, ">Emulated 00:wrong|\n>1:READERS|\n>2:APDU:00A4000C023F00|\n\n"),
                         f">1:{h.registry.listing}\n>2:C085\n@@\n")
        self.assertEqual(h.factory.auth_failures, 1)


class ProtectedModeTests(LogCapture, SynchronousTestCase):
    def lines(self):
        return [formatEvent(e) for e in self.events if "protected mode" in formatEvent(e)]

    def test_loopback_served_others_refused_and_told_once(self):
        h = Harness()
        proto, t = h.connect("127.0.0.1")
        self.assertEqual(h.send(proto, t, ">Emulated 00|\n" + SELECT), ">1:9000\n@@\n")
        for port in (1, 2, 3):
            proto, t = h.connect("192.0.2.1", port)
            self.assertEqual(h.send(proto, t, ">*|\n>1:READERS|\n>2:APDU:00A4000C023F00|\n\n"),
                             ">1:C085\n>2:C085\n@@\n")
        lines = self.lines()
        self.assertEqual(len(lines), 1)
        self.assertIn("192.0.2.1", lines[0])
        self.assertIn("--credentials", lines[0])
        self.assertIn("--allow-anonymous", lines[0])

    def test_unix_socket_clients_are_local(self):
        h = Harness()
        proto = h.factory.buildProtocol(None)
        t = StringTransport(peerAddress=UNIXAddress(None))
        proto.makeConnection(t)
        self.assertEqual(h.send(proto, t, ">Emulated 00|\n" + SELECT), ">1:9000\n@@\n")

    def test_allow_anonymous(self):
        h = Harness(Access(allow_anonymous=True))
        proto, t = h.connect("192.0.2.1")
        self.assertEqual(h.send(proto, t, ">Emulated 00|\n" + SELECT), ">1:9000\n@@\n")


class ThrottleTests(LogCapture, SynchronousTestCase):
    def test_delays_grow_are_capped_and_serialised_per_peer(self):
        t = Throttle()
        delays = [t.failed("192.0.2.1", 100.0) for _ in range(8)]
        self.assertEqual(delays[:3], [0.0, 0.0, 0.0])
        # spaced one after another: 0.25, +0.5, +1, +2, +4 from the same moment
        self.assertEqual(delays[3:], [0.25, 0.75, 1.75, 3.75, 7.75])
        self.assertEqual(t.failed("192.0.2.2", 100.0), 0.0)  # other peers are not slowed
        self.assertEqual(t.failures("192.0.2.1"), 8)
        self.assertEqual(t.failed("192.0.2.1", 100.0 + Throttle.FORGET + 10), 0.0)  # forgotten

    def test_guessing_on_a_line_connection_is_slowed_logged_and_cut(self):
        h = Harness(password="right-password")
        proto, t = h.connect("192.0.2.5")
        answered, seconds = 0, 0.0
        for i in range(Throttle.CLOSE_AFTER):
            proto.dataReceived(b">Emulated 00:guess%d|\n>1:APDU:00A4000C023F00|\n\n" % i)
            while ">1:C085" not in t.value().decode():
                h.clock.advance(0.05)
                seconds += 0.05
            t.clear()
            answered += 1
        self.assertGreaterEqual(seconds, 15.0)  # 0.25 + 0.5 + 1 + 2 + 4 + 4 + 4
        self.assertTrue(t.disconnecting)  # closed after CLOSE_AFTER failures
        self.assertEqual(h.factory.auth_failures, Throttle.CLOSE_AFTER)
        text = "\n".join(formatEvent(e) for e in self.events)
        self.assertIn("authentication failed on line", text)
        self.assertIn("192.0.2.5", text)
        self.assertNotIn("guess", text)  # never the guessed value
        # another peer with the right password: served at once
        proto2, t2 = h.connect("192.0.2.6")
        self.assertEqual(h.send(proto2, t2, ">Emulated 00:right-password|\n" + SELECT), ">1:9000\n@@\n")

    def test_client_gone_during_delay_leaves_no_timer(self):
        h = Harness(password="right-password")
        proto, t = h.connect("192.0.2.5")
        for i in range(Throttle.FREE):
            h.send(proto, t, f">Emulated 00:g{i}|\n" + SELECT)
        proto.dataReceived(b">Emulated 00:gx|\n>1:APDU:00A4000C023F00|\n\n")
        self.assertEqual(t.value(), b"")  # delayed
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)
        proto.connectionLost(None)
        self.assertEqual(h.clock.getDelayedCalls(), [])


class AuditTests(SynchronousTestCase):
    def test_records_requests_and_failures_without_data(self):
        path = write("")
        h = Harness(load_credentials(write(CREDENTIALS)))
        h.dispatcher.audit = AuditLog(path)
        proto, t = h.connect()
        h.send(proto, t, f">Emulated 00:{A_SECRET}|\n>1:APDU:00A4000C023F00|\n>2:RESET|\n\n")
        h.send(proto, t, ">*|\n>1:READERS|\n\n")  # no card command: not audited
        h.send(proto, t, ">Emulated 00:not-the-secret|\n" + SELECT)
        records = [json.loads(line) for line in open(path)]
        self.assertEqual(len(records), 2)  # a refused request is its auth_failure line only
        first = records[0]
        self.assertEqual({k: first[k] for k in ("event", "identity", "peer", "frontend", "reader",
                                                "commands", "count", "results")},
                         {"event": "request", "identity": "a", "peer": "127.0.0.1:40000", "frontend": "line",
                          "reader": "Emulated 00", "commands": {"APDU": 1, "RESET": 1}, "count": 2,
                          "results": {"OK": 2}})
        self.assertGreaterEqual(first["duration_ms"], 0)
        self.assertEqual(records[1]["event"], "auth_failure")
        text = open(path).read()
        for secret in ("00A4000C023F00", A_SECRET, "not-the-secret"):
            self.assertNotIn(secret, text)
        # reopened (logrotate): later records go to the new file
        os.rename(path, path + ".1")
        h.dispatcher.audit.reopen()
        h.send(proto, t, f">Emulated 00:{A_SECRET}|\n" + SELECT)
        self.assertEqual(len(open(path).readlines()), 1)

    def test_what_a_client_typed_as_reader_line_is_never_written(self):
        path = write("")
        h = Harness(load_credentials(write(CREDENTIALS)))
        h.dispatcher.audit = AuditLog(path)
        proto, t = h.connect()
        h.send(proto, t, f">Emulated 00:{A_SECRET}|\n" + SELECT)  # authenticated: later lines may omit it
        h.send(proto, t, f">{A_SECRET}|\n" + SELECT)  # the secret typed as the reader line
        h.send(proto, t, f">Emulated 00;{A_SECRET}|\n" + SELECT)  # a mistyped separator
        h.send(proto, t, f">Emulated 00:{A_SECRET}|\n>1:APDU:00A4|\n\n")  # malformed only: nothing ran
        text = open(path).read()
        self.assertNotIn(A_SECRET, text)
        records = [json.loads(line) for line in text.splitlines()]
        self.assertEqual([(r["event"], r["reader"]) for r in records],
                         [("request", "Emulated 00"), ("request", None), ("request", None)])


class ToolTests(SynchronousTestCase):
    """foxyproxy-credentials (secrets.main): the secret never on stdout."""

    def run_tool(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            status = secrets_module.main(list(argv))
        return status, out.getvalue(), err.getvalue()

    def test_new_client_table_on_stdout_secret_in_a_0600_file(self):
        folder = tempfile.mkdtemp()
        secret_file = os.path.join(folder, "billing.secret")
        status, out, err = self.run_tool("billing", "--secret-file", secret_file)
        self.assertEqual(status, 0)
        self.assertEqual(os.stat(secret_file).st_mode & 0o777, 0o600)
        secret = open(secret_file).read().strip()
        self.assertGreaterEqual(len(secret), 43)  # 256 bits
        self.assertNotIn(secret, out + err)
        access = load_credentials(write(out))  # stdout as it is: `>> clients.toml`
        self.assertEqual(access.check(secret, "line")[0].name, "billing")
        # an existing file is never overwritten
        status, out, err = self.run_tool("other", "--secret-file", secret_file)
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err, f"foxyproxy-credentials: --secret-file {secret_file!r}: File exists\n")
        self.assertEqual(open(secret_file).read().strip(), secret)

    def test_rotate_replaces_only_that_clients_hash(self):
        folder = tempfile.mkdtemp()
        path = os.path.join(folder, "clients.toml")
        with open(path, "w") as f:
            f.write(CREDENTIALS)
        os.chmod(path, 0o640)
        status, out, err = self.run_tool("--rotate", path, "b", "--secret-file", os.path.join(folder, "b"))
        self.assertEqual((status, out), (0, ""))
        new = open(os.path.join(folder, "b")).read().strip()
        access = load_credentials(path)
        self.assertEqual(access.check(new, "line")[0].name, "b")
        self.assertEqual(access.check(B_SECRET, "line"), (None, None))
        self.assertEqual(access.check(A_SECRET, "line")[0].name, "a")
        self.assertEqual(open(path).read(), CREDENTIALS.replace(sha(B_SECRET), sha(new)))
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o640)
        status, out, err = self.run_tool("--rotate", path, "nobody")
        self.assertEqual(status, 1)
        self.assertEqual(err.splitlines(), [
            f"foxyproxy-credentials: --rotate {path!r}: no client 'nobody' (written as name = \"nobody\") in the file"])

    def test_check_gives_start_ups_one_line_errors(self):
        good = write(CREDENTIALS)
        status, out, err = self.run_tool("--check", good)
        self.assertEqual((status, err), (0, ""))
        self.assertIn("valid", out)
        bad = write('[[client]]\nname = "billing"\nsecret_sha256 = "1234"\n')
        status, out, err = self.run_tool("--check", bad)
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err.splitlines(), [
            f"foxyproxy-credentials: --credentials {bad!r}, client 'billing': secret_sha256 must be 64 hex "
            "digits (make one with foxyproxy-credentials)"])

    def test_usage_errors_are_one_line(self):
        for argv in ([], ["--bogus"], ['bad"name'], ["--check"]):
            status, out, err = self.run_tool(*argv)
            self.assertEqual((status, out), (2 if argv != ['bad"name'] else 1, ""), argv)
            self.assertEqual(len(err.splitlines()), 1, (argv, err))
            self.assertTrue(err.startswith("foxyproxy-credentials: "), err)


class EmulatedPinFileTests(SynchronousTestCase):
    def test_pin_file(self):
        path = write("654321\n")
        make = from_url(f"emulated:?type=piv&cards=1&pin_file={path}", {})
        backend = make(Clock())
        self.assertEqual(backend.cards[0]._pin, pad_pin("654321"))
        with self.assertRaises(ValueError) as e:
            from_url("emulated:?type=piv&pin_file=/nonexistent/pin", {})
        self.assertIn("pin_file=", str(e.exception))


class RestTests(SynchronousTestCase):
    """The REST front end asks the same dispatcher (the HTTP base, frontends/http.py)."""

    def setUp(self):
        from support import memory_core

        from cloudfoxy_proxy.frontends import rest as restapi

        self.h = Harness(load_credentials(write(CREDENTIALS)))
        resource = restapi.RestResource(self.h.dispatcher, self.h.registry, self.h.clock)
        self.site = restapi.RestSite(resource, memory_core(self.h.dispatcher, self.h.clock))

    def get(self, path, token, host="10.0.0.9"):
        peer = IPv4Address("TCP", host, 5555)
        channel = self.site.buildProtocol(peer)
        t = StringTransport(peerAddress=peer)
        channel.makeConnection(t)
        channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nX-Auth-Token: " + token + b"\r\n\r\n")
        return channel, t

    def test_inventory_and_terminals_of_the_identity_only(self):
        _, t = self.get(b"/api/v1/inventory", A_SECRET.encode())
        self.assertEqual([line.split()[0] for line in t.value().partition(b"\r\n\r\n")[2].splitlines()],
                         [b"/Emulated_00"])
        _, t = self.get(b"/api/v1/basic?terminal=Emulated_01&apdu=00A4000C023F00", A_SECRET.encode())
        self.assertTrue(t.value().startswith(b"HTTP/1.1 404 "), t.value())
        _, t = self.get(b"/api/v1/basic?terminal=Emulated_01&apdu=00A4000C023F00", B_SECRET.encode())
        self.assertTrue(t.value().endswith(b"\r\n\r\n9000\n"), t.value())  # b: REST only

    def test_guessed_tokens_are_answered_later_and_later(self):
        waited = []
        for i in range(Throttle.FREE + 3):
            _, t = self.get(b"/api/v1/hello", b"guess-%d" % i)
            seconds = 0.0
            while not t.value():
                self.h.clock.advance(0.05)
                seconds += 0.05
            self.assertTrue(t.value().startswith(b"HTTP/1.1 401 "), t.value())
            waited.append(round(seconds, 2))
        self.assertEqual(waited[:Throttle.FREE], [0.0] * Throttle.FREE)
        self.assertEqual(waited[Throttle.FREE:], [0.25, 0.5, 1.0])
        # the right token from another address is not slowed
        _, t = self.get(b"/api/v1/hello", A_SECRET.encode(), host="10.0.0.10")
        self.assertTrue(t.value().startswith(b"HTTP/1.1 200 "), t.value())

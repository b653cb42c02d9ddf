"""CLIENT between proxies in memory (relay.py): the owner honours it only
from a relay identity and audits on whose behalf; the tcp:// backend sends
it once per change of client per connection, only to an upstream known to
keep connections, and stops after C081."""

import base64
import json
import os
import tempfile

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy.access import Access, load_credentials
from cloudfoxy_proxy.audit import AuditLog
from cloudfoxy_proxy.dispatch import Dispatcher, Session
from cloudfoxy_proxy.parser import Request, make_command
from cloudfoxy_proxy.relay import decode, encode

from test_access import Harness, sha, write
from test_tcp_backend import Base

RELAY_SECRET, PLAIN_SECRET = "relay-secret-0123456789", "plain-secret-0123456789"
CREDENTIALS = f"""
[[client]]
name = "front"
secret_sha256 = "{sha(RELAY_SECRET)}"
readers = ["*"]
relay = true

[[client]]
name = "plain"
secret_sha256 = "{sha(PLAIN_SECRET)}"
readers = ["*"]
"""
SELECT = ">1:APDU:00A4000C023F00|\n\n"


def client_line(data):
    return f">2:CLIENT:{data}|\n\n"


class CodecTests(SynchronousTestCase):
    def test_round_trip(self):
        data = encode("192.0.2.77:5000", "alice", "line")
        self.assertEqual(json.loads(base64.b64decode(data)), {"peer": "192.0.2.77:5000", "identity": "alice",
                                                              "frontend": "line"})
        self.assertEqual(decode(data), {"peer": "192.0.2.77:5000", "identity": "alice", "frontend": "line"})
        self.assertEqual(decode(encode("h:1", None, "api"))["identity"], None)

    def test_malformed(self):
        def b64(value):
            return base64.b64encode(json.dumps(value).encode()).decode()

        for bad in ("not base64!", base64.b64encode(b"\xff\xfe").decode(), b64([1]), b64({"peer": "x"}),
                    b64({"peer": "x", "identity": None, "frontend": "line", "more": 1}),
                    b64({"peer": "", "identity": None, "frontend": "line"}),
                    b64({"peer": "x" * 257, "identity": None, "frontend": "line"}),
                    b64({"peer": 5, "identity": None, "frontend": "line"})):
            with self.assertRaises(ValueError, msg=bad):
                decode(bad)


class OwnerTests(SynchronousTestCase):
    def setUp(self):
        self.h = Harness(load_credentials(write(CREDENTIALS)))
        fd, self.audit_path = tempfile.mkstemp(suffix=".jsonl")
        os.close(fd)
        self.h.dispatcher.audit = AuditLog(self.audit_path, self.h.clock)

    def records(self):
        with open(self.audit_path) as f:
            return [json.loads(line) for line in f]

    def test_a_relay_identity_is_honoured_and_audited_on_behalf(self):
        proto, t = self.h.connect(host="10.0.0.21", port=40000)
        data = encode("192.0.2.77:5000", "alice", "api")
        self.assertEqual(self.h.send(proto, t, f">*:{RELAY_SECRET}|\n" + client_line(data)), ">2:OK\n@@\n")
        self.assertEqual(self.h.send(proto, t, ">Emulated 00|\n" + SELECT), ">1:9000\n@@\n")
        data = encode("192.0.2.78:6000", None, "line")  # sticky until the next CLIENT
        self.assertEqual(self.h.send(proto, t, ">*|\n" + client_line(data)), ">2:OK\n@@\n")
        self.assertEqual(self.h.send(proto, t, ">Emulated 00|\n" + SELECT), ">1:9000\n@@\n")
        [a, b] = self.records()
        self.assertEqual((a["identity"], a["peer"]), ("front", "10.0.0.21:40000"))
        self.assertEqual(a["on_behalf_of"], {"peer": "192.0.2.77:5000", "identity": "alice", "frontend": "api"})
        self.assertEqual(b["on_behalf_of"], {"peer": "192.0.2.78:6000", "identity": None, "frontend": "line"})

    def test_another_identity_gets_c085_audited_and_its_requests_run_as_its_own(self):
        proto, t = self.h.connect(host="10.0.0.22")
        data = encode("192.0.2.77:5000", "alice", "line")
        self.assertEqual(self.h.send(proto, t, f">*:{PLAIN_SECRET}|\n" + client_line(data)), ">2:C085\n@@\n")
        self.assertEqual(self.h.send(proto, t, ">Emulated 00|\n" + SELECT), ">1:9000\n@@\n")
        [failure, request] = self.records()
        self.assertEqual((failure["event"], failure["identity"], failure["reason"]),
                         ("auth_failure", "plain", "CLIENT from an identity that may not relay"))
        self.assertNotIn("on_behalf_of", request)

    def test_relay_with_a_commands_list_may_relay(self):
        """Found by trying it: a front's identity with relay = true and the
        commands docs/security.md lists for a front (no CLIENT among them:
        it is not an identity's command to list) got C085 for CLIENT, with
        no log at the owner and a hint at the front to set relay = true."""
        h = Harness(load_credentials(write(f"""
[[client]]
name = "front"
secret_sha256 = "{sha(RELAY_SECRET)}"
readers = ["*"]
commands = ["APDU", "RESET", "READERS", "HOLD", "RELEASE"]
relay = true
""")))
        proto, t = h.connect(host="10.0.0.21")
        data = encode("192.0.2.77:5000", "alice", "line")
        self.assertEqual(h.send(proto, t, f">*:{RELAY_SECRET}|\n" + client_line(data)), ">2:OK\n@@\n")
        self.assertEqual(h.send(proto, t, ">*|\n>3:PERSONALIZE:x|\n\n"), ">3:C085\n@@\n")  # still bounded

    def test_a_refused_client_ends_the_earlier_one(self):
        """Before: after CLIENT alice, a malformed CLIENT (C084) left alice
        sticky, so the requests that followed were audited as hers."""
        proto, t = self.h.connect(host="10.0.0.21")
        data = encode("192.0.2.77:5000", "alice", "line")
        self.assertEqual(self.h.send(proto, t, f">*:{RELAY_SECRET}|\n" + client_line(data)), ">2:OK\n@@\n")
        self.assertEqual(self.h.send(proto, t, ">*|\n" + client_line("e30=")), ">2:C084\n@@\n")
        self.assertEqual(self.h.send(proto, t, ">Emulated 00|\n" + SELECT), ">1:9000\n@@\n")
        [request] = [r for r in self.records() if r["event"] == "request"]
        self.assertNotIn("on_behalf_of", request)

    def test_long_fields_are_cut_not_refused(self):
        data = encode("h" * 300 + ":1", "n" * 300, "line")
        self.assertEqual(decode(data), {"peer": "h" * 256, "identity": "n" * 256, "frontend": "line"})
        proto, t = self.h.connect(host="10.0.0.21")
        self.assertEqual(self.h.send(proto, t, f">*:{RELAY_SECRET}|\n" + client_line(data)), ">2:OK\n@@\n")

    def test_malformed_data_is_c084(self):
        proto, t = self.h.connect()
        self.assertEqual(self.h.send(proto, t, f">*:{RELAY_SECRET}|\n" + client_line("e30=")), ">2:C084\n@@\n")

    def test_open_mode_anonymous_relays_from_loopback_only(self):
        h = Harness(Access())
        proto, t = h.connect(host="127.0.0.1")
        data = encode("192.0.2.77:5000", None, "line")
        self.assertEqual(h.send(proto, t, ">*|\n" + client_line(data)), ">2:OK\n@@\n")
        proto, t = h.connect(host="192.0.2.5")
        self.assertEqual(h.send(proto, t, ">*|\n" + client_line(data)), ">2:C085\n@@\n")  # protected mode

    def test_simple_mode_secrets_may_not_relay(self):
        h = Harness(password="line-password-0123")
        proto, t = h.connect()
        data = encode("192.0.2.77:5000", None, "line")
        self.assertEqual(h.send(proto, t, ">*:line-password-0123|\n" + client_line(data)), ">2:C085\n@@\n")

    def test_relay_must_be_a_boolean(self):
        with self.assertRaises(ValueError) as e:
            load_credentials(write(CREDENTIALS.replace("relay = true", 'relay = "yes"')))
        self.assertIn("relay must be true or false", str(e.exception))


class FrontTests(Base):
    """The tcp:// backend's side, through the real Dispatcher."""

    def setUp(self):
        super().setUp()
        self.conn = self.connect()
        self.dispatcher = Dispatcher(self.registry, self.clock, command_timeout=5.0,
                                     access=Access(allow_anonymous=True))  # clients from anywhere

    def run_for(self, session, command=("1", "APDU", "00A4000C023F00")):
        d = self.dispatcher.execute(Request("B Emulated 00", None, [make_command(list(command))]), session)
        return d

    def raw(self):
        data = self.conn.transport.value()[self.conn.seen:]
        self.conn.seen += len(data)
        return [chunk.decode().split("\n") for chunk in data.split(b"\n\n") if chunk]

    def test_client_told_once_per_change_per_connection(self):
        alice = Session("192.0.2.77:5000", "line", "192.0.2.77")
        bob = Session("192.0.2.78:6000", "api", "192.0.2.78")
        sent = []
        for who in (alice, alice, bob, alice):
            d = self.run_for(who)
            reqs = self.raw()
            sent.append([lines[1].split(":")[1] for lines in reqs])
            for lines in reqs:
                cid = lines[1][1:].split(":")[0]
                self.conn.answer(cid, "OK" if ":CLIENT:" in lines[1] else "9000")
            self.assertEqual(self.successResultOf(d), [("1", "9000")])
        self.assertEqual(sent, [["CLIENT", "APDU"], ["APDU"], ["CLIENT", "APDU"], ["CLIENT", "APDU"]])

    def test_the_client_line_names_the_client(self):
        self.run_for(Session("192.0.2.77:5000", "line", "192.0.2.77"))
        [client, _apdu] = self.raw()
        self.assertEqual(client[0], ">*|")
        data = client[1][1:-1].split(":", 2)[2]
        self.assertEqual(decode(data), {"peer": "192.0.2.77:5000", "identity": "anonymous", "frontend": "line"})

    def test_a_batch_tells_the_client_first(self):
        session = Session("192.0.2.77:5000", "line", "192.0.2.77")
        request = Request("B Emulated 00", None, [make_command(["1", "RESET"]),
                                                  make_command(["2", "APDU", "00A4000C023F00"])])
        self.dispatcher.execute(request, session)
        data = self.conn.transport.value().decode()
        self.assertLess(data.index(":CLIENT:"), data.index(":RESET|"))

    def reconnect(self):
        self.conn.lose()
        self.clock.advance(1.0)
        return self.connect()

    def test_the_proxys_own_calls_tell_nothing(self):
        self.run_for(Session())  # no peer: the proxy's own work
        self.assertNotIn(b"CLIENT", self.conn.transport.value())

    def test_c081_stops_it_and_c085_is_logged(self):
        d = self.run_for(Session("192.0.2.77:5000", "line", "192.0.2.77"))
        reqs = self.raw()
        self.conn.answer(reqs[0][1][1:].split(":")[0], "C085")
        self.conn.answer(reqs[1][1][1:].split(":")[0], "9000")
        self.assertEqual(self.successResultOf(d), [("1", "9000")])
        self.assertEqual(len(self.logged("answered CLIENT with C085")), 1)
        d = self.run_for(Session("192.0.2.78:5000", "line", "192.0.2.78"))  # refused here: not again
        [apdu] = self.raw()
        self.assertIn(":APDU:", apdu[1])
        self.conn.answer(apdu[1][1:].split(":")[0], "9000")
        self.assertEqual(self.successResultOf(d), [("1", "9000")])
        self.conn = self.reconnect()  # a new connection tries again
        d = self.run_for(Session("192.0.2.78:5000", "line", "192.0.2.78"))
        reqs = self.raw()
        self.conn.answer(reqs[0][1][1:].split(":")[0], "C081")
        self.conn.answer(reqs[1][1][1:].split(":")[0], "9000")
        self.assertFalse(self.backend.relaying)
        self.run_for(Session("192.0.2.79:5000", "line", "192.0.2.79"))
        self.assertEqual([lines[1].split(":")[1] for lines in self.raw()], ["APDU"])
        self.assertEqual(len(self.logged("does not know CLIENT")), 1)


class UnknownUpstreamTests(FrontTests):
    persistent = None  # not known to keep connections: one request each, no CLIENT

    def test_no_client_before_persistence_is_known(self):
        self.run_for(Session("192.0.2.77:5000", "line", "192.0.2.77"))
        self.assertNotIn(b"CLIENT", self.conn.transport.value())

    # the FrontTests need a persistent upstream
    test_client_told_once_per_change_per_connection = None
    test_the_client_line_names_the_client = None
    test_a_batch_tells_the_client_first = None
    test_c081_stops_it_and_c085_is_logged = None

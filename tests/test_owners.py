"""Owner-stable names (docs/tcp.md "Owner-stable names"): ``--owner-id``, the
OWNER line command, and tcp:// backends naming an owner's readers
``<owner id>/<name>``, in memory (the fakes of test_tcp_backend.py)."""

import socket

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy import owners, tap
from cloudfoxy_proxy.backends import tcp
from cloudfoxy_proxy.dispatch import Dispatcher, Session
from cloudfoxy_proxy.interfaces import ReaderInfo
from cloudfoxy_proxy.parser import Request, RequestParser, make_command
from cloudfoxy_proxy.registry import ReaderRegistry

from test_tcp_backend import Base, FakeEndpoint, b64, outcome


class OwnerIdTests(SynchronousTestCase):
    def test_valid_and_invalid_ids(self):
        for good in ("rack1", "a", "A.b_c-9", "x" * 63):
            self.assertEqual(owners.check_owner_id(good), good)
        for bad in ("", "x" * 64, "rack 1", "rack/1", "räck", "C081", "a:b"):
            self.assertRaises(ValueError, owners.check_owner_id, bad)

    def test_default_is_the_host_name_or_its_first_label(self):
        self.assertEqual(owners.default_owner_id("host-7"), "host-7")
        long_name = "h1." + "d" * 70 + ".example"
        self.assertEqual(owners.default_owner_id(long_name), "h1")
        self.assertRaises(ValueError, owners.default_owner_id, "bad host")
        self.assertEqual(owners.default_owner_id(), owners.default_owner_id(socket.gethostname()))

    def test_option(self):
        o = tap.Options()
        o.parseOptions(["--owner-id", "rack1"])
        self.assertEqual(o["owner-id"], "rack1")
        o = tap.Options()
        o.parseOptions([])
        self.assertEqual(o["owner-id"], owners.default_owner_id())
        for bad in ("rack 1", "x" * 64, "C085"):
            with self.assertRaises(usage.UsageError) as e:
                tap.Options().parseOptions(["--owner-id", bad])
            self.assertIn("--owner-id", str(e.exception))


class OwnerCommandTests(SynchronousTestCase):
    def run_line(self, dispatcher, text):
        parser = RequestParser()
        for line in text.encode().split(b"\n"):
            request = parser.line(line)
            if request is not None:
                return dispatcher.execute(request, Session(host="127.0.0.1"))
        raise AssertionError("no request")

    def test_owner_answers_the_id(self):
        d = Dispatcher(ReaderRegistry(), Clock())
        d.owner_id = "rack1"
        self.assertEqual(self.run_line(d, ">*|\n>1:OWNER|\n>2:READERS|\n"), [("1", "rack1"), ("2", "")])
        self.assertEqual(self.run_line(d, ">1:owner|\n"), [("1", "rack1")])  # no reader line needed

    def test_no_id_is_c081(self):
        d = Dispatcher(ReaderRegistry(), Clock())
        self.assertEqual(self.run_line(d, ">*|\n>1:OWNER|\n"), [("1", "C081")])


class OwnerNamingTests(Base):
    """One upstream: the owner id becomes the readers' prefix unless prefix= is given."""

    prefix = None

    def connect(self, names=("Emulated 00", "Emulated 01"), owner="rack1"):
        conn = self.endpoint.succeed()
        conn.owner = owner
        [(reader, cid, command)] = conn.requests()
        self.assertEqual((reader, command), ("*", "READERS"))
        conn.answer(cid, "|".join(b64(n) for n in names))
        return conn

    def names(self):
        return [r.name for r in self.registry.readers]

    def test_wire_asks_owner_with_readers(self):
        conn = self.endpoint.succeed()
        self.assertEqual(conn.transport.value(), b">*|\n>1:OWNER|\n>2:READERS|\n\n")
        conn.proto.dataReceived(b">1:rack1\n>2:" + b64("Emulated 00").encode() + b"\n@@\n")
        self.assertEqual(self.names(), ["rack1/Emulated 00"])
        self.assertEqual(self.backend.owner, "rack1")
        self.assertEqual(self.registry.get("rack1/Emulated 00").key, "Emulated 00")

    def test_commands_go_upstream_with_the_upstream_name(self):
        conn = self.connect()
        d = self.backend.transmit(self.registry.get("rack1/Emulated 01").key, b"\x00\xa4\x00\x0c")
        [(reader, cid, command)] = conn.requests()
        self.assertEqual(reader, "Emulated 01")
        conn.answer(cid, "9000")
        self.assertEqual(outcome(d), b"\x90\x00")

    def test_c081_keeps_todays_naming(self):
        self.connect(owner="C081")
        self.assertEqual(self.names(), ["Emulated 00", "Emulated 01"])
        self.assertIsNone(self.backend.owner)

    def test_upstream_answering_only_the_last_command(self):
        """foxyproxy 2.10 answers a request of two commands with the last one's line."""
        conn = self.endpoint.succeed()
        conn.transport.clear()
        conn.proto.dataReceived(b">2:" + b64("Foxy NET 1").encode() + b"\n@@\n")
        self.assertEqual(self.names(), ["Foxy NET 1"])
        self.assertFalse(conn.transport.disconnecting)

    def test_junk_owner_answer_is_no_id(self):
        """An upstream that does not know OWNER but answers it with junk."""
        self.connect(owner="not an id!")
        self.assertEqual(self.names(), ["Emulated 00", "Emulated 01"])
        self.assertEqual(len(self.logged("not an owner id")), 1)

    def test_owner_changes_at_the_address(self):
        conn = self.connect()
        self.clock.advance(10)
        conn.owner = "rack9"
        [(_, cid, _)] = conn.requests()
        conn.answer(cid, b64("Emulated 00"))
        self.assertEqual(self.names(), [])  # another owner's cards never get rack1's names
        self.assertEqual(len(self.logged("now answers OWNER with 'rack9'")), 1, [formatEvent(e) for e in self.events])
        self.clock.advance(10)
        conn.owner = "rack1"
        [(_, cid, _)] = conn.requests()
        conn.answer(cid, b64("Emulated 00"))
        self.assertEqual(self.names(), ["rack1/Emulated 00"])


    def test_reader_line_with_owner_name(self):
        conn = self.connect()
        d = Dispatcher(self.registry, self.clock)
        result = d.execute(Request("rack1/Emulated 00", None, [make_command(["1", "APDU", "00A4000C"])]),
                           Session(host="127.0.0.1"))
        [(reader, cid, _)] = conn.requests()
        self.assertEqual(reader, "Emulated 00")
        conn.answer(cid, "9000")
        self.assertEqual(self.successResultOf(result), [("1", "9000")])


class PrefixWinsTests(Base):
    prefix = "B "

    def test_prefix_given_wins_over_the_owner_id(self):
        conn = self.endpoint.succeed()
        conn.owner = "rack1"
        [(_, cid, _)] = conn.requests()
        conn.answer(cid, b64("Emulated 00"))
        self.assertEqual([r.name for r in self.registry.readers], ["B Emulated 00"])
        self.assertEqual(self.backend.owner, "rack1")


class TwoUpstreamTests(SynchronousTestCase):
    """Two tcp:// backends on one registry (one front)."""

    def setUp(self):
        self.clock = Clock()
        self.registry = ReaderRegistry()
        self.claims = owners.claims(self.registry)
        self.fatal = []
        self.claims.fatal = self.fatal.append
        self.backends = []

    def backend(self, where, prefix=None):
        endpoint = FakeEndpoint()
        b = tcp.TcpBackend(endpoint=endpoint, clock=self.clock, where=where, prefix=prefix,
                           refresh=10.0, timeout=5.0, retry_delay=lambda failures: 1.0, persistent=True)
        b.start(self.registry)
        self.addCleanup(b.stop)
        return b, endpoint

    def answer(self, endpoint, owner, names=("Emulated 00",)):
        conn = endpoint.succeed()
        conn.owner = owner
        [(_, cid, _)] = conn.requests()
        conn.answer(cid, "|".join(b64(n) for n in names))
        return conn

    def names(self):
        return sorted(r.name for r in self.registry.readers)

    def test_two_owners_any_order_same_names(self):
        listings = []
        for order in ((0, 1), (1, 0)):
            self.registry = ReaderRegistry()
            pairs = [self.backend(f"tcp://o{i}:4001") for i in range(2)]
            for i in order:
                self.answer(pairs[i][1], f"rack{i}")
            listings.append(self.names())
        self.assertEqual(listings[0], ["rack0/Emulated 00", "rack1/Emulated 00"])
        self.assertEqual(listings[0], listings[1])

    def test_same_owner_id_at_start_is_fatal(self):
        (_, e1), (_, e2) = self.backend("tcp://a:4001"), self.backend("tcp://b:4001")
        self.answer(e1, "rack1")
        self.assertEqual(self.fatal, [])
        self.answer(e2, "rack1")
        self.assertEqual(self.fatal, ["backend tcp://b:4001: owner id 'rack1' is already that of "
                                      "tcp://a:4001 (two upstreams with one owner id)"])

    def test_same_owner_id_later_refuses_the_newcomer(self):
        (_, e1), (b2, e2) = self.backend("tcp://a:4001"), self.backend("tcp://b:4001")
        self.answer(e1, "rack1")
        e2.fail()  # b is down at start
        self.assertFalse(self.claims.starting)
        self.clock.advance(1.0)
        self.answer(e2, "rack1", names=("Other 00",))
        self.assertEqual(self.fatal, [])
        self.assertEqual(self.names(), ["rack1/Emulated 00"])  # b's readers are not listed
        self.assertIsNone(b2.owner)

    def test_prefixes_given_allow_one_owner_id_twice(self):
        """Several proxies on one host share the default id; prefix= names them apart."""
        (_, e1), (_, e2) = self.backend("tcp://a:4001", prefix="A "), self.backend("tcp://b:4001", prefix="B ")
        self.answer(e1, "host1")
        self.answer(e2, "host1")
        self.assertEqual(self.fatal, [])
        self.assertEqual(self.names(), ["A Emulated 00", "B Emulated 00"])

    def test_name_collision_at_start_is_fatal(self):
        (_, e1), (_, e2) = self.backend("tcp://a:4001", prefix="X "), self.backend("tcp://b:4001", prefix="X ")
        self.answer(e1, "C081")
        self.answer(e2, "C081")
        self.assertEqual(self.fatal, ["backend tcp://b:4001: reader name(s) 'X Emulated 00' are another "
                                      "backend's already"])

    def test_name_collision_refuses_the_newcomer(self):
        other = object()
        self.registry.update(other, [ReaderInfo("x", "rack1/Emulated 00")])
        self.claims.starting = False
        b, e = self.backend("tcp://a:4001")
        self.answer(e, "rack1")
        self.assertEqual(self.fatal, [])
        self.assertEqual(self.names(), ["rack1/Emulated 00"])
        self.assertIs(self.registry.get("rack1/Emulated 00").backend, other)

    def test_released_on_stop(self):
        (b1, e1), (_, e2) = self.backend("tcp://a:4001"), self.backend("tcp://b:4001")
        self.answer(e1, "rack1")
        e2.fail()
        b1.stop()
        self.clock.advance(1.0)
        self.answer(e2, "rack1", names=("Other 00",))
        self.assertIn("rack1/Other 00", self.names())


class OwnerMeansPersistentTests(Base):
    """Only a proxy answers OWNER with an id, and it keeps connections."""

    prefix = None
    persistent = None

    def test_owner_id_means_pipelining_at_once(self):
        conn = self.endpoint.succeed()
        conn.owner = "rack1"
        [(_, cid, _)] = conn.requests()
        conn.answer(cid, b64("Emulated 00"))
        self.assertIs(self.backend.persistent, True)
        conn.lose(ConnectionDone())  # at once after its first answer: an owner restarting, not FoxyProxy 2.10
        self.assertIs(self.backend.persistent, True)

    def test_no_id_still_learns(self):
        conn = self.endpoint.succeed()
        [(_, cid, _)] = conn.requests()
        conn.answer(cid, b64("Emulated 00"))
        self.assertIsNone(self.backend.persistent)
        conn.lose(ConnectionDone())
        self.assertIs(self.backend.persistent, False)


class OwnerAccessTests(SynchronousTestCase):
    def test_readers_implies_owner_and_simple_mode_needs_no_password(self):
        import hashlib
        import os
        import tempfile

        from cloudfoxy_proxy.access import Access, load_credentials

        fd, path = tempfile.mkstemp(suffix=".toml")
        with os.fdopen(fd, "w") as f:
            f.write(f'[[client]]\nname = "front"\nsecret_sha256 = "{hashlib.sha256(b"s").hexdigest()}"\n'
                    'commands = ["READERS", "APDU"]\n'
                    f'[[client]]\nname = "apdu-only"\nsecret_sha256 = "{hashlib.sha256(b"t").hexdigest()}"\n'
                    'commands = ["APDU"]\n')
        self.addCleanup(os.unlink, path)
        access = load_credentials(path)
        front, _ = access.check("s", "line")
        self.assertIn("OWNER", front.commands)
        self.assertNotIn("OWNER", access.check("t", "line")[0].commands)
        simple = Access(simple=[("pw", "line")])
        self.assertIn("OWNER", simple.open_commands["line"])

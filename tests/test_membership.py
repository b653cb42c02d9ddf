"""Membership (docs/tcp.md, "Membership: SIGHUP and etcd"): the registry
dropping a backend, the UpstreamSet, SIGHUP's re-read of --config, and the
etcd watch and registration against a fake JSON gateway on loopback
(tests/fake_etcd.py; the real etcd: test_membership_integration.py)."""

import json
import types

import attr
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cloudfoxy_proxy import errors, membership
from cloudfoxy_proxy.dispatch import Dispatcher, Session
from cloudfoxy_proxy.errors import CardError
from cloudfoxy_proxy.etcd import EtcdClient, EtcdError
from cloudfoxy_proxy.interfaces import ReaderInfo
from cloudfoxy_proxy.parser import make_command
from cloudfoxy_proxy.registry import ReaderRegistry
from cloudfoxy_proxy.tap import Options

import fake_etcd
from test_server import ManualBackend


@attr.s(eq=False)
class Upstream(ManualBackend):
    """A ManualBackend at a place (``where``) that a stop fails like tcp://'s."""

    where = attr.ib(default="tcp://owner:4001")
    names = attr.ib(default=("Slow A", "Slow B"))
    stopped = attr.ib(default=False)

    def start(self, registry):
        registry.update(self, [ReaderInfo(n[-1].lower(), n) for n in self.names])

    def stop(self):
        self.stopped = True
        for _, _, d in self.calls:
            if not d.called:
                d.errback(CardError(errors.UPSTREAM, "backend stopped"))

    def transmit(self, key, apdu):
        if self.stopped:
            raise CardError(errors.UPSTREAM, "backend stopped")
        return super().transmit(key, apdu)


def temp_file(case):
    """A path in a directory of its own, removed after the test."""
    import shutil
    import tempfile

    home = tempfile.mkdtemp(prefix="foxyproxy-test-")
    case.addCleanup(shutil.rmtree, home, True)
    return f"{home}/front.toml"


def results(d):
    out = []
    d.addCallback(lambda lines: out.extend(r for _, r in lines))
    return out


class DropTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.registry = ReaderRegistry()
        self.upstream = Upstream()
        self.upstream.start(self.registry)
        self.d = Dispatcher(self.registry, self.clock, 15.0, queue_timeout=10.0)

    def send(self, reader="Slow A", session=None):
        return results(self.d.submit(reader, [make_command(["1", "APDU", "00A4000C023F00"])],
                                     session=session or Session("127.0.0.1:1", "line")))

    def test_dropped_readers_leave_and_their_requests_end(self):
        running = self.send()
        waiting = self.send()
        self.assertEqual(len(self.upstream.calls), 1)
        self.assertEqual(self.registry.drop(self.upstream), 2)
        self.assertEqual(self.registry.listing, "")
        self.assertEqual(self.send(), [errors.NOT_FOUND])  # a new request: no such reader
        self.upstream.stop()
        self.assertEqual(running, [errors.UPSTREAM])
        self.assertEqual(waiting, [errors.UPSTREAM])  # granted after the drop: the stopped backend
        self.assertEqual(len(self.upstream.calls), 1)  # the waiting one never reached a card

    def test_a_held_card_session_ends(self):
        holder = Session("127.0.0.1:2", "api")
        held = []
        self.d.hold("Slow A", holder).addCallback(held.append)
        ended = []
        held[0].ended.addCallback(ended.append)
        self.registry.drop(self.upstream)
        self.assertEqual(len(ended), 1)
        self.assertFalse(held[0].held)

    def test_names_stay_reserved_for_other_cards(self):
        self.registry.drop(self.upstream)
        other = Upstream(where="tcp://elsewhere:4001")
        other.start(self.registry)
        self.assertEqual([r.name for r in self.registry.readers], ["Slow A (2)", "Slow B (2)"])

    def test_the_same_upstream_back_gets_its_names(self):
        other = Upstream(where="tcp://elsewhere:4001")
        other.start(self.registry)  # Slow A (2), Slow B (2)
        self.registry.drop(other)
        again = Upstream(where="tcp://elsewhere:4001")
        again.start(self.registry)
        self.assertEqual(sorted(r.name for r in self.registry.readers),
                         ["Slow A", "Slow A (2)", "Slow B", "Slow B (2)"])
        self.assertIs(self.registry.get("Slow A (2)").backend, again)
        self.assertIs(self.registry.get("Slow A").backend, self.upstream)

    def test_an_owner_at_a_new_address_gets_its_names(self):
        first = Upstream(where="tcp://10.0.0.1:4001", names=("rack1/Card",))
        first.owner = "rack1"
        first.start(self.registry)
        self.registry.drop(first)
        moved = Upstream(where="tcp://10.0.0.2:4001", names=("rack1/Card",))
        moved.owner = "rack1"
        moved.start(self.registry)
        self.assertIs(self.registry.get("rack1/Card").backend, moved)

    def test_drop_of_an_unknown_backend(self):
        self.assertEqual(self.registry.drop(Upstream()), 0)
        self.assertEqual(len(self.registry.readers), 2)


class SetTests(SynchronousTestCase):
    """UpstreamSet: real (emulated:) backends under a running MultiService."""

    def setUp(self):
        self.top = MultiService()
        self.registry = ReaderRegistry()
        self.core = types.SimpleNamespace(reactor=Clock(), registry=self.registry, backends=[])
        self.set = membership.UpstreamSet(self.top, self.core)
        self.top.startService()
        self.addCleanup(self.top.stopService)

    def names(self):
        return sorted(r.name for r in self.registry.readers)

    def test_add_drop_and_keep(self):
        a, b, c = "emulated:?cards=1&prefix=A", "emulated:?cards=1&prefix=B", "emulated:?cards=1&prefix=C"
        self.assertEqual(self.set.set_source("config", [a, b]), ([a, b], []))
        self.assertEqual(self.names(), ["A 00", "B 00"])
        kept = self.set.members[a].backend
        self.assertEqual(self.set.set_source("config", [a, c]), ([c], [b]))
        self.assertEqual(self.names(), ["A 00", "C 00"])
        self.assertIs(self.set.members[a].backend, kept)  # untouched
        self.assertIs(self.registry.get("A 00").backend, kept)
        self.assertEqual(len(self.core.backends), 2)
        self.assertEqual(len(list(self.top)), 2)

    def test_two_sources_share_one_upstream(self):
        a = "emulated:?cards=1&prefix=A"
        self.set.set_source("config", [a])
        self.set.set_source("etcd", [a])
        self.assertEqual(len(self.core.backends), 1)
        self.set.set_source("config", [])
        self.assertEqual(self.names(), ["A 00"])  # etcd still wants it
        self.set.set_source("etcd", [])
        self.assertEqual(self.names(), [])

    def test_a_bad_url_is_not_added(self):
        self.assertEqual(self.set.set_source("config", ["nope://x"]), ([], []))
        self.assertEqual(self.core.backends, [])


class ConfigReloadTests(SynchronousTestCase):
    def setUp(self):
        self.top = MultiService()
        self.registry = ReaderRegistry()
        self.core = types.SimpleNamespace(reactor=Clock(), registry=self.registry, backends=[])
        self.set = membership.UpstreamSet(self.top, self.core)
        self.top.startService()
        self.addCleanup(self.top.stopService)
        self.path = temp_file(self)
        self.write(["emulated:?cards=1&prefix=A"])
        self.set.set_source(membership.CONFIG, ["emulated:?cards=1&prefix=A"])
        self.reload = membership.ConfigReload(self.path, self.set)

    def write(self, backends, extra=""):
        with open(self.path, "w") as f:
            f.write(f"backend = {json.dumps(backends)}\n{extra}")

    def names(self):
        return sorted(r.name for r in self.registry.readers)

    def test_reload(self):
        self.write(["emulated:?cards=1&prefix=A", "emulated:?cards=1&prefix=B"])
        self.reload.reload()
        self.assertEqual(self.names(), ["A 00", "B 00"])

    def test_bad_files_keep_the_set(self):
        for text in ("backend = [", 'backend = ["nope://x"]', 'backend = ["emulated:?cards=x"]',
                     'no-such-option = 1\nbackend = ["emulated:?cards=1&prefix=B"]', "backend = 3"):
            with open(self.path, "w") as f:
                f.write(text)
            self.reload.reload()
            self.assertEqual(self.names(), ["A 00"], text)
        warnings = [e for e in self.flushLoggedErrors()]  # none: warnings are log lines, not errors
        self.assertEqual(warnings, [])

    def test_command_line_backends_win(self):
        self.write(["emulated:?cards=1&prefix=B"])
        membership.ConfigReload(self.path, self.set, given={"backend"}).reload()
        self.assertEqual(self.names(), ["A 00"])

    def test_etcd_urls_are_left_to_their_watch(self):
        self.write(["etcd://127.0.0.1:2379/fp", "emulated:?cards=1&prefix=B"])
        self.reload.reload()
        self.assertEqual(self.names(), ["B 00"])


class OptionTests(SynchronousTestCase):
    def parse(self, *argv):
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_etcd_backend_and_register(self):
        o = self.parse("--backend", "etcd://127.0.0.1:2379/fp?max_members=5&connections=2",
                       "--register", "etcd://127.0.0.1:2379/fp?advertise=tcp://10.1.2.3:4001&ttl=7",
                       "--owner-id", "rack1")
        self.assertEqual(o["backend-makers"], [])  # no emulated: default beside a watch
        [watch] = o["etcd-watches"]
        self.assertEqual((watch.base, watch.prefix, watch.max_members, watch.passed),
                         ("http://127.0.0.1:2379", "fp", 5, {"connections": "2"}))
        source = o["register-source"]
        self.assertEqual((source.advertise, source.ttl, source.key("rack1")),
                         ("tcp://10.1.2.3:4001", 7, b"fp/owners/rack1"))

    def test_owner_id_default_is_the_host_name(self):
        import socket

        self.assertEqual(self.parse()["owner-id"], socket.gethostname())

    def test_bad_values(self):
        for argv, words in (
                (["--backend", "etcd://127.0.0.1/fp"], "expected etcd://HOST:PORT/PREFIX"),
                (["--backend", "etcd://127.0.0.1:2379/"], "expected etcd://HOST:PORT/PREFIX"),
                (["--backend", "etcd://127.0.0.1:2379/fp?prefix=x"], "unknown parameter"),
                (["--register", "etcd://127.0.0.1:2379/fp?ttl=1"], "ttl=1"),
                (["--register", "etcd://127.0.0.1:2379/fp?advertise=tcp://h:1?x=1"], "advertise="),
                (["--owner-id", "a/b"], "--owner-id: 'a/b' is not an owner id"),
                # before: accepted, and spoken to in clear (https:// too)
                (["--register", "https://127.0.0.1:2379/fp"], "expected etcd://HOST:PORT/PREFIX"),
                (["--register", "http://127.0.0.1:2379/fp"], "expected etcd://HOST:PORT/PREFIX"),
                (["-p", "unix:/tmp/x.sock", "--register", "etcd://127.0.0.1:2379/fp"], "add ?advertise=")):
            with self.assertRaises(usage.UsageError) as e:
                self.parse(*argv)
            self.assertIn(words, str(e.exception))
            self.assertNotIn("\n", str(e.exception))

    def test_owner_url(self):
        self.assertEqual(membership.owner_url("tcp://10.0.0.1:4001"), "tcp://10.0.0.1:4001")
        self.assertEqual(membership.owner_url("tcp://[::1]:4001/"), "tcp://[::1]:4001")
        for bad in ("tls://h:1", "tcp://h", "tcp://h:1?password_file=/etc/shadow", "tcp://u@h:1",
                    "tcp://h:1/x", 7, None, "tcp://h:99999"):
            self.assertIsNone(membership.owner_url(bad), bad)


def until(predicate, timeout=10.0):
    """A Deferred that fires once ``predicate()`` is true (polled every 20
    ms), or fails after ``timeout`` seconds."""
    d = Deferred()
    deadline = reactor.seconds() + timeout

    def poll():
        if predicate():
            d.callback(None)
        elif reactor.seconds() > deadline:
            d.errback(AssertionError("timed out waiting"))
        else:
            reactor.callLater(0.02, poll)
    poll()
    return d


class Recorder:
    def __init__(self):
        self.sets = []

    def set_source(self, source, urls):
        self.sets.append(list(urls))
        return [], []

    @property
    def now(self):
        return self.sets[-1] if self.sets else None


def owner(i, port=None):
    return json.dumps({"id": f"o{i}", "url": f"tcp://127.0.0.1:{port or 5000 + i}"})


class GatewayTestCase(TestCase):
    def setUp(self):
        self.fake, port = fake_etcd.serve(reactor)
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"

    def client(self, timeout=2.0, max_body=64 * 1024):
        client = EtcdClient(reactor, self.base, timeout, max_body)
        self.addCleanup(client.close)
        return client


class ClientTests(GatewayTestCase):
    @inlineCallbacks
    def test_bounded_answers_and_calls(self):
        client = self.client(timeout=0.5)
        self.fake.huge.add("/v3/kv/range")
        with self.assertRaises(EtcdError) as e:
            yield client.range_prefix(b"fp/owners/", 10)
        self.assertIn("more than 65536 bytes", str(e.exception))
        self.fake.stall.add("/v3/lease/grant")
        with self.assertRaises(EtcdError) as e:
            yield client.grant(5)
        self.assertIn("did not answer /v3/lease/grant within 0.5 s", str(e.exception))

    @inlineCallbacks
    def test_errors_are_one_line(self):
        self.fake.down = True
        with self.assertRaises(EtcdError) as e:
            yield self.client().grant(5)
        self.assertEqual(str(e.exception), "etcd answered HTTP 503: etcdserver: unavailable")
        with self.assertRaises(EtcdError) as e:
            yield EtcdClient(reactor, "http://127.0.0.1:1", 2.0).grant(5)
        self.assertIn("unreachable", str(e.exception))

    @inlineCallbacks
    def test_claim(self):
        client = self.client()
        mine = yield client.grant(5)
        other = yield client.grant(5)
        self.assertEqual((yield client.claim(b"fp/owners/a", b"v1", mine)), (True, None))
        self.assertEqual((yield client.claim(b"fp/owners/a", b"v2", other)), (False, b"v1"))
        self.assertEqual((yield client.claim(b"fp/owners/a", b"v3", mine)), (True, None))  # ours: refreshed
        self.assertEqual(self.fake.kv[b"fp/owners/a"][:2], (b"v3", mine))


class WatchTests(GatewayTestCase):
    def watch(self, url="etcd://127.0.0.1:1/fp", client=None):
        recorder = Recorder()
        watch = membership.EtcdWatch(membership.watch_source(url), recorder, reactor,
                                     client=client or self.client())
        watch.startService()
        self.addCleanup(watch.stopService)
        return watch, recorder

    @inlineCallbacks
    def test_list_then_watch(self):
        self.fake.put("fp/owners/o1", owner(1))
        self.fake.put("other/owners/o9", owner(9))
        watch, rec = self.watch()
        yield until(lambda: rec.now == ["tcp://127.0.0.1:5001"] and self.fake.watches)
        self.fake.put("fp/owners/o2", owner(2))
        yield until(lambda: rec.now == ["tcp://127.0.0.1:5001", "tcp://127.0.0.1:5002"])
        self.fake.put("fp/owners/o2", owner(2, 6000))  # moved
        yield until(lambda: rec.now == ["tcp://127.0.0.1:5001", "tcp://127.0.0.1:6000"])
        self.fake.delete("fp/owners/o1")
        yield until(lambda: rec.now == ["tcp://127.0.0.1:6000"])

    @inlineCallbacks
    def test_bad_values_are_ignored(self):
        for key, value in (("fp/owners/o1", "not json"), ("fp/owners/o2", owner(3)),
                           ("fp/owners/o4", json.dumps({"id": "o4", "url": "tcp://h:1?password_file=/x"})),
                           ("fp/owners/a b", json.dumps({"id": "a b", "url": "tcp://h:1"})),
                           ("fp/owners/o5", owner(5))):
            self.fake.put(key, value)
        watch, rec = self.watch()
        yield until(lambda: rec.now is not None)
        self.assertEqual(rec.now, ["tcp://127.0.0.1:5005"])

    @inlineCallbacks
    def test_params_pass_on_to_owner_urls(self):
        self.fake.put("fp/owners/o1", owner(1))
        watch, rec = self.watch("etcd://127.0.0.1:1/fp?connections=2&heartbeat=1")
        yield until(lambda: rec.now is not None)
        self.assertEqual(rec.now, ["tcp://127.0.0.1:5001?connections=2&heartbeat=1"])

    @inlineCallbacks
    def test_members_are_capped(self):
        for i in range(5):
            self.fake.put(f"fp/owners/o{i}", owner(i))
        watch, rec = self.watch("etcd://127.0.0.1:1/fp?max_members=3")
        yield until(lambda: rec.now is not None and self.fake.watches)
        self.assertEqual(rec.now, [f"tcp://127.0.0.1:500{i}" for i in range(3)])
        self.fake.put("fp/owners/o7", owner(7))  # over the cap: not taken
        self.fake.delete("fp/owners/o0")
        yield until(lambda: rec.now == [f"tcp://127.0.0.1:500{i}" for i in (1, 2)])

    @inlineCallbacks
    def test_compaction_lists_again(self):
        self.fake.put("fp/owners/o1", owner(1))
        watch, rec = self.watch()
        yield until(lambda: self.fake.watches)
        lists = self.fake.calls.count("/v3/kv/range")
        self.fake.compact()
        self.fake.put("fp/owners/o2", owner(2))  # missed by the cancelled watch
        yield until(lambda: rec.now == ["tcp://127.0.0.1:5001", "tcp://127.0.0.1:5002"])
        self.assertGreater(self.fake.calls.count("/v3/kv/range"), lists)

    @inlineCallbacks
    def test_etcd_down_keeps_members_and_reconnects(self):
        self.fake.put("fp/owners/o1", owner(1))
        watch, rec = self.watch()
        yield until(lambda: self.fake.watches)
        self.fake.down = True
        self.fake.end_watches()  # etcd went away
        yield deferLater(reactor, 1.2, lambda: None)  # at least one failed try (back-off 0.5 s)
        self.assertIsNotNone(watch._down.down_since)
        self.assertEqual(rec.now, ["tcp://127.0.0.1:5001"])  # the current members stay
        self.fake.down = False
        self.fake.delete("fp/owners/o1")  # changed while we could not see
        yield until(lambda: rec.now == [], timeout=15)
        yield until(lambda: self.fake.watches)
        self.assertIsNone(watch._down.down_since)

    @inlineCallbacks
    def test_silent_watch_stream_is_ended_by_the_check(self):
        self.patch(membership, "CHECK_EVERY", 0.2)
        self.fake.put("fp/owners/o1", owner(1))
        watch, rec = self.watch(client=self.client(timeout=0.3))
        yield until(lambda: self.fake.watches)
        first = self.fake.watches[0][0]
        self.fake.stall.add("/v3/kv/range")  # etcd stops answering; the stream stays open
        yield until(lambda: first not in [w[0] for w in self.fake.watches] or first.finished, timeout=5)
        self.fake.stall.clear()
        yield until(lambda: self.fake.watches and self.fake.watches[0][0] is not first, timeout=10)
        self.assertEqual(rec.now, ["tcp://127.0.0.1:5001"])


class RegistrationTests(GatewayTestCase):
    def register(self, owner_id="rack1", url="etcd://127.0.0.1:1/fp?advertise=tcp://10.0.0.1:4001&ttl=3"):
        exits = []
        reg = membership.EtcdRegistration(membership.register_source(url), owner_id, reactor,
                                          client=self.client(), exit=exits.append)
        reg.startService()
        self.addCleanup(lambda: reg.running and reg.stopService())
        return reg, exits

    @inlineCallbacks
    def test_register_keepalive_revoke(self):
        reg, exits = self.register()
        yield until(lambda: b"fp/owners/rack1" in self.fake.kv)
        value, lease, _ = self.fake.kv[b"fp/owners/rack1"]
        self.assertEqual(json.loads(value), {"id": "rack1", "url": "tcp://10.0.0.1:4001"})
        self.assertEqual(self.fake.leases[lease], 3)
        yield until(lambda: "/v3/lease/keepalive" in self.fake.calls)  # every ttl/3 = 1 s
        yield reg.stopService()
        self.assertNotIn(b"fp/owners/rack1", self.fake.kv)
        self.assertNotIn(lease, self.fake.leases)
        self.assertEqual(exits, [])

    @inlineCallbacks
    def test_a_live_id_is_refused_at_start(self):
        self.fake.put("fp/owners/rack1", json.dumps({"id": "rack1", "url": "tcp://10.0.0.9:4001"}), "77")
        self.fake.leases["77"] = 10
        reg, exits = self.register()
        yield until(lambda: exits)
        self.assertEqual(exits, ["--register etcd://127.0.0.1:1/fp: owner id 'rack1' is held by another "
                                 "live owner (tcp://10.0.0.9:4001); give this proxy another --owner-id"])
        self.assertEqual(list(self.fake.leases), ["77"])  # ours was revoked
        self.assertEqual(json.loads(self.fake.kv[b"fp/owners/rack1"][0])["url"], "tcp://10.0.0.9:4001")

    @inlineCallbacks
    def test_lost_lease_registers_again_and_retries_when_taken(self):
        self.patch(membership, "RETRY_MIN", 0.1)
        reg, exits = self.register()
        yield until(lambda: b"fp/owners/rack1" in self.fake.kv)
        first = self.fake.kv[b"fp/owners/rack1"][1]
        self.fake.expire(first)  # etcd was out of reach longer than the TTL
        self.fake.put("fp/owners/rack1", json.dumps({"id": "rack1", "url": "tcp://10.0.0.9:4001"}), "77")
        self.fake.leases["77"] = 10
        yield until(lambda: self.fake.calls.count("/v3/kv/txn") >= 3)  # refused, and tried again
        self.assertEqual(exits, [])  # not at start: no exit
        self.fake.expire("77")
        yield until(lambda: b"fp/owners/rack1" in self.fake.kv)
        value, lease, _ = self.fake.kv[b"fp/owners/rack1"]
        self.assertNotEqual(lease, first)
        self.assertEqual(json.loads(value)["url"], "tcp://10.0.0.1:4001")

    @inlineCallbacks
    def test_etcd_down_at_start_retries(self):
        self.patch(membership, "RETRY_MIN", 0.1)
        self.fake.down = True
        reg, exits = self.register()
        yield until(lambda: self.fake.calls.count("/v3/lease/grant") >= 2)
        self.assertNotIn(b"fp/owners/rack1", self.fake.kv)
        self.fake.down = False
        yield until(lambda: b"fp/owners/rack1" in self.fake.kv)
        self.assertEqual(exits, [])


class ServiceTreeTests(SynchronousTestCase):
    def test_membership_services_and_sighup(self):
        from twisted.internet.testing import MemoryReactorClock

        from cloudfoxy_proxy import tap

        path = temp_file(self)
        with open(path, "w") as f:
            f.write('backend = ["emulated:?cards=1", "etcd://127.0.0.1:2379/fp"]\n')
        o = Options()
        o.parseOptions(["--config", path, "--register", "etcd://127.0.0.1:2379/fp", "--owner-id", "r1"])
        top = tap.makeService(o, MemoryReactorClock())
        kinds = [type(s).__name__ for s in top]
        self.assertEqual(kinds.count("EtcdWatch"), 1)
        self.assertEqual(kinds.count("EtcdRegistration"), 1)
        self.assertEqual(len(top.core.backends), 1)  # emulated:, not etcd:
        self.assertEqual([r.__self__.__class__ for r in top.reopeners], [membership.ConfigReload])

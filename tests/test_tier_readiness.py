"""Unit tests (fake clock, in memory) of readiness for a tier: a front with
two upstream owners (``tcp://`` backends over a fake endpoint) is ready
while ``--ready-min-upstreams`` of them are up; ``/status.json``'s
``upstreams`` and ``foxyproxy_upstream_up``; the ``--drain-announce``
period after SIGTERM (``/readyz`` 503 while requests still run, then the
drain)."""

import json
import signal

from twisted.application.service import MultiService
from twisted.internet.error import ConnectionAborted
from twisted.internet.task import Clock

from support import memory_core
from test_metrics import SELECT_MF, get, render, run, samples
from test_tcp_backend import NAMES, FakeEndpoint, b64

from cloudfoxy_proxy import metrics, ops, tap
from cloudfoxy_proxy.backends import tcp
from cloudfoxy_proxy.backends.emulated import from_url as emulated
from cloudfoxy_proxy.dispatch import Dispatcher
from cloudfoxy_proxy.frontends import status
from cloudfoxy_proxy.registry import ReaderRegistry


class Owner:
    """One upstream owner as a front sees it: a TcpBackend over a fake
    endpoint (one pooled connection and the liveness connection)."""

    def __init__(self, name, clock, registry):
        self.endpoint = FakeEndpoint()
        self.backend = tcp.TcpBackend(
            endpoint=self.endpoint, clock=clock, where=f"tcp://{name}:4001", prefix=f"{name}/",
            connections=1, refresh=0, timeout=5.0, retry_delay=lambda failures: 1.0,
            persistent=True, heartbeat=1.0, heartbeat_timeout=1.5, liveness=True)
        self.backend.start(registry)
        self.conns = []

    def come_up(self):
        """Its connections accept; the reader list is read."""
        conn = self.endpoint.succeed()
        [(_, cid, _)] = conn.requests()
        conn.answer(cid, "|".join(b64(n) for n in NAMES))
        self.conns = [conn, self.endpoint.succeed()]

    def beats(self, answer=True):
        """Answer (or not) every heartbeat written since the last call."""
        for conn in self.conns:
            for _, cid, command in conn.requests():
                if command == "READERS" and answer:
                    conn.answer(cid, "|".join(b64(n) for n in NAMES))

    def lose_all(self):
        for conn in self.conns:
            if conn.transport.disconnecting:
                conn.lose(ConnectionAborted())
        self.conns = []


def front(min_upstreams=1):
    clock = Clock()
    registry = ReaderRegistry()
    a, b = Owner("rack1", clock, registry), Owner("rack2", clock, registry)
    top = MultiService()
    top.startService()
    backends = [a.backend, b.backend]
    readiness = ops.Readiness(top, registry, backends, clock, min_upstreams=min_upstreams)
    m = metrics.Metrics(registry, backends)
    resource = status.StatusResource(m, readiness, clock)
    site = status.StatusSite(resource, memory_core(Dispatcher(registry, clock), clock))
    return clock, a, b, readiness, m, site


def readyz(site):
    code, body, _ = render(site, "/readyz")
    return code, json.loads(body)["reasons"]


def test_ready_with_one_of_two_owners_and_no_flap_when_the_other_goes_silent():
    clock, a, b, readiness, m, site = front(min_upstreams=1)
    code, reasons = readyz(site)
    assert code == 503
    assert reasons == ["0 of 2 upstreams up with readers, --ready-min-upstreams 1 needed "
                       "(tcp://rack1:4001 down, tcp://rack2:4001 down)"]
    a.come_up()  # rack2 stays down
    assert readyz(site) == (200, [])
    b.come_up()
    for _ in range(4):  # both answer their heartbeats: ready throughout
        clock.advance(1.0)
        a.beats()
        b.beats()
        assert readyz(site)[0] == 200
    clock.advance(1.0)
    a.beats()
    b.beats(answer=False)  # rack2 froze
    clock.advance(1.5)
    assert b.backend.upstream_state == "silent" and a.backend.upstream_state == "up"
    assert readyz(site) == (200, [])  # N=1: one owner serves, the front stays in the balancer
    s = samples(m)
    assert get(s, "foxyproxy_upstream_up", upstream="tcp://rack1:4001", owner="") == 1
    assert get(s, "foxyproxy_upstream_up", upstream="tcp://rack2:4001", owner="") == 0
    code, body, _ = render(site, "/status.json")
    assert [b["state"] for b in json.loads(body)["backends"]] == ["up", "silent"]
    assert json.loads(body)["upstreams"] == [
        {"upstream": "tcp://rack1:4001", "owner": None, "state": "up", "readers": 2},
        {"upstream": "tcp://rack2:4001", "owner": None, "state": "silent", "readers": 2}]
    assert [(r["name"], r["present"]) for r in json.loads(body)["readers"]] == [
        ("rack1/Emulated 00", True), ("rack1/Emulated 01", True),
        ("rack2/Emulated 00", False), ("rack2/Emulated 01", False)]
    b.backend.owner = "rack2"  # what the OWNER answer sets
    assert get(samples(m), "foxyproxy_upstream_up", upstream="tcp://rack2:4001", owner="rack2") == 0
    b.lose_all()
    a.backend.stop()
    b.backend.stop()


def test_min_upstreams_2_is_not_ready_while_one_owner_is_silent_and_ready_once_it_answers():
    clock, a, b, readiness, m, site = front(min_upstreams=2)
    a.come_up()
    assert readyz(site) == (503, ["1 of 2 upstreams up with readers, --ready-min-upstreams 2 "
                                  "needed (tcp://rack2:4001 down)"])
    b.come_up()
    assert readyz(site) == (200, [])
    clock.advance(1.0)
    a.beats()
    b.beats(answer=False)
    clock.advance(1.5)
    a.beats()
    assert readyz(site) == (503, ["1 of 2 upstreams up with readers, --ready-min-upstreams 2 "
                                  "needed (tcp://rack2:4001 silent)"])
    b.lose_all()
    clock.advance(1.0)  # rack2's connections are dialled again and its kernel accepts
    a.beats()
    b.conns = [b.endpoint.succeed(), b.endpoint.succeed()]
    assert readyz(site)[0] == 503  # connected is not enough: it has not answered yet
    clock.advance(1.0)
    a.beats()
    b.beats()  # it answers again
    assert a.backend.upstream_state == "up"
    assert b.backend.upstream_state == "up"
    assert readyz(site) == (200, [])
    a.backend.stop()
    b.backend.stop()


def test_other_backends_keep_the_first_report_rule():
    clock = Clock()
    registry = ReaderRegistry()
    card = emulated("emulated:?cards=1", {})(clock)
    owner = Owner("rack1", clock, registry)
    top = MultiService()
    top.startService()
    readiness = ops.Readiness(top, registry, [card, owner.backend], clock)
    assert readiness.reasons() == [
        "0 of 1 upstreams up with readers, --ready-min-upstreams 1 needed (tcp://rack1:4001 down)",
        "backend emulated: 1 iso7816 cards has not reported its readers"]
    card.start(registry)
    owner.come_up()
    assert readiness.reasons() == []
    owner.backend.stop()


def announce_setup(announce=2.0):
    clock = Clock()
    registry = ReaderRegistry()
    backend = emulated("emulated:?cards=1&latency_ms=500", {})(clock)
    backend.start(registry)
    top = ops.ProxyService(clock, drain_timeout=5, drain_announce=announce)
    handlers = {}
    top.on_signal = lambda signum, callback: handlers.__setitem__(signum, callback)
    top.dispatcher = Dispatcher(registry, clock, command_timeout=60)
    top.readiness = ops.Readiness(top, registry, [backend], clock)
    top.startService()
    clock.advance(0.2)
    assert top.readiness.reasons() == []
    m = metrics.Metrics(registry, [backend])
    resource = status.StatusResource(m, top.readiness, clock)
    site = status.StatusSite(resource, memory_core(top.dispatcher, clock))
    return clock, top, handlers, site


def test_drain_announce_answers_503_while_requests_still_run_then_drains():
    clock, top, handlers, site = announce_setup(announce=2.0)
    first = run(top.dispatcher, "Emulated 00", f"1:APDU:{SELECT_MF}")
    stopped = []
    top.stopService().addBoth(stopped.append)  # SIGTERM
    code, reasons = readyz(site)
    assert code == 503 and reasons == ["stopping: the drain begins in 2s (--drain-announce)"]
    clock.advance(0.6)
    assert first.result == [("1", "9000")]
    later = run(top.dispatcher, "Emulated 00", f"1:APDU:{SELECT_MF}")  # a new request is served
    clock.advance(0.6)
    assert later.result == [("1", "9000")]
    assert not stopped and readyz(site)[0] == 503
    clock.advance(0.8)  # 2 s: the drain (nothing in flight) and the stop
    clock.pump([0.05] * 40)
    assert len(stopped) == 1


def test_a_second_sigterm_ends_the_announcement_at_once():
    clock, top, handlers, site = announce_setup(announce=30.0)
    stopped = []
    top.stopService().addBoth(stopped.append)
    clock.advance(1.0)
    assert not stopped
    handlers[signal.SIGTERM]()  # the second SIGTERM
    clock.pump([0.05] * 40)
    assert len(stopped) == 1


def test_announce_0_drains_at_once():
    clock, top, handlers, site = announce_setup(announce=0)
    stopped = []
    top.stopService().addBoth(stopped.append)
    clock.pump([0.05] * 40)
    assert len(stopped) == 1 and handlers == {}


def test_options():
    o = tap.Options()
    o.parseOptions(["--drain-announce", "3", "--ready-min-upstreams", "2"])
    assert (o["drain-announce"], o["ready-min-upstreams"]) == (3.0, 2)
    o = tap.Options()
    o.parseOptions([])
    assert (o["drain-announce"], o["ready-min-upstreams"]) == (0.0, 1)
    for args, word in ((["--drain-announce", "-1"], "--drain-announce"),
                       (["--ready-min-upstreams", "x"], "--ready-min-upstreams")):
        try:
            tap.Options().parseOptions(args)
        except Exception as e:
            assert word in str(e)
        else:
            raise AssertionError(args)


def test_a_front_whose_owners_all_left_is_not_ready():
    """Found by trying it: an etcd front with no owner registered (or whose
    owners all left, or were all dropped by SIGHUP) answered /readyz 200
    with no reader to serve."""
    clock, a, b, readiness, m, site = front(min_upstreams=1)
    readiness.upstream_tier = True  # what tap sets for etcd watches and tcp:// upstreams
    a.come_up()
    assert readyz(site) == (200, [])
    readiness.backends.remove(a.backend)  # what membership.UpstreamSet.drop does
    readiness.backends.remove(b.backend)
    assert readyz(site) == (503, ["0 of 0 upstreams up with readers, --ready-min-upstreams 1 needed"])
    readiness.min_upstreams = 0  # the operator's choice: ready without owners
    assert readyz(site) == (200, [])
    a.lose_all()
    a.backend.stop()
    b.backend.stop()


def test_tap_marks_fronts_of_etcd_and_tcp_upstreams_as_a_tier():
    from twisted.internet.testing import MemoryReactorClock

    from cloudfoxy_proxy.tap import Options

    for args, tier in ((["--backend", "etcd://127.0.0.1:2379/fp"], True),
                       (["--backend", "tcp://127.0.0.1:4031"], True),
                       (["--backend", "emulated:?cards=1"], False)):
        o = Options()
        o.parseOptions(args)
        top = tap.makeService(o, MemoryReactorClock())
        assert top.readiness.upstream_tier is tier, args
    assert top.readiness.reasons() != []  # not started: the listener does not listen

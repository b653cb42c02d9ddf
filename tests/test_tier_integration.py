"""The scale-out tier of docs/scale-out.md, built from the doc's own
configurations in a network namespace: HAProxy (TCP mode, send-proxy-v2,
httpchk /readyz), two owners (rack1, rack2: 50 emulated cards each), three
fronts, then route-by-reader HAProxy straight to two owners, and etcd
membership (owners rack3/rack4, a front following etcd).

The scenario runs once, inside ``unshare --net`` (this file run as a
script), and reports what every client got as JSON; each test below
asserts one point of the issue's "Done when" on that report.  Markers,
interleaving probes and counters live in the emulated cards' EF 5001
(tests/tier_rig.py).
"""

import json
import os
import signal
import sys
import threading
import time
import traceback
import urllib.request

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import tier_rig as rig  # noqa: E402

pytestmark = pytest.mark.integration

OWNERS = {"rack1": "127.0.0.31", "rack2": "127.0.0.32"}
FRONTS = {"front1": "127.0.0.21", "front2": "127.0.0.22", "front3": "127.0.0.23"}
CLIENT = "127.0.0.77"  # the client whose address must reach the audit logs
API_PORT, API_TOKEN = 8080, "tier-api-token-0123456789"
MARKED = (0, 17, 49)  # cards of each owner that get a marker
SCENARIO_TIMEOUT = 240
#: how a test client reaches one front directly: from the balancer's
#: address, with a PROXY header naming CLIENT
DIRECT = {"client": CLIENT}


def name(owner, i):
    return f"{owner}/Emulated {i:02d}"


# -- the scenario (runs inside the namespace) -----------------------------------

class Scenario:
    def __init__(self, workdir, doc):
        self.tier = rig.Tier(workdir, doc)
        self.facts = {}
        token = os.path.join(workdir, "api-token")
        with open(token, "w") as f:
            f.write(API_TOKEN + "\n")
        self.api_args = ["--api", f"tcp:{API_PORT}:interface={FRONTS['front1']}", "--api-token-file", token]

    def phase(self, key, fn):
        t0 = time.monotonic()
        try:
            self.facts[key] = fn() or {}
        except Exception:  # noqa: BLE001 (reported to the test as data)
            self.facts[key] = {"error": traceback.format_exc()[-4000:], "logs": self.tier.tail(chars=1500)}
        self.facts[key]["seconds"] = round(time.monotonic() - t0, 1)

    # building
    def start_tier(self):
        t = self.tier
        for owner, addr in OWNERS.items():
            t.proxy(owner, addr, config="owner.toml")
        for owner in OWNERS:
            t.procs[owner].wait_listening()
        for front, addr in FRONTS.items():
            t.proxy(front, addr, config="front.toml", extra=self.api_args if front == "front1" else ())
        for front in FRONTS:
            self.wait_front(front, want=100)
        lb = t.haproxy("haproxy-front-tier.cfg")
        rig.wait_for(lambda: rig.accepts(rig.LB, rig.TIER_PORT), 20, "HAProxy listening", proc=lb)
        self.wait_haproxy_up(list(FRONTS))
        return {"started": True}

    def wait_front(self, front, want=None, timeout=40.0):
        p = self.tier.procs[front]
        p.wait_listening()
        rig.wait_for(lambda: p.readyz() == 200, timeout, f"{front} /readyz 200", proc=p)
        if want:
            rig.wait_for(lambda: len(self.front_readers(front)) >= want, timeout,
                         f"{front} listing {want} readers", proc=p)

    def front_readers(self, front):
        try:
            return rig.readers(FRONTS[front], rig.LINE_PORT, **DIRECT)
        except (OSError, RuntimeError, IndexError):
            return []

    def wait_haproxy_up(self, fronts, timeout=30.0):
        lb = self.tier.procs["haproxy"]
        rig.wait_for(lambda: all(rig.haproxy_servers(lb.admin).get(("fronts", f), "")
                                 .startswith("UP") for f in fronts), timeout, f"HAProxy: {fronts} UP", proc=lb)

    # 1. identical READERS
    def readers_everywhere(self):
        out = {front: self.front_readers(front) for front in FRONTS}
        out["haproxy"] = rig.readers(rig.LB, rig.TIER_PORT, source=CLIENT)
        return {"readers": out}

    # 2. the same marker through every front
    def write_markers(self, owners=OWNERS):
        for owner in owners:
            for i in MARKED:
                rig.write_marker(OWNERS[owner], rig.LINE_PORT, f"Emulated {i:02d}", rig.marker_of(name(owner, i)))

    def read_markers(self, fronts=FRONTS, owners=OWNERS):
        out = []
        for front in fronts:
            for owner in owners:
                for i in MARKED:
                    got, raw = rig.read_marker(FRONTS[front], rig.LINE_PORT, name(owner, i), **DIRECT)
                    out.append({"front": front, "reader": name(owner, i), "want": rig.marker_of(name(owner, i)).decode(),
                                "got": got.decode(errors="replace") if got is not None else None, "raw": raw})
        return out

    def markers(self):
        self.write_markers()
        return {"reads": self.read_markers()}

    # 3. 0 mixed requests from two clients on two fronts
    def mixed(self):
        deadline = time.monotonic() + 4.0
        probes = [rig.InterleaveProbe(FRONTS[f], rig.LINE_PORT, name("rack1", 1), deadline=deadline,
                                      max_requests=4000, token=tok, **DIRECT)
                  for f, tok in (("front1", b"A"), ("front2", b"B"))]
        for p in probes:
            p.start()
        for p in probes:
            p.join(15)
        return {"probes": [dict(p.stats, samples=p.samples) for p in probes]}

    # 4. a session on one front excludes every other client
    def api(self, method, path, body=None):
        req = urllib.request.Request(f"http://{FRONTS['front1']}:{API_PORT}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": "Bearer " + API_TOKEN,
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def try_others(self, attempts, timeout):
        """{key: {"got", "after"}} of one SELECT MF per (key, host, reader,
        kwargs) attempt, all at once, each given ``timeout`` seconds."""
        out = {}

        def other(key, host, reader, kw):
            t0 = time.monotonic()
            try:
                got = rig.one(host, rig.LINE_PORT, reader, ["00A4000C023F00"], timeout=timeout, **kw)
            except OSError as e:
                got = [f"no answer: {type(e).__name__}"]
            out[key] = {"got": got, "after": round(time.monotonic() - t0, 2)}
        threads = [threading.Thread(target=other, args=a) for a in attempts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 5)
        return out

    def session(self):
        """An API session on front1 (card A) and a line-protocol HOLD on
        front2 (card B), held at their owners: every other client, of any
        front, HAProxy or the owner itself, is kept off both cards."""
        card, held = name("rack1", 2), name("rack2", 4)
        path = f"/api/v1/readers/{card.replace('/', '%2F').replace(' ', '%20')}/transmit"
        st, opened = self.api("POST", "/api/v1/sessions", {"reader": card, "idle_timeout": 30})
        if st != 200:
            return {"opened": [st, opened]}
        sid = opened["session"]
        st1, first = self.api("POST", path, {"session": sid, "apdus": [rig.SELECT_EF]})
        hold = rig.Line(FRONTS["front2"], rig.LINE_PORT, timeout=10, **DIRECT)
        try:
            hold_got = hold.request(held, [("1", "HOLD", "30"), ("2", "APDU", rig.SELECT_EF)])
            others = self.try_others([
                ("A via front2", FRONTS["front2"], card, DIRECT),
                ("A via front3", FRONTS["front3"], card, DIRECT),
                ("A via front1 line", FRONTS["front1"], card, DIRECT),
                ("A via haproxy", rig.LB, card, {"source": CLIENT}),
                ("A at its owner", OWNERS["rack1"], "Emulated 02", {}),
                ("B via front1", FRONTS["front1"], held, DIRECT),
                ("B via front2, another connection", FRONTS["front2"], held, DIRECT),
                ("B via haproxy", rig.LB, held, {"source": CLIENT}),
                ("B at its owner", OWNERS["rack2"], "Emulated 04", {})], timeout=3.0)
            st2, during = self.api("POST", path, {"session": sid, "apdus": [rig.read_binary(rig.MARKER_OFFSET, 4)]})
            hold_during = hold.request(None, [("3", "APDU", rig.read_binary(rig.MARKER_OFFSET, 4)), ("4", "RELEASE", None)])
        finally:
            hold.close()
        st3, closed = self.api("DELETE", f"/api/v1/sessions/{sid}")
        after = self.try_others([("A via front2", FRONTS["front2"], card, DIRECT),
                                 ("A at its owner", OWNERS["rack1"], "Emulated 02", {}),
                                 ("B via front1", FRONTS["front1"], held, DIRECT),
                                 ("B at its owner", OWNERS["rack2"], "Emulated 04", {})], timeout=8.0)
        return {"opened": [st, opened], "session_first": [st1, first], "session_during": [st2, during],
                "closed": st3, "hold": hold_got, "hold_during": hold_during, "others": others,
                "after": {k: v["got"] for k, v in after.items()}}

    # 5. the client's own address in the front's and the owner's audit lines
    def audit(self):
        card = name("rack2", 3)
        with rig.Line(rig.LB, rig.TIER_PORT, source=CLIENT) as c:
            got = c.apdus(card, ["00A4000C023F00", "00A4000C023F00", "00A4000C023F00"])
            client_port = c.sock.getsockname()[1]
        time.sleep(1.0)
        fronts = [dict(r, file=f) for f in FRONTS for r in self.tier.procs[f].audit_records()
                  if r.get("reader") == card]
        owner = [r for r in self.tier.procs["rack2"].audit_records() if r.get("reader") == "Emulated 03"]
        return {"got": got, "client": f"{CLIENT}:{client_port}", "front_records": fronts[-5:], "owner_records": owner[-5:]}

    # 6 / 7. silent and killed owners
    def load(self, cards, seconds=60.0, via="haproxy"):
        deadline = time.monotonic() + seconds
        out = []
        for k, card in enumerate(cards):
            if via == "haproxy":
                w = rig.CounterClient(rig.LB, rig.TIER_PORT, card, source=f"127.0.1.{k + 1}", deadline=deadline)
            else:
                w = rig.CounterClient(via, rig.LINE_PORT, card, deadline=deadline, client=f"127.0.1.{k + 1}")
            w.start()
            out.append(w)
        return out

    def stop_load(self, workers):
        for w in workers:
            w.stop()
        for w in workers:
            w.join(20)
        return [dict(w.stats, reader=w.reader, samples=w.samples, alive=w.is_alive()) for w in workers]

    def ask_each_front(self, card, timeout):
        """{front: {"got", "after"}} of one request on ``card`` sent to every
        front at once."""
        out = {}

        def ask(front):
            t0 = time.monotonic()
            try:
                got = rig.one(FRONTS[front], rig.LINE_PORT, card, ["00A4000C023F00"], timeout=timeout,
                              **DIRECT)
            except OSError as e:
                got = [f"no answer: {type(e).__name__}"]
            out[front] = {"got": got, "after": round(time.monotonic() - t0, 2)}

        threads = [threading.Thread(target=ask, args=(f,)) for f in FRONTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 5)
        return out

    def wait_owner_back(self, owner, timeout=30.0):
        card = name(owner, 5)

        def ok():
            return all(v["got"] == ["9000"] for v in self.ask_each_front(card, 3.0).values())
        t0 = time.monotonic()
        rig.wait_for(ok, timeout, f"every front answering {card}", interval=0.3)
        return round(time.monotonic() - t0, 2)

    def silent_owner(self):
        workers = self.load([name("rack2", 10 + k) for k in range(3)])
        time.sleep(1.0)
        t0 = time.monotonic()
        self.tier.procs["rack1"].send(signal.SIGSTOP)
        try:
            in_flight = self.ask_each_front(name("rack1", 5), 12.0)
            time.sleep(0.5)
            later = self.ask_each_front(name("rack1", 6), 12.0)
            status = {f: self.tier.procs[f].status() for f in FRONTS}
            silent_for = time.monotonic() - t0
        finally:
            self.tier.procs["rack1"].send(signal.SIGCONT)
        back = self.wait_owner_back("rack1")
        time.sleep(0.5)
        return {"in_flight": in_flight, "later": later, "silent_for": round(silent_for, 2),
                "upstreams": {f: (s or {}).get("upstreams") for f, s in status.items()},
                "back_after": back, "load": self.stop_load(workers),
                "window": [0, round(silent_for, 2)],
                "max_gap": max(rig.gaps(w.answered_at, t0, t0 + silent_for) for w in workers)}

    def killed_owner(self):
        t = self.tier
        workers = self.load([name("rack2", 10 + k) for k in range(3)])
        time.sleep(1.0)
        t0 = time.monotonic()
        t.procs["rack1"].stop(signal.SIGKILL)
        first = self.ask_each_front(name("rack1", 5), 12.0)
        time.sleep(1.0)
        killed_for = time.monotonic() - t0
        # a front restarts while rack1 is down
        t.restart("front3")
        restart_error = None
        try:
            self.wait_front("front3", timeout=30)
            self.wait_haproxy_up(["front3"], timeout=15)  # back in HAProxy's rotation
        except (TimeoutError, RuntimeError) as e:
            restart_error = str(e)[-1500:]
        readers_down = self.front_readers("front3")
        markers_down = self.read_markers(fronts=["front3"], owners=["rack2"])
        # rack1 back (its cards' contents are new: markers written again)
        t.procs["rack1"].start()
        t.procs["rack1"].wait_listening()
        back = self.wait_owner_back("rack1")
        self.write_markers(owners=["rack1"])
        readers_back = {f: self.front_readers(f) for f in FRONTS}
        markers_back = self.read_markers()
        return {"first": first, "restart_error": restart_error, "readers_down": readers_down,
                "markers_down": markers_down, "back_after": back, "readers_back": readers_back,
                "markers_back": markers_back, "load": self.stop_load(workers),
                "max_gap": max(rig.gaps(w.answered_at, t0, t0 + killed_for) for w in workers)}

    # 8. fronts restarted one by one under load
    def rolling(self):
        cards = [name(o, 20 + k) for o in OWNERS for k in range(3)]
        workers = self.load(cards, seconds=90)
        time.sleep(1.5)
        windows = []
        for front in FRONTS:
            t0 = time.monotonic()
            proc = self.tier.procs[front]
            proc.send(signal.SIGTERM)
            lb = self.tier.procs["haproxy"]
            try:  # HAProxy takes it out of rotation while it still serves (drain-announce)
                rig.wait_for(lambda: not rig.haproxy_servers(lb.admin).get(("fronts", front), "").startswith("UP"),
                             10, f"HAProxy: {front} out of rotation", interval=0.05)
                down = time.monotonic() - t0
            except TimeoutError:
                down = None
            rc = proc.wait_exit(20)
            stopped = time.monotonic() - t0
            self.tier.procs[front].start()
            self.wait_front(front, want=100)
            self.wait_haproxy_up([front])
            t1 = time.monotonic()
            windows.append({"front": front, "exit": rc, "stopped_after": round(stopped, 2),
                            "out_of_rotation_after": down and round(down, 2),
                            "back_after": round(t1 - t0, 2),
                            "answers": sum(1 for w in workers for a in w.answered_at if t0 <= a <= t1),
                            "max_gap": round(max(rig.gaps(w.answered_at, t0, t1) for w in workers), 2)})
        time.sleep(1.0)
        return {"windows": windows, "load": self.stop_load(workers)}

    # 9. route by reader: HAProxy straight to the owners
    def route(self):
        t = self.tier
        for f in list(FRONTS) + list(OWNERS) + ["haproxy"]:
            t.procs[f].stop()
        for owner, addr in OWNERS.items():
            t.proxy("route-" + owner, addr, config="owner.toml", route=True)
        lb = t.haproxy("haproxy-route-by-reader.cfg", name="haproxy-route")
        for owner in OWNERS:
            t.procs["route-" + owner].wait_listening()
        rig.wait_for(lambda: all(s.startswith("UP") for s in rig.haproxy_servers(lb.admin).values())
                     and len(rig.haproxy_servers(lb.admin)) == 2, 20, "route HAProxy: owners UP", proc=lb)
        out = {}
        port = rig.ROUTE_PORT
        out["readers"] = rig.readers(rig.LB, port, source=CLIENT)
        with rig.Line(rig.LB, port, source=CLIENT) as c:
            out["write"] = c.apdus("rack2 07", [rig.SELECT_EF, rig.update_binary(rig.MARKER_OFFSET, b"route-rack2-07")])
            out["client"] = f"{CLIENT}:{c.sock.getsockname()[1]}"
        out["read"] = rig.one(rig.LB, port, "rack2 07", [rig.SELECT_EF, rig.read_binary(rig.MARKER_OFFSET, 14)],
                              source=CLIENT)
        out["rack1"] = rig.one(rig.LB, port, "rack1 03", ["00A4000C023F00"], source=CLIENT)
        with rig.Line(rig.LB, port, source=CLIENT) as c:
            out["same_connection"] = [c.apdus("rack1 03", ["00A4000C023F00"]), c.apdus("rack2 03", ["00A4000C023F00"])]
        time.sleep(1.0)
        out["owner_records"] = [r for r in t.procs["route-rack2"].audit_records() if r.get("reader") == "rack2 07"][-3:]
        return out

    # 10. owners added and removed through etcd while clients run
    def etcd(self):
        t = self.tier
        t.etcd()
        t.proxy("rack3", "127.0.0.33", config="owner.toml")
        t.procs["rack3"].wait_listening()
        t.proxy("front4", "127.0.0.24", config="front-etcd.toml")
        t.procs["front4"].wait_listening()
        f4 = t.procs["front4"]
        rig.wait_for(lambda: f4.readyz() == 200, 30, "front4 /readyz 200", proc=f4)
        front = "127.0.0.24"

        def listed():
            try:
                return rig.readers(front, rig.LINE_PORT, client=CLIENT)
            except (OSError, RuntimeError, IndexError):
                return []
        rig.wait_for(lambda: name("rack3", 0) in listed(), 30, "front4 listing rack3's readers", proc=f4)
        workers = self.load([name("rack3", k) for k in range(3)], seconds=60, via=front)
        time.sleep(1.0)
        argv = rig.doc_command_like("127.0.0.33", "127.0.0.34", [("rack3", "rack4")], config="owner.toml", path=t.doc)[4:]
        t.proxy("rack4", "127.0.0.34", argv=argv)
        t.procs["rack4"].wait_listening()
        t0 = time.monotonic()
        rig.wait_for(lambda: name("rack4", 0) in listed(), 20, "front4 listing rack4's readers", proc=f4)
        added_after = time.monotonic() - t0
        keys = rig.etcd_range()
        on_rack4 = rig.one(front, rig.LINE_PORT, name("rack4", 0), ["00A4000C023F00"], client=CLIENT)
        # the id rack3 is taken by a live lease: a second rack3 must not start
        dup_argv = rig.doc_command_like("127.0.0.33", "127.0.0.35", config="owner.toml", path=t.doc)[4:]
        dup = t.proxy("rack3-again", "127.0.0.35", argv=dup_argv)
        try:
            dup.proc.wait(30)
        except Exception:  # noqa: BLE001
            pass
        dup_rc = dup.proc.poll()
        dup_out = dup.tail(800)
        t.procs["rack4"].stop()
        t1 = time.monotonic()
        rig.wait_for(lambda: name("rack4", 0) not in listed(), 20, "front4 dropping rack4's readers", proc=f4)
        removed_after = time.monotonic() - t1
        keys_after = rig.etcd_range()
        time.sleep(1.0)
        return {"added_after": round(added_after, 2), "removed_after": round(removed_after, 2), "keys": keys,
                "keys_after": keys_after, "on_rack4": on_rack4, "duplicate_id_exit": dup_rc,
                "duplicate_id_output": dup_out, "load": self.stop_load(workers)}

    def run(self):
        self.phase("start", self.start_tier)
        if "error" not in self.facts["start"]:
            self.phase("readers", self.readers_everywhere)
            self.phase("markers", self.markers)
            self.phase("mixed", self.mixed)
            self.phase("session", self.session)
            self.phase("audit", self.audit)
            self.phase("silent_owner", self.silent_owner)
            self.phase("killed_owner", self.killed_owner)
            self.phase("rolling", self.rolling)
        self.phase("route", self.route)
        self.phase("etcd", self.etcd)
        self.tier.stop_all()
        return self.facts


def main():
    out_path = sys.argv[sys.argv.index("--scenario") + 1]
    doc = sys.argv[sys.argv.index("--doc") + 1] if "--doc" in sys.argv else rig.DOC
    workdir = os.path.join(os.path.dirname(os.path.abspath(out_path)), "tier")
    os.makedirs(workdir, exist_ok=True)
    s = Scenario(workdir, doc)
    try:
        facts = s.run()
    finally:
        s.tier.stop_all()
    facts["workdir"] = workdir
    with open(out_path, "w") as f:
        json.dump(facts, f, indent=1, default=str)


# -- the tests ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tier(tmp_path_factory):
    why = rig.can_namespace()
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("tier") / "facts.json"
    run = rig.in_namespace([sys.executable, os.path.abspath(__file__), "--scenario", str(out)],
                           timeout=SCENARIO_TIMEOUT)
    assert run.returncode == 0 and out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())


def facts_of(tier, key):
    if key not in tier:  # the tier did not start
        start = tier["start"]
        pytest.fail(f"phase {key} did not run: the tier did not start:\n{start.get('error')}\n{start.get('logs', '')}")
    got = tier[key]
    assert "error" not in got, f"phase {key} failed:\n{got['error']}\n{got.get('logs', '')}"
    return got


def all_names(owners=OWNERS):
    return sorted(name(o, i) for o in owners for i in range(50))


def test_readers_identical_on_every_front(tier):
    got = facts_of(tier, "readers")["readers"]
    assert sorted(got["front1"]) == all_names(), got["front1"][:5]
    for key, names in got.items():
        assert sorted(names) == all_names(), key
        # and in the same order: "the first reader" is the same card everywhere
        assert names == got["front1"], f"{key} lists the same readers in another order: {names[:2]} ... vs {got['front1'][:2]} ..."


def test_same_marker_through_every_front(tier):
    reads = facts_of(tier, "markers")["reads"]
    assert len(reads) == len(FRONTS) * len(OWNERS) * len(MARKED)
    assert [r for r in reads if r["got"] != r["want"]] == []


def test_same_marker_after_a_front_restarted_while_an_owner_was_down(tier):
    got = facts_of(tier, "killed_owner")
    assert got["restart_error"] is None, got["restart_error"]  # ready (and in HAProxy) with one owner of two
    assert set(all_names(["rack2"])) <= set(got["readers_down"])
    assert not [n for n in got["readers_down"] if not n.startswith(("rack1/", "rack2/"))]
    assert [r for r in got["markers_down"] if r["got"] != r["want"]] == []
    for front, names in got["readers_back"].items():
        assert sorted(names) == all_names(), front
    assert [r for r in got["markers_back"] if r["got"] != r["want"]] == []


def test_no_mixed_requests_from_two_clients_on_two_fronts(tier):
    probes = facts_of(tier, "mixed")["probes"]
    for p in probes:
        assert p["mixed"] == 0 and p["wrong"] == 0 and p["lost"] == 0 and not p["errors"], p
        assert p["ok"] >= 50, p  # both really ran, side by side, for 4 s


def test_session_on_one_front_excludes_every_other_client(tier):
    """An API session on front1 and a line HOLD on front2."""
    got = facts_of(tier, "session")
    assert got["opened"][0] == 200, got["opened"]
    assert got["session_first"] == [200, {"atr": None, "responses": ["9000"]}], got["session_first"]
    # the EF the session selected is still selected after the others tried: READ BINARY reads it
    assert got["session_during"] == [200, {"atr": None, "responses": ["00000000" "9000"]}], got["session_during"]
    for who, other in got["others"].items():
        # nobody else's command ran on the held card: no answer within 3 s, or C086 (queue timeout)
        assert other["got"] in (["C086"], ["no answer: timeout"], ["no answer: TimeoutError"]), (who, other)
    assert got["hold"] == [["1", "OK"], ["2", "9000"]], got["hold"]  # a line HOLD on front2
    assert got["hold_during"] == [["3", "00000000" "9000"], ["4", "OK"]], got["hold_during"]
    assert len(got["others"]) == 9
    assert got["closed"] == 200
    assert got["after"] == {k: ["9000"] for k in ("A via front2", "A at its owner", "B via front1", "B at its owner")}, \
        got["after"]


def test_client_address_in_front_and_owner_audit_lines(tier):
    got = facts_of(tier, "audit")
    assert got["got"] == ["9000"] * 3
    client = got["client"]
    assert [r for r in got["front_records"] if r.get("peer") == client], (client, got["front_records"])
    owner = [r for r in got["owner_records"] if (r.get("on_behalf_of") or {}).get("peer") == client]
    assert owner, (client, got["owner_records"])
    assert not owner[-1]["peer"].startswith(CLIENT + ":")  # peer stays the front's connection
    assert owner[-1]["on_behalf_of"]["frontend"] == "line"


def check_load(load):
    for w in load:
        assert w["wrong"] == 0 and w["duplicate"] == 0, w
        assert not w["alive"], w
        assert w["ok"] > 0, w


def test_silent_owner_gives_c086_within_the_bound(tier):
    got = facts_of(tier, "silent_owner")
    for front, r in got["in_flight"].items():  # in flight when the owner froze: C086 once it is seen silent
        assert r["got"] == ["C086"] and r["after"] <= 5.0, (front, r)
    for front, r in got["later"].items():  # known silent: C086 at once
        assert r["got"] == ["C086"] and r["after"] <= 1.0, (front, r)
    for front, ups in got["upstreams"].items():
        states = {u["owner"]: u["state"] for u in ups or []}
        assert states.get("rack1") in ("silent", "down") and states.get("rack2") == "up", (front, ups)
    check_load(got["load"])  # the other owner's cards kept answering
    for w in got["load"]:
        assert w["lost"] == 0 and not w["errors"], w
    assert got["max_gap"] < 1.0, got["max_gap"]


def test_killed_owner_gives_c086_within_the_bound(tier):
    got = facts_of(tier, "killed_owner")
    for front, r in got["first"].items():
        assert r["got"] == ["C086"] and r["after"] <= 2.0, (front, r)
    check_load(got["load"])  # (through HAProxy: also while front3 restarted)
    assert got["max_gap"] < 1.0, got["max_gap"]  # the other owner's cards, until front3 restarts


def test_fronts_restarted_one_by_one_under_load(tier):
    got = facts_of(tier, "rolling")
    check_load(got["load"])
    for w in got["load"]:  # a request whose connection a draining front closed did not run: safe to send again
        assert w.get("uncertain_ran", 0) == 0 and not w["errors"], w
    assert [w["front"] for w in got["windows"]] == list(FRONTS)
    for w in got["windows"]:
        assert w["exit"] == 0, w
        # out of HAProxy's rotation (503 /readyz) before it stops serving
        assert w["out_of_rotation_after"] is not None and w["out_of_rotation_after"] < w["stopped_after"], w
        assert w["answers"] > 0 and w["max_gap"] < 3.0, w  # the tier kept answering during each restart


def test_route_by_reader_through_haproxy(tier):
    got = facts_of(tier, "route")
    assert got["readers"] == [f"rack1 {i:02d}" for i in range(50)]  # the default owner's
    assert got["write"] == ["9000", "9000"]
    assert got["read"] == ["9000", b"route-rack2-07".hex().upper() + "9000"]
    assert got["rack1"] == ["9000"]
    assert got["same_connection"] == [["9000"], ["C083"]]  # one owner per connection
    assert [r for r in got["owner_records"] if r.get("peer") == got["client"]], got["owner_records"]


def test_owner_added_and_removed_through_etcd_while_clients_run(tier):
    got = facts_of(tier, "etcd")
    assert set(got["keys"]) == {"foxyproxy/owners/rack3", "foxyproxy/owners/rack4"}, got["keys"]
    assert json.loads(got["keys"]["foxyproxy/owners/rack4"]) == {"id": "rack4", "url": "tcp://127.0.0.34:4001"}
    assert got["on_rack4"] == ["9000"]
    assert set(got["keys_after"]) == {"foxyproxy/owners/rack3"}
    assert got["duplicate_id_exit"] not in (None, 0), got["duplicate_id_output"]
    check_load(got["load"])
    for w in got["load"]:
        assert w["lost"] == 0 and not w["errors"], w


if __name__ == "__main__":
    main()

"""A front and two owners as real ``twistd foxyproxy`` processes on
loopback: an owner that goes silent (SIGSTOP: its kernel still accepts
and ACKs, the process answers nothing) is found within 3 s while every
pooled connection to it waits on a card, its commands in flight get
``C086`` (never re-sent: its card ran each once), new ones ``C086`` at once,
its readers are listed absent and present again once it answers; a
SIGKILLed owner gives ``C086`` at once; the other owner's cards answer
throughout; ``/readyz`` follows ``--ready-min-upstreams``; and the
``--drain-announce`` period after SIGTERM (``/readyz`` 503 while clients
are still served, then the drain), also behind a real HAProxy that stops
sending new clients to the stopping front."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import threading
import time

import pytest

from support import HOST, LineClient, free_port, wait_for
from test_operations_integration import http, metrics_proxy, scrape, value

SELECT_MF = "00A4000C023F00"

pytestmark = pytest.mark.integration


def owner(proxy_factory, *backend):
    return metrics_proxy(proxy_factory, "--no-signing", "--backend", *backend)


def apdus(p, reader):
    """APDUs the card ``reader`` of process ``p`` has finished (its metrics)."""
    s = scrape(p.metrics_port)
    return sum(value(s, "foxyproxy_reader_commands_total", reader=reader, kind="APDU", result=r)
               for r in ("OK", "C080", "C086"))


def status_json(p):
    code, body = http(p.metrics_port, "/status.json")
    assert code == 200, body
    return json.loads(body)


def present(p, prefix):
    return {r["name"]: r["present"] for r in status_json(p)["readers"] if r["name"].startswith(prefix)}


def upstream_states(p):
    return {u["upstream"]: u["state"] for u in status_json(p)["upstreams"]}


class Keeper(threading.Thread):
    """A client that keeps sending one APDU to ``reader`` through ``port``
    and records every answer, until stopped (bounded: at most 60 s)."""

    def __init__(self, port, reader):
        super().__init__(daemon=True)
        self.port, self.reader = port, reader
        self.answers = []
        self.done = threading.Event()

    def run(self):
        deadline = time.monotonic() + 60
        try:
            with LineClient(HOST, self.port, timeout=10) as c:
                n = 0
                while not self.done.is_set() and time.monotonic() < deadline:
                    n += 1
                    self.answers.append(c.results(f">{self.reader}|\n>{n}:APDU:{SELECT_MF}|\n\n")[0])
                    time.sleep(0.05)
        except OSError as e:
            self.answers.append(f"{type(e).__name__}: {e}")

    def stop(self):
        self.done.set()
        self.join(15)
        return self.answers


def in_flight(port, reader):
    """Send one APDU to ``reader`` on a connection of its own; returns a
    function that waits for its result and the seconds since it was sent."""
    c = LineClient(HOST, port, timeout=20)
    c.send(f">{reader}|\n>1:APDU:{SELECT_MF}|\n\n")
    box = []

    def read():
        box.append(c.read_response())
        box.append(time.monotonic())
        c.close()

    t = threading.Thread(target=read, daemon=True)
    t.start()

    def result():
        t.join(20)
        assert box, "no answer"
        return box[0], box[1]

    return result


def test_a_stopped_owner_is_found_within_3s_with_every_connection_busy(proxy_factory):
    # rack1's cards take 1.5 s per command, so commands are in flight on every pooled connection
    a = owner(proxy_factory, "emulated:?cards=2&latency_ms=1500", "--owner-id", "rack1")
    b = owner(proxy_factory, "emulated:?cards=2", "--owner-id", "rack2")
    f = metrics_proxy(proxy_factory, "--no-signing",  # names rack1/... and rack2/... by the owner ids
                      "--backend", f"tcp://{HOST}:{a.port}?connections=2",
                      "--backend", f"tcp://{HOST}:{b.port}")
    try:
        wait_for(lambda: http(f.metrics_port, "/readyz")[0] == 200, what="the front ready")
        with f.client() as c:
            assert c.results(f">rack1/Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]
        time.sleep(1.0)  # the front learns that rack1 keeps connections: the pool, its liveness connection
        keeper = Keeper(f.port, "rack2/Emulated 00")
        keeper.start()
        ran = apdus(a, "Emulated 00") + apdus(a, "Emulated 01")
        waits = [in_flight(f.port, "rack1/Emulated 00"), in_flight(f.port, "rack1/Emulated 01")]
        time.sleep(0.3)  # both on rack1's cards, one on each pooled connection
        os.kill(a.proc.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            for wait in waits:
                answer, at = wait()
                assert answer == [("1", "C086")]
                seconds = at - stopped_at
                print(f"\nC086 {seconds:.2f} s after the owner stopped (heartbeat 1 s + timeout 1.5 s)")
                assert seconds < 3.0, seconds
            # new commands: C086 at once, while it stays silent
            with f.client() as c:
                began = time.monotonic()
                assert c.results(f">rack1/Emulated 01|\n>1:APDU:{SELECT_MF}|\n\n") == ["C086"]
                assert time.monotonic() - began < 0.5
            assert present(f, "rack1/") == {"rack1/Emulated 00": False, "rack1/Emulated 01": False}
            assert present(f, "rack2/") == {"rack2/Emulated 00": True, "rack2/Emulated 01": True}
            assert upstream_states(f) == {f"tcp://{HOST}:{a.port}": "silent",
                                          f"tcp://{HOST}:{b.port}": "up"}
            assert http(f.metrics_port, "/readyz")[0] == 200  # N=1: rack2 serves
            time.sleep(3.5)  # it stays silent through a reconnection or two: still refused at once
            with f.client() as c:
                began = time.monotonic()
                assert c.results(f">rack1/Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["C086"]
                assert time.monotonic() - began < 0.5
            s = scrape(f.metrics_port)
            assert value(s, "foxyproxy_upstream_up", upstream=f"tcp://{HOST}:{a.port}", owner="rack1") == 0
            assert value(s, "foxyproxy_upstream_up", upstream=f"tcp://{HOST}:{b.port}", owner="rack2") == 1
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        resumed = time.monotonic()
        wait_for(lambda: present(f, "rack1/") == {"rack1/Emulated 00": True, "rack1/Emulated 01": True},
                 timeout=10, what="rack1's readers present again")
        print(f"rack1's readers present again {time.monotonic() - resumed:.2f} s after SIGCONT")
        with f.client() as c:
            # the first APDU after the outage may be told the card may have changed (C080, once:
            # answered by the front, not sent)
            first = c.results(f">rack1/Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n")
            assert first in (["9000"], ["C080"])
            assert c.results(f">rack1/Emulated 00|\n>2:APDU:{SELECT_MF}|\n\n") == ["9000"]
        answers = keeper.stop()
        assert len(answers) >= 20 and set(answers) == {"9000"}, answers
        # the two commands in flight ran once each at rack1, and nothing was sent again
        time.sleep(2.0)
        assert apdus(a, "Emulated 00") + apdus(a, "Emulated 01") == ran + 2 + (first == ["9000"]) + 1, f.log()
        assert f.log().count("did not answer a heartbeat") == 1
        assert "Traceback" not in f.log()
    finally:
        if a.proc.poll() is None:
            os.kill(a.proc.pid, signal.SIGCONT)


def test_a_killed_owner_gives_c086_at_once_and_readiness_follows_min_upstreams(proxy_factory):
    a = owner(proxy_factory, "emulated:?cards=1&latency_ms=1500")
    b = owner(proxy_factory, "emulated:?cards=1")
    backends = ["--backend", f"tcp://{HOST}:{a.port}?prefix=rack1/",
                "--backend", f"tcp://{HOST}:{b.port}?prefix=rack2/"]
    f1 = metrics_proxy(proxy_factory, "--no-signing", *backends)
    f2 = metrics_proxy(proxy_factory, "--no-signing", "--ready-min-upstreams", "2", *backends)
    for f in (f1, f2):
        wait_for(lambda: http(f.metrics_port, "/readyz")[0] == 200, what="the front ready")
    time.sleep(1.0)
    keeper = Keeper(f1.port, "rack2/Emulated 00")
    keeper.start()
    wait = in_flight(f1.port, "rack1/Emulated 00")
    time.sleep(0.3)
    a.proc.kill()
    killed_at = time.monotonic()
    answer, at = wait()
    assert answer == [("1", "C086")]
    assert at - killed_at < 1.0, at - killed_at
    with f1.client() as c:
        began = time.monotonic()
        wait_for(lambda: present(f1, "rack1/") == {"rack1/Emulated 00": False}, timeout=3,
                 interval=0.05, what="rack1's reader absent")
        assert c.results(f">rack1/Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["C086"]
        assert time.monotonic() - began < 3.0
    assert upstream_states(f1)[f"tcp://{HOST}:{a.port}"] == "down"
    assert http(f1.metrics_port, "/readyz")[0] == 200  # one of two owners is enough for N=1
    # f2 sends rack1 nothing: it learns of the kill from its connections' loss (within the liveness bound)
    wait_for(lambda: http(f2.metrics_port, "/readyz")[0] == 503, timeout=3, interval=0.05,
             what="f2 (N=2) not ready without rack1")
    code, body = http(f2.metrics_port, "/readyz")
    assert code == 503
    assert json.loads(body)["reasons"] == [
        f"1 of 2 upstreams up with readers, --ready-min-upstreams 2 needed (tcp://{HOST}:{a.port} down)"]
    answers = keeper.stop()
    assert len(answers) >= 10 and set(answers) == {"9000"}, answers
    for f in (f1, f2):
        assert "Traceback" not in f.log()


def test_a_front_started_while_one_owner_is_down_is_ready_with_the_other(proxy_factory):
    b = owner(proxy_factory, "emulated:?cards=1")
    gone = free_port()  # nothing listens there
    f = metrics_proxy(proxy_factory, "--no-signing", "--backend", f"tcp://{HOST}:{gone}?prefix=rack1/",
                      "--backend", f"tcp://{HOST}:{b.port}?prefix=rack2/")
    wait_for(lambda: http(f.metrics_port, "/readyz")[0] == 200, what="the front ready with one owner")
    assert upstream_states(f) == {f"tcp://{HOST}:{gone}": "down", f"tcp://{HOST}:{b.port}": "up"}
    with f.client() as c:
        assert c.results(f">rack2/Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]


def test_drain_announce_answers_503_while_clients_are_served_then_drains(proxy_factory):
    p = metrics_proxy(proxy_factory, "--no-signing", "--backend", "emulated:?cards=2&latency_ms=100",
                      "--drain-announce", "2", "--drain-timeout", "5")
    wait_for(lambda: http(p.metrics_port, "/readyz")[0] == 200, what="ready")
    keeper = Keeper(p.port, "Emulated 00")
    keeper.start()
    time.sleep(0.5)
    p.proc.send_signal(signal.SIGTERM)
    sent_at = time.monotonic()
    time.sleep(0.3)
    code, body = http(p.metrics_port, "/readyz")
    assert code == 503
    assert json.loads(body)["reasons"] == ["stopping: the drain begins in 2s (--drain-announce)"]
    with p.client() as c:  # a new client is still accepted and served
        assert c.results(f">Emulated 01|\n>1:APDU:{SELECT_MF}|\n>2:APDU:{SELECT_MF}|\n\n") == ["9000", "9000"]
    served = len(keeper.answers)
    time.sleep(1.0)
    assert len(keeper.answers) > served  # the running client too
    assert time.monotonic() - sent_at < 2.0 and p.proc.poll() is None
    assert p.proc.wait(15) == 0
    stopped = time.monotonic() - sent_at
    assert 2.0 <= stopped < 5.0, stopped
    keeper.join(15)
    # every request answered 9000; the one sent once the drain had begun may find its connection
    # closed instead (never run: docs/deployment.md "Clean stop and reload")
    *answered, last = keeper.answers
    assert len(answered) >= 10 and set(answered) == {"9000"}, keeper.answers
    assert last == "9000" or last.startswith(("ConnectionError", "ConnectionResetError")), last
    assert "Traceback" not in p.log()
    assert "/readyz answers 503 for 2s" in p.log()


HAPROXY = shutil.which("haproxy")
DEPLOYMENT = pathlib.Path(__file__).parent.parent / "docs" / "deployment.md"


def haproxy_config(port, fronts):
    """docs/deployment.md's HAProxy configuration for a tier, on loopback:
    its servers replaced by ``fronts`` ([(line port, metrics port)]), and
    checks every 250 ms instead of 1 s (a faster test)."""
    text = DEPLOYMENT.read_text()
    block = text.split("```\n# /etc/haproxy/haproxy.cfg", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines()[1:] if not line.strip().startswith("server ")]
    assert "    option httpchk GET /readyz" in lines and "    http-check expect status 200" in lines
    config = "\n".join(lines).replace("bind :4001", f"bind {HOST}:{port}").replace(
        "inter 1s", "inter 250ms").replace("check port 9464", "check")
    servers = "".join(f"    server front{i} {HOST}:{line} port {metrics}\n"
                      for i, (line, metrics) in enumerate(fronts))
    return "global\n    log stdout format raw local0 info\n" + config + "\n" + servers


@pytest.mark.skipif(HAPROXY is None, reason="Debian haproxy is not installed")
def test_haproxy_takes_a_front_out_during_its_announce_period(proxy_factory, tmp_path):
    owner_p = owner(proxy_factory, "emulated:?cards=2")
    fronts = [metrics_proxy(proxy_factory, "--no-signing", "--drain-announce", "3",
                            "--backend", f"tcp://{HOST}:{owner_p.port}?prefix=rack1/") for _ in range(2)]
    port = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(port, [(f.port, f.metrics_port) for f in fronts]))
    out = open(tmp_path / "haproxy.out", "wb")
    h = subprocess.Popen([HAPROXY, "-f", str(cfg), "-db"], stdout=out, stderr=subprocess.STDOUT)
    try:
        def requests_on(f):
            return value(scrape(f.metrics_port), "foxyproxy_frontend_requests_total", frontend="line")

        def through_haproxy():
            with LineClient(HOST, port, timeout=10) as c:
                return c.results(f">rack1/Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n")

        def tried():
            try:
                return through_haproxy() == ["9000"]
            except OSError:
                return False  # haproxy still starting, or no front checked up yet

        for f in fronts:
            wait_for(lambda: http(f.metrics_port, "/readyz")[0] == 200, what="fronts ready")
        wait_for(lambda: tried() and all(requests_on(f) > 0 for f in fronts), timeout=15,
                 what="haproxy sends clients to both fronts")
        fronts[0].proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # two failed checks at 250 ms: front0 is out, and still serving
        assert fronts[0].proc.poll() is None
        before = [requests_on(f) for f in fronts]
        answers = [through_haproxy() for _ in range(10)]
        after = [requests_on(f) for f in fronts]
        assert answers == [["9000"]] * 10
        assert after[0] == before[0] and after[1] - before[1] >= 10, (before, after)
        assert fronts[0].proc.wait(15) == 0
        assert [through_haproxy() for _ in range(3)] == [["9000"]] * 3
    finally:
        h.terminate()
        h.wait(10)
        out.close()


from test_tcp_integration import foxyproxy_upstream  # noqa: E402,F401  (a fixture)


def test_an_upstream_that_closes_after_every_answer_counts_as_up(proxy_factory, foxyproxy_upstream):  # noqa: F811
    """foxyproxy 2.10 has no connection open between requests: it is up
    while it answers, and a front on it stays ready."""
    f = metrics_proxy(proxy_factory, "--backend", f"tcp://{HOST}:{foxyproxy_upstream}?prefix=F%20")
    wait_for(lambda: http(f.metrics_port, "/readyz")[0] == 200, what="the front ready")
    name = status_json(f)["readers"][0]["name"]
    with f.client() as c:
        for i in range(5):
            assert c.results(f">{name}|\n>{i}:APDU:{SELECT_MF}|\n\n") == ["9000"]
    for _ in range(10):  # between requests too
        time.sleep(0.3)
        assert http(f.metrics_port, "/readyz")[0] == 200
    [state] = status_json(f)["upstreams"]
    assert state["state"] == "up" and state["readers"] >= 1
    assert "a new connection for every request" in f.log()

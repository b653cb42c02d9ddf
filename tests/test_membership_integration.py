"""Membership end to end (docs/tcp.md, "Membership: SIGHUP and etcd"): a
real etcd (Debian etcd-server, its own data directory, loopback ports),
real twistd owners and fronts, and etcdctl (etcd-client) to look at what
was registered."""

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest

from support import HOST, TWISTD, LineClient, free_port, wait_for

pytestmark = pytest.mark.integration

SELECT_MF = "00A4000C023F00"


class Etcd:
    """An etcd process on loopback ports with its own data directory; it
    can be stopped and started again (the same data, the same ports)."""

    def __init__(self):
        assert shutil.which("etcd"), "etcd is missing: apt-get install etcd-server (tests/debian-packages.txt)"
        self.home = tempfile.mkdtemp(prefix="foxyproxy-etcd-")
        self.client, self.peer = free_port(), free_port()
        self.url = f"http://{HOST}:{self.client}"
        self.proc = None

    def start(self):
        peer = f"http://{HOST}:{self.peer}"
        self.log = open(os.path.join(self.home, "etcd.log"), "ab")
        self.proc = subprocess.Popen(
            ["etcd", "--name", "test", "--data-dir", os.path.join(self.home, "data"),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"test={peer}"], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self.answers, timeout=30, what="etcd to answer")
        return self

    def answers(self):
        try:
            urllib.request.urlopen(self.url + "/v3/kv/range", data=b'{"key": "AA=="}', timeout=1).read()
            return True
        except OSError:
            return False

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.log.close()


@pytest.fixture
def etcd_server():
    server = Etcd().start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.home, ignore_errors=True)


@pytest.fixture
def etcd(etcd_server):
    """A running etcd on loopback; its client URL."""
    return etcd_server.url


def etcd_get(url, key):
    """The value of ``key`` through etcdctl, or None."""
    out = subprocess.run(["etcdctl", "--endpoints", url, "get", key, "--print-value-only"],
                         env=dict(os.environ, ETCDCTL_API="3"), capture_output=True, text=True,
                         timeout=10, check=True).stdout.strip()
    return json.loads(out) if out else None


def readers(proxy):
    with proxy.client() as c:
        [(_, listing)] = c.request(">*|\n>1:READERS|\n\n")
    return sorted(base64.b64decode(n).decode() for n in listing.split("|") if n)


def etcd_url(base, extra=""):
    return f"etcd://{base[len('http://'):]}/fp{extra}"


def emulated(owner):
    """The front's names of an owner's four emulated cards (docs/tcp.md, "Owner-stable names")."""
    return [f"{owner}/Emulated 0{i}" for i in range(4)]


def readyz(proxy):
    try:
        with urllib.request.urlopen(f"http://{HOST}:{proxy.ports['StatusSite'][0]}/readyz", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_owner_joins_answers_and_leaves_on_sigterm(etcd, proxy_factory):
    front = proxy_factory("--backend", etcd_url(etcd), "--metrics", f"tcp:0:interface={HOST}", listeners=2)
    time.sleep(1)  # the front has listed the (empty) prefix
    assert readyz(front) == 503  # no owner: not ready (--ready-min-upstreams 1)
    owner = proxy_factory("--owner-id", "rack1", "--register", etcd_url(etcd, "?ttl=30"))
    # the default address: the owner's first line-protocol listener
    assert wait_for(lambda: etcd_get(etcd, "fp/owners/rack1"), timeout=10) == {
        "id": "rack1", "url": f"tcp://{HOST}:{owner.port}"}
    wait_for(lambda: readers(front) == emulated("rack1"), timeout=10, what="the owner's readers on the front")
    wait_for(lambda: readyz(front) == 200, timeout=5, what="the front ready with its owner")
    with front.client() as c:
        assert c.results(f">Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]
    owner.stop()  # SIGTERM: the lease is revoked, not left to expire (ttl=30)
    assert owner.proc.returncode == 0
    assert etcd_get(etcd, "fp/owners/rack1") is None
    wait_for(lambda: readers(front) == [], timeout=5, what="the front to drop the owner")
    assert readyz(front) == 503
    with front.client() as c:
        assert c.results(f">Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["C083"]
    assert "lease revoked" in owner.log()


def test_killed_owner_goes_after_its_ttl(etcd, proxy_factory):
    owner = proxy_factory("--owner-id", "rack2", "--register", etcd_url(etcd, "?ttl=3"))
    front = proxy_factory("--backend", etcd_url(etcd))
    wait_for(lambda: readers(front) == emulated("rack2"), timeout=10, what="the owner's readers on the front")
    owner.kill()
    assert etcd_get(etcd, "fp/owners/rack2") is not None  # the lease outlives the process ...
    killed = time.monotonic()
    wait_for(lambda: readers(front) == [], timeout=10, what="the front to drop the killed owner")
    assert etcd_get(etcd, "fp/owners/rack2") is None  # ... until its TTL
    assert time.monotonic() - killed < 3 + 5


def test_second_owner_with_a_live_id_is_refused(etcd, proxy_factory):
    first = proxy_factory("--owner-id", "rack3", "--register", etcd_url(etcd))
    wait_for(lambda: etcd_get(etcd, "fp/owners/rack3"), timeout=10, what="the first registration")
    home = tempfile.mkdtemp(prefix="foxyproxy-test-")
    logfile = os.path.join(home, "twistd.log")
    done = subprocess.run([TWISTD, "-n", "--pidfile=", "--logfile", logfile, "foxyproxy",
                           "-p", f"tcp:0:interface={HOST}", "--owner-id", "rack3",
                           "--register", etcd_url(etcd)], capture_output=True, text=True,
                          cwd=home, timeout=60)
    assert done.returncode == 1
    with open(logfile) as f:
        refusals = [line for line in f if "twistd foxyproxy: --register" in line]
    assert len(refusals) == 1
    assert (f"owner id 'rack3' is held by another live owner (tcp://{HOST}:{first.port}); "
            "give this proxy another --owner-id") in refusals[0]
    assert etcd_get(etcd, "fp/owners/rack3")["url"] == f"tcp://{HOST}:{first.port}"  # untouched
    shutil.rmtree(home, ignore_errors=True)


def test_sighup_adds_and_drops_upstreams_while_a_client_runs(proxy_factory, tmp_path):
    # three owners on one host: each its own --owner-id (the default, the host name, would be one id)
    a, b, c = (proxy_factory("--owner-id", p, "--backend", "emulated:?cards=1&prefix=card ") for p in "ABC")
    config = tmp_path / "front.toml"

    def write(*owners):
        config.write_text("backend = [%s]\n" % ", ".join(f'"tcp://{HOST}:{o.port}"' for o in owners))

    write(a, b)
    front = proxy_factory("--config", str(config), "--metrics", f"tcp:0:interface={HOST}", listeners=2)
    status_port = front.ports["StatusSite"][0]

    def status_backends():
        with urllib.request.urlopen(f"http://{HOST}:{status_port}/status.json", timeout=5) as r:
            return sorted((b["name"].split(" ")[0], b["readers"]) for b in json.load(r)["backends"])

    wait_for(lambda: readers(front) == ["A/card 00", "B/card 00"], timeout=10, what="A and B on the front")
    connected = front.log().count(f"connected to upstream tcp://{HOST}:{a.port}")

    answers, stop = [], threading.Event()

    def client():
        with LineClient(HOST, front.port) as conn:
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline and len(answers) < 100000:
                answers.extend(conn.results(f">A/card 00|\n>1:APDU:{SELECT_MF}|\n\n"))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        wait_for(lambda: len(answers) > 50, timeout=10, what="the client to run")
        write(a, c)
        front.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: readers(front) == ["A/card 00", "C/card 00"], timeout=10, what="B dropped and C added")
        assert status_backends() == sorted([(f"tcp://{HOST}:{a.port}", 1), (f"tcp://{HOST}:{c.port}", 1)])
        before = len(answers)
        wait_for(lambda: len(answers) > before + 50, timeout=10, what="the client to go on")
        # a bad file: the running set stays, one line says why
        config.write_text("backend = [\n")
        front.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "not used, the backends stay as they are" in front.log(), timeout=10,
                 what="the bad file's log line")
        assert readers(front) == ["A/card 00", "C/card 00"]
    finally:
        stop.set()
        thread.join(30)
    assert answers and set(answers) == {"9000"}  # not one error for the unchanged upstream
    assert front.log().count(f"connected to upstream tcp://{HOST}:{a.port}") == connected  # its connections stayed
    with front.client() as conn:
        assert conn.results(f">C/card 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]
        assert conn.results(f">B/card 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["C083"]


def test_etcd_down_keeps_the_owners_and_the_watch_comes_back(etcd_server, proxy_factory):
    etcd = etcd_server.url
    owner = proxy_factory("--owner-id", "rack4", "--register", etcd_url(etcd, "?ttl=20"))
    front = proxy_factory("--backend", etcd_url(etcd))
    wait_for(lambda: readers(front) == emulated("rack4"), timeout=10, what="the owner's readers on the front")
    upstream = f"connected to upstream tcp://{HOST}:{owner.port}"
    connected = front.log().count(upstream)
    etcd_server.stop()
    deadline = time.monotonic() + 4  # a few failed tries (back-off 0.5, 1, 2 s) and liveness checks
    with front.client() as c:
        while time.monotonic() < deadline:
            assert c.results(f">Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]
            time.sleep(0.05)
    assert readers(front) == emulated("rack4")  # the current owners stay
    assert front.log().count("the current owners stay") == 1  # once a minute, not once a try
    etcd_server.start()  # the same data: the owner's key and lease are still there
    wait_for(lambda: "etcd answers again" in front.log(), timeout=40, what="the front to reach etcd again")
    assert readers(front) == emulated("rack4")
    assert front.log().count(upstream) == connected  # the owner's connections were never touched
    owner.stop()
    wait_for(lambda: readers(front) == [], timeout=10, what="the watch to see the owner leave")


def test_an_owner_joins_and_leaves_through_etcd_while_a_client_runs(etcd, proxy_factory):
    first = proxy_factory("--owner-id", "rack5", "--register", etcd_url(etcd))
    front = proxy_factory("--backend", etcd_url(etcd))
    wait_for(lambda: readers(front) == emulated("rack5"), timeout=10, what="the first owner on the front")
    answers, stop = [], threading.Event()

    def client():
        with LineClient(HOST, front.port) as conn:
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline and len(answers) < 100000:
                answers.extend(conn.results(f">Emulated 01|\n>1:APDU:{SELECT_MF}|\n\n"))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        wait_for(lambda: len(answers) > 50, timeout=10, what="the client to run")
        second = proxy_factory("--owner-id", "rack6", "--register", etcd_url(etcd),
                               "--backend", "emulated:?cards=1&prefix=B ")
        wait_for(lambda: readers(front) == emulated("rack5") + ["rack6/B 00"], timeout=10, what="the second owner")
        with front.client() as c:
            assert c.results(f">rack6/B 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]
        second.stop()
        wait_for(lambda: readers(front) == emulated("rack5"), timeout=10, what="the second owner to leave")
        before = len(answers)
        wait_for(lambda: len(answers) > before + 50, timeout=10, what="the client to go on")
    finally:
        stop.set()
        thread.join(30)
    assert set(answers) == {"9000"}
    assert first.proc.poll() is None

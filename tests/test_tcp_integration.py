"""The tcp:// / tls:// backend between real ``twistd foxyproxy`` processes on
loopback: client -> proxy B (tcp backend) -> proxy A (emulated cards)."""

import base64
import datetime
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from support import HOST, LineClient, foxyproxy_venv, free_port

ATR = "3B8B8001466F7879456D753738313677"
CHALLENGE = re.compile(r"[0-9A-F]{16}9000")
EMULATED = ["Emulated 00", "Emulated 01", "Emulated 02", "Emulated 03"]


def listing(proxy):
    with proxy.client() as c:
        [(_, names)] = c.request(">*|\n>1:READERS|\n\n")
    return [base64.b64decode(n).decode() for n in names.split("|") if n]


def wait_for_readers(proxy, expected, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        names = listing(proxy)
        if names == expected:
            return names
        if time.monotonic() > deadline:
            raise AssertionError(f"readers {names} never became {expected}\n{proxy.log()}")
        time.sleep(0.05)


def tcp_url(upstream, **params):
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"tcp://{HOST}:{upstream.port}" + (f"?{query}" if query else "")


def chain(proxy_factory, a_args=(), b_params=None, b_args=(), env=None):
    """Start A (emulated cards) and B (tcp backend to A, prefix "B ")."""
    a = proxy_factory(*a_args, env=env)
    params = {"prefix": "B%20"}
    params.update(b_params or {})
    b = proxy_factory("--backend", tcp_url(a, **params), *b_args, env=env)
    return a, b


def test_chain_answers(proxy_factory):
    a, b = chain(proxy_factory)
    wait_for_readers(b, ["B " + n for n in EMULATED])
    with b.client() as c:
        assert c.request(">B Emulated 00|\n>1:APDU:00A4000C023F00|\n\n") == [("1", "9000")]
        [(cid, r1)] = c.request(">B Emulated 00|\n>2:APDU:0084000008|\n\n")
        [(_, r2)] = c.request(">B Emulated 00|\n>3:APDU:0084000008|\n\n")
        assert cid == "2" and CHALLENGE.fullmatch(r1) and CHALLENGE.fullmatch(r2) and r1 != r2
        assert c.request(">B Emulated 01|\n>4:RESET|\n\n") == [("4", ATR)]
        # Several commands in one request, and the older APDU|HEX spelling.
        assert c.request(">B Emulated 02|\n>a:RESET|\n>b:APDU|00A4040C0AF0434C4F5544464F5859|\n"
                         ">c:APDU:00A4020C025001|\n>d:APDU:00D6000004CAFEBABE|\n"
                         ">e:APDU:00B0000004|\n\n") == [
            ("a", ATR), ("b", "9000"), ("c", "9000"), ("d", "9000"), ("e", "CAFEBABE9000")]
        # The write went to A's card: A itself reads it back.
        with a.client() as direct:
            assert direct.request(">Emulated 02|\n>1:APDU:00B0000004|\n\n") == [("1", "CAFEBABE9000")]
        # Errors found locally and upstream.
        assert c.request(">B Emulated 00|\n>5:APDU:00ZZ|\n\n") == [("5", "C084")]
        assert c.request(">no such reader|\n>6:APDU:00A4000C023F00|\n\n") == [("6", "C083")]
        assert c.request(">B Emulated|\n>7:APDU:00A4000C023F00|\n\n") == [("7", "C082")]


def test_three_proxy_chain(proxy_factory):
    a, b = chain(proxy_factory)
    c3 = proxy_factory("--backend", tcp_url(b, prefix="C%20"))
    wait_for_readers(c3, ["C B " + n for n in EMULATED])
    with c3.client() as c:
        assert c.request(">C B Emulated 03|\n>1:RESET|\n>2:APDU:00A4000C023F00|\n"
                         ">3:APDU:0084000008|\n\n")[:2] == [("1", ATR), ("2", "9000")]
        for i in range(50):
            [(cid, result)] = c.request(f">C B Emulated 01|\n>{i}:APDU:0084000008|\n\n")
            assert cid == str(i) and CHALLENGE.fullmatch(result)


def test_upstream_restarted_with_other_readers(proxy_factory):
    """B re-reads the reader list on reconnecting (periodic refresh off)."""
    port = free_port()
    a = proxy_factory(port=f"tcp:{port}:interface={HOST}")
    b = proxy_factory("--backend", f"tcp://{HOST}:{port}?prefix=B%20&refresh=0")
    wait_for_readers(b, ["B " + n for n in EMULATED])
    a.stop()
    proxy_factory("--backend", "emulated:?cards=2&prefix=New", port=f"tcp:{port}:interface={HOST}")
    wait_for_readers(b, ["B New 00", "B New 01"])
    with b.client() as c:
        assert c.request(">B New 01|\n>1:RESET|\n\n") == [("1", ATR)]
        assert c.request(">B Emulated 00|\n>2:RESET|\n\n") == [("2", "C083")]


def test_wrong_password_gives_c085(proxy_factory, tmp_path):
    a = proxy_factory(env={"FOXYPROXY_CLIENT_PASSWORD": "right one"})
    wrong = tmp_path / "wrong"
    wrong.write_text("wrong one\n")
    right = tmp_path / "right"
    right.write_text("right one\n")
    bad = proxy_factory("--backend", tcp_url(a, prefix="B%20", password_file=str(wrong)),
                        env={"FOXYPROXY_PASSWORD": "right one"})  # the URL's file wins
    by_env = proxy_factory("--backend", tcp_url(a, prefix="B%20"),
                           env={"FOXYPROXY_PASSWORD": "right one"})
    by_file = proxy_factory("--password-file", str(right), "--backend", tcp_url(a, prefix="B%20"))
    none = proxy_factory("--backend", tcp_url(a, prefix="B%20"))
    for proxy, expected in [(bad, "C085"), (by_env, "9000"), (by_file, "9000"), (none, "C085")]:
        wait_for_readers(proxy, ["B " + n for n in EMULATED])
        with proxy.client() as c:
            assert c.request(">B Emulated 00|\n>1:APDU:00A4000C023F00|\n\n") == [("1", expected)]
    for proxy in (bad, by_env, by_file):
        assert "right one" not in proxy.log() and "wrong one" not in proxy.log()


def test_slow_upstream_card_does_not_block_another(proxy_factory):
    # --no-signing: no certificate probe keeps the slow card busy first.
    a = proxy_factory("--no-signing", "--backend", "emulated:?latency_ms=2000&prefix=Slow&cards=1",
                      "--backend", "emulated:?cards=2")
    b = proxy_factory("--no-signing", "--backend", tcp_url(a, prefix="B%20"))
    wait_for_readers(b, ["B Slow 00", "B Emulated 00", "B Emulated 01"])
    slow = {}

    def slow_client():
        t0 = time.monotonic()
        with b.client() as c:
            slow["result"] = c.request(">B Slow 00|\n>s:APDU:00A4000C023F00|\n\n")
        slow["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=slow_client)
    thread.start()
    time.sleep(0.2)  # the slow APDU is in flight upstream
    t0 = time.monotonic()
    with b.client() as c:
        for i in range(20):
            [(_, result)] = c.request(f">B Emulated {i % 2:02d}|\n>{i}:APDU:0084000008|\n\n")
            assert CHALLENGE.fullmatch(result)
    fast = time.monotonic() - t0
    assert "result" not in slow  # still waiting on the slow card
    thread.join(10)
    assert slow["result"] == [("s", "9000")]
    assert slow["seconds"] >= 1.9
    assert fast < 1.0, f"20 fast APDUs took {fast:.2f}s behind a slow card"


def test_upstream_killed_under_load_then_restarted(proxy_factory):
    port = free_port()
    a = proxy_factory(port=f"tcp:{port}:interface={HOST}")
    b = proxy_factory("--command-timeout", "10",
                      "--backend", f"tcp://{HOST}:{port}?prefix=B%20")
    wait_for_readers(b, ["B " + n for n in EMULATED])

    threads_n, per_request = 6, 3
    answers = {}  # command id -> [results]
    sent = []  # command ids, as sent
    slowest = [0.0]
    killed = threading.Event()
    after_kill_ok = []
    stop = threading.Event()
    lock = threading.Lock()
    errors_seen = []

    def worker(n):
        try:
            with LineClient(HOST, b.port, timeout=15) as c:
                i = 0
                deadline = time.monotonic() + 20
                while not stop.is_set() and time.monotonic() < deadline:
                    ids = [f"t{n}-{i}-{j}" for j in range(per_request)]
                    i += 1
                    text = f">B Emulated {n % 4:02d}|\n" + "".join(
                        f">{cid}:APDU:0084000008|\n" for cid in ids) + "\n"
                    was_killed = killed.is_set()
                    t0 = time.monotonic()
                    with lock:
                        sent.extend(ids)
                    lines = c.request(text)
                    took = time.monotonic() - t0
                    with lock:
                        slowest[0] = max(slowest[0], took)
                        for cid, result in lines:
                            answers.setdefault(cid, []).append(result)
                        if was_killed:
                            after_kill_ok.extend(r for _, r in lines if r != "C086")
        except Exception as e:  # pragma: no cover - reported below
            errors_seen.append(repr(e))

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads_n)]
    for w in workers:
        w.start()
    time.sleep(1.0)
    a.kill()  # SIGKILL: no goodbye on the upstream connections
    killed.set()
    time.sleep(1.5)
    stop.set()
    for w in workers:
        w.join(20)
    assert not any(w.is_alive() for w in workers)
    assert not errors_seen, errors_seen

    # Every command answered exactly once; each answer a challenge or C086.
    assert sorted(answers) == sorted(sent)
    assert all(len(v) == 1 for v in answers.values()), [k for k, v in answers.items() if len(v) != 1]
    results = [v[0] for v in answers.values()]
    print(f"{len(results)} commands: {results.count('C086')} C086, slowest request {slowest[0]:.3f}s")
    assert all(CHALLENGE.fullmatch(r) or r == "C086" for r in results), set(results)
    assert sum(1 for r in results if CHALLENGE.fullmatch(r)) > 50
    assert results.count("C086") > 0
    assert after_kill_ok == []  # nothing answered from a dead upstream
    assert slowest[0] < 3.0, f"a request took {slowest[0]:.2f}s: failures must be fast, not timeouts"
    assert "C086" in b.log() or "lost a connection" in b.log()

    # Down: fail fast.
    with b.client() as c:
        t0 = time.monotonic()
        assert c.request(">B Emulated 00|\n>x:APDU:00A4000C023F00|\n\n") == [("x", "C086")]
        assert time.monotonic() - t0 < 1.0

    # A comes back on the same port: B recovers by itself.
    proxy_factory(port=f"tcp:{port}:interface={HOST}")
    t0 = time.monotonic()
    while True:
        with b.client() as c:
            if c.request(">B Emulated 00|\n>y:APDU:00A4000C023F00|\n\n") == [("y", "9000")]:
                break
        assert time.monotonic() - t0 < 10, "B did not reconnect to the restarted upstream"
        time.sleep(0.1)
    recovered = time.monotonic() - t0
    assert recovered < 6.0
    with b.client() as c:
        # A's readers were listed absent while it was down and present again now: its cards
        # lost their state in the restart, and a client that used one is told so once
        assert c.request(">B Emulated 01|\n>z:APDU:0084000008|\n\n") == [("z", "C080")]
        for i in range(20):
            [(_, result)] = c.request(f">B Emulated 01|\n>{i}:APDU:0084000008|\n\n")
            assert CHALLENGE.fullmatch(result)


def test_upstream_down_at_start_fails_fast_then_appears(proxy_factory):
    port = free_port()
    b = proxy_factory("--backend", f"tcp://{HOST}:{port}?prefix=B%20")
    with b.client() as c:
        assert c.request(">B Emulated 00|\n>1:APDU:00A4000C023F00|\n\n") == [("1", "C083")]
    proxy_factory(port=f"tcp:{port}:interface={HOST}")
    wait_for_readers(b, ["B " + n for n in EMULATED])
    with b.client() as c:
        assert c.request(">B Emulated 00|\n>1:APDU:00A4000C023F00|\n\n") == [("1", "9000")]


def test_upstream_hangs_gives_timeout_not_hang(proxy_factory):
    """An upstream that accepts and never answers: C086 after the command
    timeout; the listing stays empty (no READERS answer)."""
    server = socket.socket()
    server.bind((HOST, 0))
    server.listen(16)
    accepted = []

    def accept():
        server.settimeout(10)
        try:
            while len(accepted) < 16:
                conn, _ = server.accept()
                accepted.append(conn)
        except OSError:
            pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        b = proxy_factory("--command-timeout", "1",
                          "--backend", f"tcp://{HOST}:{server.getsockname()[1]}?prefix=B%20")
        with b.client() as c:
            assert c.request(">*|\n>1:READERS|\n\n") == [("1", "")]
        deadline = time.monotonic() + 5
        while not accepted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert accepted, "B never connected"
        data = accepted[0].recv(1000)
        assert data.endswith(b":READERS|\n\n"), data
    finally:
        server.close()
        for conn in accepted:
            conn.close()


# -- TLS ---------------------------------------------------------------------

def make_pki(tmp_path, name):
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test CA {name}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = {}
    for what, data in [
        ("ca", ca.public_bytes(pem)),
        ("cert", cert.public_bytes(pem)),
        ("key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())),
    ]:
        path = tmp_path / f"{name}-{what}.pem"
        path.write_bytes(data)
        paths[what] = str(path)
    return paths


def test_tls_chain_verified(proxy_factory, tmp_path):
    pki = make_pki(tmp_path, "good")
    other = make_pki(tmp_path, "other")
    a = proxy_factory("--listen", f"ssl:0:interface={HOST}:privateKey={pki['key']}:certKey={pki['cert']}")
    deadline = time.monotonic() + 10
    while not re.search(r"\(TLS\) starting on (\d+)", a.log()) and time.monotonic() < deadline:
        time.sleep(0.05)
    tls_port = re.findall(r"\(TLS\) starting on (\d+)", a.log())
    assert len(tls_port) == 1, a.log()
    good = proxy_factory("--backend", f"tls://{HOST}:{tls_port[0]}?ca={pki['ca']}&prefix=T%20")
    bad = proxy_factory("--backend", f"tls://{HOST}:{tls_port[0]}?ca={other['ca']}&prefix=T%20")
    wait_for_readers(good, ["T " + n for n in EMULATED])
    with good.client() as c:
        assert c.request(">T Emulated 00|\n>1:RESET|\n>2:APDU:00A4000C023F00|\n\n") == [
            ("1", ATR), ("2", "9000")]
    # The wrong CA: the server is never trusted, no reader is listed.
    deadline = time.monotonic() + 10
    while "unreachable" not in bad.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "unreachable" in bad.log(), bad.log()
    assert listing(bad) == []


# -- foxyproxy 2.10 as the upstream --------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def foxyproxy_upstream(tmp_path):
    """foxyproxy 2.10 in front of the fake CloudFoxy REST server of bench/."""
    foxyproxy = foxyproxy_venv()
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        from fake_cloudfoxy import FakeCloudFoxy
    finally:
        sys.path.pop(0)
    fake = FakeCloudFoxy(cards=4, token="fake-token")
    rest_port = fake.start_in_thread()
    port = free_port()
    out = open(tmp_path / "foxyproxy.out", "wb")
    proc = subprocess.Popen(
        [foxyproxy, "-p", str(port), "-s", f"http://{HOST}:{rest_port}", "-t", "fake-token"],
        stdout=out, stderr=subprocess.STDOUT, cwd=str(tmp_path), start_new_session=True,
        env=dict(os.environ, HOME=str(tmp_path), PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + 60
        while "TCP API of FoxyProxy is up" not in (tmp_path / "foxyproxy.out").read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, "foxyproxy did not start"
            time.sleep(0.1)
        yield port
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # it and its worker processes
        except ProcessLookupError:
            pass
        proc.wait(10)
        out.close()
        fake.stop()


def test_foxyproxy_210_upstream(proxy_factory, foxyproxy_upstream):
    """foxyproxy 2.10 answers one request per connection and closes it; the
    backend learns that and never loses or repeats a command over it."""
    b = proxy_factory("--backend", f"tcp://{HOST}:{foxyproxy_upstream}?prefix=F%20")
    deadline = time.monotonic() + 20
    while len(listing(b)) < 2:
        assert time.monotonic() < deadline, b.log()
        time.sleep(0.1)
    names = listing(b)
    assert all(n.startswith("F Foxy NET ") for n in names), names  # foxyproxy lists at most 2
    with b.client() as c:
        assert c.request(f">{names[0]}|\n>1:RESET|\n>2:APDU:00A4000C023F00|\n\n") == [
            ("1", ATR), ("2", "9000")]
        for i in range(30):
            [(cid, result)] = c.request(f">{names[i % 2]}|\n>{i}:APDU:0084000008|\n\n")
            assert cid == str(i) and CHALLENGE.fullmatch(result), result
    results = []

    def worker(name):
        with b.client() as c:
            for i in range(20):
                results.extend(c.results(f">{name}|\n>{i}:APDU:00A4000C023F00|\n\n"))

    threads = [threading.Thread(target=worker, args=(n,)) for n in names[:2] * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == ["9000"] * 80
    log = b.log()
    assert "a new connection for every request" in log
    assert "lost a connection" not in log, log

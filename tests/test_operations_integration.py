"""Operations on real ``twistd foxyproxy`` processes: Prometheus metrics,
/healthz and /readyz, systemd socket activation and readiness, --config,
--log-format json, SIGHUP and the drain on SIGTERM."""

import base64
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import HOST, TWISTD, LineClient, free_port

SELECT_MF = "00A4000C023F00"


def http(port, path, headers=None, timeout=5.0):
    """(status, body bytes) of a GET on the metrics listener."""
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def scrape(port, headers=None):
    """{(sample name, frozenset(labels)): value} parsed by prometheus_client's own parser."""
    status, body = http(port, "/metrics", headers)
    assert status == 200, body
    samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


def metrics_proxy(proxy_factory, *args, **kw):
    p = proxy_factory("--metrics", f"tcp:0:interface={HOST}", *args, listeners=2, **kw)
    p.metrics_port = p.ports["StatusSite"][0]
    return p


def test_counters_move_by_exactly_the_apdus_sent(proxy_factory):
    p = metrics_proxy(proxy_factory)
    before = scrape(p.metrics_port)
    reader = "Emulated 01"
    with p.client() as c:
        for _ in range(23):  # K=1
            assert c.results(f">{reader}|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]
        for _ in range(5):  # K=3
            assert c.results(f">{reader}|\n>1:APDU:{SELECT_MF}\n>2:APDU:{SELECT_MF}\n"
                             f">3:APDU:{SELECT_MF}|\n\n") == ["9000"] * 3
        assert c.results(f">{reader}|\n>1:APDU:00A4|\n\n") == ["C084"]  # malformed APDU
        assert c.results(">No such reader|\n>1:APDU:00A4000C023F00|\n\n") == ["C083"]
    after = scrape(p.metrics_port)
    ok = dict(reader=reader, kind="APDU", result="OK")
    assert value(after, "foxyproxy_reader_commands_total", **ok) - value(
        before, "foxyproxy_reader_commands_total", **ok) == 23 + 15
    # neither the malformed APDU nor the unknown reader reached a card
    assert value(after, "foxyproxy_reader_commands_total", reader="(none)", kind="APDU",
                 result="C084") == 1
    assert value(after, "foxyproxy_reader_commands_total", reader=reader, kind="APDU",
                 result="C084") == 0
    assert value(after, "foxyproxy_reader_commands_total", reader="(none)", kind="APDU",
                 result="C083") == 1
    assert value(after, "foxyproxy_reader_command_seconds_count", reader=reader) == 38
    assert value(after, "foxyproxy_reader_command_seconds_bucket", reader=reader, le="+Inf") == 38
    assert value(after, "foxyproxy_reader_command_seconds_sum", reader=reader) > 0
    # other readers saw nothing
    assert value(after, "foxyproxy_reader_commands_total", reader="Emulated 00", kind="APDU",
                 result="OK") == 0
    assert value(after, "foxyproxy_frontend_requests_total", frontend="line") == 23 + 5 + 2
    assert value(after, "foxyproxy_frontend_received_bytes_total", frontend="line") > 0
    assert value(after, "foxyproxy_frontend_connections", frontend="line") == 0
    assert value(after, "foxyproxy_reader_present", reader=reader) == 1
    assert value(after, "foxyproxy_backend_readers", backend="emulated: 4 iso7816 cards") == 4
    assert value(after, "foxyproxy_ready") == 1
    assert value(after, "process_resident_memory_bytes") > 1e6
    with LineClient(HOST, p.port) as c:  # one connection open while scraping
        c.results(">Emulated 00|\n>1:APDU:00A4000C023F00|\n\n")
        assert value(scrape(p.metrics_port), "foxyproxy_frontend_connections", frontend="line") == 1


def test_rest_front_end_is_counted(proxy_factory, tmp_path):
    token = tmp_path / "rest-token"
    token.write_text("rest-s3cret\n")
    p = proxy_factory("--rest", f"tcp:0:interface={HOST}", "--rest-token-file", str(token),
                      "--metrics", f"tcp:0:interface={HOST}", listeners=3)
    rest, metrics_port = p.ports["Site"][0], p.ports["StatusSite"][0]
    url = f"/api/v1/basic?terminal=/Emulated%2000&apdu={SELECT_MF}"
    assert http(rest, url, {"X-Auth-Token": "rest-s3cret"}) == (200, b"9000\n")
    assert http(rest, url, {"X-Auth-Token": "rest-s3cret"}) == (200, b"9000\n")
    assert http(rest, url, {"X-Auth-Token": "wrong"})[0] == 401
    samples = scrape(metrics_port)
    assert value(samples, "foxyproxy_frontend_requests_total", frontend="rest") == 3
    assert value(samples, "foxyproxy_frontend_auth_failures_total", frontend="rest") == 1
    assert value(samples, "foxyproxy_frontend_sent_bytes_total", frontend="rest") > 0
    assert value(samples, "foxyproxy_frontend_connections", frontend="rest") == 0
    assert value(samples, "foxyproxy_reader_commands_total", reader="Emulated 00", kind="APDU",
                 result="OK") == 2


def test_readyz_flips_when_a_slow_upstream_comes_up(proxy_factory):
    upstream_port = free_port()
    p = metrics_proxy(proxy_factory, "--backend", f"tcp://{HOST}:{upstream_port}?prefix=B%20")
    assert http(p.metrics_port, "/healthz") == (200, b"ok\n")
    status, body = http(p.metrics_port, "/readyz")
    assert status == 503
    answer = json.loads(body)
    assert answer["ready"] is False
    assert any(f"tcp://{HOST}:{upstream_port}" in r for r in answer["reasons"]), answer
    proxy_factory(port=f"tcp:{upstream_port}:interface={HOST}")  # the upstream starts later
    deadline = time.monotonic() + 20
    while http(p.metrics_port, "/readyz")[0] != 200:
        assert time.monotonic() < deadline, p.log()
        time.sleep(0.1)
    assert json.loads(http(p.metrics_port, "/readyz")[1]) == {"ready": True, "reasons": []}
    with p.client() as c:
        assert c.results(f">B Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]


def test_readyz_waits_for_the_first_rest_inventory(proxy_factory, tmp_path):
    from test_rest_integration import TOKEN, StubServer

    stub = StubServer()
    try:
        stub.control(down=3)  # the CloudFoxy server refuses connections for 3 s
        token = tmp_path / "token"
        token.write_text(TOKEN + "\n")
        p = metrics_proxy(proxy_factory, "--backend",
                          f"cloudfoxy+http://{HOST}:{stub.port}?token_file={token}&poll=0.3")
        status, body = http(p.metrics_port, "/readyz")
        assert status == 503 and "has not reported its readers" in json.loads(body)["reasons"][0]
        deadline = time.monotonic() + 20
        while http(p.metrics_port, "/readyz")[0] != 200:
            assert time.monotonic() < deadline, p.log()
            time.sleep(0.1)
        with p.client() as c:
            assert c.results(f">CloudFoxy 127.0.0.1@1|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]
    finally:
        stub.stop()


def test_backend_reconnects_are_counted(proxy_factory):
    upstream_port = free_port()
    a = proxy_factory(port=f"tcp:{upstream_port}:interface={HOST}")
    b = metrics_proxy(proxy_factory, "--backend", f"tcp://{HOST}:{upstream_port}?prefix=B%20")

    def answers():
        try:
            with b.client() as c:
                return c.results(f">B Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]
        except OSError:
            return False

    def wait(condition):
        deadline = time.monotonic() + 20
        while not condition():
            assert time.monotonic() < deadline, b.log()
            time.sleep(0.1)

    wait(answers)
    [backend] = [dict(labels)["backend"] for name, labels in scrape(b.metrics_port)
                 if name == "foxyproxy_backend_readers"]
    assert backend.startswith(f"tcp://{HOST}:{upstream_port}")
    for _ in range(3):  # a persistent upstream: several answers on the connection
        assert answers()
    time.sleep(0.6)  # and it stayed open a while (the tcp backend's probe, docs/tcp.md)
    assert value(scrape(b.metrics_port), "foxyproxy_backend_reconnects_total", backend=backend) == 0
    a.stop()
    proxy_factory(port=f"tcp:{upstream_port}:interface={HOST}")  # the upstream restarts
    wait(answers)
    samples = scrape(b.metrics_port)
    assert value(samples, "foxyproxy_backend_reconnects_total", backend=backend) == 1, b.log()[-3000:]
    assert value(samples, "foxyproxy_backend_readers", backend=backend) == 4


def test_metrics_token(proxy_factory, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-metrics\n")
    p = metrics_proxy(proxy_factory, "--metrics-token-file", str(token))
    for path in ("/metrics", "/", "/status.json"):
        assert http(p.metrics_port, path)[0] == 401
        assert http(p.metrics_port, path, {"Authorization": "Bearer wrong"})[0] == 401
    assert http(p.metrics_port, "/healthz")[0] == 200
    assert http(p.metrics_port, "/readyz")[0] == 200
    samples = scrape(p.metrics_port, {"Authorization": "Bearer s3cret-metrics"})
    assert value(samples, "foxyproxy_ready") == 1
    basic = base64.b64encode(b"me:s3cret-metrics").decode()
    status, body = http(p.metrics_port, "/status.json", {"Authorization": f"Basic {basic}"})
    assert status == 200 and len(json.loads(body)["readers"]) == 4


@pytest.mark.parametrize("fdname", [[], ["--fdname=line"]])
def test_systemd_socket_activation_and_readiness(tmp_path, fdname):
    if shutil.which("systemd-socket-activate") is None:
        import pcsc_rig

        pcsc_rig.ensure_packages(["systemd"])  # tests/debian-packages.txt
    activate = shutil.which("systemd-socket-activate")
    notify_path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(20)
    port = free_port()
    log = tmp_path / "twistd.log"
    # without --fdname there is no LISTEN_FDNAMES (systemd itself always sets it)
    cmd = [activate, "-l", f"{HOST}:{port}", *fdname, "-E", f"NOTIFY_SOCKET={notify_path}",
           TWISTD, "-n", "--pidfile=", "--logfile", str(log), "foxyproxy",
           "-p", "systemd:domain=INET:index=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 10
        while True:  # systemd-socket-activate listens, then execs twistd on the first connection
            try:
                client = LineClient(HOST, port, timeout=20)
                break
            except OSError:
                assert time.monotonic() < deadline, proc.stdout.read1()
                time.sleep(0.05)
        with client:
            assert client.results(f">Emulated 02|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]
        states = notify.recv(4096).decode()
        assert "READY=1" in states.split("\n")
        with LineClient(HOST, port) as c:  # a second client, same adopted socket
            assert c.results(f">Emulated 03|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert "STOPPING=1" in notify.recv(4096).decode().split("\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        notify.close()


CONFIG = """\
# a rack deployment, in short
port = "tcp:{port}:interface=127.0.0.1"
listen = ["tcp:{port2}:interface=127.0.0.1"]
backend = ["emulated:?cards=2&prefix=Rack", "emulated:?cards=1&type=piv&prefix=Signer"]
no-signing = false

[limits]
max-queue = 7
command-timeout = 3.5
max-commands-per-request = 50

[observability]
metrics = "tcp:{mport}:interface=127.0.0.1"
log-format = "json"
log-level = "debug"
"""


def _config_file(tmp_path, **ports):
    path = tmp_path / "foxyproxy.toml"
    path.write_text(CONFIG.format(**ports))
    return path


def test_config_file_serves_like_the_command_line(tmp_path):
    from cloudfoxy_proxy.tap import Options

    ports = dict(port=free_port(), port2=free_port(), mport=free_port())
    path = _config_file(tmp_path, **ports)
    proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", "--logfile", str(tmp_path / "log"),
                             "foxyproxy", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if http(ports["mport"], "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "log").read_text()
            time.sleep(0.1)
        for p in (ports["port"], ports["port2"]):
            with LineClient(HOST, p) as c:
                assert c.results(f">Rack 01|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]
                names = c.results(">*|\n>1:READERS|\n\n")[0].split("|")
                assert [base64.b64decode(n).decode() for n in names] == ["Rack 00", "Rack 01", "Signer 00"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        lines = (tmp_path / "log").read_text().splitlines()
        assert lines and all(isinstance(json.loads(line), dict) for line in lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    # the options are those of the same command line
    o = Options()
    o.parseOptions(["--config", str(path)])
    assert o["max-queue"] == 7 and o["command-timeout"] == 3.5 and o["log-format"] == "json"


@pytest.mark.parametrize("text,expected", [
    ('port = "1234"\nmax-queu = 5\n', "foxyproxy.toml:2: max-queu: unknown option"),
    ('port = "1234"\n\n[limits]\nmax-queue = 0\n',
     "foxyproxy.toml:4: --max-queue '0': must be between 1 and 1000000"),
    ('backend = "emulated:"\n', "foxyproxy.toml:1: backend: expected a list of strings"),
    ('backend = ["nosuch://x"]\n', "foxyproxy.toml:1: --backend 'nosuch://x': unknown backend"),
    ('no-signing = "yes"\n', "foxyproxy.toml:1: no-signing: expected true or false"),
    ('port = [\n', "foxyproxy.toml: not valid TOML"),
])
def test_bad_config_stops_with_one_line(tmp_path, text, expected):
    path = tmp_path / "foxyproxy.toml"
    path.write_text(text)
    done = subprocess.run([TWISTD, "-n", "--pidfile=", "foxyproxy", "--config", str(path)],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert done.returncode != 0
    out = (done.stdout + done.stderr).strip().splitlines()
    assert len(out) == 1, out
    assert expected in out[0]
    assert "Traceback" not in out[0]


def test_json_log_on_stdout_and_sighup_reopens_the_log_file(tmp_path):
    port = free_port()
    # stdout (twistd -n without --logfile): every line is a JSON object
    proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", "foxyproxy", "-p", f"tcp:{port}:interface={HOST}",
                             "--log-format", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=tmp_path)
    try:
        _wait_port(port, proc)
        with LineClient(HOST, port) as c:
            c.results(">Emulated 00|\n>1:PERSONALIZE:json-test|\n\n")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0
    events = [json.loads(line) for line in out.decode().splitlines()]
    assert len(events) > 5 and all(isinstance(e, dict) for e in events)
    assert err == b""
    for e in events:  # the shape journald/Vector/Loki read: time, level, message, logger, fields
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"]), e
        assert abs(datetime.datetime.fromisoformat(e["time"].replace("Z", "+00:00")).timestamp()
                   - time.time()) < 120
        assert e["level"] in ("debug", "info", "warn", "error", "critical"), e
        assert isinstance(e["message"], str) and e["message"] and "{" not in e["message"], e
        assert isinstance(e["logger"], str) and e["logger"], e
        assert not [k for k in e if k.startswith("log_") and k != "log_namespace"], e
    assert "__class_uuid__" not in out.decode()
    personalized = [e for e in events if e.get("tag") == "json-test"]
    assert len(personalized) == 1, events
    assert personalized[0]["logger"].startswith("cloudfoxy_proxy.")
    assert "json-test" in personalized[0]["message"]
    assert any(e["logger"].startswith("twisted.") for e in events)  # Twisted's own lines in the shape too

    # --log-level applies to Twisted's own lines: at warn a calm run writes nothing
    proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", "foxyproxy", "-p", f"tcp:{port}:interface={HOST}",
                             "--log-format", "json", "--log-level", "warn", "--backend", "emulated:",
                             "--backend", "tcp://127.0.0.1:1"],  # a down upstream: warn lines
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        _wait_port(port, proc)
        with LineClient(HOST, port) as c:
            c.results(">Emulated 00|\n>1:PERSONALIZE:json-test|\n\n")
        first = b""
        for _ in range(20):  # up to the down upstream's warning (the suite's timeout bounds each read)
            first += proc.stdout.readline()
            if b'"level": "warn"' in first:
                break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    events = [json.loads(line) for line in (first + out).decode().splitlines()]
    # only the listener's "starting on" line (where it listens) is kept below warn
    assert [e["message"] for e in events if e["level"] in ("debug", "info")] == [f"LineFactory starting on {port}"]
    assert any(e["level"] == "warn" and "tcp://127.0.0.1:1" in e["message"] for e in events), events
    assert not any("Starting factory" in e["message"] or "starting up" in e["message"] for e in events)

    log = tmp_path / "foxyproxy.log"
    proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", "--logfile", str(log), "foxyproxy",
                             "-p", f"tcp:{port}:interface={HOST}", "--log-format", "json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        _wait_port(port, proc)
        os.rename(log, tmp_path / "foxyproxy.log.1")  # what logrotate does
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not log.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with LineClient(HOST, port) as c:
            c.results(">Emulated 00|\n>1:PERSONALIZE:after-hup|\n\n")
        deadline = time.monotonic() + 10
        while "after-hup" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert all(isinstance(json.loads(line), dict) for line in log.read_text().splitlines())
        assert "after-hup" not in (tmp_path / "foxyproxy.log.1").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def _wait_port(port, proc, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)


def _load_clients(port, n, text):
    """``n`` connections, connection i sends ``text(i)`` once; returns (threads, answers)."""
    answers = [None] * n
    ready = threading.Barrier(n + 1)

    def one(i):
        with LineClient(HOST, port, timeout=20) as c:
            ready.wait(10)
            try:
                answers[i] = c.results(text(i))
            except (OSError, ConnectionError) as e:
                answers[i] = e

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    ready.wait(10)
    return threads, answers


def _sigterm(p, threads):
    """SIGTERM, wait for the client threads and for a clean exit (status 0);
    the time the signal was sent."""
    t0 = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    assert p.proc.wait(20) == 0
    return t0


def test_sigterm_under_load_answers_every_request_in_flight(proxy_factory):
    # 8 cards, 300 ms each: 40 requests of 2 APDUs queue behind each other
    p = proxy_factory("--backend", "emulated:?cards=8&latency_ms=300")
    threads, answers = _load_clients(
        p.port, 16, lambda i: f">Emulated 0{i % 8}|\n>1:APDU:{SELECT_MF}\n>2:APDU:{SELECT_MF}|\n\n")
    time.sleep(0.2)  # every request is in flight (8 on cards, 8 queued)
    t0 = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    with pytest.raises(OSError):  # the listener is closed while requests still finish
        LineClient(HOST, p.port, timeout=2)
    assert p.proc.poll() is None
    for t in threads:
        t.join(20)
    assert p.proc.wait(20) == 0
    assert answers == [["9000", "9000"]] * 16, answers
    assert time.monotonic() - t0 < 5


def test_sigterm_answers_c086_after_the_drain_timeout(proxy_factory):
    p = proxy_factory("--backend", "emulated:?cards=2&latency_ms=3000", "--drain-timeout", "0.5")
    threads, answers = _load_clients(
        p.port, 4, lambda i: f">Emulated 0{i % 2}|\n>1:APDU:{SELECT_MF}\n>2:APDU:{SELECT_MF}|\n\n")
    time.sleep(0.3)
    t0 = _sigterm(p, threads)
    assert time.monotonic() - t0 < 2.5
    assert answers == [["C086", "C086"]] * 4, answers


def test_sigterm_under_continuous_load_cuts_no_answer(proxy_factory):
    """Closed-loop clients keep sending through the stop: every request sent
    before SIGTERM is answered in full; a request sent after it may be left
    unread (the connection then ends, cleanly or reset, never mid-answer)."""
    p = proxy_factory("--backend", "emulated:?cards=4&latency_ms=20")
    results = []

    def client(i):
        sock = socket.create_connection((HOST, p.port), timeout=20)
        sends, answered = [], 0
        buf, outcome = b"", None
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline:
                sock.sendall(f">Emulated 0{i % 4}|\n>1:APDU:{SELECT_MF}\n>2:APDU:{SELECT_MF}|\n\n".encode())
                sends.append(time.monotonic())
                while b"@@\n" not in buf:
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise EOFError
                    buf += chunk
                answer, _, buf = buf.partition(b"@@\n")
                assert answer == b">1:9000\n>2:9000\n", answer
                answered += 1
        except EOFError:
            outcome = "closed" if buf == b"" else f"partial {buf!r}"
        except ConnectionResetError:
            outcome = "reset" if buf == b"" else f"partial {buf!r}"
        finally:
            sock.close()
        results.append((sends, answered, outcome))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(12)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    stopped_at = _sigterm(p, threads)
    assert len(results) == 12
    for sends, answered, outcome in results:
        assert outcome in ("closed", "reset"), results
        before = sum(1 for t in sends if t < stopped_at - 0.05)  # surely read by the proxy
        assert before >= 3 and answered >= before, (before, answered, outcome)
        assert answered >= len(sends) - 1

"""Unit tests (in memory) of metrics.py, status.py, ops.py and config_file.py."""

import base64
import json
import os
import socket

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import MultiService
from twisted.internet.task import Clock
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python import usage

from support import memory_core, site_treq

from cloudfoxy_proxy import config_file, errors, metrics, ops, tap
from cloudfoxy_proxy import run as run_module
from cloudfoxy_proxy.access import Access
from cloudfoxy_proxy.frontends import status
from cloudfoxy_proxy.backends.emulated import from_url as emulated
from cloudfoxy_proxy.dispatch import Dispatcher, Session
from cloudfoxy_proxy.parser import Request, make_command
from cloudfoxy_proxy.registry import ReaderRegistry

SELECT_MF = "00A4000C023F00"


class FakeTime:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def setup(url="emulated:?cards=4", max_readers=metrics.MAX_READERS, clock=None, access=None):
    clock = clock or Clock()
    registry = ReaderRegistry()
    backend = emulated(url, {})(clock)
    backend.start(registry)
    d = Dispatcher(registry, clock, command_timeout=5, access=access)
    m = Metrics = metrics.Metrics(registry, [backend], max_readers=max_readers)
    d.metrics = Metrics
    return clock, registry, backend, d, m


def run(d, reader, *commands):
    request = Request(reader, None, [make_command(c.split(":")) for c in commands])
    return d.execute(request, Session())


def samples(m, ready=None):
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(metrics.Collector(m, ready))
    out = {}
    for family in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def get(s, name, **labels):
    return s.get((name, frozenset(labels.items())))


def test_counts_by_reader_kind_and_result():
    _, _, _, d, m = setup()
    assert run(d, "Emulated 01", f"1:APDU:{SELECT_MF}", f"2:APDU:{SELECT_MF}") == [("1", "9000"), ("2", "9000")]
    assert run(d, "Emulated 01", "1:RESET") != []
    assert run(d, "Emulated 01", "1:LIST") != []
    assert run(d, "nope", f"1:APDU:{SELECT_MF}") == [("1", errors.NOT_FOUND)]
    s = samples(m)
    assert get(s, "foxyproxy_reader_commands_total", reader="Emulated 01", kind="APDU", result="OK") == 2
    assert get(s, "foxyproxy_reader_commands_total", reader="Emulated 01", kind="RESET", result="OK") == 1
    assert get(s, "foxyproxy_reader_commands_total", reader="(none)", kind="LIST", result="OK") == 1
    assert get(s, "foxyproxy_reader_commands_total", reader="(none)", kind="APDU", result="C083") == 1
    assert get(s, "foxyproxy_reader_command_seconds_count", reader="Emulated 01") == 3
    assert get(s, "foxyproxy_reader_commands_total", reader="Emulated 00", kind="APDU", result="OK") is None
    assert get(s, "foxyproxy_reader_present", reader="Emulated 03") == 1
    assert get(s, "foxyproxy_backend_readers", backend="emulated: 4 iso7816 cards") == 4


def test_latency_lands_in_its_bucket_queue_wait_included(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(metrics, "perf_counter", fake)
    monkeypatch.setattr(run_module, "perf_counter", fake)
    clock, _, _, d, m = setup("emulated:?cards=1&latency_ms=3")
    first = run(d, "Emulated 00", f"1:APDU:{SELECT_MF}")
    second = run(d, "Emulated 00", f"1:APDU:{SELECT_MF}")  # queued behind the first
    fake.now += 0.003
    clock.advance(0.003)
    fake.now += 0.003
    clock.advance(0.003)
    assert first.result == [("1", "9000")] and second.result == [("1", "9000")]
    stats = m.by_name["Emulated 00"]
    # 3 ms -> le=0.005 bucket; the queued one waited 3 ms more: 6 ms -> le=0.01
    assert stats.buckets[metrics.BUCKETS.index(0.005)] == 1
    assert stats.buckets[metrics.BUCKETS.index(0.01)] == 1
    assert stats.seconds == pytest.approx(0.009)
    s = samples(m)
    assert get(s, "foxyproxy_reader_command_seconds_bucket", reader="Emulated 00", le="0.0025") == 0
    assert get(s, "foxyproxy_reader_command_seconds_bucket", reader="Emulated 00", le="0.005") == 1
    assert get(s, "foxyproxy_reader_command_seconds_bucket", reader="Emulated 00", le="+Inf") == 2


def test_reader_labels_are_capped():
    _, _, _, d, m = setup("emulated:?cards=4", max_readers=2)
    for i in range(4):
        run(d, f"Emulated 0{i}", f"1:APDU:{SELECT_MF}")
    assert sorted(m.by_name) == ["(other)", "Emulated 00", "Emulated 01"]
    s = samples(m)
    assert get(s, "foxyproxy_reader_commands_total", reader="(other)", kind="APDU", result="OK") == 2
    assert len([k for k in s if k[0] == "foxyproxy_reader_present"]) == 2


def test_upstream_errors_per_backend_and_readiness_gauge():
    clock, _, backend, d, m = setup("emulated:?cards=1&latency_ms=10000")
    pending = run(d, "Emulated 00", f"1:APDU:{SELECT_MF}")
    clock.advance(5)  # the command timeout
    assert pending.result == [("1", errors.UPSTREAM)]
    s = samples(m, ready=lambda: ["backend x has not reported its readers"])
    assert get(s, "foxyproxy_backend_upstream_errors_total", backend=backend.description) == 1
    assert get(s, "foxyproxy_ready") == 0


def test_quantile():
    buckets = [0] * (len(metrics.BUCKETS) + 1)
    assert metrics.quantile(buckets, 0.5) is None
    buckets[metrics.BUCKETS.index(0.001)] = 100  # all between 0.5 and 1 ms
    assert metrics.quantile(buckets, 0.5) == pytest.approx(0.00075)
    assert metrics.quantile(buckets, 0.99) == pytest.approx(0.000995)


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def render(site, path, headers=None, clock=None):
    """``(status, body)`` of a GET of ``path`` through ``site``'s real channel
    (a StatusSite on the HTTP base) from 127.0.0.1; ``clock`` is advanced
    past a throttled refusal (access.Throttle: guesses after the third are
    answered later)."""
    http = site_treq(site)
    d = http.get("http://127.0.0.1:9100" + path, headers=headers)
    http.flush()
    if clock is not None:
        clock.advance(5)
        http.flush()
    response = result_of(d)
    body = result_of(response.content())
    return response.code, body, response.headers


def raw_get(site, path, host="10.0.0.9", extra=b""):
    """``(status, headers, body)`` of a GET of ``path`` sent by hand from
    ``host`` (the HTTP base judges the peer address)."""
    peer = IPv4Address("TCP", host, 5555)
    channel = site.buildProtocol(peer)
    t = StringTransport(peerAddress=peer)
    channel.makeConnection(t)
    channel.dataReceived(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 10.0.0.1:9100\r\n" + extra + b"\r\n")
    head, _, body = t.value().partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), headers, body


def refused(body, code=errors.BAD_PIN):
    """A metrics refusal is JSON: ``{"error": {"code": ..., "message": ...}}``."""
    error = json.loads(body)["error"]
    return error["code"] == code and isinstance(error["message"], str) and error["message"]


def status_root(token=None):
    """(StatusResource, StatusSite, clock, dispatcher, metrics); ``token``:
    the --metrics-token-file secret (simple mode's secret of front end
    ``metrics``, as tap.Options._access builds it), None: protected mode."""
    access = Access(simple=[(token, "metrics")] if token else [])
    clock, registry, backend, d, m = setup(access=access)
    top = MultiService()
    top.startService()
    readiness = ops.Readiness(top, registry, [backend], clock)
    resource = status.StatusResource(m, readiness, clock)
    site = status.StatusSite(resource, memory_core(d, clock))
    return resource, site, clock, d, m


def test_status_resources_and_token():
    _, site, clock, d, m = status_root("tok")
    assert render(site, "/healthz")[:2] == (200, b"ok\n")
    assert render(site, "/readyz")[0] == 200
    for path in ("/metrics", "/", "/status.json"):
        for headers in (None, {"Authorization": "Bearer bad"}, {"Authorization": "Basic !!!"}):
            code, body, response_headers = render(site, path, headers, clock)
            assert code == 401, (path, headers)
            assert refused(body), body  # JSON, C085
            assert response_headers.getRawHeaders(b"www-authenticate") == [
                b'Basic realm="cloudfoxy-proxy metrics"']
    code, body, _ = render(site, "/metrics", {"Authorization": "Bearer tok"})
    assert code == 200 and b"foxyproxy_ready 1.0" in body and b"process_cpu_seconds_total" in body
    basic = base64.b64encode(b"anyone:tok").decode()
    code, body, _ = render(site, "/status.json", {"Authorization": f"Basic {basic}"})
    assert code == 200 and [r["name"] for r in json.loads(body)["readers"]] == [
        "Emulated 00", "Emulated 01", "Emulated 02", "Emulated 03"]
    code, page, _ = render(site, "/", {"Authorization": "Bearer tok"})
    assert b"<svg id=\"chart\"" in page and b"http" not in page.split(b"<body>")[1]  # nothing remote


def test_wrong_metrics_token_is_401_from_anywhere():
    _, site, clock, d, m = status_root("tok")
    status_code, headers, body = raw_get(site, "/metrics", extra=b"Authorization: Bearer bad\r\n")
    assert status_code == 401 and headers[b"content-type"] == b"application/json" and refused(body)
    status_code, _, body = raw_get(site, "/metrics", extra=b"Authorization: Bearer tok\r\n")
    assert status_code == 200 and b"foxyproxy_ready" in body


def test_protected_mode_serves_loopback_clients_only():
    """No --metrics-token-file and no credentials: /metrics, / and
    /status.json answer 403 (JSON, C085) to clients outside loopback;
    /healthz and /readyz stay open; loopback clients are served."""
    _, site, clock, d, m = status_root()
    for path in ("/metrics", "/", "/status.json"):
        status_code, headers, body = raw_get(site, path)
        assert status_code == 403, path
        assert headers[b"content-type"] == b"application/json" and refused(body), body
    assert raw_get(site, "/healthz")[::2] == (200, b"ok\n")
    assert raw_get(site, "/readyz")[0] == 200
    code, body, _ = render(site, "/metrics")  # from 127.0.0.1
    assert code == 200 and b"foxyproxy_ready 1.0" in body


def test_sampler_rates_and_percentiles():
    resource, site, clock, d, m = status_root()
    sampler = resource.sampler
    sampler.start()
    for second in range(3):
        for _ in range(10):
            run(d, "Emulated 02", f"1:APDU:{SELECT_MF}")
        clock.advance(1)
    answer = status.status(m, sampler, None, clock)
    assert answer["rates"] == [10.0, 10.0, 10.0]
    reader = [r for r in answer["readers"] if r["name"] == "Emulated 02"][0]
    assert reader["rate"] == 10.0 and reader["commands"] == 30 and reader["p50_ms"] > 0
    assert [r["rate"] for r in answer["readers"] if r["name"] != "Emulated 02"] == [0.0] * 3
    sampler.stop()


def test_readyz_until_every_backend_reported():
    clock = Clock()
    registry = ReaderRegistry()
    backend = emulated("emulated:?cards=1", {})(clock)
    top = MultiService()
    top.startService()
    readiness = ops.Readiness(top, registry, [backend], clock)
    fired = []
    readiness.on_ready(lambda: fired.append(1))
    readiness.start()
    resource = status.StatusResource(metrics.Metrics(registry, [backend]), readiness, clock)
    site = status.StatusSite(resource, memory_core(Dispatcher(registry, clock), clock))
    code, body, _ = render(site, "/readyz")
    assert code == 503
    assert json.loads(body) == {"ready": False, "reasons": [
        "backend emulated: 1 iso7816 cards has not reported its readers"]}
    backend.start(registry)
    assert fired == [1] and render(site, "/readyz")[0] == 200
    clock.advance(1)
    assert fired == [1]


def test_sd_notify(tmp_path):
    path = str(tmp_path / "n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        assert ops.sd_notify("READY=1", {"NOTIFY_SOCKET": path})
        assert s.recv(100) == b"READY=1"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0foxyproxy-test-%d" % os.getpid())
        assert ops.sd_notify("STOPPING=1", {"NOTIFY_SOCKET": "@foxyproxy-test-%d" % os.getpid()})
        assert s.recv(100) == b"STOPPING=1"
    assert not ops.sd_notify("READY=1", {})
    assert not ops.sd_notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "none")})


def drain_setup(latency_ms, drain):
    clock = Clock()
    registry = ReaderRegistry()
    backend = emulated(f"emulated:?cards=1&latency_ms={latency_ms}", {})(clock)
    backend.start(registry)
    top = ops.ProxyService(clock, drain_timeout=drain)
    top.dispatcher = Dispatcher(registry, clock, command_timeout=60)
    top.startService()
    # two requests in flight (one on the card, one queued), then stop
    first = run(top.dispatcher, "Emulated 00", f"1:APDU:{SELECT_MF}", f"2:APDU:{SELECT_MF}")
    queued = run(top.dispatcher, "Emulated 00", f"1:APDU:{SELECT_MF}")
    stopped = []
    top.stopService().addBoth(stopped.append)
    return clock, top, first, queued, stopped


def test_drain_lets_requests_finish():
    clock, top, first, queued, stopped = drain_setup(latency_ms=500, drain=5)
    clock.pump([0.1] * 20)
    assert first.result == [("1", "9000"), ("2", "9000")]
    assert queued.result == [("1", "9000")]
    assert len(stopped) == 1 and not top.dispatcher.pending


def test_drain_timeout_answers_c086():
    clock, top, first, queued, stopped = drain_setup(latency_ms=10000, drain=1)
    clock.pump([0.1] * 9)
    assert not first.called and not stopped
    clock.pump([0.1] * 3)
    assert first.result == [("1", errors.UPSTREAM), ("2", errors.UPSTREAM)]
    assert queued.result == [("1", errors.UPSTREAM)]
    clock.pump([0.1] * 2)
    assert len(stopped) == 1
    clock.advance(20)  # the command still on the card finishes quietly and frees it
    assert top.dispatcher.registry.readers[0].queue.busy is False


def test_json_log_observer(tmp_path):
    from twisted.logger import Logger

    path = tmp_path / "x.log"
    observer, lf = ops.log_observer("json", {"logfile": str(path), "nodaemon": True})
    Logger(observer=observer).info("hello {who}", who="json")
    lf.flush()
    [event] = [json.loads(line) for line in path.read_text().splitlines()]
    assert (event["who"], event["message"], event["level"]) == ("json", "hello json", "info")
    assert ops.log_observer("json", {"logger": "x.y"}) == (None, None)


# -- --config


def parse(argv):
    o = tap.Options()
    o.parseOptions(argv)
    return o


def test_line_of_finds_bare_and_quoted_keys():
    text = 'port = "1"\n\n[limits]\n  "max-queue" = 3\nmax-queuex = 1\n'
    assert config_file.line_of(text, "port") == 1
    assert config_file.line_of(text, "max-queue") == 4
    assert config_file.line_of(text, "missing") == 1


def test_config_and_command_line_give_the_same_tree(tmp_path):
    from twisted.internet.testing import MemoryReactorClock

    (tmp_path / "c.toml").write_text(
        'port = "tcp:4101:interface=127.0.0.1"\nlisten = ["tcp:4102:interface=127.0.0.1"]\n'
        'backend = ["emulated:?cards=2", "emulated:?cards=1&type=piv&prefix=S"]\n'
        'vpcd = ["127.0.0.1:35990=Emulated 00"]\nno-signing = true\n'
        '[limits]\nmax-queue = 9\ncommand-timeout = 2.5\n'
        '[ops]\nmetrics = "tcp:4103:interface=127.0.0.1"\ndrain-timeout = 1\nlog-format = "json"\n')
    argv = ["-p", "tcp:4101:interface=127.0.0.1", "--listen", "tcp:4102:interface=127.0.0.1",
            "--backend", "emulated:?cards=2", "--backend", "emulated:?cards=1&type=piv&prefix=S",
            "--vpcd", "127.0.0.1:35990=Emulated 00", "--no-signing", "--max-queue", "9",
            "--command-timeout", "2.5", "--metrics", "tcp:4103:interface=127.0.0.1",
            "--drain-timeout", "1", "--log-format", "json"]
    a, b = parse(["--config", str(tmp_path / "c.toml")]), parse(argv)

    def tree(options):
        top = tap.makeService(options, MemoryReactorClock())
        core = top.core
        return [(type(s).__name__, getattr(s, "description", None),
                 getattr(getattr(s, "backend", None), "description", None),
                 type(getattr(getattr(s, "factory", None), "wrappedFactory", None)).__name__) for s in top], (
            core.registry.max_queue, core.dispatcher.command_timeout, top.drain_timeout,
            core.dispatcher.signing)

    assert tree(a) == tree(b)
    assert ("Listener", "tcp:4103:interface=127.0.0.1:backlog=1024", None, "StatusSite") in tree(a)[0]
    assert {k: v for k, v in a.items() if k not in ("config", "backend-makers")} == {
        k: v for k, v in b.items() if k not in ("config", "backend-makers")}


def test_command_line_overrides_config(tmp_path):
    (tmp_path / "c.toml").write_text('max-queue = 9\nbackend = ["emulated:?cards=2"]\nport = "4101"\n')
    o = parse(["--config", str(tmp_path / "c.toml"), "--max-queue", "3", "--backend", "emulated:?cards=1"])
    assert o["max-queue"] == 3 and o["backend"] == ["emulated:?cards=1"]
    assert o["endpoints"][0].startswith("tcp:4101")


@pytest.mark.parametrize("text,message", [
    ('port = "1"\n\nmax-queu = 5\n', "c.toml:3: max-queu: unknown option"),
    ('config = "x"\n', "c.toml:1: config: unknown option"),
    ('[l]\nmax-queue = 1\n[m]\nmax-queue = 2\n', "c.toml:2: max-queue: given twice"),
    ('[l]\n[l.m]\nport = "1"\n', "tables nest one level only"),
    ('\n\nmax-queue = 0\n', "c.toml:3: --max-queue '0': must be between 1 and 1000000"),
    ('listen = ["tcp:x"]\n', "c.toml:1: --listen 'tcp:x': not a valid endpoint"),
    ('vpcd = ["nonsense"]\n', "c.toml:1: --vpcd 'nonsense': expected HOST:PORT=READER"),
    ('port = true\n', "c.toml:1: port: expected a string or a number"),
    ('max-queue = [1]\n', "c.toml:1: max-queue: expected a string or a number"),
])
def test_bad_config(tmp_path, text, message):
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(usage.UsageError) as e:
        parse(["--config", str(tmp_path / "c.toml")])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_systemd_endpoint_without_a_socket_says_so():
    with pytest.raises(usage.UsageError) as e:
        tap.check_endpoint("port", "systemd:domain=INET:index=0")
    assert "no such socket from systemd" in str(e.value)


def test_inherited_sockets_get_default_names():
    env = {"LISTEN_FDS": "2", "LISTEN_PID": str(os.getpid())}
    ops.name_inherited_sockets(env)
    assert env["LISTEN_FDNAMES"] == "unknown:unknown"
    env = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid()), "LISTEN_FDNAMES": "line"}
    ops.name_inherited_sockets(env)
    assert env["LISTEN_FDNAMES"] == "line"
    env = {"LISTEN_FDS": "1", "LISTEN_PID": "1"}  # meant for another process
    ops.name_inherited_sockets(env)
    assert "LISTEN_FDNAMES" not in env


def test_the_deployment_guide_config_is_valid(tmp_path):
    """docs/deployment.md's rack example: every key is an option with a
    value of the right type (its secret files exist only on a real host)."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "deployment.md"), encoding="utf-8") as f:
        text = re.search(r"```toml\n(.*?)```", f.read(), re.S).group(1)
    (tmp_path / "rack.toml").write_text(text)
    o = tap.Options()
    applied = config_file.apply(o, str(tmp_path / "rack.toml"), set())
    assert {"port", "listen", "rest", "backend", "vpcd", "metrics", "token-file", "drain-timeout"} <= set(applied)
    assert len(o["vpcd"]) == 2 and o["backend"][0].startswith("cloudfoxy+https://")
    assert o["log-format"] == "json"


def test_contrib_systemd_units_verify(tmp_path):
    """contrib/systemd/ passes systemd-analyze verify (ExecStart pointed at
    an existing program, since /opt/cloudfoxy-proxy is not installed here)."""
    import shutil
    import subprocess

    import pcsc_rig

    if shutil.which("systemd-analyze") is None:
        pcsc_rig.ensure_packages(["systemd"])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("foxyproxy.service", "foxyproxy.socket"):
        with open(os.path.join(root, "contrib", "systemd", name), encoding="utf-8") as f:
            text = f.read()
        (tmp_path / name).write_text(text.replace("/opt/cloudfoxy-proxy/.venv/bin/twistd", "/bin/true"))
    service = (tmp_path / "foxyproxy.service").read_text()
    for setting in ("DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes", "LoadCredential=",
                    "Type=notify", "systemd:domain=INET:name=line"):
        assert setting in service
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "foxyproxy.socket"),
                           str(tmp_path / "foxyproxy.service")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr


@pytest.mark.parametrize("argv,message", [
    (["--log-format", "xml"], "--log-format 'xml': use text or json"),
    (["--drain-timeout", "-1"], "--drain-timeout '-1': must be between 0 and 3600"),
    (["--drain-timeout", "soon"], "--drain-timeout 'soon': not a number"),
    (["--metrics", "tcp:x"], "--metrics 'tcp:x': not a valid endpoint"),
    (["--metrics", "tcp:0", "--metrics-token-file", "/nonexistent/token"],
     "--metrics-token-file '/nonexistent/token': No such file or directory"),
    (["--config", "/nonexistent/c.toml"], "--config '/nonexistent/c.toml': No such file or directory"),
])
def test_new_options_are_validated(argv, message):
    with pytest.raises(usage.UsageError) as e:
        parse(argv)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_sighup_reopens_registered_files():
    top = ops.ProxyService(Clock())
    calls = []
    top.reopeners.append(lambda: calls.append("audit"))
    top.reopeners.append(lambda: 1 / 0)  # a failing one is logged, not fatal
    top.reopen_logs()
    assert calls == ["audit"]

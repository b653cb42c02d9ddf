"""Keeps the benchmark tools from rotting: bench/loadgen.py against a real
proxy (every answer checked, a wrong answer noticed) and
bench/fake_cloudfoxy.py answering the CloudFoxy REST calls.  No timing
asserts."""

import http.client
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import loadgen  # noqa: E402
from bench.fake_cloudfoxy import FakeCloudFoxy  # noqa: E402


def test_loadgen_checks_every_answer(proxy):
    r = loadgen.run("127.0.0.1", proxy.port, clients=2, k=2, duration=1.0, warmup=0.2,
                    pid=proxy.proc.pid)
    assert r["errors"] == 0, r["error_samples"]
    assert r["sent"] > 0
    assert r["checked"] == r["answered"] == r["ok"] == r["sent"]
    assert r["requests"] > 0 and r["latency_ms"]["p50"] is not None
    assert r["readers"] == 4
    assert r["proxy_cpu_s"] is not None and r["proxy_peak_rss_bytes"] > 0


def test_loadgen_notices_a_wrong_answer(proxy):
    # SELECT MF answers 9000; expecting 6A82 must turn every answer into an error.
    r = loadgen.run("127.0.0.1", proxy.port, clients=1, duration=0.3, warmup=0.0, expect="6A82",
                    persistent=False)
    assert r["sent"] > 0
    assert r["errors"] == r["error_kinds"]["wrong_answer"] == r["checked"] == r["sent"]
    assert "9000" in r["error_samples"][0]


def test_open_connections(proxy):
    burst = loadgen.open_connections("127.0.0.1", proxy.port, 20, "Emulated 01")
    try:
        assert burst.result["ok"] == 20 and burst.result["errors"] == 0
    finally:
        burst.close()


def test_fake_cloudfoxy():
    fake = FakeCloudFoxy(cards=3, token="T")
    port = fake.start_in_thread()
    try:
        def get(path, token="T"):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", path, headers={"X-Auth-Token": token} if token else {})
            resp = c.getresponse()
            body = resp.read().decode()
            c.close()
            return resp.status, body

        status, body = get("/api/v1/inventory")
        assert status == 200
        assert [line.split()[0] for line in body.splitlines()] == [
            "/127.0.0.1@1", "/127.0.0.1@2", "/127.0.0.1@3"]
        atr = body.splitlines()[0].split()[1]
        assert get("/api/v1/basic?terminal=/127.0.0.1@2&reset=1") == (200, atr + "\n")
        assert get("/api/v1/basic?terminal=%2F127.0.0.1%402&reset=0&apdu=00A4000C023F00") == (200, "9000\n")
        assert get("/api/v1/hello")[1].splitlines()[1].split()[1].isdigit()
        assert get("/api/v1/hello", token="wrong")[0] == 401
        assert get("/api/v1/basic?terminal=/127.0.0.1@9&reset=1")[0] == 404
        fake.call(fake.remove, 3)
        assert "/127.0.0.1@3" not in get("/api/v1/inventory")[1]
        assert fake.stats()["max_inflight"] == 1
    finally:
        fake.stop()


def test_ram_hop_runs(capsys):
    from bench import ram_hop

    assert ram_hop.main(["--count", "5", "--warmup", "1", "--batch", "3", "--json"]) == 0
    import json

    r = json.loads(capsys.readouterr().out)
    assert r["ram"]["apdus"] == 5 and r["ram_batch"]["apdus"] == 3 and r["direct"]["apdus"] == 5


def test_api_load_checks_every_answer():
    """bench/api_load.py's one-load child: a real proxy, treq and Autobahn clients."""
    import json
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "api_load.py")
    for transport in ("http", "ws", "rest"):
        out = subprocess.run([sys.executable, script, "--one", transport, "2", "--duration", "0.5",
                              "--warmup", "0.2"], capture_output=True, text=True, timeout=60)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        assert r["errors"] == 0 and r["apdus"] > 0, out.stdout + out.stderr
        assert r["transport"] == transport and r["cpu_us_per_apdu"] > 0
    for transport in ("ws", "http"):  # the bare Autobahn / twisted.web floors, same checks of every answer
        out = subprocess.run([sys.executable, script, "--one", transport, "2", "--floor", "--duration", "0.5",
                              "--warmup", "0.2"], capture_output=True, text=True, timeout=60)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        assert r["errors"] == 0 and r["apdus"] > 0 and r["cpu_us_per_apdu"] > 0, out.stdout + out.stderr


def test_line_builds_runs(capsys):
    from bench import line_builds

    assert line_builds.main(["now=.", "--clients", "2", "--rounds", "1", "--duration", "0.5", "--floor",
                             "--k", "1,4"]) == 0
    out = capsys.readouterr().out
    for k in (1, 4):  # every answer was checked (exit 0); one row per K and floor, ours / floor / ratio
        assert f"| now, emulated, K={k}, 2 clients: proxy CPU µs/APDU vs bare Twisted responder | " in out
        assert f"| now, emulated, K={k}, 2 clients: proxy CPU µs/APDU vs plain-Python epoll responder | " in out
        assert f"| K={k} bare Twisted responder | " in out


def test_api_load_rounds_table_judges_the_median():
    from bench import api_load

    runs = [dict(transport="ws", clients=1, build="now", apdus_per_s=a, p50_ms=0.3, p99_ms=0.6,
                 cpu_us_per_apdu=c, errors=0) for a, c in ((100, 140.0), (90, 170.0), (95, 160.0))]
    row = api_load.combine(runs)
    assert (row["cpu_us_per_apdu"], row["cpu_min"], row["apdus_per_s"]) == (160.0, 140.0, 95)
    text = api_load.table([row])
    assert "| WebSocket | 1 | 95 | 0.30 | 0.60 | 160 (140; 140, 170, 160) | ≤ 150 OVER | 0 |" in text
    runs[1]["disturbed"] = True  # the 170: steal time over the limit
    row = api_load.combine(runs)
    assert (row["cpu_us_per_apdu"], row["cpu_min"], row["apdus_per_s"]) == (150.0, 140.0, 97.5)  # 2 undisturbed
    assert "| 150 (140; 140, 170*, 160) | ≤ 150 ok | 0 |" in api_load.table([row])
    assert "\\* a disturbed round" in api_load.table([row])
    floor = api_load.combine([dict(runs[0], build="floor")])
    text = api_load.table([row, floor])  # builds side by side; the floor is not judged
    assert "| now | WebSocket | 1 | 98 | 0.30 | 0.60 | 150 (140; 140, 170*, 160) | ≤ 150 ok | 0 |" in text
    ratios = api_load.ratio_table([row, dict(floor, cpu_us_per_apdu=100.0, cpu_rounds=[100.0, 120.0])])
    assert "| WebSocket, 1 clients | 150 [140, 170, 160] | bare Autobahn 100 [100, 120] | 1.50× |" in ratios
    assert "| floor | WebSocket | 1 | 100 | 0.30 | 0.60 | 140 (140; 140) | – (bare Autobahn, not the proxy) | 0 |" in text


def test_line_inprocess_runs():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "bench/line_inprocess.py", "now=src", "--rounds", "1",
                          "--requests", "200"], capture_output=True, text=True, timeout=120,
                         cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].startswith("| now | ")

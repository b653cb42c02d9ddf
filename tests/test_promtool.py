"""Prometheus' own linter on the proxy's /metrics: ``promtool check
metrics`` (Debian package ``prometheus``, tests/debian-packages.txt) reads a
real scrape taken after line-protocol, REST and API traffic (successes,
errors and failed authentications, so labelled series exist), once over
plain HTTP and once over HTTPS fetched by curl offering ALPN.

promtool exits 0 when the text parses and has no lint problem; it exits 1
on a parse error and 3 when it prints lint problems.  Each problem it
prints is in the assertion message."""

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest

from support import HOST, ProxyProcess, accepts, free_port, wait_for

REST_TOKEN = "rest-token-0123456789"
API_TOKEN = "api-token-0123456789"


@pytest.fixture(scope="module")
def promtool():
    path = shutil.which("promtool")
    if path is None:
        if os.geteuid() != 0:
            pytest.fail("promtool missing: apt-get install --no-install-recommends prometheus (as root)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]):
            subprocess.run(cmd, env=env, check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=1200)
        path = shutil.which("promtool")
    assert path, "the Debian package prometheus gave no promtool"
    return path


def check_metrics(promtool, text):
    """promtool's verdict on one scrape: (exit code, its output)."""
    done = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    return done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")


def assert_clean(promtool, text):
    code, out = check_metrics(promtool, text)
    print(f"promtool check metrics: exit {code}, output {out!r}")  # shown with pytest -s
    problems = [line for line in out.splitlines() if line.strip()]
    assert code == 0 and not any("error" in line.lower() for line in problems), \
        f"promtool check metrics exit {code}:\n{out}"
    assert not problems, f"promtool printed lint problems:\n{out}"


def traffic(proxy, rest_port=None, api_port=None):
    """Line-protocol requests (answers and error codes), a REST and an API call, a failed login each."""
    with proxy.client() as c:
        for i in range(20):
            assert c.results(f">Emulated 0{i % 4}|\n>1:APDU:00A4000C023F00|\n>2:APDU:0084000008|\n\n")[0] == "9000"
        assert c.results(">Emulated 00|\n>1:APDU:00B0000002|\n\n") == ["6986"]  # a card error status
        assert c.results(">Nobody 99|\n>1:APDU:00A4000C023F00|\n\n")[0].startswith("C08")  # no such reader
        assert c.results(">Emulated 00|\n>1:APDU:0|\n\n")[0].startswith("C08")  # not an APDU
    if rest_port:
        req = urllib.request.Request(f"http://{HOST}:{rest_port}/api/v1/inventory",
                                     headers={"X-Auth-Token": REST_TOKEN})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert "/Emulated_00 " in r.read().decode()
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(urllib.request.Request(req.full_url, headers={"X-Auth-Token": "no"}),
                                   timeout=10)
    if api_port:
        req = urllib.request.Request(f"http://{HOST}:{api_port}/api/v1/readers",
                                     headers={"Authorization": f"Bearer {API_TOKEN}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.load(r)["readers"][0]["name"] == "Emulated 00"
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(urllib.request.Request(req.full_url, headers={"Authorization": "Bearer no"}),
                                   timeout=10)


def start(*args, ports=()):
    proxy = ProxyProcess(*args, listeners=1).start()
    try:
        for port in ports:
            wait_for(lambda: accepts(port), timeout=20, what=f"port {port}")
    except BaseException:
        proxy.stop()
        raise
    return proxy


def test_promtool_accepts_metrics_after_traffic(promtool, tmp_path):
    (tmp_path / "rest").write_text(REST_TOKEN + "\n")
    (tmp_path / "api").write_text(API_TOKEN + "\n")
    metrics, rest, api = free_port(), free_port(), free_port()
    proxy = start("--no-signing", "--metrics", f"tcp:{metrics}:interface={HOST}",
                  "--rest", f"tcp:{rest}:interface={HOST}", "--rest-token-file", str(tmp_path / "rest"),
                  "--api", f"tcp:{api}:interface={HOST}", "--api-token-file", str(tmp_path / "api"),
                  ports=(metrics, rest, api))
    try:
        traffic(proxy, rest, api)
        with urllib.request.urlopen(f"http://{HOST}:{metrics}/metrics", timeout=10) as r:
            assert r.status == 200
            content_type = r.headers["Content-Type"]
            text = r.read().decode("utf-8")
    finally:
        proxy.stop()
    assert content_type.startswith("text/plain; version="), content_type  # a Prometheus text format
    # the scrape has what the traffic made, so promtool lints labelled series, not an empty registry
    assert re.search(r'^foxyproxy_reader_commands_total\{[^}]*reader="Emulated 00"[^}]*\} [1-9]', text, re.M), text
    assert re.search(r"^foxyproxy_reader_command_seconds_bucket\{", text, re.M), text
    assert re.search(r'^foxyproxy_frontend_requests_total\{frontend="line"\} [1-9]', text, re.M), text
    assert re.search(r'^foxyproxy_frontend_auth_failures_total\{[^}]*\} [1-9]', text, re.M), text
    assert_clean(promtool, text)


def test_promtool_accepts_metrics_scraped_over_https_with_alpn(promtool, tmp_path):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", "key.pem", "-out", "cert.pem", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], cwd=tmp_path, check=True, capture_output=True)
    metrics = free_port()
    proxy = start("--no-signing", "--metrics",
                  f"ssl:{metrics}:interface={HOST}:privateKey={tmp_path}/key.pem:certKey={tmp_path}/cert.pem",
                  ports=(metrics,))
    try:
        traffic(proxy)
        done = subprocess.run(["curl", "-sS", "-v", "--max-time", "20", "--cacert", str(tmp_path / "cert.pem"),
                               f"https://{HOST}:{metrics}/metrics"], capture_output=True, timeout=30)
    finally:
        proxy.stop()
    trace = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 0, trace
    assert "ALPN: offers h2,http/1.1" in trace, trace  # curl offered ALPN ...
    assert re.search(r"ALPN: server accepted http/1\.1|ALPN: server did not agree", trace), trace  # ... not h2
    assert "< HTTP/1.1 200" in trace, trace
    text = done.stdout.decode("utf-8")
    assert re.search(r'^foxyproxy_frontend_requests_total\{frontend="line"\} [1-9]', text, re.M), text
    assert_clean(promtool, text)

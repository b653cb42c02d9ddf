"""Access control on real processes (docs/security.md): identities over the
line protocol and REST, the audit log of a run, throttled guessing,
protected mode seen from a non-loopback address inside a network namespace
made by the test, and mutual TLS checked with ``openssl s_client``."""

import base64
import hashlib
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from support import HOST, LineClient, ProxyProcess

SELECT = ">1:APDU:00A4000C023F00|\n\n"
A, B = "a-secret-0123456789abcdef", "b-secret-0123456789abcdef"


def sha(text):
    return hashlib.sha256(text.encode()).hexdigest()


def b64(name):
    return base64.b64encode(name.encode()).decode()


def credentials(tmp_path, extra=""):
    """a: Emulated 00, every command; b: Emulated 01, APDU and READERS only."""
    path = tmp_path / "credentials.toml"
    clients = [("a", A, ["Emulated 00"], None), ("b", B, ["Emulated 01"], ["APDU", "READERS"])]
    path.write_text("".join(
        f'[[client]]\nname = "{name}"\nsecret_sha256 = "{sha(secret)}"\nreaders = {json.dumps(readers)}\n'
        + (f"commands = {json.dumps(commands)}\n" if commands else "") + "\n"
        for name, secret, readers, commands in clients) + extra)
    return str(path)


def rest_get(port, path, token):
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", path, headers={"X-Auth-Token": token} if token else {})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_identity_a_cannot_see_or_use_reader_b_and_the_audit_log_has_exactly_the_requests(
        proxy_factory, tmp_path):
    audit = tmp_path / "audit.jsonl"
    proxy = proxy_factory("--no-signing", "--credentials", credentials(tmp_path), "--audit-log", str(audit),
                          "--rest", f"tcp:0:interface={HOST}", listeners=2)
    rest = proxy.ports["Site"][0]
    with proxy.client() as c:
        # line protocol: a sees and uses only Emulated 00
        assert c.results(f">*:{A}|\n>1:READERS|\n\n") == [b64("Emulated 00")]
        assert c.results(f">Emulated 00:{A}|\n" + SELECT) == ["9000"]
        assert c.results(f">Emulated 01:{A}|\n" + SELECT) == ["C083"]
    with proxy.client() as c:
        assert c.results(f">Emulated 01:{B}|\n>1:APDU:00A4000C023F00|\n>2:RESET|\n\n") == ["9000", "C085"]
    # REST: the same identities, X-Auth-Token
    status, text = rest_get(rest, "/api/v1/inventory", A)
    assert status == 200 and [line.split()[0] for line in text.splitlines()] == ["/Emulated_00"]
    assert rest_get(rest, "/api/v1/basic?terminal=Emulated_01&apdu=00A4000C023F00", A)[0] == 404
    assert rest_get(rest, "/api/v1/basic?terminal=Emulated_00&apdu=00A4000C023F00", A) == (200, "9000\n")
    assert rest_get(rest, "/api/v1/basic?terminal=Emulated_00&apdu=00A4000C023F00", "not-the-token")[0] == 401
    time.sleep(0.3)
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    summary = [(r["event"], r.get("identity"), r["frontend"], r.get("reader"), r.get("results"))
               for r in records]
    assert summary == [
        ("request", "a", "line", "Emulated 00", {"OK": 1}),
        ("request", "a", "line", "Emulated 01", {"C083": 1}),
        ("request", "b", "line", "Emulated 01", {"OK": 1, "C085": 1}),
        ("request", "a", "rest", "Emulated 01", {"C083": 1}),
        ("request", "a", "rest", "Emulated 00", {"OK": 1}),
        ("auth_failure", None, "rest", None, None),
    ]
    text = audit.read_text()
    for secret in (A, B, "not-the-token", "00A4000C023F00"):
        assert secret not in text
    # logrotate: move the file, SIGHUP, and the next record goes to a new file
    os.rename(audit, str(audit) + ".1")
    proxy.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not audit.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    with proxy.client() as c:
        assert c.results(f">Emulated 00:{A}|\n" + SELECT) == ["9000"]
    time.sleep(0.3)
    assert [json.loads(line)["identity"] for line in audit.read_text().splitlines()] == ["a"]


def test_guessing_is_slow_logged_and_the_right_secret_works_for_others(proxy_factory, tmp_path):
    proxy = proxy_factory("--no-signing", "--credentials", credentials(tmp_path))
    answered = []
    stop = threading.Event()

    def guess():
        # an attacker on 127.0.0.1: new connections whenever one is closed
        while not stop.is_set():
            try:
                with LineClient(HOST, proxy.port, timeout=10) as c:
                    while not stop.is_set():
                        assert c.results(">Emulated 00:guess-%d|\n" % len(answered) + SELECT) == ["C085"]
                        answered.append(time.monotonic())
            except (ConnectionError, OSError):
                continue

    threads = [threading.Thread(target=guess) for _ in range(3)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        time.sleep(6.0)
        # another peer (127.0.0.2) with the right secret: served at once
        with LineClient(HOST, proxy.port, source="127.0.0.2") as c:
            t1 = time.monotonic()
            assert c.results(f">Emulated 00:{A}|\n" + SELECT) == ["9000"]
            assert time.monotonic() - t1 < 1.0
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    took = time.monotonic() - t0
    late = [t for t in answered if t - t0 > 2.0]  # after the first free failures
    rate = len(late) / (took - 2.0)
    assert 3 <= len(answered) and rate <= 5.0, (len(answered), rate)
    log = proxy.log()
    assert "authentication failed on line" in log and "127.0.0.1" in log
    assert "guess-" not in log


NAMESPACE_CLIENT = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from support import LineClient, ProxyProcess
out = {}
for name, extra in (("protected", []), ("anonymous", ["--allow-anonymous"])):
    with ProxyProcess("--no-signing", *extra, port="tcp:0:interface=0.0.0.0") as p:
        with LineClient("192.0.2.1", p.port, source="192.0.2.1") as c:
            out[name + " remote"] = c.results(">Emulated 00|\n>1:READERS|\n>2:APDU:00A4000C023F00|\n\n")
        with LineClient("192.0.2.1", p.port, source="192.0.2.1") as c:
            c.results(">Emulated 00|\n>1:APDU:00A4000C023F00|\n\n")
        with LineClient("127.0.0.1", p.port) as c:
            out[name + " loopback"] = c.results(">Emulated 00|\n>1:APDU:00A4000C023F00|\n\n")
        time.sleep(0.3)
        out[name + " log"] = p.log()
print(json.dumps(out))
"""


def test_protected_mode_seen_from_a_non_loopback_address_in_a_network_namespace(tmp_path):
    script = tmp_path / "ns_client.py"
    script.write_text(NAMESPACE_CLIENT)
    tests = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run(
        ["unshare", "-rn", "sh", "-c", "ip addr add 192.0.2.1/32 dev lo && ip link set lo up && "
         f"exec {sys.executable} {script} {tests}"],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.splitlines()[-1])
    assert out["protected remote"] == ["C085", "C085"]
    assert out["protected loopback"] == ["9000"]
    log = out["protected log"]
    assert "reachable from outside loopback with no authentication" in log  # start-up warning
    told = [line for line in log.splitlines() if "protected mode serves only loopback clients" in line]
    assert len(told) == 1 and "192.0.2.1" in told[0] and "--allow-anonymous" in told[0]
    assert out["anonymous remote"][1] == "9000" and out["anonymous remote"][0].count("|") >= 3
    assert "NO authentication" in out["anonymous log"]


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d):
    """CA, server and client certificates, and a client of another CA, made by openssl."""
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN={ca}", cwd=d)
    for name, ca in (("server", "ca"), ("client", "ca"), ("stranger", "other-ca")):
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        ext = ["-extfile", "ext.cnf"] if name == "server" else []
        if name == "server":
            with open(os.path.join(d, "ext.cnf"), "w") as f:
                f.write("subjectAltName=IP:127.0.0.1\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", *ext, cwd=d)
    # an RSA server key too: static-RSA suites need one to be offered at all
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "rsa.key", "-out", "rsa.csr",
            "-subj", "/CN=rsa", cwd=d)
    openssl("x509", "-req", "-in", "rsa.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "rsa.pem", "-days", "2", cwd=d)


def s_client(port, d, request, *args, answers=2, timeout=15.0):
    """Send ``request`` through ``openssl s_client`` and read until
    ``answers`` responses came, it exited, or ``timeout``; (exit code or
    None if it was still running, output)."""
    proc = subprocess.Popen(["openssl", "s_client", "-connect", f"{HOST}:{port}", "-quiet", "-ign_eof",
                             "-CAfile", "ca.pem", *args], cwd=d, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc.stdin.write(request.encode())
    proc.stdin.flush()
    out = b""
    deadline = time.monotonic() + timeout
    while out.count(b"@@") < answers and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
    code = proc.poll()
    if code is None:
        proc.kill()
    proc.wait(5)
    proc.stdin.close()
    proc.stdout.close()
    return code, out.decode(errors="replace")


def refused(out, alert):
    """No answer, and openssl reports the handshake failed with ``alert``."""
    return "@@" not in out and ":error:" in out and alert in out


def test_mutual_tls_with_openssl(proxy_factory, tmp_path):
    d = str(tmp_path)
    make_pki(d)
    der = subprocess.run(["openssl", "x509", "-in", "client.pem", "-outform", "DER"], cwd=d,
                         capture_output=True, check=True).stdout
    fingerprint = ":".join("%02X" % b for b in hashlib.sha256(der).digest())
    creds = credentials(tmp_path, f'\n[[client]]\nname = "tls-client"\ncert_sha256 = "{fingerprint}"\n'
                                  'readers = ["Emulated 01"]\n')
    proxy = proxy_factory(
        "--no-signing", "--credentials", creds,
        "--listen", f"mtls:0:privateKey={d}/server.key:certKey={d}/server.pem:caCerts={d}/ca.pem:interface={HOST}",
        "--listen", f"mtls:0:privateKey={d}/rsa.key:certKey={d}/rsa.pem:caCerts={d}/ca.pem:interface={HOST}",
        listeners=3)
    port, rsa_port = proxy.ports["LineFactory"][1:3]
    request = ">*|\n>1:READERS|\n>Emulated 01|\n>2:APDU:00A4000C023F00|\n\n"
    # right certificate: served as tls-client (sees Emulated 01 only, no secret needed)
    code, out = s_client(port, d, request, "-cert", "client.pem", "-key", "client.key")
    assert f">1:{b64('Emulated 01')}\n@@" in out and ">2:9000" in out, out
    # no certificate: refused
    code, out = s_client(port, d, request)
    assert refused(out, "certificate required"), out
    # a certificate of another CA: refused
    code, out = s_client(port, d, request, "-cert", "stranger.pem", "-key", "stranger.key")
    assert refused(out, "unknown ca"), out
    # static-RSA TLS 1.2 suite: refused even with the right certificate
    code, out = s_client(rsa_port, d, request, "-cert", "client.pem", "-key", "client.key",
                         "-tls1_2", "-cipher", "AES128-GCM-SHA256")
    assert refused(out, "handshake failure"), out
    # TLS 1.1: refused
    code, out = s_client(port, d, request, "-cert", "client.pem", "-key", "client.key", "-tls1_1")
    assert refused(out, "protocol version"), out
    # a forward-secret TLS 1.2 suite works
    code, out = s_client(rsa_port, d, request, "-cert", "client.pem", "-key", "client.key",
                         "-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256")
    assert ">2:9000" in out, out


def run_twistd(*args, cwd=None):
    from support import TWISTD

    return subprocess.run([TWISTD, "-n", "--pidfile=", "foxyproxy", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def test_bad_credentials_stop_start_up_in_one_line_naming_the_client(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[client]]\nname = "billing"\nsecret_sha256 = "1234"\n')
    r = run_twistd("--credentials", str(bad), cwd=str(tmp_path))
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        f"twistd foxyproxy: --credentials {str(bad)!r}, client 'billing': secret_sha256 must be 64 hex "
        "digits (make one with foxyproxy-credentials)"]
    r = run_twistd("--rest", "tcp:0", cwd=str(tmp_path), )
    assert r.returncode != 0 and "--credentials" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_twistd("--listen", "mtls:0:privateKey=/nonexistent/key.pem:certKey=x:caCerts=y", cwd=str(tmp_path))
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "/nonexistent/key.pem" in r.stderr and "Traceback" not in r.stderr + r.stdout


def test_rest_with_credentials_only_and_the_console_script(proxy_factory, tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "foxyproxy-credentials")
    path = tmp_path / "c.toml"
    with open(path, "w") as f:  # the documented `foxyproxy-credentials kiosk >> clients.toml`
        subprocess.run([script, "kiosk", "--secret-file", str(tmp_path / "kiosk.secret")], stdout=f,
                       check=True, timeout=30)
    secret = (tmp_path / "kiosk.secret").read_text().strip()
    assert secret not in path.read_text()
    proxy = proxy_factory("--no-signing", "--credentials", str(path), "--rest", f"tcp:0:interface={HOST}",
                          listeners=2)
    rest = proxy.ports["Site"][0]
    assert rest_get(rest, "/api/v1/basic?terminal=Emulated_02&apdu=00A4000C023F00", secret) == (200, "9000\n")
    assert rest_get(rest, "/api/v1/hello", None)[0] == 401
    with proxy.client() as c:
        assert c.results(f">Emulated 02:{secret}|\n" + SELECT) == ["9000"]

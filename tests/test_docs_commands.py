"""The proxy commands of README.md and docs/*.md, run as written.

Every command line of a fenced code block that starts the proxy
(``twistd -n ... foxyproxy``, also behind ``systemd-socket-activate``) is
either run here or named in ``SKIP`` with the reason a test cannot run it.
The runnable ones start together (each doc in a directory of its own, as a
user would beside the README's proxy on 4001), must listen on the ports
they give and answer one request there; the ``$ `` client commands of the
same doc that talk to those ports run and print what the doc shows.  An
error example (a command followed by its ``twistd foxyproxy: ...`` line)
must print that line.  Loopback only; every wait bounded.
"""

import glob
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest

from support import HOST, accepts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)

# (doc, start of the command) -> why a test cannot run it
SKIP = {
    ("README.md", "python3 -m venv .venv"): "installs into a fresh copy: tests/test_readme.py runs it",
    ("trace.md", "twistd -n --pidfile= foxyproxy --backend 'pcsc:?readers=Yubico'"):
        "a YubiKey on a PC/SC reader",
    ("trace.md", "twistd -n --pidfile= foxyproxy --backend 'emulated:?replay=session.jsonl"):
        "replays the YubiKey recording of the command above",
    ("trace.md", "twistd -n --pidfile= foxyproxy --backend 'emulated:?type=piv&cards=1' --vpcd"):
        "the vpcd rig and OpenSC: tests/test_trace_integration.py records and replays exactly this",
    ("trace.md", "twistd -n --pidfile= foxyproxy --backend 'emulated:?replay=piv.jsonl' --vpcd"):
        "replays the recording of the command above on the vpcd rig (tests/test_trace_integration.py)",
    ("deployment.md", "twistd -n --pidfile= foxyproxy -p tcp:4001:interface=127.0.0.1 --listen ssl:4002:privateKey=..."):
        "an outline of a production set-up with elided values (...) and a CloudFoxy box",
    ("pcsc.md", ".venv/bin/twistd -n --pidfile= foxyproxy --backend pcsc: -p tcp:4001"):
        "a machine's own PC/SC readers (tests/test_pcsc_install.py starts pcsc: from a fresh venv)",
    ("pcsc.md", ".venv/bin/twistd -n --pidfile= foxyproxy --backend pcsc: -p tcp:4001:interface"):
        "PC/SC readers and the operator's key.pem, cert.pem and /etc/foxyproxy/client-password",
    ("ramoverhttp.md", "twistd -n --pidfile= foxyproxy --ram tcp:8080 --ram-token-file /etc"):
        "the operator's /etc/foxyproxy/ram-tokens (tests/test_ram_integration.py runs --ram)",
    ("ramoverhttp.md", "twistd -n --pidfile= foxyproxy --ram-connect 'https://ram.example.org"):
        "a RAM server on the internet (ram.example.org)",
    ("ramoverhttp.md", "twistd -n --pidfile= foxyproxy --backend pcsc: --ram-approved"):
        "PC/SC readers and a RAM server on the internet",
    ("rest.md", "FOXYPROXY_TOKEN=... twistd -n --pidfile= foxyproxy --backend cloudfoxy+http"):
        "a real CloudFoxy box (192.168.42.1)",
    ("rest.md", "twistd -n --pidfile= foxyproxy --backend 'cloudfoxy+https://foxy.example.com"):
        "a real CloudFoxy box and its CA and client certificate files",
    ("rest.md", "twistd -n --pidfile= foxyproxy --rest-token-file /etc/foxy/rest-token"):
        "the operator's /etc/foxy/rest-token",
    ("security.md", "twistd -n --pidfile= foxyproxy --credentials /etc/foxyproxy/clients.toml"):
        "the operator's credentials file, CA and certificates in /etc/foxyproxy",
    ("signing.md", "twistd -n --pidfile= foxyproxy -p tcp:4001 --backend 'cloudfoxy+http://cloudfoxy.example"):
        "a real CloudFoxy box (cloudfoxy.example) and a CA directory",
    ("scale-out.md", "twistd -n --pidfile= foxyproxy --config "):
        "a tier on 127.0.0.x addresses of a network namespace: tests/test_tier_integration.py runs these",
    ("tcp.md", "twistd -n --pidfile= foxyproxy -p tcp:4001:interface=127.0.0.1 --listen ssl:4443"):
        "two machines (a.example.com) and their certificates",
    ("tcp.md", "twistd -n --pidfile= foxyproxy -p 4002 --backend 'tls://a.example.com"):
        "two machines (a.example.com) and their certificates",
}
# values the docs elide, as a user fills them in
PLACEHOLDERS = {"FOXYPROXY_REST_TOKEN=...": "FOXYPROXY_REST_TOKEN=rest-secret"}
START = re.compile(r"^(\w+=\S+\s+)*(\S*/)?(twistd\s+-n|systemd-socket-activate)\s|&& \S*twistd -n ")


def blocks():
    """(doc, [lines]) of every fenced code block, in order."""
    for path in [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        inside, block = False, []
        for line in open(path, encoding="utf-8"):
            if line.startswith("```"):
                if inside:
                    yield os.path.basename(path), block
                inside, block = not inside, []
            elif inside:
                block.append(line.rstrip("\n"))


def commands(lines):
    """[(command, was_prompted, output lines)] with ``\\`` continuations joined."""
    out = []
    i = 0
    while i < len(lines):
        line, prompted = lines[i], lines[i].startswith("$ ")
        text = line[2:] if prompted else line
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text[:-1].rstrip() + " " + lines[i].strip()
        out.append((text.strip(), prompted, []))
        i += 1
        if prompted:
            while i < len(lines) and not lines[i].startswith("$ "):
                out[-1][2].append(lines[i])
                i += 1
    return out


def documented():
    """{doc: (start commands, client commands, error examples)}: client
    commands are the ``$ `` lines that send to the line protocol with nc."""
    docs = {}
    for doc, lines in blocks():
        starts, clients, errors = docs.setdefault(doc, ([], [], []))
        for command, prompted, output in commands(lines):
            if START.search(command) and output[:1] and output[0].startswith("twistd foxyproxy: "):
                errors.append((command, output[0]))  # an error example and its one line
            elif START.search(command):
                starts.append((command, output))
            elif prompted and re.search(r"\| nc -\w+ 127\.0\.0\.1 \d+$", command):
                clients.append((command, output))
    return docs


def skip_reason(doc, command):
    for (d, head), why in SKIP.items():
        if d == doc and command.startswith(head):
            return why
    return None


def listening_ports(command):
    """The TCP ports a start command listens on (4001 when it gives no -p)."""
    ports = [int(p) for p in re.findall(r"(?:-p|--listen|--api|--rest|--metrics|--ram)\s+'?(?:tcp|ssl|mtls):(\d+)",
                                        command)]
    ports += [int(p) for p in re.findall(r"-p\s+(\d+)\b", command)]
    ports += [int(p) for p in re.findall(r"systemd-socket-activate -l [\d.]+:(\d+)", command)]
    if not re.search(r"\s-p\s", command):
        ports.append(4001)
    return ports


def line_endpoint(command):
    """(port, tls) of a start command's line-protocol listener (-p)."""
    endpoint = re.search(r"\s-p\s+'?(\S+?)'?(\s|$)", command)
    endpoint = endpoint.group(1) if endpoint else "4001"
    if endpoint.startswith("systemd:"):
        return int(re.search(r"systemd-socket-activate -l [\d.]+:(\d+)", command).group(1)), False
    return int(re.match(r"(?:(tcp|ssl|mtls):)?(\d+)", endpoint).group(2)), endpoint.startswith(("ssl:", "mtls:"))


def same(doc_line, got):
    """A doc's output line against the real one: ``...`` elides; a
    GET CHALLENGE answer's random bytes differ (same length, same SW)."""
    if doc_line == got:
        return True
    if "..." in doc_line or "…" in doc_line:
        pattern = ".*".join(re.escape(part) for part in re.split(r"\.\.\.|…", doc_line))
        return re.fullmatch(pattern, got) is not None
    m, g = re.fullmatch(r"(>\d+:)([0-9A-F]+)", doc_line), re.fullmatch(r"(>\d+:)([0-9A-F]+)", got)
    return bool(m and g and m.group(1) == g.group(1) and len(m.group(2)) == len(g.group(2))
                and m.group(2)[-4:] == g.group(2)[-4:] == "9000")


def line_request(port, tls=False, timeout=10.0):
    """One READERS request on the line protocol: the answer's text."""
    raw = socket.create_connection((HOST, port), timeout=timeout)
    sock = raw
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the doc's self-signed cert.pem
        sock = ctx.wrap_socket(raw)
    with sock:
        sock.sendall(b">*|\n>1:READERS|\n\n")
        data = b""
        deadline = time.monotonic() + timeout
        while not data.endswith(b"@@\n") and time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace")


def test_every_docs_proxy_command_runs_or_has_a_reason():
    docs = documented()
    found = [(doc, c) for doc, (starts, _, errors) in docs.items() for c, _ in starts + errors]
    assert len(found) >= 20
    assert all(skip_reason(doc, c) or "--pidfile=" in c for doc, c in found if doc != "README.md"), found
    # the skip list stays small and names only commands still in the docs
    used = {(d, h) for (d, h) in SKIP for doc, c in found if doc == d and c.startswith(h)}
    assert set(SKIP) - used == set()
    assert len(SKIP) <= 20
    # the runnable ones can run side by side, and beside the README's proxy
    ports = {}
    for doc, (starts, _, _) in docs.items():
        for c in [c for c, _ in starts if not skip_reason(doc, c)]:
            for port in listening_ports(c):
                assert port != 4001, (doc, c)
                assert port not in ports, (doc, c, ports.get(port))
                ports[port] = (doc, c)
    assert len(ports) >= 8


@pytest.mark.integration
def test_docs_proxy_commands_run(tmp_path):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-keyout", "key.pem", "-out", "cert.pem"], cwd=str(tmp_path), check=True, capture_output=True,
                   timeout=60)
    env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""))
    procs, checks, clients, errors = [], [], [], []
    try:
        for doc, (starts, doc_clients, doc_errors) in documented().items():
            cwd = tmp_path / doc
            cwd.mkdir()
            for name in ("key.pem", "cert.pem"):
                os.link(tmp_path / name, cwd / name)
            # the block's set-up lines (printf 'a-secret\n' > a.pw) run first, as the reader does
            for line in [line for d, lines in blocks() if d == doc for line in lines
                         if re.match(r"printf '[^']*' > \w+\.pw$", line)]:
                subprocess.run(["bash", "-c", line], cwd=str(cwd), check=True, timeout=10)
            errors += [(doc, c, want) for c, want in doc_errors]
            ran = []
            for command, output in starts:
                if skip_reason(doc, command):
                    continue
                for old, new in PLACEHOLDERS.items():
                    command = command.replace(old, new)
                command = command.replace(".venv/bin/", VENV_BIN + "/")
                log = open(cwd / f"proxy{len(procs)}.log", "wb")
                procs.append((subprocess.Popen(["bash", "-c", command], cwd=str(cwd), env=env, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True), doc, command, log))
                ran.append(command)
                checks.append((doc, command, listening_ports(command)))
            for command, output in doc_clients:
                port = int(command.rsplit(" ", 1)[1])
                if any(port in listening_ports(c) for c in ran):
                    clients.append((doc, command, output))
        assert len(procs) >= 6 and errors
        deadline = time.monotonic() + 90
        for doc, command, ports in checks:
            for port in ports:
                while not accepts(port) and time.monotonic() < deadline:
                    dead = [p for p, *_ in procs if p.poll() is not None]
                    assert not dead, [open(log.name, errors="replace").read() for p, _, _, log in procs if p in dead]
                    time.sleep(0.2)
                assert accepts(port), (doc, command, port)
            port, tls = line_endpoint(command)
            answer = line_request(port, tls=tls, timeout=30)  # socket activation starts twistd now
            assert answer.startswith(">1:") and answer.endswith("@@\n"), (doc, command, answer)
        for doc, command, output in clients:
            got = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=20)
            lines = got.stdout.splitlines()
            assert len(lines) == len(output) and all(same(w, g) for w, g in zip(output, lines)), \
                (doc, command, output, lines, got.stderr)
        assert len(clients) >= 4
        for doc, command, want in errors:
            got = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env,
                                 cwd=str(tmp_path / doc), timeout=30)
            assert got.returncode != 0 and want in got.stdout + got.stderr, (doc, command, want, got.stderr)
    finally:
        for proc, _, _, log in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _, _, log in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            log.close()

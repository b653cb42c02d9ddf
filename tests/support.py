"""Helpers for integration tests: a real ``twistd foxyproxy`` process on a
free loopback port, and a blocking line-protocol client."""

import contextlib
import os
import re
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HOST = "127.0.0.1"
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
_LISTENING = re.compile(r"(\w+)(?: \(TLS\))? starting on (\d+)")


class ProxyProcess:
    """``twistd -n foxyproxy ARGS`` listening on a free loopback port.

    ``port`` is the line-protocol port; ``ports`` maps each listening
    factory's class name (``LineFactory``, ``Site``…) to its ports in the
    order they were logged.
    """

    def __init__(self, *args, env=None, listeners=1, timeout=20.0, port=None, preexec_fn=None):
        self.args = list(args)
        self.logdir = tempfile.mkdtemp(prefix="foxyproxy-test-")
        self.logfile = os.path.join(self.logdir, "twistd.log")
        self.env = dict(os.environ, **(env or {}))
        self.listeners = listeners
        self.timeout = timeout
        self.requested_port = port
        self.preexec_fn = preexec_fn  # e.g. to set resource limits of the proxy
        self.proc = None
        self.ports = {}
        self.port = None

    def start(self):
        port = self.requested_port or f"tcp:0:interface={HOST}"
        cmd = [TWISTD, "-n", "--pidfile=", "--logfile", self.logfile, "foxyproxy", "-p", str(port)]
        cmd += self.args
        self._out = open(os.path.join(self.logdir, "stdout"), "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=self.logdir, preexec_fn=self.preexec_fn)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            found = _LISTENING.findall(self.log())
            if len(found) >= self.listeners:
                for name, number in found:
                    self.ports.setdefault(name, []).append(int(number))
                self.port = self.ports.get("LineFactory", [None])[0]
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"proxy did not start: {' '.join(cmd)}\n{self.log()}{self.output()}")

    def log(self):
        try:
            with open(self.logfile, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def output(self):
        with open(os.path.join(self.logdir, "stdout"), encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._out.close()

    def kill(self):
        self.stop(signal.SIGKILL)

    def client(self, **kw):
        return LineClient(HOST, self.port, **kw)

    def fds(self):
        """How many file descriptors the proxy process has open."""
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class LineClient:
    """A blocking client: ``request(text)`` sends and reads until ``@@``."""

    def __init__(self, host=HOST, port=4001, timeout=10.0, source=None):
        """``source``: the local address to connect from, e.g. ``127.0.0.2``
        (any 127.0.0.0/8 address works on Linux loopback)."""
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data.encode("utf-8") if isinstance(data, str) else data)

    def read_response(self):
        """The ``>ID:RESULT`` lines of one response, as [(id, result)]."""
        while b"@@\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before @@; got {self.buf!r}")
            self.buf += chunk
        text, _, self.buf = self.buf.partition(b"@@\n")
        lines = []
        for line in text.decode("utf-8").splitlines():
            assert line.startswith(">"), line
            cid, _, result = line[1:].partition(":")
            lines.append((cid, result))
        return lines

    def request(self, text):
        self.send(text)
        return self.read_response()

    def results(self, text):
        """Just the result strings of one request."""
        return [r for _, r in self.request(text)]

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOXYPROXY_VENV = os.path.join(ROOT, ".venv-foxyproxy")
FOXYPROXY_PACKAGES = ["foxyproxy==2.10.0", "cryptography==3.3.2"]


def foxyproxy_check():
    """None when FOXYPROXY_VENV holds a FoxyProxy 2.10 that imports, else
    what is wrong (one line)."""
    python = os.path.join(FOXYPROXY_VENV, "bin", "python")
    if not os.path.exists(os.path.join(FOXYPROXY_VENV, "bin", "foxyproxy")):
        return f"no {FOXYPROXY_VENV}/bin/foxyproxy"
    done = subprocess.run([python, "-c", "import foxyproxy.__main__, foxyproxy.version as v; "
                                         "assert v.proxy_version.startswith('2.10'), v.proxy_version"],
                          capture_output=True, text=True, timeout=60)
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["?"])[-1]


def foxyproxy_venv():
    """The original FoxyProxy 2.10's console script, in its own virtualenv
    (``.venv-foxyproxy``; on Python 3.11 it needs ``cryptography==3.3.2``
    to import).  The install phase of tests/run.sh provisions it
    (tests/provision.py); the tests never download: RuntimeError naming
    the command when it is missing."""
    problem = foxyproxy_check()
    if problem:
        raise RuntimeError(f"FoxyProxy 2.10 is not provisioned ({problem}): run tests/run.sh, or "
                           f".venv/bin/python tests/provision.py /tmp/wheels (needs the network)")
    return os.path.join(FOXYPROXY_VENV, "bin", "foxyproxy")


class FoxyProxy:
    """foxyproxy 2.10 in its own process group (its worker processes die with it)."""

    def __init__(self, upstream, token, home, signer=None):
        """``signer``: its ``-c`` profile (``ica``, the default, ``postsignum``
        or ``pgp``)."""
        self.port = free_port()
        self.out = os.path.join(home, "foxyproxy.out")
        self._file = open(self.out, "wb")
        env = dict(os.environ, HOME=home, PYTHONUNBUFFERED="1")
        args = [foxyproxy_venv(), "-p", str(self.port), "-s", upstream, "-t", token]
        if signer:
            args += ["-c", signer]
        self.proc = subprocess.Popen(args,
                                     stdout=self._file, stderr=subprocess.STDOUT, cwd=home, env=env,
                                     start_new_session=True)

    def output(self):
        with open(self.out, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "TCP API of FoxyProxy is up and running" in self.output():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"foxyproxy did not start:\n{self.output()}")

    def request(self, text):
        """One request on a new connection (foxyproxy closes it after answering)."""
        with LineClient(HOST, self.port, timeout=30) as c:
            return c.request(text)

    def raw(self, text):
        """Everything foxyproxy sends back until it closes the connection."""
        with socket.create_connection((HOST, self.port), timeout=30) as s:
            s.sendall(text.encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return data.decode()
                data += chunk

    def stop(self):
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 1.5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftover workers of its group, if any
        except ProcessLookupError:
            pass
        self._file.close()


def card_tx(card, hexstr):
    """An in-process card's answer to an APDU given in hex (spaces allowed)."""
    return card.transmit(bytes.fromhex(hexstr.replace(" ", ""))).hex().upper()


def card_collect(card, hexstr):
    """Send, follow 61xx with GET RESPONSE (Le from SW2); data and final SW."""
    out = card_tx(card, hexstr)
    data = out[:-4]
    while out[-4:-2] == "61":
        out = card_tx(card, "00C00000" + out[-2:])
        data += out[:-4]
    return bytes.fromhex(data), out[-4:]


class ApiAgent:
    """A real API client (tests/api_client.py: treq and Autobahn in their own
    Twisted process) driven with blocking calls: ``http(method, path,
    body)``, ``ws_open(name)``, ``ws_send(name, msg)``, ``ws_recv(name)``."""

    def __init__(self, base, token, env=None):
        self.token = token
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "api_client.py")
        self.proc = subprocess.Popen([sys.executable, script, base], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, **(env or {})))

    def call(self, wait=30, **cmd):
        import select

        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], wait)
        if not ready:
            raise TimeoutError(f"api_client gave no answer to {cmd['op']} in {wait} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("api_client ended")
        try:
            return json.loads(line)
        except ValueError:
            raise RuntimeError(f"api_client said: {line!r}{self.proc.stdout.read(4000)!r}") from None

    def auth(self, token=None):
        return {"Authorization": f"Bearer {self.token if token is None else token}"}

    def http(self, method, path, body=None, headers=None, token=None):
        """(status, body, headers) of one request, with the bearer token unless ``headers``."""
        answer = self.call(op="http", method=method, path=path, body=body,
                           headers=self.auth(token) if headers is None else headers)
        if "status" not in answer:
            raise RuntimeError(f"HTTP request failed: {answer}")
        return answer["status"], answer["body"], answer["headers"]

    def ws_open(self, name="ws", headers=None):
        return self.call(op="ws_open", name=name, headers=self.auth() if headers is None else headers)

    def ws_send(self, msg, name="ws"):
        return self.call(op="ws_send", name=name, msg=msg)

    def ws_recv(self, name="ws", timeout=10):
        """``{"msg", "t"}``, ``{"timeout": True}`` or ``{"closed": [code, reason]}``."""
        return self.call(wait=timeout + 10, op="ws_recv", name=name, timeout=timeout)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.call(op="quit", wait=5)
            except (OSError, RuntimeError, TimeoutError):
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def chromium_path():
    """Debian's chromium, installed when missing (tests/debian-packages.txt)."""
    import shutil

    path = shutil.which("chromium")
    if path is None:
        import pcsc_rig

        pcsc_rig.ensure_packages(["chromium"])
        path = shutil.which("chromium")
    return path


def browser_dom(url, done_js, timeout=30.0):
    """Load ``url`` in headless chromium, wait (at most ``timeout`` s) until
    the page's JavaScript expression ``done_js`` is true, and return the
    page's HTML then.  Reads the page through the DevTools protocol
    (Runtime.evaluate over its WebSocket, with websocket-client), so a page
    that waits on a WebSocket is read when it is done, not when headless
    chromium's virtual time runs out."""
    import urllib.request

    import websocket

    with devtools_chromium(url, timeout) as (port, deadline):
        ws = None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                page = next(t for t in json.load(r) if t.get("type") == "page")
            ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=10, suppress_origin=True)
            calls = iter(range(1, 1000000))

            def evaluate(expression):
                n = next(calls)
                ws.send(json.dumps({"id": n, "method": "Runtime.evaluate",
                                    "params": {"expression": expression, "returnByValue": True}}))
                while True:
                    answer = json.loads(ws.recv())
                    if answer.get("id") == n:
                        return answer.get("result", {}).get("result", {}).get("value")

            while not evaluate(f"Boolean({done_js})") and time.monotonic() < deadline:
                time.sleep(0.2)
            return evaluate("document.documentElement.outerHTML")
        finally:
            if ws is not None:
                ws.close()


@contextlib.contextmanager
def devtools_chromium(url, timeout, *flags):
    """Headless chromium on ``url`` (extra command-line ``flags``) with a
    fresh profile and DevTools on a free loopback port: yields ``(port,
    deadline)`` (``deadline``: time.monotonic() + ``timeout``).  On exit the
    whole process group is stopped (renderers and helpers too, which
    otherwise still write into the profile), then the profile removed."""
    profile = tempfile.mkdtemp(prefix="chromium-")
    proc = subprocess.Popen(
        [chromium_path(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={profile}", *flags, "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        port = None
        while port is None:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError(f"chromium gave no DevTools port (exit {proc.poll()})")
            try:
                with open(os.path.join(profile, "DevToolsActivePort")) as f:
                    port = int(f.readline())
            except (OSError, ValueError):
                time.sleep(0.1)
        yield port, deadline
    finally:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)  # our own session: chromium and its children only
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # helpers that outlived the browser
        except ProcessLookupError:
            pass
        shutil.rmtree(profile, ignore_errors=True)


def accepts(port, host=HOST):
    """True when ``host:port`` accepts a TCP connection now."""
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def wait_for(predicate, timeout=20.0, interval=0.1, what=None):
    """Call ``predicate`` every ``interval`` seconds until it gives a true
    value (returned) or ``timeout`` seconds pass: then its last value, or,
    with ``what``, an AssertionError saying what was waited for."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            break
        time.sleep(interval)
    if not value and what is not None:
        raise AssertionError(f"timed out waiting for {what}")
    return value


def memory_core(dispatcher, clock=None, header_timeout=10.0, **limits):
    """A frontends.base.Core over ``dispatcher`` for in-memory tests of a
    front end (``limits``: ConnectionLimits arguments, e.g. buffered_bytes)."""
    from twisted.application.service import MultiService

    from cloudfoxy_proxy.frontends.base import Core
    from cloudfoxy_proxy.limits import ConnectionLimits

    clock = clock or dispatcher.clock
    return Core(reactor=clock, dispatcher=dispatcher, registry=dispatcher.registry,
                limits=ConnectionLimits(clock, **limits), service=MultiService(),
                header_timeout=header_timeout)


def site_treq(site):
    """A treq.testing.StubTreq whose requests reach ``site`` (an HttpSite:
    its channel judges every request head, as on a real listener) from
    127.0.0.1.  treq's StubTreq builds a plain Site around a resource; its
    agent's ``_serverFactory`` is replaced here, the one place tests reach
    into treq."""
    from treq.testing import StubTreq

    stub = StubTreq(site.resource)
    stub._agent._serverFactory = site
    return stub


def tls_half_close(port, ctx, request, timeout=10.0):
    """Over ``ctx`` (an _ssl.SSLContext, offering ALPN or not): handshake, send ``request``, then close_notify
    (``unwrap``) with the TCP connection left open, as a client that is
    done sending does; returns ``(what arrived, how it ended)``: ``"close_notify"``
    (the proxy's own, after its answers), ``"eof"`` (TCP closed without
    it) or ``"timeout"``."""
    import ssl as _ssl

    raw = socket.create_connection((HOST, port), timeout)
    incoming, outgoing = _ssl.MemoryBIO(), _ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=HOST)
    got, how = b"", "timeout"
    try:
        while True:
            try:
                obj.do_handshake()
                break
            except _ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                data = raw.recv(65536)
                assert data, "the proxy closed during the handshake"
                incoming.write(data)
        raw.sendall(outgoing.read())
        assert obj.selected_alpn_protocol() in (None, "http/1.1")
        obj.write(request)
        try:
            obj.unwrap()  # close_notify right after the request
        except _ssl.SSLWantReadError:
            pass
        raw.sendall(outgoing.read())
        deadline = time.monotonic() + timeout
        while how == "timeout" and time.monotonic() < deadline:
            raw.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = raw.recv(65536)
            except socket.timeout:
                break
            if not data:
                how = "eof"
                break
            incoming.write(data)
            while True:
                try:
                    chunk = obj.read(65536)
                except _ssl.SSLWantReadError:
                    break
                except _ssl.SSLZeroReturnError:
                    how = "close_notify"
                    break
                if not chunk:
                    break
                got += chunk
    finally:
        raw.close()
    return got, how

"""A scale-out tier of real processes for tests and benches: HAProxy (TCP
mode), etcd, owner and front ``twistd foxyproxy`` processes, and line-protocol
clients that check every answer -- all on 127.0.0.x addresses inside a
network namespace of their own (``in_namespace``).

The configurations and command lines are the ones docs/scale-out.md shows
(``doc_files``, ``doc_command``): a test of the tier is a test of the doc.

Every process is started and stopped by its PID, its output kept in a log
file of its own (``Tier.tail`` for failure messages); every wait is bounded.

Card data used by the checks lives in the emulated ISO 7816 card's writable
EF 5001 under DF 5000 (64 bytes): ``MARKER_OFFSET`` holds a card's marker,
offset 0 the interleaving probe's token, ``COUNTER_OFFSET`` a load client's
request counter.
"""

import base64
import csv
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "scale-out.md")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

LB = "127.0.0.10"
TIER_PORT, ROUTE_PORT = 4001, 4002
LINE_PORT, METRICS_PORT = 4001, 9100
ETCD = "127.0.0.40"
ETCD_PORT = 2379
#: where the doc's configurations put the audit log; each process of the
#: rig writes it in its own directory instead
AUDIT_DIR = "/var/log/foxyproxy/"

SELECT_EF = "00A4080C0450005001"  # SELECT by path from the MF: DF 5000 / EF 5001
MARKER_OFFSET, MARKER_LEN = 40, 24
COUNTER_OFFSET = 8


def update_binary(offset, data):
    return "00D6%04X%02X%s" % (offset, len(data), data.hex().upper())


def read_binary(offset, length):
    return "00B0%04X%02X" % (offset, length)


# -- the doc -------------------------------------------------------------------

def _blocks(path=DOC):
    inside, block = False, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("```"):
                if inside:
                    yield block
                inside, block = not inside, []
            elif inside:
                block.append(line.rstrip("\n"))


def doc_files(path=DOC):
    """{NAME: text} of the doc's code blocks that start ``# file: NAME``."""
    files = {}
    for block in _blocks(path):
        m = block and re.match(r"#\s*file:\s*(\S+)\s*$", block[0])
        if m:
            files[m.group(1)] = "\n".join(block[1:]) + "\n"
    return files


def doc_commands(path=DOC):
    """Every ``twistd`` command line of the doc's code blocks, as argv lists
    (``\\`` continuations joined)."""
    out = []
    for block in _blocks(path):
        i = 0
        while i < len(block):
            text = block[i]
            while text.endswith("\\") and i + 1 < len(block):
                i += 1
                text = text[:-1].rstrip() + " " + block[i].strip()
            i += 1
            if text.strip().startswith("twistd "):
                out.append(shlex.split(text))
    return out


def doc_command_like(address, new_address, replace=(), **kw):
    """The doc's command for ``address`` run at ``new_address`` (another
    host of the same kind), with the ``replace`` (old, new) pairs done too."""
    argv = [a.replace(address, new_address) for a in doc_command(address, **kw)]
    for old, new in replace:
        argv = [a.replace(old, new) for a in argv]
    return argv


def doc_command(address, config=None, route=False, path=DOC):
    """The doc's command line of the process on ``address`` (one using
    ``--config CONFIG`` when given; ``route``: a route-by-reader owner,
    whose command gives ``--backend``).  A front the doc describes as "the
    same with ADDRESS" gets the first front's command with the address
    replaced."""
    cands = []
    for argv in doc_commands(path):
        if config is not None and config not in argv:
            continue
        if route != ("--backend" in argv):
            continue
        cands.append(argv)
    for argv in cands:
        if any(f"interface={address}" in a for a in argv):
            return list(argv)
    if cands:
        first = cands[0]
        old = re.search(r"interface=(127\.\d+\.\d+\.\d+)", " ".join(first)).group(1)
        return [a.replace(old, address) for a in first]
    raise LookupError(f"no command for {address} (config {config}) in {path}")


# -- processes ------------------------------------------------------------------

class Proc:
    """One child process, started and stopped by its PID; output in ``log``."""

    def __init__(self, name, argv, cwd, log=None):
        self.name, self.argv, self.cwd = name, list(argv), cwd
        self.log = log or os.path.join(cwd, f"{name}.out")
        self.proc = None

    def start(self):
        os.makedirs(self.cwd, exist_ok=True)
        self._out = open(self.log, "ab")
        self._out.write(("\n=== start %s: %s\n" % (time.strftime("%H:%M:%S"), shlex.join(self.argv))).encode())
        self._out.flush()
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        return self

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig):
        if self.alive():
            os.kill(self.proc.pid, sig)

    def stop(self, sig=signal.SIGTERM, timeout=15.0):
        """Signal and wait (bounded); SIGKILL after ``timeout``.  Returns the
        exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)  # a paused process cannot handle SIGTERM
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._out.close()
        return self.proc.returncode

    def wait_exit(self, timeout=20.0):
        """Wait (bounded) for a process already signalled to end, without
        signalling it again (a second SIGTERM cuts the proxy's drain short);
        SIGKILL after ``timeout``.  Returns the exit status."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        return self.stop(signal.SIGKILL)

    def tail(self, chars=3000):
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""


def accepts(host, port, timeout=0.3, source=None):
    try:
        socket.create_connection((host, port), timeout, source_address=(source, 0) if source else None).close()
        return True
    except OSError:
        return False


def wait_for(predicate, timeout, what, interval=0.1, proc=None):
    """Poll ``predicate`` until it returns a true value (returned) or
    ``timeout`` seconds pass (TimeoutError naming ``what``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.proc.returncode}) while waiting for {what}:\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s" + (f"\n{proc.tail()}" if proc else ""))
        time.sleep(interval)


def http_get(host, port, path, timeout=2.0):
    """(status, body bytes) of GET, or (None, b"") when it cannot connect."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return None, b""


class Proxy(Proc):
    """A ``twistd foxyproxy`` process at ``address`` (line port 4001,
    metrics 9100 when its command gives --metrics)."""

    def __init__(self, name, argv, cwd, address):
        super().__init__(name, argv, cwd)
        self.address = address
        self.audit = os.path.join(cwd, "audit.jsonl")

    def wait_listening(self, timeout=40.0):
        # from the balancer's address: a PROXY-protocol listener refuses (and logs) a connection from elsewhere
        wait_for(lambda: accepts(self.address, LINE_PORT, source=LB), timeout, f"{self.name} listening", proc=self)
        if any(a.startswith("--metrics") for a in self.argv):
            wait_for(lambda: accepts(self.address, METRICS_PORT), timeout, f"{self.name} metrics", proc=self)
        return self

    def readyz(self):
        return http_get(self.address, METRICS_PORT, "/readyz")[0]

    def status(self):
        st, body = http_get(self.address, METRICS_PORT, "/status.json")
        return json.loads(body) if st == 200 else None

    def audit_records(self):
        out = []
        try:
            with open(self.audit, encoding="utf-8") as f:
                for line in f:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
        except OSError:
            pass
        return out


class Tier:
    """The processes of one tier, all in directory ``workdir``.

    ``files`` are the doc's configuration files (written into workdir with
    the audit log moved into each process's own directory)."""

    def __init__(self, workdir, doc=DOC):
        self.dir = workdir
        self.doc = doc
        self.procs = {}
        self.files = {}
        for name, text in doc_files(doc).items():
            path = os.path.join(workdir, name)
            with open(path, "w") as f:
                f.write(text.replace(AUDIT_DIR, ""))
            self.files[name] = path

    # starting
    def proxy(self, name, address, config=None, route=False, extra=(), argv=None, start=True):
        """The doc's command for ``address`` run in its own directory
        (``extra`` arguments appended), or ``argv`` after ``twistd -n``."""
        cwd = os.path.join(self.dir, name)
        os.makedirs(cwd, exist_ok=True)
        if argv is None:
            argv = doc_command(address, config=config, route=route, path=self.doc)
            assert argv[:4] == ["twistd", "-n", "--pidfile=", "foxyproxy"], argv
            argv = argv[4:]
        argv = [self.files.get(a, a) for a in argv]
        full = [TWISTD, "-n", "--pidfile=", "--logfile", os.path.join(cwd, "twistd.log"), "foxyproxy"]
        p = Proxy(name, full + argv + list(extra), cwd, address)
        p.log = os.path.join(cwd, "twistd.log")
        self.procs[name] = p
        if start:
            p.start()
        return p

    def restart(self, name, sig=signal.SIGTERM, timeout=20.0):
        p = self.procs[name]
        p.stop(sig, timeout)
        p.start()
        return p

    def haproxy(self, config_name, name="haproxy"):
        """HAProxy with the doc's ``config_name`` plus a stats socket."""
        exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
        cwd = os.path.join(self.dir, name)
        os.makedirs(cwd, exist_ok=True)
        sock = os.path.join(cwd, "admin.sock")
        extra = os.path.join(cwd, "stats.cfg")
        with open(extra, "w") as f:
            f.write(f"global\n    stats socket {sock} level admin\n")
        p = Proc(name, [exe, "-db", "-f", self.files[config_name], "-f", extra], cwd).start()
        p.admin = sock
        self.procs[name] = p
        return p

    def etcd(self, name="etcd"):
        cwd = os.path.join(self.dir, name)
        client, peer = f"http://{ETCD}:{ETCD_PORT}", f"http://{ETCD}:2380"
        p = Proc(name, [shutil.which("etcd") or "/usr/bin/etcd", "--name", "tier", "--data-dir",
                        os.path.join(cwd, "data"), "--listen-client-urls", client, "--advertise-client-urls",
                        client, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                        "--initial-cluster", f"tier={peer}", "--log-level", "warn"], cwd).start()
        self.procs[name] = p
        wait_for(lambda: http_get(ETCD, ETCD_PORT, "/health")[0] == 200, 30, "etcd healthy", proc=p)
        return p

    def stop_all(self):
        for p in reversed(list(self.procs.values())):
            try:
                p.stop(timeout=10)
            except Exception:  # noqa: BLE001 (stop the others too)
                pass

    def tail(self, *names, chars=2500):
        names = names or list(self.procs)
        return "\n".join(f"--- {n} ---\n{self.procs[n].tail(chars)}" for n in names if n in self.procs)


def haproxy_servers(admin_sock, timeout=2.0):
    """{(backend, server): status} from HAProxy's ``show stat``."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    try:
        s.connect(admin_sock)
        s.sendall(b"show stat\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        return {}
    finally:
        s.close()
    text = data.decode(errors="replace").lstrip("# ")
    out = {}
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("svname") not in ("FRONTEND", "BACKEND"):
            out[(row["pxname"], row["svname"])] = row["status"]
    return out


def etcd_range(prefix="", timeout=2.0):
    """{key: value} of every etcd key under ``prefix`` (v3 JSON gateway;
    "": every key)."""
    key = prefix.encode() or b"\0"
    end = key[:-1] + bytes([key[-1] + 1]) if prefix else b"\0"
    body = json.dumps({"key": base64.b64encode(key).decode(), "range_end": base64.b64encode(end).decode()})
    req = urllib.request.Request(f"http://{ETCD}:{ETCD_PORT}/v3/kv/range", data=body.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        got = json.loads(r.read())
    return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
            for kv in got.get("kvs", [])}


# -- clients ---------------------------------------------------------------------

class Line:
    """A blocking line-protocol connection (``source``: local address).

    ``client``: act as the balancer for a front that reads the PROXY
    protocol: connect from the balancer's address (LB) and send a PROXY v1
    header naming ``client`` (an address) as the client."""

    def __init__(self, host, port, source=None, timeout=5.0, client=None):
        if client is not None:
            source = LB
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if client is not None:
            sport = self.sock.getsockname()[1]
            self.sock.sendall(f"PROXY TCP4 {client} {host} {sport} {port}\r\n".encode())
        self.buf = b""

    def request(self, reader, commands, timeout=None):
        """Send ``>reader|`` (None: none) and ``(id, COMMAND, DATA)`` lines,
        an empty line; [(id, result)] of the answer."""
        text = (f">{reader}|\n" if reader is not None else "")
        text += "".join(f">{cid}:{cmd}" + (f":{data}" if data is not None else "") + "|\n"
                        for cid, cmd, data in commands) + "\n"
        if timeout is not None:
            self.sock.settimeout(timeout)
        self.sock.sendall(text.encode())
        while b"@@\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before @@ (got {self.buf[:200]!r})")
            self.buf += chunk
        text, _, self.buf = self.buf.partition(b"@@\n")
        out = []
        for line in text.decode(errors="replace").splitlines():
            if line.startswith(">"):
                cid, _, result = line[1:].partition(":")
                out.append((cid, result))
        return out

    def apdus(self, reader, apdus, timeout=None):
        """Results of ``apdus`` (hex) on ``reader``, ids 1..n checked."""
        got = self.request(reader, [(str(i + 1), "APDU", a) for i, a in enumerate(apdus)], timeout)
        if [c for c, _ in got] != [str(i + 1) for i in range(len(apdus))]:
            raise AssertionError(f"answer ids {got!r} for {len(apdus)} commands")
        return [r for _, r in got]

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def readers(host, port, source=None, timeout=5.0, client=None):
    """The reader names READERS lists."""
    with Line(host, port, source, timeout, client) as c:
        got = c.request("*", [("1", "READERS", None)])
    result = got[0][1] if got else ""
    if re.fullmatch(r"C0\d\d", result):
        raise RuntimeError(f"READERS answered {result}")
    return [base64.b64decode(x).decode() for x in result.split("|") if x]


def one(host, port, reader, apdus, source=None, timeout=5.0, client=None):
    """Results of one request on a fresh connection."""
    with Line(host, port, source, timeout, client) as c:
        return c.apdus(reader, apdus)


def marker_of(name):
    return name.encode()[:MARKER_LEN].ljust(MARKER_LEN, b".")


def write_marker(host, port, reader, marker):
    got = one(host, port, reader, [SELECT_EF, update_binary(MARKER_OFFSET, marker)])
    if got != ["9000", "9000"]:
        raise AssertionError(f"writing the marker on {reader} at {host}: {got}")


def read_marker(host, port, reader, source=None, client=None):
    """The marker bytes on ``reader`` (None with the result codes when the
    card did not answer 9000)."""
    for _ in range(2):  # C080: the card was replaced (its owner restarted) since it was used; said once
        got = one(host, port, reader, [SELECT_EF, read_binary(MARKER_OFFSET, MARKER_LEN)], source=source, client=client)
        if got[0] != "C080":
            break
    if got[0] != "9000" or not got[1].endswith("9000"):
        return None, got
    return bytes.fromhex(got[1][:-4]), got


class Worker(threading.Thread):
    """A client thread, bounded by ``deadline`` (monotonic) and
    ``max_requests``; ``stop()`` ends it early.  ``samples`` keeps the first
    few problems for failure messages."""

    def __init__(self, host, port, reader, source=None, deadline=None, max_requests=100000, timeout=10.0,
                 client=None):
        super().__init__(daemon=True)
        self.host, self.port, self.reader, self.source, self.client = host, port, reader, source, client
        self.deadline = deadline if deadline is not None else time.monotonic() + 60
        self.max_requests, self.timeout = max_requests, timeout
        self.stopping = threading.Event()
        self.stats = {"requests": 0, "ok": 0, "wrong": 0, "duplicate": 0, "lost": 0, "errors": {}}
        self.answered_at = []  # monotonic time of each correct answer
        self.samples = []
        self.conn = None

    def note(self, text):
        if len(self.samples) < 8:
            self.samples.append(f"{time.strftime('%H:%M:%S')} {self.reader}: {text}")

    def stop(self):
        self.stopping.set()

    def running(self):
        return (not self.stopping.is_set() and time.monotonic() < self.deadline
                and self.stats["requests"] < self.max_requests)

    def connect(self):
        while self.running():
            try:
                self.conn = Line(self.host, self.port, self.source, self.timeout, self.client)
                return True
            except OSError as e:
                self.stats["errors"]["connect"] = self.stats["errors"].get("connect", 0) + 1
                self.note(f"connect: {e}")
                time.sleep(0.1)
        return False

    def drop(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def exchange(self, apdus):
        """Results, or None when the connection was lost before the whole
        answer (counted ``lost``)."""
        if self.conn is None and not self.connect():
            return None
        self.stats["requests"] += 1
        seq = self.stats["requests"]
        ids = [f"{seq}.{j}" for j in range(len(apdus))]
        try:
            got = self.conn.request(self.reader, [(i, "APDU", a) for i, a in zip(ids, apdus)])
        except (OSError, ConnectionError) as e:
            self.stats["lost"] += 1
            self.note(f"request {seq} lost: {e}")
            self.drop()
            return None
        if [c for c, _ in got] != ids:
            dup = len(got) > len(ids)
            self.stats["duplicate" if dup else "wrong"] += 1
            self.note(f"request {seq}: answer ids {[c for c, _ in got]} for {ids}")
            self.drop()
            return None
        return [r for _, r in got]


class CounterClient(Worker):
    """Requests that count on the card: SELECT EF, READ the counter (must be
    the last value written), UPDATE it +1, READ (must be the new value).
    A request run twice shows as a jump of 2 (``duplicate``); one whose
    answer was lost is resolved by reading the counter again."""

    def run(self):
        try:
            self._run()
        finally:
            self.drop()

    def _sync(self):
        while self.running():
            got = self.exchange([SELECT_EF, read_binary(COUNTER_OFFSET, 8)])
            if got and got[0] == "9000" and got[1].endswith("9000") and len(got[1]) == 20:
                return int(got[1][:16], 16)
            if got:
                self._error(got)
                time.sleep(0.1)
        return None

    def _error(self, got):
        for r in got:
            if re.fullmatch(r"C0\d\d", r):
                self.stats["errors"][r] = self.stats["errors"].get(r, 0) + 1
                self.note(f"answer {got}")
                return True
        return False

    def _run(self):
        got = None
        while self.running() and got != ["9000", "9000"]:
            got = self.exchange([SELECT_EF, update_binary(COUNTER_OFFSET, bytes(8))])
            if got is not None and got != ["9000", "9000"]:
                self._error(got)
                time.sleep(0.1)
        value, uncertain = 0, False
        while self.running():
            if uncertain:
                seen = self._sync()
                if seen is None:
                    return
                if seen not in (value, value + 1):
                    self.stats["duplicate" if seen > value + 1 else "wrong"] += 1
                    self.note(f"after a lost answer the counter is {seen}, expected {value} or {value + 1}")
                else:  # what became of the request whose answer was lost (or an error code)
                    key = "uncertain_ran" if seen == value + 1 else "uncertain_not_run"
                    self.stats[key] = self.stats.get(key, 0) + 1
                value, uncertain = seen, False
            nxt = (value + 1).to_bytes(8, "big").hex().upper()
            got = self.exchange([SELECT_EF, read_binary(COUNTER_OFFSET, 8), update_binary(COUNTER_OFFSET, bytes.fromhex(nxt)),
                                 read_binary(COUNTER_OFFSET, 8)])
            if got is None:
                uncertain = True
                continue
            want = ["9000", "%016X9000" % value, "9000", nxt + "9000"]
            if got == want:
                value += 1
                self.stats["ok"] += 1
                self.answered_at.append(time.monotonic())
                continue
            uncertain = True
            if self._error(got):
                time.sleep(0.05)
                continue
            seen = got[1][:16] if len(got) > 1 else ""
            if re.fullmatch(r"[0-9A-F]{16}", seen) and int(seen, 16) > value:
                self.stats["duplicate"] += 1
            else:
                self.stats["wrong"] += 1
            self.note(f"request {self.stats['requests']}: got {got}, expected {want}")


class InterleaveProbe(Worker):
    """Requests whose commands must run back to back on the card: SELECT EF,
    UPDATE offset 0 with this client's token, READ it twice.  Another
    client's request run in between shows as a foreign token (``mixed``)."""

    def __init__(self, *a, token=b"A", **kw):
        super().__init__(*a, **kw)
        self.token = token
        self.stats["mixed"] = 0

    def run(self):
        try:
            while self.running():
                tok = (self.token + b"%07d" % self.stats["requests"])[:8]
                got = self.exchange([SELECT_EF, update_binary(0, tok), read_binary(0, 8), read_binary(0, 8)])
                if got is None:
                    continue
                want = tok.hex().upper() + "9000"
                if got[:2] == ["9000", "9000"] and got[2] == got[3] == want:
                    self.stats["ok"] += 1
                    self.answered_at.append(time.monotonic())
                elif any(re.fullmatch(r"C0\d\d", r) for r in got):
                    for r in got:
                        if re.fullmatch(r"C0\d\d", r):
                            self.stats["errors"][r] = self.stats["errors"].get(r, 0) + 1
                    self.note(f"answer {got}")
                else:
                    self.stats["mixed"] += 1
                    self.note(f"mixed: got {got}, own token {want}")
        finally:
            self.drop()


def gaps(times, start, end):
    """The longest time without a correct answer in [start, end]."""
    points = [start] + sorted(t for t in times if start <= t <= end) + [end]
    return max(b - a for a, b in zip(points, points[1:]))


# -- the namespace -----------------------------------------------------------------

def in_namespace(argv, timeout, env=None):
    """Run ``argv`` in a new network namespace with loopback up (needs root
    and unshare); a CompletedProcess with text output."""
    return subprocess.run(["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"] + list(argv),
                          capture_output=True, text=True, timeout=timeout, env=env)


def can_namespace():
    """None, or why a network namespace with HAProxy and etcd cannot be made."""
    if os.geteuid() != 0:
        return "needs root for unshare --net"
    for tool in ("unshare", "ip"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    if not (shutil.which("haproxy") or os.path.exists("/usr/sbin/haproxy")):
        return "HAProxy is not installed (Debian: haproxy)"
    if not (shutil.which("etcd") or os.path.exists("/usr/bin/etcd")):
        return "etcd is not installed (Debian: etcd-server)"
    return None

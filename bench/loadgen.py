#!/usr/bin/env python3
"""A closed-loop load generator for the CloudFoxy/FoxyProxy line protocol.

One process, one thread, many non-blocking sockets on one ``epoll`` (no
thread per client), so a single core can saturate a proxy on a 2-core box.
Each of C clients sends a request of K ``APDU`` commands, waits for the
whole answer, checks it byte for byte (ids, count, result) and sends the
next one.  Connections are persistent or opened per request.

Library::

    from bench.loadgen import run
    stats = run("127.0.0.1", 4001, clients=50, k=1, duration=5, pid=proxy_pid)

CLI::

    python bench/loadgen.py --port 4001 --clients 50 -k 1 --duration 5 --pid PID

Only loopback or your own test hosts are valid targets.  Every run is
bounded by ``warmup + duration + drain`` seconds.
"""

import argparse
import base64
import errno
import json
import os
import re
import select
import socket
import sys
import time

DEFAULT_APDU = "00A4000C023F00"  # SELECT MF, no answer data
DEFAULT_EXPECT = "9000"
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# -- the proxy process, seen through /proc ---------------------------------

def proc_cpu(pid):
    """utime + stime of process ``pid`` in seconds (all threads), or None."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _cpu_ticks():
    """The first 8 counters of /proc/stat's ``cpu`` line (user nice system
    idle iowait irq softirq steal, all cores), or None."""
    try:
        with open("/proc/stat", "rb") as f:
            return [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None


def machine_busy():
    """CPU seconds all cores spent busy since boot (/proc/stat: all but idle
    and iowait), or None."""
    ticks = _cpu_ticks()
    return None if ticks is None else (sum(ticks) - ticks[3] - ticks[4]) / _TICK


def machine_steal():
    """(steal, all) CPU seconds of all cores since boot (/proc/stat): time
    the hypervisor ran something else while a core of this machine wanted
    to run, or None."""
    ticks = _cpu_ticks()
    return None if ticks is None else (ticks[7] / _TICK, sum(ticks) / _TICK)


def proc_status(pid, key):
    """A ``kB`` value (``VmRSS``, ``VmHWM``...) of /proc/PID/status in bytes, or None."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# -- readers -----------------------------------------------------------------

def list_readers(host, port, timeout=5.0):
    """Canonical reader names from ``READERS``, in the proxy's order."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(b">*|\n>1:READERS|\n\n")
        buf = b""
        while b"@@\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"proxy closed the connection; got {buf!r}")
            buf += chunk
    text = buf.split(b"@@\n", 1)[0].decode("utf-8")
    for line in text.splitlines():
        if line.startswith(">1:"):
            value = line[3:]
            if value.startswith("C0") and len(value) == 4:
                raise RuntimeError(f"READERS failed: {value}")
            return [base64.b64decode(n).decode("utf-8") for n in value.split("|") if n]
    raise RuntimeError(f"no READERS result in {text!r}")


def pick_readers(host, port, count=None, match=None, names=None):
    """``names`` as given, else the first ``count`` readers of READERS whose
    name matches the regular expression ``match``."""
    if names:
        return list(names)
    found = list_readers(host, port)
    if match:
        rx = re.compile(match)
        found = [n for n in found if rx.search(n)]
    if count:
        found = found[:count]
    if not found:
        raise RuntimeError("no reader to send to (READERS is empty or nothing matched)")
    return found


# -- the load loop -----------------------------------------------------------

class _Conn:
    __slots__ = ("sock", "fd", "client", "seq", "buf", "expect", "sent_at", "connecting",
                 "out", "reader", "fresh", "measured", "done")

    def __init__(self, client):
        self.client = client
        self.sock = None
        self.fd = -1
        self.seq = 0
        self.buf = b""
        self.expect = None  # expected answer bytes while a request is in flight
        self.sent_at = 0.0
        self.connecting = False
        self.out = b""
        self.reader = 0
        self.fresh = True  # no request sent on this socket yet
        self.measured = False
        self.done = 0  # answers counted in the measured window


def _percentile(sorted_values, q):
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, int(round(q / 100.0 * (len(sorted_values) - 1)))))
    return sorted_values[i]


class LoadGenerator:
    """One closed-loop run; see :func:`run` for the parameters."""

    def __init__(self, host, port, clients=10, k=1, duration=5.0, warmup=1.0, persistent=True,
                 readers=None, reader_count=None, reader_match=None, rotate=False, sticky=False,
                 apdu=DEFAULT_APDU, expect=DEFAULT_EXPECT, empty_line=True, pid=None,
                 drain=5.0, connect_timeout=5.0, linger_reset=True, max_samples=5, watch=None):
        if k < 1:
            raise ValueError("k must be at least 1")
        if not empty_line and k != 1:
            raise ValueError("without an empty line a request holds exactly one command (k=1)")
        self.host, self.port = host, port
        self.clients, self.k = clients, k
        self.duration, self.warmup, self.drain = float(duration), float(warmup), float(drain)
        self.persistent, self.rotate, self.sticky = persistent, rotate, sticky
        self.readers = pick_readers(host, port, reader_count, reader_match, readers)
        self.apdu = "".join(apdu.split()).upper()
        self.expect = expect.upper()
        self.empty_line = empty_line
        self.pid = pid
        self.watch = dict(watch or {})
        self.connect_timeout = connect_timeout
        self.linger_reset = linger_reset
        self.max_samples = max_samples
        self._heads = [f">{name}|\n".encode("utf-8") for name in self.readers]
        self._cmd = f":APDU:{self.apdu}|\n".encode("ascii")
        self._ans = f":{self.expect}\n".encode("ascii")
        self._tail = b"\n" if empty_line else b""

    # requests and their expected answers
    def _request(self, conn):
        k = self.k
        base = conn.seq * k
        conn.seq += 1
        reader = conn.reader
        if self.rotate:
            conn.reader = (reader + 1) % len(self.readers)
        cmd, ans = self._cmd, self._ans
        if k == 1:
            ids = b"%d" % base
            body = b">" + ids + cmd
            conn.expect = b">" + ids + ans + b"@@\n"
        else:
            ids = [b"%d" % (base + j) for j in range(k)]
            body = b"".join([b">" + i + cmd for i in ids])
            conn.expect = b"".join([b">" + i + ans for i in ids]) + b"@@\n"
        if self.sticky and not conn.fresh:
            return body + self._tail
        conn.fresh = False
        return self._heads[reader] + body + self._tail

    def run(self):
        ep = select.epoll()
        conns = {}
        st = {
            "sent": 0, "answered": 0, "checked": 0, "ok": 0, "mismatch": 0, "closed": 0,
            "connect_errors": 0, "unanswered": 0, "connections": 0,
        }
        samples = []
        lat = []
        perf = time.perf_counter
        t0 = perf()
        mstart = t0 + self.warmup
        mend = mstart + self.duration
        hard_end = mend + self.drain
        state = {"measuring": False, "stopping": False}
        window = {}
        nreaders = len(self.readers)

        def open_socket(conn):
            s = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET,
                              socket.SOCK_STREAM)
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self.persistent and self.linger_reset:
                # Per-request connections: close with RST, or thousands of
                # sockets sit in TIME_WAIT and the ephemeral ports run out.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.sock, conn.fd, conn.buf, conn.fresh = s, s.fileno(), b"", True
            conn.connecting = True
            conn.sent_at = perf()
            conns[conn.fd] = conn
            err = s.connect_ex((self.host, self.port))
            if err not in (0, errno.EINPROGRESS):
                fail_connect(conn, err)
                return
            ep.register(conn.fd, select.EPOLLOUT)
            st["connections"] += 1

        def fail_connect(conn, err):
            st["connect_errors"] += 1
            if len(samples) < self.max_samples:
                samples.append(f"client {conn.client}: connect failed: {os.strerror(err)}")
            drop(conn)

        def drop(conn):
            conns.pop(conn.fd, None)
            try:
                ep.unregister(conn.fd)
            except (OSError, ValueError):
                pass
            conn.sock.close()
            conn.sock, conn.expect = None, None

        def send(conn, now):
            if state["stopping"]:
                return
            data = self._request(conn)
            if self.persistent:
                conn.sent_at = now
            conn.measured = now >= mstart
            st["sent"] += 1
            try:
                n = conn.sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError as e:
                closed(conn, f"send failed: {e}")
                return
            if n < len(data):
                conn.out = data[n:]
                ep.modify(conn.fd, select.EPOLLIN | select.EPOLLOUT)

        def closed(conn, why):
            if conn.expect is not None:
                st["closed"] += 1
                if len(samples) < self.max_samples:
                    samples.append(f"client {conn.client}: {why}; pending {conn.expect[:60]!r}, got {conn.buf[:60]!r}")
            drop(conn)
            if not state["stopping"]:
                open_socket(conn)  # the client reconnects and carries on

        def answered(conn, resp, now):
            st["answered"] += 1
            st["checked"] += 1
            expect = conn.expect
            conn.expect = None
            if resp == expect:
                st["ok"] += 1
                if conn.measured and now <= mend:
                    lat.append(now - conn.sent_at)
                    conn.done += 1
            else:
                st["mismatch"] += 1
                if len(samples) < self.max_samples:
                    samples.append(f"client {conn.client}: expected {expect[:120]!r}, got {resp[:120]!r}")
            if not self.persistent:
                drop(conn)
                if not state["stopping"]:
                    open_socket(conn)
            elif not state["stopping"]:
                send(conn, now)

        cpu_self0 = None
        clients = [_Conn(i) for i in range(self.clients)]
        try:
            for c in clients:
                c.reader = c.client % nreaders
                open_socket(c)
            recv_size = 262144
            while True:
                now = perf()
                if not state["measuring"] and now >= mstart:
                    state["measuring"] = True
                    window["cpu0"] = proc_cpu(self.pid)
                    window["machine0"] = machine_busy()
                    window["watch0"] = {k: proc_cpu(v) for k, v in self.watch.items()}
                    window["answered0"] = st["ok"]
                    cpu_self0 = time.process_time()
                    window["t0"] = now
                if not state["stopping"] and now >= mend:
                    state["stopping"] = True
                    window["cpu1"] = proc_cpu(self.pid)
                    window["machine1"] = machine_busy()
                    window["watch1"] = {k: proc_cpu(v) for k, v in self.watch.items()}
                    window["t1"] = now
                    window["self_cpu"] = time.process_time() - (cpu_self0 or 0.0)
                    window["ok_in_window"] = len(lat)
                if state["stopping"]:
                    inflight = sum(1 for c in conns.values() if c.expect is not None or c.connecting)
                    if not inflight or now >= hard_end:
                        st["unanswered"] = inflight
                        for c in list(conns.values()):
                            if c.expect is not None and len(samples) < self.max_samples:
                                samples.append(f"client {c.client}: no answer within {self.drain}s of the end")
                        break
                    if not any(c.expect is not None for c in conns.values()):
                        # only connects in flight: nothing to wait for
                        st["unanswered"] = 0
                        break
                timeout = min(0.05, max(0.0, (mstart if not state["measuring"] else
                                               (mend if not state["stopping"] else hard_end)) - now))
                events = ep.poll(timeout, 1024)
                if not events:
                    for c in list(conns.values()):  # connect timeouts
                        if c.connecting and now - c.sent_at > self.connect_timeout:
                            fail_connect(c, errno.ETIMEDOUT)
                            if not state["stopping"]:
                                open_socket(c)
                    continue
                now = perf()
                for fd, ev in events:
                    conn = conns.get(fd)
                    if conn is None:
                        continue
                    if conn.connecting:
                        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            fail_connect(conn, err)
                            if not state["stopping"]:
                                time.sleep(0.001)
                                open_socket(conn)
                            continue
                        conn.connecting = False
                        ep.modify(fd, select.EPOLLIN)
                        if state["stopping"]:
                            drop(conn)
                            continue
                        # per-request connections: latency counts from connect()
                        send(conn, now if self.persistent else conn.sent_at)
                        continue
                    if ev & select.EPOLLOUT and conn.out:
                        try:
                            n = conn.sock.send(conn.out)
                        except BlockingIOError:
                            n = 0
                        except OSError as e:
                            closed(conn, f"send failed: {e}")
                            continue
                        conn.out = conn.out[n:]
                        if not conn.out:
                            ep.modify(fd, select.EPOLLIN)
                    if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                        try:
                            data = conn.sock.recv(recv_size)
                        except BlockingIOError:
                            continue
                        except OSError as e:
                            closed(conn, f"recv failed: {e}")
                            continue
                        if not data:
                            closed(conn, "connection closed by the proxy")
                            continue
                        buf = conn.buf + data if conn.buf else data
                        if conn.expect is None:
                            st["mismatch"] += 1
                            if len(samples) < self.max_samples:
                                samples.append(f"client {conn.client}: unsolicited data {buf[:80]!r}")
                            conn.buf = b""
                            continue
                        end = buf.find(b"@@\n") + 3
                        if end > 2:
                            resp, conn.buf = buf[:end], buf[end:]
                            if conn.buf:
                                st["mismatch"] += 1
                                if len(samples) < self.max_samples:
                                    samples.append(f"client {conn.client}: extra data after @@: {conn.buf[:80]!r}")
                                conn.buf = b""
                            answered(conn, resp, now)
                        else:
                            conn.buf = buf
        finally:
            for c in list(conns.values()):
                try:
                    ep.unregister(c.fd)
                except (OSError, ValueError):
                    pass
                c.sock.close()
            ep.close()

        elapsed = window.get("t1", perf()) - window.get("t0", t0)
        lat.sort()
        ok = window.get("ok_in_window", len(lat))
        result = {
            "host": self.host, "port": self.port, "clients": self.clients, "k": self.k,
            "persistent": self.persistent, "readers": len(self.readers), "rotate": self.rotate,
            "sticky": self.sticky, "apdu": self.apdu, "expect": self.expect,
            "duration": round(elapsed, 3), "warmup": self.warmup,
            "requests": ok,
            "requests_per_s": ok / elapsed if elapsed > 0 else 0.0,
            "apdus_per_s": ok * self.k / elapsed if elapsed > 0 else 0.0,
            "latency_ms": {
                "p50": _ms(_percentile(lat, 50)), "p90": _ms(_percentile(lat, 90)),
                "p99": _ms(_percentile(lat, 99)), "max": _ms(lat[-1] if lat else None),
                "mean": _ms(sum(lat) / len(lat) if lat else None),
            },
            "sent": st["sent"], "answered": st["answered"], "checked": st["checked"],
            "ok": st["ok"],
            "errors": st["mismatch"] + st["closed"] + st["connect_errors"] + st["unanswered"],
            "error_kinds": {"wrong_answer": st["mismatch"], "closed": st["closed"],
                            "connect": st["connect_errors"], "unanswered": st["unanswered"]},
            "error_samples": samples,
            "connections_opened": st["connections"],
            "per_client_min": min(c.done for c in clients),
            "per_client_max": max(c.done for c in clients),
            "loadgen_cpu_util": (window.get("self_cpu", 0.0) / elapsed) if elapsed > 0 else None,
        }
        if self.watch and "watch1" in window and elapsed > 0:
            w0, w1 = window["watch0"], window["watch1"]
            result["watch_cpu_util"] = {k: (w1[k] - w0[k]) / elapsed
                                        for k in self.watch if w0[k] is not None and w1[k] is not None}
        m0, m1 = window.get("machine0"), window.get("machine1")
        if m0 is not None and m1 is not None and elapsed > 0:
            # busy cores of the whole machine: proxy + load generator + the rest
            result["machine_cpu_util"] = (m1 - m0) / elapsed
        cpu0, cpu1 = window.get("cpu0"), window.get("cpu1")
        if cpu0 is not None and cpu1 is not None:
            cpu = cpu1 - cpu0
            apdus = ok * self.k
            result["proxy_cpu_s"] = round(cpu, 3)
            result["proxy_cpu_util"] = cpu / elapsed if elapsed > 0 else None
            result["proxy_cpu_us_per_apdu"] = (cpu / apdus * 1e6) if apdus else None
        if self.pid:
            result["proxy_rss_bytes"] = proc_status(self.pid, "VmRSS")
            result["proxy_peak_rss_bytes"] = proc_status(self.pid, "VmHWM")
        return result


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000.0, 3)


def run(host, port, clients=10, k=1, duration=5.0, warmup=1.0, persistent=True, readers=None,
        reader_count=None, reader_match=None, rotate=False, sticky=False, apdu=DEFAULT_APDU,
        expect=DEFAULT_EXPECT, empty_line=True, pid=None, drain=5.0, connect_timeout=5.0, watch=None):
    """Run a closed-loop load and return a dict of results.

    ``clients`` connections each send a request of ``k`` APDU commands
    (``apdu``, answer expected to be exactly ``expect``) and wait for its
    answer before sending the next.  Client ``i`` uses reader ``i mod R``
    (``rotate=True``: the next reader on every request), where the R readers
    are ``readers`` (names) or the first ``reader_count`` of READERS matching
    ``reader_match``.  ``persistent=False`` opens a connection per request
    (latency then includes connect).  ``sticky=True`` sends the reader line
    only on a connection's first request.  ``empty_line=False`` ends a
    request the APDUPlay way (no empty line; k must be 1).

    Nothing is recorded during ``warmup`` seconds; then ``duration`` seconds
    are measured; requests in flight at the end get ``drain`` seconds to be
    answered (and checked) before they count as ``unanswered`` errors.
    With ``pid`` (the proxy's process id) the proxy's CPU seconds (utime +
    stime) over the measured window, the CPU per APDU and its RSS / peak
    RSS (VmHWM) are reported; ``watch`` ({name: pid}) adds the CPU share
    of other processes (e.g. a fake upstream server) over the same window.
    """
    return LoadGenerator(
        host, port, clients=clients, k=k, duration=duration, warmup=warmup, persistent=persistent,
        readers=readers, reader_count=reader_count, reader_match=reader_match, rotate=rotate,
        sticky=sticky, apdu=apdu, expect=expect, empty_line=empty_line, pid=pid, drain=drain,
        connect_timeout=connect_timeout, watch=watch).run()


# -- many connections at once -------------------------------------------------

class Burst:
    """``n`` connections open at once, each having sent one request and
    checked its answer (``open_connections``); ``close()`` closes them."""

    def __init__(self, socks, result):
        self.socks = socks
        self.result = result

    def close(self):
        for s in self.socks:
            s.close()
        self.socks = []


def open_connections(host, port, n, reader, apdu=DEFAULT_APDU, expect=DEFAULT_EXPECT,
                     connect_window=256, timeout=60.0):
    """Connect ``n`` sockets (at most ``connect_window`` connects pending at
    once), then send one request on every one of them and check every
    answer, keeping all ``n`` open throughout.  Returns a :class:`Burst`
    whose ``result`` dict holds ``connected``, ``answered``, ``ok``,
    ``errors``, ``connect_s`` (all connected) and ``serve_s`` (all answered)."""
    perf = time.perf_counter
    ep = select.epoll()
    head = f">{reader}|\n".encode("utf-8")
    body = f":APDU:{apdu}|\n".encode("ascii")
    deadline = perf() + timeout
    socks, pending, connected = {}, {}, []
    errors, samples = 0, []
    todo = n
    t0 = perf()
    try:
        while (todo or pending) and perf() < deadline:
            while todo and len(pending) < connect_window:
                s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                err = s.connect_ex((host, port))
                todo -= 1
                if err not in (0, errno.EINPROGRESS):
                    errors += 1
                    if len(samples) < 5:
                        samples.append(f"connect: {os.strerror(err)}")
                    s.close()
                    continue
                pending[s.fileno()] = s
                ep.register(s.fileno(), select.EPOLLOUT)
            for fd, _ev in ep.poll(0.1, 1024):
                s = pending.pop(fd)
                ep.unregister(fd)
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    errors += 1
                    if len(samples) < 5:
                        samples.append(f"connect: {os.strerror(err)}")
                    s.close()
                else:
                    connected.append(s)
        for s in pending.values():
            errors += 1
            s.close()
        pending = {}
        t1 = perf()
        expect_of = {}
        for i, s in enumerate(connected):
            data = head + b">%d" % i + body + b"\n"
            expect_of[s.fileno()] = (b">%d:" % i) + expect.encode("ascii") + b"\n@@\n"
            socks[s.fileno()] = s
            try:
                s.send(data)  # tiny: fits the empty socket buffer
            except OSError as e:
                errors += 1
                if len(samples) < 5:
                    samples.append(f"send: {e}")
                continue
            ep.register(s.fileno(), select.EPOLLIN)
        bufs = {}
        answered = ok = 0
        waiting = len(socks)
        while waiting and perf() < deadline:
            for fd, _ev in ep.poll(0.1, 1024):
                s = socks[fd]
                try:
                    data = s.recv(65536)
                except OSError as e:
                    data = b""
                    if len(samples) < 5:
                        samples.append(f"recv: {e}")
                buf = bufs.get(fd, b"") + data
                if not data or b"@@\n" in buf:
                    ep.unregister(fd)
                    waiting -= 1
                    if data:
                        answered += 1
                    if buf == expect_of[fd]:
                        ok += 1
                    else:
                        errors += 1
                        if len(samples) < 5:
                            samples.append(f"expected {expect_of[fd]!r}, got {buf[:80]!r}")
                else:
                    bufs[fd] = buf
        errors += waiting
        if waiting and len(samples) < 5:
            samples.append(f"{waiting} connections got no answer within {timeout:g} s")
        t2 = perf()
    finally:
        ep.close()
    return Burst(connected, {
        "connections": n, "connected": len(connected), "answered": answered, "ok": ok,
        "errors": errors, "unanswered": waiting, "error_samples": samples,
        "connect_s": round(t1 - t0, 3), "serve_s": round(t2 - t1, 3),
    })


# -- CLI ------------------------------------------------------------------------

def _human(r):
    lat = r["latency_ms"]
    lines = [
        f"{r['clients']} clients, K={r['k']}, {'persistent' if r['persistent'] else 'per-request'} "
        f"connections, {r['readers']} reader(s), {r['duration']:.1f} s measured",
        f"  {r['requests_per_s']:.0f} requests/s, {r['apdus_per_s']:.0f} APDUs/s",
        f"  latency ms: p50 {lat['p50']} p90 {lat['p90']} p99 {lat['p99']} max {lat['max']}",
        f"  sent {r['sent']}, checked {r['checked']}, errors {r['errors']} {r['error_kinds']}",
    ]
    if "proxy_cpu_us_per_apdu" in r and r["proxy_cpu_us_per_apdu"] is not None:
        lines.append(f"  proxy CPU {r['proxy_cpu_us_per_apdu']:.1f} us/APDU "
                     f"({100 * r['proxy_cpu_util']:.0f}% of a core), peak RSS "
                     f"{(r.get('proxy_peak_rss_bytes') or 0) / 2**20:.1f} MiB")
    if r.get("loadgen_cpu_util") is not None:
        lines.append(f"  load generator CPU {100 * r['loadgen_cpu_util']:.0f}% of a core")
    if r.get("machine_cpu_util") is not None:
        lines.append(f"  whole machine {100 * r['machine_cpu_util']:.0f}% of a core busy "
                     f"({os.cpu_count()} cores)")
    for s in r["error_samples"]:
        lines.append(f"  ! {s}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4001)
    p.add_argument("-c", "--clients", type=int, default=10, help="concurrent clients (default 10)")
    p.add_argument("-k", type=int, default=1, help="APDU commands per request (default 1)")
    p.add_argument("-d", "--duration", type=float, default=5.0, help="measured seconds (default 5)")
    p.add_argument("-w", "--warmup", type=float, default=1.0, help="unmeasured seconds first (default 1)")
    p.add_argument("--per-request", action="store_true", help="a new connection for every request")
    p.add_argument("-r", "--readers", type=int, default=None, help="use the first R readers of READERS")
    p.add_argument("--reader-match", default=None, help="only readers whose name matches this regex")
    p.add_argument("--reader", action="append", default=None, help="reader name (repeatable; skips READERS)")
    p.add_argument("--rotate", action="store_true", help="every request goes to the next reader")
    p.add_argument("--sticky", action="store_true", help="reader line only on a connection's first request")
    p.add_argument("--no-empty-line", action="store_true", help="end requests APDUPlay-style (K=1)")
    p.add_argument("--apdu", default=DEFAULT_APDU, help=f"command APDU hex (default {DEFAULT_APDU})")
    p.add_argument("--expect", default=DEFAULT_EXPECT, help=f"expected answer hex (default {DEFAULT_EXPECT})")
    p.add_argument("--pid", type=int, default=None, help="proxy PID: report its CPU per APDU and RSS")
    p.add_argument("--drain", type=float, default=5.0, help="seconds to wait for answers in flight at the end")
    p.add_argument("--json", action="store_true", help="print the result dict as JSON")
    a = p.parse_args(argv)
    r = run(a.host, a.port, clients=a.clients, k=a.k, duration=a.duration, warmup=a.warmup,
            persistent=not a.per_request, readers=a.reader, reader_count=a.readers,
            reader_match=a.reader_match, rotate=a.rotate, sticky=a.sticky,
            empty_line=not a.no_empty_line, apdu=a.apdu, expect=a.expect, pid=a.pid, drain=a.drain)
    print(json.dumps(r, indent=2) if a.json else _human(r))
    return 1 if r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

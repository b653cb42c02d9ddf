#!/usr/bin/env python3
"""A fast fake CloudFoxy RESTful server (docs/rest.md) for the
benchmarks and for integration tests of the ``cloudfoxy+http://`` backend.

Raw asyncio HTTP/1.1 with keep-alive (and pipelining, answered in order);
no framework, so that the fake is never the bottleneck.

* ``GET /api/v1/basic?terminal=/IP@N&reset=0|1[&apdu=HEX]``: ``reset=1``
  alone answers the ATR; with ``apdu`` the card is reset first (when
  ``reset=1``) and the body is the response APDU in upper-case hex.  Body
  is one line ending in ``\\n``.  Unknown terminal or no card: HTTP 404;
  missing/bad ``terminal``/``apdu``: HTTP 400.
* ``GET /api/v1/inventory``: one line per present card, ``/IP@N ATR``.
* ``GET /api/v1/hello``: three lines; line 2 is ``uptime S seconds`` (its
  second token is the uptime in whole seconds; ``restart()`` sets it back
  to 0).
* ``GET /_fake/stats`` (not CloudFoxy's): JSON counters (requests,
  max_inflight...), for the bench and tests.
* Every request must carry ``X-Auth-Token: TOKEN`` when a token is set;
  otherwise HTTP 401.

Cards are ``cloudfoxy_proxy.cards.iso7816.Iso7816Card`` (real ISO 7816
answers: SELECT MF ``00A4000C023F00`` gives ``9000``), or with
``model="fixed"`` a card that answers ``9000`` to everything.  Each card
runs one command at a time: with ``latency`` seconds per command, commands
for one card queue in arrival order, different cards run in parallel.
``max_inflight`` records, per card, the most requests it ever had at once
(a correct proxy never sends a card two at a time).

Use::

    python bench/fake_cloudfoxy.py --port 0 --cards 120 --latency-ms 0 --token T
    # prints "port N", serves until SIGTERM/SIGINT

    fake = FakeCloudFoxy(cards=4, token="T")
    port = fake.start_in_thread()        # own event loop in a daemon thread
    ...; fake.call(fake.remove, 2); ...; fake.stop()
"""

import argparse
import asyncio
import json
import signal
import sys
import threading
import time
from urllib.parse import unquote

try:
    from cloudfoxy_proxy.cards.iso7816 import Iso7816Card
except ImportError:  # the bench can still run with the fixed model
    Iso7816Card = None

FIXED_ATR = bytes.fromhex("3B8F8001804F0CA000000306030001000000006A")
MAX_HEAD = 65536


class FixedCard:
    """Answers ``9000`` to every command."""

    atr = FIXED_ATR

    def reset(self):
        return self.atr

    def transmit(self, apdu):
        return b"\x90\x00"


class _Card:
    __slots__ = ("name", "model", "present", "free_at", "inflight", "max_inflight", "hw_errors",
                 "commands")

    def __init__(self, name, model):
        self.name = name
        self.model = model
        self.present = True
        self.free_at = 0.0
        self.inflight = 0
        self.max_inflight = 0
        self.hw_errors = 0  # answer this many commands with C000 (CloudFoxy hardware error)
        self.commands = 0


def _response(status, body, close=False, reason=None):
    reasons = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
               405: "Method Not Allowed", 413: "Payload Too Large"}
    head = (f"HTTP/1.1 {status} {reason or reasons.get(status, 'Error')}\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n")
    if close:
        head += "Connection: close\r\n"
    return head.encode("ascii") + b"\r\n" + body


class _HTTP(asyncio.Protocol):
    """One client connection; requests are answered one at a time, in order."""

    def __init__(self, server):
        self.server = server
        self.buf = b""
        self.busy = False
        self.closing = False
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.server.connections += 1

    def connection_lost(self, exc):
        self.server.connections -= 1
        self.closing = True

    def data_received(self, data):
        self.buf = self.buf + data if self.buf else data
        self._next()

    def _next(self):
        while not self.busy and not self.closing:
            buf = self.buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._send(_response(413, b"request head too long\n", close=True), True)
                return
            head = buf[:end].decode("latin-1")
            lines = head.split("\r\n")
            parts = lines[0].split(" ")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0") or 0)
            if len(buf) < end + 4 + length:
                return  # wait for the body (ignored)
            self.buf = buf[end + 4 + length:]
            if len(parts) != 3:
                self._send(_response(400, b"bad request line\n", close=True), True)
                return
            method, target, version = parts
            conn = headers.get("connection", "").lower()
            close = conn == "close" or (version == "HTTP/1.0" and conn != "keep-alive")
            self.server.handle(self, method, target, headers, close)

    def _send(self, data, close):
        if self.closing:
            return
        self.transport.write(data)
        if close:
            self.closing = True
            self.transport.close()


class FakeCloudFoxy:
    """The fake server; see the module docstring."""

    def __init__(self, cards=120, latency=0.0, token=None, host="127.0.0.1", ip="127.0.0.1",
                 model="iso7816"):
        if model == "iso7816" and Iso7816Card is None:
            raise RuntimeError("model iso7816 needs cloudfoxy_proxy installed; use model='fixed'")
        make = (lambda i: Iso7816Card(serial=i)) if model == "iso7816" else (lambda i: FixedCard())
        self.cards = {f"/{ip}@{i}": _Card(f"/{ip}@{i}", make(i)) for i in range(1, cards + 1)}
        self.ip = ip
        self.latency = float(latency)
        self.token = token
        self.host = host
        self.started = time.monotonic()
        self.requests = 0
        self.auth_failures = 0
        self.connections = 0
        self.loop = None
        self._server = None
        self._thread = None
        self.port = None

    # -- state changes for tests (call them on the server's loop: ``call``) --
    def call(self, fn, *args):
        """Run ``fn(*args)`` on the server's event loop (thread-safe); its result."""
        if self._thread is None or threading.current_thread() is self._thread:
            return fn(*args)
        done = threading.Event()
        out = []

        def run():
            try:
                out.append(fn(*args))
            finally:
                done.set()

        self.loop.call_soon_threadsafe(run)
        done.wait(10)
        return out[0] if out else None

    def card(self, n):
        return self.cards[f"/{self.ip}@{n}"]

    def remove(self, n):
        self.card(n).present = False

    def insert(self, n):
        card = self.card(n)
        card.present = True
        card.model.reset()

    def fail_next(self, n, count=1):
        """The next ``count`` commands on card ``n`` answer ``C000`` (hardware error)."""
        self.card(n).hw_errors = count

    def restart(self):
        """As if the server had restarted: uptime starts again from 0."""
        self.started = time.monotonic()
        for card in self.cards.values():
            card.model.reset()

    def stats(self):
        """Counters, also served as JSON at ``/_fake/stats`` (not part of the API)."""
        return {"requests": self.requests, "auth_failures": self.auth_failures,
                "connections": self.connections, "max_inflight": self.max_inflight,
                "commands": sum(c.commands for c in self.cards.values())}

    @property
    def max_inflight(self):
        """The most commands any one card ever had at once."""
        return max((c.max_inflight for c in self.cards.values()), default=0)

    # -- HTTP ------------------------------------------------------------------
    def handle(self, conn, method, target, headers, close):
        self.requests += 1
        if self.token is not None and headers.get("x-auth-token") != self.token:
            self.auth_failures += 1
            conn._send(_response(401, b"bad or missing X-Auth-Token\n", close), close)
            return
        if method != "GET":
            conn._send(_response(405, b"GET only\n", close), close)
            return
        path, _, query = target.partition("?")
        if path == "/api/v1/basic":
            self._basic(conn, query, close)
        elif path == "/api/v1/inventory":
            body = "".join(f"{c.name} {c.model.atr.hex().upper()}\n"
                           for c in self.cards.values() if c.present)
            conn._send(_response(200, body.encode("ascii"), close), close)
        elif path == "/api/v1/hello":
            up = int(time.monotonic() - self.started)
            body = f"CloudFoxy fake server\nuptime {up} seconds\ncards {len(self.cards)}\n"
            conn._send(_response(200, body.encode("ascii"), close), close)
        elif path == "/_fake/stats":
            body = json.dumps(self.stats()).encode("ascii")
            conn._send(_response(200, body, close), close)
        else:
            conn._send(_response(404, b"no such resource\n", close), close)

    def _basic(self, conn, query, close):
        params = {}
        for item in query.split("&"):
            key, _, value = item.partition("=")
            params[key] = unquote(value) if "%" in value else value
        card = self.cards.get(params.get("terminal", ""))
        if card is None or not card.present:
            conn._send(_response(404, b"unknown terminal or no card\n", close), close)
            return
        reset = params.get("reset", "0") == "1"
        apdu = None
        if "apdu" in params:
            try:
                apdu = bytes.fromhex(params["apdu"])
            except ValueError:
                apdu = b""
            if len(apdu) < 4:
                conn._send(_response(400, b"bad apdu\n", close), close)
                return
        elif not reset:
            conn._send(_response(400, b"apdu or reset=1 needed\n", close), close)
            return
        card.inflight += 1
        if card.inflight > card.max_inflight:
            card.max_inflight = card.inflight
        if not self.latency:
            self._execute(conn, card, reset, apdu, close)
            return
        conn.busy = True
        loop = self.loop
        when = max(loop.time(), card.free_at) + self.latency
        card.free_at = when
        loop.call_at(when, self._execute, conn, card, reset, apdu, close)

    def _execute(self, conn, card, reset, apdu, close):
        card.inflight -= 1
        card.commands += 1
        if not card.present:
            body = b"null\n"
            status = 404
        elif card.hw_errors:
            card.hw_errors -= 1
            status, body = 200, b"C000\n"
        else:
            status = 200
            out = card.model.reset() if reset else None
            if apdu is not None:
                out = card.model.transmit(apdu)
            body = out.hex().upper().encode("ascii") + b"\n"
        conn._send(_response(status, body, close), close)
        if conn.busy:
            conn.busy = False
            if conn.buf:
                conn._next()

    # -- running -----------------------------------------------------------------
    async def start(self, port=0):
        """Listen (on the running loop); the port."""
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(
            lambda: _HTTP(self), self.host, port, backlog=1024, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def start_in_thread(self, port=0, timeout=10.0):
        """Serve from a daemon thread with its own event loop; the port."""
        ready = threading.Event()
        errors = []

        def main():
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start(port))
            except Exception as e:  # pragma: no cover - reported to the caller
                errors.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=main, name="fake-cloudfoxy", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or errors:
            raise RuntimeError(f"fake CloudFoxy did not start: {errors}")
        return self.port

    def stop(self):
        if self._thread is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self._thread = None


def main(argv=None):
    p = argparse.ArgumentParser(description="A fast fake CloudFoxy RESTful server.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    p.add_argument("--cards", type=int, default=120)
    p.add_argument("--latency-ms", type=float, default=0.0, help="per-command card latency")
    p.add_argument("--token", default=None, help="required X-Auth-Token (default: none checked)")
    p.add_argument("--ip", default="127.0.0.1", help="IP in the native card names /IP@N")
    p.add_argument("--model", choices=("iso7816", "fixed"), default="iso7816")
    p.add_argument("--stop-after", type=float, default=3600.0, help="exit after this many seconds")
    a = p.parse_args(argv)
    fake = FakeCloudFoxy(cards=a.cards, latency=a.latency_ms / 1000.0, token=a.token, host=a.host,
                         ip=a.ip, model=a.model)

    async def serve():
        port = await fake.start(a.port)
        print(f"port {port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await asyncio.wait_for(stop.wait(), a.stop_after)
        except asyncio.TimeoutError:
            pass

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())

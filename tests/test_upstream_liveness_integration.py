"""A silently lost flow between real processes: client -> proxy B
(``tcp://`` backend) -> an in-test TCP relay -> proxy A (emulated cards).
The relay can freeze: it stops reading and writing both sides without a
FIN or RST (what a NAT or firewall that dropped its state, or a frozen
peer, looks like; the kernel still ACKs, so only B's heartbeat sees it).
A's metrics count what its cards ran."""

import selectors
import socket
import threading
import time

import pytest

from support import HOST, wait_for
from test_operations_integration import metrics_proxy, scrape, value

SELECT_MF = "00A4000C023F00"

pytestmark = pytest.mark.integration


class Relay:
    """Forwards every connection on ``port`` to ``target`` (one thread, a
    selector).  ``freeze()``: nothing is accepted, read or written any
    more, every socket stays open; ``thaw()``: forwarding goes on."""

    def __init__(self, target):
        self.target = target
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.frozen = threading.Event()
        self.done = threading.Event()
        self.peers = {}  # socket -> its other side
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def freeze(self):
        self.frozen.set()

    def thaw(self):
        self.frozen.clear()

    def close(self):
        self.done.set()
        self.thread.join(5)
        for s in [self.listener, *self.peers]:
            s.close()

    def _run(self):
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        while not self.done.is_set():
            if self.frozen.is_set():
                time.sleep(0.02)
                continue
            for key, _ in sel.select(0.05):
                s = key.fileobj
                if s is self.listener:
                    client, _ = s.accept()
                    try:
                        upstream = socket.create_connection(self.target, 5)
                    except OSError:
                        client.close()
                        continue
                    self.peers[client], self.peers[upstream] = upstream, client
                    sel.register(client, selectors.EVENT_READ)
                    sel.register(upstream, selectors.EVENT_READ)
                    continue
                other = self.peers.get(s)
                if other is None:
                    continue  # closed with its other side in this round
                try:
                    data = s.recv(65536)
                    if data:
                        other.sendall(data)
                        continue
                except OSError:
                    pass
                for end in (s, other):  # closed or reset: close the pair
                    sel.unregister(end)
                    self.peers.pop(end, None)
                    end.close()
        sel.close()


def apdus_run(a, reader="Emulated 00"):
    """APDUs A's card ``reader`` has run (A's metrics)."""
    s = scrape(a.metrics_port)
    return sum(value(s, "foxyproxy_reader_commands_total", reader=reader, kind="APDU", result=r)
               for r in ("OK", "C086"))


def test_a_silently_lost_flow_costs_one_short_timeout_and_nothing_runs_twice(proxy_factory):
    # A's card takes 1.5 s per command: a command is in flight when the flow is lost
    a = metrics_proxy(proxy_factory, "--no-signing", "--backend", "emulated:?cards=2&latency_ms=1500")
    relay = Relay((HOST, a.port))
    try:
        b = proxy_factory("--no-signing", "--backend", f"tcp://{HOST}:{relay.port}?prefix=B%20")
        with b.client(timeout=30) as c:
            wait_for(lambda: c.results(">*|\n>1:READERS|\n\n") != [""], what="B lists A's readers")
            assert c.results(f">B Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]
            time.sleep(1.0)  # B learns that A keeps connections: the pool and its heartbeats
            ran = apdus_run(a)
            assert ran == 1
            c.send(f">B Emulated 00|\n>2:APDU:{SELECT_MF}|\n\n")
            time.sleep(0.3)  # A has the command, its card runs it; then the flow goes silent
            relay.freeze()
            lost_at = time.monotonic()
            answer = c.read_response()
            seconds = time.monotonic() - lost_at
            assert answer == [("2", "C086")]
            print(f"\ntime to C086 after a silent flow loss: {seconds:.2f} s "
                  f"(heartbeat 1 s, heartbeat_timeout 1.5 s; --command-timeout 15 s)")
            assert seconds < 5.0, seconds  # one heartbeat interval + its timeout, not 15 s
            assert "did not answer a heartbeat within 1.5s" in b.log()
            # while the flow is gone, commands fail within the bound too, none reaches the card
            began = time.monotonic()
            assert c.results(f">B Emulated 00|\n>3:APDU:{SELECT_MF}|\n\n") == ["C086"]
            assert time.monotonic() - began < 5.0
            time.sleep(2.0)
            assert apdus_run(a) == ran + 1  # the lost one ran once, and was never sent again
            relay.thaw()
            began = time.monotonic()
            wait_for(lambda: c.results(f">B Emulated 00|\n>4:APDU:{SELECT_MF}|\n\n") == ["9000"],
                     timeout=20, interval=0.2, what="requests through the relay again")
            print(f"requests answered again {time.monotonic() - began:.2f} s after the flow came back")
            answered = apdus_run(a)
            assert c.results(f">B Emulated 00|\n>5:APDU:{SELECT_MF}|\n\n") == ["9000"]
            assert apdus_run(a) == answered + 1
        assert b.log().count("did not answer a heartbeat") == 1  # one warning for the outage
        assert "Traceback" not in b.log()
    finally:
        relay.close()

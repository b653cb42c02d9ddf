#!/usr/bin/env python3
"""The cheapest line-protocol server we can write in Python: it answers
every command line ``>ID:...`` with ``>ID:9000`` and ends a request with
``@@`` (on an empty line, or when all received bytes are consumed and a
command is pending: docs/protocol.md "When a request is complete", rule 2).  No parsing beyond framing,
no readers, no cards.

Run the load generator against it to learn the harness's own ceiling: a
proxy figure close to it says "the load generator was the limit", not
the proxy.

    python bench/trivial_responder.py --port 0     # prints "port N"
"""

import argparse
import select
import signal
import socket
import sys

ANSWER = b":9000\n"


def frame(data, out):
    """Frame ``data`` (bytes, after the previous read's partial line): the
    answers to send now (a list of bytes) and the new partial line.  Every
    command line ``>ID:...`` is answered ``>ID:9000`` into ``out`` (the
    request's pending answers); a request ends with ``@@`` on an empty line,
    or when all received bytes are consumed and a command is pending.
    Returns ``(partial, reply)``."""
    lines = data.split(b"\n")
    partial = lines.pop()  # partial line (b"" when data ended with \n)
    reply = []
    for line in lines:
        line = line.strip()
        if not line:
            if out:
                reply.extend(out)
                reply.append(b"@@\n")
                out.clear()
            continue
        if line[:1] == b">":
            colon = line.find(b":")
            if colon > 0:
                out.append(b">" + line[1:colon] + ANSWER)
    if out and not partial:
        reply.extend(out)
        reply.append(b"@@\n")
        out.clear()
    return partial, reply


def serve(sock, stop_after=None):
    """Serve on the listening socket until SIGTERM/SIGINT (or ``stop_after`` s)."""
    import time

    ep = select.epoll()
    sock.setblocking(False)
    lfd = sock.fileno()
    ep.register(lfd, select.EPOLLIN)
    conns = {}  # fd -> [socket, partial line bytes, pending answer lines]
    running = [True]

    def stop(*_):
        running[0] = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    end = time.monotonic() + stop_after if stop_after else None
    try:
        while running[0]:
            if end is not None and time.monotonic() > end:
                break
            try:
                events = ep.poll(0.5, 1024)
            except InterruptedError:
                continue
            for fd, _ev in events:
                if fd == lfd:
                    for _ in range(100):
                        try:
                            c, _addr = sock.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        c.setblocking(False)
                        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        conns[c.fileno()] = [c, b"", []]
                        ep.register(c.fileno(), select.EPOLLIN)
                    continue
                entry = conns[fd]
                c = entry[0]
                try:
                    data = c.recv(262144)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    ep.unregister(fd)
                    del conns[fd]
                    c.close()
                    continue
                entry[1], reply = frame(entry[1] + data if entry[1] else data, entry[2])
                if reply:
                    try:
                        c.sendall(b"".join(reply))  # tiny answers; fine for a bench tool
                    except OSError:
                        pass
    finally:
        for c, _, _ in conns.values():
            c.close()
        ep.close()


def main(argv=None):
    p = argparse.ArgumentParser(description="Answer every line-protocol command with 9000.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    p.add_argument("--stop-after", type=float, default=3600.0, help="exit after this many seconds")
    a = p.parse_args(argv)
    sock = socket.socket(socket.AF_INET6 if ":" in a.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((a.host, a.port))
    sock.listen(1024)
    print(f"port {sock.getsockname()[1]}", flush=True)
    serve(sock, a.stop_after)
    return 0


if __name__ == "__main__":
    sys.exit(main())

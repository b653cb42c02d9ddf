"""A real API client for integration tests: treq (one keep-alive connection
pool) and Autobahn's WebSocket client, in its own Twisted process.

Run as ``python api_client.py BASE_URL``; it reads one JSON command a line
on stdin and writes one JSON answer a line on stdout:

* ``{"op": "http", "method", "path", "body"?, "headers"?}`` ->
  ``{"status", "headers": {lower-case name: value}, "body": JSON or text}``
* ``{"op": "ws_open", "name", "headers"?}`` -> ``{"open": true}`` or
  ``{"error": text, "status"?}``
* ``{"op": "ws_send", "name", "msg"}`` -> ``{"sent": true}``
* ``{"op": "ws_recv", "name", "timeout"}`` -> ``{"msg", "t"}`` (``t``:
  ``time.monotonic()`` at receipt) or ``{"timeout": true}``
* ``{"op": "quit"}``.

The test side is ``ApiAgent`` in tests/support_api.py.
"""

import json
import sys
import time

import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet import defer, reactor, stdio
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool


class Client(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self.factory.inbox.append((json.loads(payload), time.monotonic()))
        waiters, self.factory.waiters = self.factory.waiters, []
        for d in waiters:
            if not d.called:
                d.callback(None)

    def onClose(self, wasClean, code, reason):
        self.factory.closed = (code, reason)
        if not self.factory.opened.called:
            self.factory.opened.errback(Exception(f"closed: {code} {reason}"))
        waiters, self.factory.waiters = self.factory.waiters, []
        for d in waiters:
            if not d.called:
                d.callback(None)


class Agent(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024 * 1024

    def __init__(self, base):
        self.base = base
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.sockets = {}
        self.queue = defer.DeferredLock()

    def lineReceived(self, line):
        cmd = json.loads(line)
        self.queue.run(self.run, cmd).addBoth(self.reply)

    def reply(self, answer):
        if isinstance(answer, Failure):
            answer = {"error": str(answer.value)}
        elif not isinstance(answer, dict):
            answer = {"error": repr(answer)}
        self.transport.write(json.dumps(answer).encode() + b"\n")

    @defer.inlineCallbacks
    def run(self, cmd):
        op = cmd["op"]
        try:
            if op == "http":
                return (yield self.http(cmd))
            if op == "ws_open":
                return (yield self.ws_open(cmd))
            if op == "ws_send":
                self.sockets[cmd["name"]].protocol.sendMessage(json.dumps(cmd["msg"]).encode())
                return {"sent": True}
            if op == "ws_recv":
                return (yield self.ws_recv(cmd))
            if op == "quit":
                reactor.callLater(0, reactor.stop)
                return {"bye": True}
        except Exception as e:
            return {"error": f"{e.__class__.__name__}: {e}"}
        return {"error": f"unknown op {op}"}

    @defer.inlineCallbacks
    def http(self, cmd):
        body = cmd.get("body")
        data = json.dumps(body).encode() if body is not None else None
        response = yield treq.request(cmd["method"], self.base + cmd["path"], data=data,
                                      headers=cmd.get("headers") or {}, pool=self.pool, timeout=30)
        text = yield response.text("utf-8")
        try:
            content = json.loads(text)
        except ValueError:
            content = text
        headers = {k.decode().lower(): b", ".join(v).decode() for k, v in response.headers.getAllRawHeaders()}
        return {"status": response.code, "headers": headers, "body": content}

    def ws_open(self, cmd):
        url = self.base.replace("http", "ws", 1) + "/api/v1/ws"
        factory = WebSocketClientFactory(url, headers=cmd.get("headers") or {})
        factory.protocol = Client
        factory.inbox = []
        factory.waiters = []
        factory.closed = None
        factory.opened = defer.Deferred()
        self.sockets[cmd["name"]] = factory
        connectWS(factory, timeout=10)

        def opened(proto):
            factory.protocol = proto
            return {"open": True}

        return factory.opened.addCallbacks(opened, lambda f: {"error": str(f.value)})

    @defer.inlineCallbacks
    def ws_recv(self, cmd):
        factory = self.sockets[cmd["name"]]
        deadline = time.monotonic() + cmd.get("timeout", 10)
        while not factory.inbox:
            if factory.closed is not None:
                return {"closed": list(factory.closed)}
            left = deadline - time.monotonic()
            if left <= 0:
                return {"timeout": True}
            d = defer.Deferred()
            factory.waiters.append(d)
            d.addTimeout(left, reactor).addErrback(lambda _: None)
            yield d
        msg, t = factory.inbox.pop(0)
        return {"msg": msg, "t": t}


def main():
    stdio.StandardIO(Agent(sys.argv[1]))
    reactor.run()


if __name__ == "__main__":
    main()

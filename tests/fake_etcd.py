"""A fake of etcd's v3 JSON gateway (the calls membership makes), as a
twisted.web resource for unit tests on loopback: keys with leases,
the create_revision == 0 transaction, streaming watches, compaction, and
ways to misbehave (``stall``: never answer; ``huge``: an over-long answer;
``down``: HTTP 503)."""

import base64
import json

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site


def b64(data):
    return base64.b64encode(data if isinstance(data, bytes) else data.encode()).decode()


def unb64(text):
    return base64.b64decode(text or "")


class FakeEtcd(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.revision = 1
        self.kv = {}  # key bytes -> (value bytes, lease str or "0", create_revision)
        self.leases = {}  # id str -> ttl
        self.next_lease = 100
        self.watches = []  # (request, key, end)
        self.calls = []  # paths, in order
        self.stall = set()  # paths never answered
        self.huge = set()  # paths answered with more than a MiB
        self.down = False
        self.compacted = 0  # watches from a revision <= this are cancelled

    def header(self):
        return {"cluster_id": "1", "member_id": "1", "revision": str(self.revision), "raft_term": "2"}

    def render_POST(self, request):
        path = request.path.decode()
        self.calls.append(path)
        body = json.loads(request.content.read() or b"{}")
        if path in self.stall:
            return NOT_DONE_YET
        if self.down:
            request.setResponseCode(503)
            return json.dumps({"error": "unavailable", "message": "etcdserver: unavailable", "code": 14}).encode()
        if path in self.huge:
            return b'{"header": {"x": "' + b"x" * (1100 * 1024) + b'"}}\n'
        handler = getattr(self, path.strip("/").replace("/", "_"), None)
        if handler is None:
            request.setResponseCode(404)
            return b'{"error": "no such path", "code": 5}'
        answer = handler(body, request)
        if answer is NOT_DONE_YET:
            return answer
        return json.dumps(answer).encode() + b"\n"

    # -- kv ---------------------------------------------------------------

    def _in(self, body):
        key = unb64(body["key"])
        end = unb64(body.get("range_end"))
        return lambda k: k == key if not end else key <= k < end

    def v3_kv_range(self, body, _request):
        match = self._in(body)
        keys = sorted(k for k in self.kv if match(k))
        answer = {"header": self.header(), "count": str(len(keys))}
        if body.get("count_only"):
            return answer
        limit = int(body.get("limit") or 0)
        shown = keys[:limit] if limit else keys
        if shown:
            answer["kvs"] = [self._kv(k) for k in shown]
        return answer

    def _kv(self, key):
        value, lease, created = self.kv[key]
        return {"key": b64(key), "value": b64(value), "lease": lease, "create_revision": str(created),
                "mod_revision": str(self.revision), "version": "1"}

    def put(self, key, value, lease="0"):
        key = key if isinstance(key, bytes) else key.encode()
        value = value if isinstance(value, bytes) else value.encode()
        self.revision += 1
        created = self.kv[key][2] if key in self.kv else self.revision
        self.kv[key] = (value, lease, created)
        self._notify({"kv": self._kv(key)})

    def delete(self, key):
        key = key if isinstance(key, bytes) else key.encode()
        if key in self.kv:
            self.revision += 1
            del self.kv[key]
            self._notify({"type": "DELETE", "kv": {"key": b64(key), "mod_revision": str(self.revision)}})

    def v3_kv_txn(self, body, _request):
        ok = True
        for compare in body.get("compare", ()):
            key = unb64(compare["key"])
            if compare["target"] == "CREATE":
                ok = ok and (self.kv[key][2] if key in self.kv else 0) == int(compare["create_revision"])
            elif compare["target"] == "LEASE":
                ok = ok and key in self.kv and self.kv[key][1] == compare["lease"]
        responses = []
        for op in body.get("success" if ok else "failure", ()):
            if "request_put" in op:
                put = op["request_put"]
                self.put(unb64(put["key"]), unb64(put["value"]), put.get("lease", "0"))
                responses.append({"response_put": {"header": self.header()}})
            elif "request_range" in op:
                responses.append({"response_range": self.v3_kv_range(op["request_range"], None)})
        answer = {"header": self.header(), "responses": responses}
        if ok:
            answer["succeeded"] = True
        return answer

    # -- leases -----------------------------------------------------------

    def v3_lease_grant(self, body, _request):
        self.next_lease += 1
        lease = str(self.next_lease)
        self.leases[lease] = int(body["TTL"])
        return {"header": self.header(), "ID": lease, "TTL": str(body["TTL"])}

    def v3_lease_keepalive(self, body, _request):
        result = {"header": self.header(), "ID": body["ID"]}
        if body["ID"] in self.leases:
            result["TTL"] = str(self.leases[body["ID"]])
        return {"result": result}

    def expire(self, lease):
        """The lease ends (its TTL passed, or a revoke): its keys go."""
        self.leases.pop(lease, None)
        for key in [k for k, (_, owner, _) in self.kv.items() if owner == lease]:
            self.delete(key)

    def v3_lease_revoke(self, body, request):
        if body["ID"] not in self.leases:
            request.setResponseCode(404)
            return {"error": "etcdserver: requested lease not found", "code": 5}
        self.expire(body["ID"])
        return {"header": self.header()}

    # -- watch ------------------------------------------------------------

    def v3_watch(self, body, request):
        create = body["create_request"]
        start = int(create.get("start_revision") or 0)
        request.setHeader(b"content-type", b"application/json")
        if start and start <= self.compacted:
            request.write(json.dumps({"result": {"header": self.header(), "created": True}}).encode() + b"\n")
            request.write(json.dumps({"result": {"header": self.header(), "canceled": True,
                                                 "compact_revision": str(self.compacted)}}).encode() + b"\n")
            request.finish()
            return NOT_DONE_YET
        watch = (request, self._in(create))
        self.watches.append(watch)
        request.notifyFinish().addBoth(lambda _: watch in self.watches and self.watches.remove(watch))
        request.write(json.dumps({"result": {"header": self.header(), "created": True}}).encode() + b"\n")
        return NOT_DONE_YET

    def _notify(self, event):
        key = unb64(event["kv"]["key"])
        for request, match in list(self.watches):
            if match(key):
                request.write(json.dumps({"result": {"header": self.header(), "events": [event]}}).encode()
                              + b"\n")

    def end_watches(self):
        for request, _ in list(self.watches):
            request.finish()

    def compact(self):
        """Compact at the current revision; open watches are cancelled."""
        self.compacted = self.revision
        for request, _ in list(self.watches):
            request.write(json.dumps({"result": {"header": self.header(), "canceled": True,
                                                 "compact_revision": str(self.compacted)}}).encode() + b"\n")
            request.finish()


def serve(reactor):
    """(FakeEtcd, listening port) on 127.0.0.1."""
    fake = FakeEtcd()
    site = Site(fake)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    return fake, port

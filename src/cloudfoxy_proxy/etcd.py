"""A small client of etcd's v3 JSON gateway (``/v3/...`` over HTTP, keys
and values base64), with treq: what membership needs and nothing more
(docs/tcp.md, "Membership: SIGHUP and etcd").

Every call is bounded: its whole time (connect, request, body) by
``timeout`` seconds on the given clock, its answer by ``max_body`` bytes.
A watch (a streaming ``POST /v3/watch``) is bounded per message
(``max_body`` bytes each) and has no end of its own: the caller stops it.

Errors are :class:`EtcdError` (one line, for a log), whatever went wrong:
etcd unreachable, a timeout, an HTTP error, an ``{"error": ...}`` answer,
an over-long or malformed answer.
"""

import base64
import json

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure


def _body_ended(reason):
    """True when a response body ended as HTTP says it may (twisted.web.client,
    imported here, at the first etcd call: a proxy without etcd never loads it,
    and the ``systemd:`` endpoint needs twisted.internet.endpoints unimported
    at start, ops.name_inherited_sockets)."""
    from twisted.web.client import PotentialDataLoss, ResponseDone

    return reason.check(ResponseDone, PotentialDataLoss) is not None


#: Bytes of one answer (or of one watch message) read at most.
MAX_BODY = 1024 * 1024


class EtcdError(Exception):
    """A call to etcd failed; ``str()`` is one line."""


def b64(text):
    """``text`` (str or bytes) as etcd's JSON gateway carries keys and values."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    return base64.b64encode(text).decode("ascii")


def unb64(text):
    """The bytes of a base64 key or value of an answer (b"" for none)."""
    try:
        return base64.b64decode(text or "", validate=True)
    except (ValueError, TypeError):
        raise EtcdError("etcd answered a key or value that is not base64") from None


def range_end(prefix):
    """The ``range_end`` that makes a range or watch of ``prefix`` (bytes)
    cover every key starting with it."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


class _Body(Protocol):
    """Reads a response body as newline-separated JSON messages (the gateway
    ends each streamed message with a newline; a unary answer is one
    message), each at most ``limit`` bytes, handing each to ``each``.
    ``finished`` fires with None at the end of the body, or fails."""

    def __init__(self, limit, each):
        self.limit = limit
        self.each = each
        self.buffer = b""
        self.finished = Deferred()
        self.failed = None

    def dataReceived(self, data):
        if self.failed is not None:
            return
        self.buffer += data
        while self.failed is None:
            line, nl, rest = self.buffer.partition(b"\n")
            if not nl:
                break
            self.buffer = rest
            if line.strip():
                self._message(line)
        if self.failed is None and len(self.buffer) > self.limit:
            self.abort(EtcdError(f"etcd sent an answer of more than {self.limit} bytes"))

    def _message(self, line):
        if len(line) > self.limit:
            self.abort(EtcdError(f"etcd sent an answer of more than {self.limit} bytes"))
            return
        try:
            message = json.loads(line)
        except ValueError:
            self.abort(EtcdError("etcd sent an answer that is not JSON"))
            return
        if not isinstance(message, dict):
            self.abort(EtcdError("etcd sent an answer that is not a JSON object"))
            return
        try:
            self.each(message)
        except EtcdError as e:
            self.abort(e)

    def abort(self, error):
        """Stop reading: the connection is closed and ``finished`` fails with ``error``."""
        if self.failed is None:
            self.failed = error
            if self.transport is not None:
                self.transport.loseConnection()

    def connectionLost(self, reason):
        if self.buffer.strip() and self.failed is None:
            self._message(self.buffer)
        self.buffer = b""
        if self.failed is not None:
            self.finished.errback(self.failed)
        elif _body_ended(reason):
            self.finished.callback(None)
        else:
            self.finished.errback(EtcdError(f"etcd's answer broke off ({reason.getErrorMessage()})"))


def _checked(message):
    """An answer's message: ``{"error": ...}`` (unary) and ``{"error": ...}``
    inside a stream's message are errors."""
    error = message.get("error")
    if error is not None:
        if isinstance(error, dict):  # a streamed error: {"error": {"grpc_code":, "message":}}
            error = error.get("message") or error
        raise EtcdError(f"etcd answered: {str(error)[:200]}")
    return message


class EtcdClient:
    """POSTs to one etcd's JSON gateway at ``base`` (``http://HOST:PORT``).

    ``clock``: an IReactorTime; ``http``: a treq HTTPClient (default: one on
    ``reactor`` with a connection pool of its own); ``timeout``: seconds
    for a whole call; ``max_body``: bytes of an answer (of a watch
    message)."""

    def __init__(self, reactor, base, timeout=5.0, max_body=MAX_BODY, http=None):
        self.clock = reactor
        self.base = base.rstrip("/")
        self.timeout = timeout
        self.max_body = max_body
        self.pool = None
        if http is None:
            from treq.client import HTTPClient
            from twisted.web.client import Agent, HTTPConnectionPool

            self.pool = HTTPConnectionPool(reactor, persistent=True)
            self.pool.maxPersistentPerHost = 4
            self.pool.cachedConnectionTimeout = 30
            http = HTTPClient(Agent(reactor, connectTimeout=timeout, pool=self.pool))
        self.http = http

    def close(self):
        """Close idle pooled connections (a Deferred)."""
        if self.pool is not None:
            return self.pool.closeCachedConnections()
        return None

    def call(self, path, body):
        """``POST {base}{path}`` with the JSON ``body``; a Deferred for the
        answer (a dict), or failing with EtcdError."""
        messages = []

        def each(message):
            if messages:
                raise EtcdError("etcd sent more than one answer")
            messages.append(_checked(message))

        d = self._post(path, body, each)
        d.addCallback(lambda _: messages[0] if messages else self._fail("etcd sent an empty answer"))
        d.addTimeout(self.timeout, self.clock, onTimeoutCancel=lambda _result, _t: self._late(path))
        d.addErrback(self._error, path)
        return d

    def _late(self, path):
        return Failure(EtcdError(f"etcd at {self.base} did not answer {path} within {self.timeout:g} s"))

    def stream(self, path, body, each):
        """``POST {base}{path}`` and ``each(result)`` for every streamed
        message's ``result`` (a dict) as it comes; ``each`` may raise
        EtcdError to end the stream.  A Deferred that fires with None when
        the stream ends, or fails with EtcdError (also when etcd does not
        answer the request within ``timeout``); cancelling it stops the
        stream (the connection is closed)."""
        holder = {}

        def one(message):
            result = _checked(message).get("result")
            if not isinstance(result, dict):
                raise EtcdError("etcd sent a stream message without a result")
            each(result)

        def cancel(_d):
            reader = holder.get("body")
            if reader is not None:
                reader.abort(EtcdError("stopped"))
            else:
                request.cancel()

        done = Deferred(cancel)
        request = self._post(path, body, one, holder=holder)
        def late():
            if "body" not in holder:
                holder["late"] = True
                request.cancel()

        timer = self.clock.callLater(self.timeout, late)

        def end(result):
            if timer.active():
                timer.cancel()
            if holder.get("late"):
                result = self._late(path)
            if isinstance(result, Failure):
                if not done.called:
                    done.errback(self._as_error(result, path))
            elif not done.called:
                done.callback(None)

        request.addBoth(end)
        return done

    def _post(self, path, body, each, holder=None):
        data = json.dumps(body).encode("utf-8")
        d = self.http.post(self.base + path, data=data, unbuffered=True,
                           headers={b"Content-Type": [b"application/json"]})

        def got(response):
            reader = _Body(self.max_body, each)
            if response.code != 200:
                # an error's body is one JSON message, read for its text
                errors = []
                reader.each = lambda m: errors.append(m)
                response.deliverBody(reader)
                return reader.finished.addBoth(lambda _: self._fail(
                    f"etcd answered HTTP {response.code}"
                    + (f": {str(errors[0].get('message') or errors[0].get('error'))[:200]}"
                       if errors else "")))
            if holder is not None:
                holder["body"] = reader
            response.deliverBody(reader)
            return reader.finished

        return d.addCallback(got)

    @staticmethod
    def _fail(message):
        raise EtcdError(message)

    def _as_error(self, failure, path):
        if failure.check(EtcdError):
            return failure.value
        if failure.check(TimeoutError, CancelledError):
            return EtcdError(f"etcd at {self.base} did not answer {path} within {self.timeout:g} s")
        reasons = getattr(failure.value, "reasons", None)  # twisted.web's ResponseFailed and kin
        if reasons:
            failure = reasons[0]
        why = failure.getErrorMessage() or failure.type.__name__
        return EtcdError(f"etcd at {self.base} unreachable ({why[:200]})")

    def _error(self, failure, path):
        raise self._as_error(failure, path)

    # -- the calls membership makes ----------------------------------------

    def range_prefix(self, prefix, limit):
        """Every key under ``prefix`` (bytes), at most ``limit``: a Deferred
        for ``(revision, [(key bytes, value bytes)], count)``."""
        d = self.call("/v3/kv/range", {"key": b64(prefix), "range_end": b64(range_end(prefix)),
                                       "limit": str(limit)})

        def parse(answer):
            revision = _int(answer.get("header", {}).get("revision"))
            kvs = [(unb64(kv.get("key")), unb64(kv.get("value"))) for kv in answer.get("kvs") or ()
                   if isinstance(kv, dict)]
            return revision, kvs[:limit], _int(answer.get("count"))

        return d.addCallback(parse)

    def grant(self, ttl):
        """A new lease of ``ttl`` seconds: a Deferred for its id (str)."""
        def parse(answer):
            lease = answer.get("ID")
            if not lease or not str(lease).isdigit():
                raise EtcdError("etcd granted no lease")
            return str(lease)

        return self.call("/v3/lease/grant", {"TTL": str(int(ttl))}).addCallback(parse)

    def keepalive(self, lease):
        """Refresh ``lease``: a Deferred for its TTL now (0: the lease is gone)."""
        return self.call("/v3/lease/keepalive", {"ID": lease}).addCallback(
            lambda answer: _int((answer.get("result") or {}).get("TTL")))

    def revoke(self, lease):
        """End ``lease`` (its keys go at once)."""
        return self.call("/v3/lease/revoke", {"ID": lease})

    def claim(self, key, value, lease):
        """Put ``key`` = ``value`` under ``lease`` only if ``key`` does not
        exist (create_revision == 0), or already belongs to ``lease``: a
        Deferred for ``(True, None)`` or ``(False, holder)``: the value
        (bytes) of the key another lease holds."""
        k = b64(key)
        put = {"request_put": {"key": k, "value": b64(value), "lease": lease}}
        body = {"compare": [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
                "success": [put], "failure": [{"request_range": {"key": k}}]}

        def parse(answer):
            if answer.get("succeeded"):
                return True, None
            for response in answer.get("responses") or ():
                for kv in (response.get("response_range") or {}).get("kvs") or ():
                    if str(kv.get("lease")) == str(lease):
                        return self._refresh(key, value, lease)
                    return False, unb64(kv.get("value"))
            return self.claim(key, value, lease)  # gone meanwhile: try again

        return self.call("/v3/kv/txn", body).addCallback(parse)

    def _refresh(self, key, value, lease):
        """The key is already ours: put the value again (it may have changed)."""
        k = b64(key)
        body = {"compare": [{"key": k, "target": "LEASE", "result": "EQUAL", "lease": lease}],
                "success": [{"request_put": {"key": k, "value": b64(value), "lease": lease}}]}
        return self.call("/v3/kv/txn", body).addCallback(lambda a: (bool(a.get("succeeded")), None))


def _int(value):
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        raise EtcdError(f"etcd answered {str(value)[:40]!r} for a number") from None

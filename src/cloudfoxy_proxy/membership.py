"""Upstreams that come and go at run time (docs/tcp.md, "Membership:
SIGHUP and etcd").

* :class:`UpstreamSet` — the backends whose set can change: each is kept
  for the sources that want it (the ``--config`` file's ``backend`` list,
  an ``etcd://`` watch); one no source wants any more is dropped from the
  registry (``ReaderRegistry.drop``) and stopped; one whose URL is
  unchanged is never touched (its connections, queues and sessions stay).
* :class:`ConfigReload` — SIGHUP: the ``--config`` file's ``backend`` list
  read again; a bad file keeps the running set (one log line).
* :class:`EtcdWatch` — ``--backend etcd://HOST:PORT/PREFIX`` (a front):
  one ``tcp://`` upstream per key ``PREFIX/owners/<owner id>``.
* :class:`EtcdRegistration` — ``--register etcd://HOST:PORT/PREFIX`` (an
  owner): its key under a lease, claimed with a transaction.

etcd is spoken to through its v3 JSON gateway (``etcd.py``, treq).
"""

import json
import os
import re
import socket
import sys
from urllib.parse import urlencode, urlsplit

from twisted.application.service import Service
from twisted.internet.task import LoopingCall

from .backends import BackendSettings, float_param, int_param, query
from .etcd import EtcdClient, EtcdError, b64 as _b64, range_end as _end, unb64
from .logs import Logger
from .owners import is_owner_id

#: Owners a front takes from etcd unless ``max_members=`` says otherwise.
MAX_MEMBERS = 256
#: Seconds between liveness checks of etcd while a watch is open.
CHECK_EVERY = 5.0
#: Back-off after a failed etcd call: from RETRY_MIN doubling to RETRY_MAX seconds.
RETRY_MIN = 0.5
RETRY_MAX = 30.0
#: At most one "etcd is unreachable" line per this many seconds.
DOWN_LOG_EVERY = 60.0
#: Seconds a call to etcd may take, whole.
ETCD_TIMEOUT = 5.0
#: The lease TTL of a registration unless ``ttl=`` says otherwise (seconds);
#: it is kept alive every third of it.
DEFAULT_TTL = 10
#: ``tcp://`` parameters an ``etcd://`` watch URL passes to every owner's URL.
PASSED_ON = ("password_file", "connections", "refresh", "readers_max", "heartbeat",
             "heartbeat_timeout", "keepalive_idle", "keepalive_interval", "keepalive_count")

log = Logger()


def is_etcd(url):
    return url.lower().startswith("etcd://")


class EtcdSource:
    """An ``etcd://HOST:PORT/PREFIX?PARAMS`` URL: ``base`` (the gateway's
    ``http://HOST:PORT``), ``prefix`` (str, no trailing ``/``), ``owners``
    (the key prefix ``PREFIX/owners/``, bytes) and its parameters."""

    def __init__(self, url, allowed):
        parts = urlsplit(url)
        self.url = url
        params = query(url, allowed)
        if parts.scheme.lower() != "etcd":  # never read https:// as plain HTTP
            raise ValueError("expected etcd://HOST:PORT/PREFIX (etcd's JSON gateway in clear: no https://)")
        if parts.username is not None or parts.password is not None:
            raise ValueError("credentials in the URL are not allowed")
        try:
            host, port = parts.hostname, parts.port
        except ValueError as e:
            raise ValueError(f"bad port: {e}") from None
        if not host or port is None:
            raise ValueError("expected etcd://HOST:PORT/PREFIX")
        prefix = parts.path.strip("/")
        if not prefix or not re.fullmatch(r"[A-Za-z0-9._/-]{1,200}", prefix) or "//" in prefix:
            raise ValueError("expected etcd://HOST:PORT/PREFIX, PREFIX of letters, digits and . _ - /")
        self.base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        self.prefix = prefix
        self.owners = f"{prefix}/owners/".encode("utf-8")
        self.params = params
        self.where = f"etcd://{self.base[7:]}/{prefix}"

    def key(self, owner_id):
        return self.owners + owner_id.encode("ascii")


def watch_source(url):
    """The EtcdSource of a ``--backend etcd://...`` URL (ValueError for the user)."""
    source = EtcdSource(url, set(PASSED_ON) | {"max_members"})
    source.max_members = int_param(source.params, "max_members", MAX_MEMBERS, 1, 10000)
    source.passed = {k: v for k, v in source.params.items() if k in PASSED_ON}
    return source


def register_source(url):
    """The EtcdSource of ``--register etcd://...?advertise=tcp://HOST:PORT&ttl=S``."""
    source = EtcdSource(url, {"advertise", "ttl"})
    source.ttl = int(float_param(source.params, "ttl", DEFAULT_TTL, 2, 3600))
    advertise = source.params.get("advertise")
    if advertise is not None:
        advertise = owner_url(advertise)
        if advertise is None:
            raise ValueError(f"advertise={source.params['advertise']!r}: expected tcp://HOST:PORT")
    source.advertise = advertise
    return source


def owner_url(text):
    """``text`` if it is exactly ``tcp://HOST:PORT`` (no path, query or
    credentials: a registered value may not set a front's options), else None."""
    if not isinstance(text, str) or len(text) > 300:
        return None
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    if (parts.scheme != "tcp" or not parts.hostname or port is None or not 0 < port < 65536
            or parts.path not in ("", "/") or parts.query or parts.fragment
            or parts.username is not None or parts.password is not None
            or not re.fullmatch(r"[A-Za-z0-9.:\[\]-]+", parts.netloc)):
        return None
    return f"tcp://{parts.netloc}"


class UpstreamSet:
    """The backends that can come and go, each with the sources that want
    it.  ``top``: the service tree's top (ops.ProxyService), where their
    BackendServices live; ``core``: its frontends.base.Core (``backends``
    is kept in step); ``settings``: the BackendSettings new URLs are built
    with."""

    log = Logger()

    def __init__(self, top, core, settings=BackendSettings()):
        self.top = top
        self.core = core
        self.settings = settings
        self.members = {}  # url -> _Member

    def adopt(self, url, backend, service, source):
        """A backend built at start-up (tap.py), wanted by ``source``."""
        self.members[url] = _Member(backend, service, {source})

    def urls(self, source):
        return [url for url, m in self.members.items() if source in m.sources]

    def check(self, url):
        """``make(reactor)`` of ``url``, or ValueError for a log line."""
        from . import backends

        return backends.from_url(url, self.settings)

    def set_source(self, source, urls):
        """``source`` now wants exactly ``urls`` (each valid: see ``check``):
        new ones are started, those no source wants any more dropped, the
        rest untouched.  Returns (added, dropped) URL lists."""
        urls = list(dict.fromkeys(urls))
        added, dropped = [], []
        for url, member in list(self.members.items()):
            if source in member.sources and url not in urls:
                member.sources.discard(source)
                if not member.sources:
                    self._drop(url)
                    dropped.append(url)
        for url in urls:
            member = self.members.get(url)
            if member is not None:
                member.sources.add(source)
                continue
            try:
                make = self.check(url)
            except ValueError as e:
                self.log.warn("upstream {url}: {error}; not added", url=url, error=e)
                continue
            if self._add(url, make, source):
                added.append(url)
        return added, dropped

    def _add(self, url, make, source):
        from .backends.service import BackendService

        backend = make(self.core.reactor)
        service = BackendService(backend, self.core.registry)
        self.members[url] = _Member(backend, service, {source})
        self.core.backends.append(backend)
        metrics = self._metrics()
        if metrics is not None:
            metrics.backend_added(backend)  # /metrics and the status page
        self.log.info("upstream {url} added ({source})", url=url, source=source)
        try:
            service.setServiceParent(self.top)  # starts it when the proxy runs
        except SystemExit:  # a configuration error it wrote on stderr: not this process's end
            self._drop(url)
            return False
        return True

    def _metrics(self):
        dispatcher = getattr(self.core, "dispatcher", None)
        return getattr(dispatcher, "metrics", None)

    def _drop(self, url):
        member = self.members.pop(url)
        self.core.registry.drop(member.backend)
        if member.backend in self.core.backends:
            self.core.backends.remove(member.backend)
        metrics = self._metrics()
        if metrics is not None:
            metrics.backend_dropped(member.backend)
        self.log.info("upstream {url} dropped", url=url)
        if member.service.parent is not None:
            d = member.service.disownServiceParent()  # stops the backend: its calls in flight C086
            if d is not None:
                d.addErrback(lambda f: self.log.failure("stopping upstream {url} failed", f, url=url))


class _Member:
    __slots__ = ("backend", "service", "sources")

    def __init__(self, backend, service, sources):
        self.backend = backend
        self.service = service
        self.sources = sources


CONFIG = "config"


class ConfigReload:
    """SIGHUP: read the ``--config`` file at ``path`` again and make the
    UpstreamSet's ``config`` source its ``backend`` list (``etcd://`` URLs
    excepted: watches are set at start-up).  A file that does not parse,
    has an unknown key or a bad value, or a backend URL that is not valid
    changes nothing: one warning line says why.  When the command line
    gave ``--backend`` (``given``), the file's list is not used."""

    log = Logger()

    def __init__(self, path, upstreams, given=()):
        self.path = path
        self.upstreams = upstreams
        self.given = set(given)

    def reload(self):
        from twisted.python import usage

        from . import config_file
        from .tap import Options

        if "backend" in self.given:
            self.log.info("SIGHUP: the backends come from the command line (--backend); "
                          "{path} is not read for them", path=self.path)
            return
        options = Options()
        try:
            config_file.apply(options, self.path, set())
            urls = [u for u in options["backend"] if not is_etcd(u)]
            for url in urls:
                try:
                    self.upstreams.check(url)
                except ValueError as e:
                    raise usage.UsageError(f"backend {url!r}: {e}") from None
        except usage.UsageError as e:
            self.log.warn("SIGHUP: {path} not used, the backends stay as they are: {error}",
                          path=self.path, error=e)
            return
        if not urls and not any(is_etcd(u) for u in options["backend"]):
            from .tap import DEFAULT_BACKEND

            urls = [DEFAULT_BACKEND]
        added, dropped = self.upstreams.set_source(CONFIG, urls)
        self.log.info("SIGHUP: backends from {path}: {added} added, {dropped} dropped, {kept} kept",
                      path=self.path, added=len(added), dropped=len(dropped),
                      kept=len(self.upstreams.urls(CONFIG)) - len(added))


class _Relist(EtcdError):
    """The watch was cancelled (compacted): list again now, no back-off."""


class _Backoff:
    """Delays after failures: RETRY_MIN doubling up to RETRY_MAX; ``reset`` on success."""

    def __init__(self):
        self.failures = 0

    def next(self):
        self.failures += 1
        return min(RETRY_MAX, RETRY_MIN * 2 ** min(self.failures - 1, 16))

    def reset(self):
        self.failures = 0


class _DownLog:
    """"etcd is unreachable" at most once a DOWN_LOG_EVERY seconds, and
    "reachable again" once when it is."""

    def __init__(self, clock, what, then):
        self.clock = clock
        self.what = what
        self.then = then
        self.down_since = None
        self._next = 0.0
        self._quiet = 0

    def failed(self, error):
        now = self.clock.seconds()
        if self.down_since is None:
            self.down_since = now
        if now < self._next:
            self._quiet += 1
            return
        more = f" ({self._quiet} more failures since the last line)" if self._quiet else ""
        self._quiet = 0
        self._next = now + DOWN_LOG_EVERY
        log.warn("{what}: {error}; {then}{more}", what=self.what, error=error,
                 then=self.then, more=more)

    def ok(self):
        if self.down_since is not None:
            log.info("{what}: etcd answers again (after {s:.0f} s)", what=self.what,
                     s=self.clock.seconds() - self.down_since)
        self.down_since = None
        self._next = 0.0
        self._quiet = 0


class EtcdWatch(Service):
    """A front's ``--backend etcd://HOST:PORT/PREFIX``: keeps one
    ``tcp://`` upstream per key ``PREFIX/owners/<owner id>`` whose JSON
    value is ``{"id": "<owner id>", "url": "tcp://HOST:PORT"}``.

    Lists the prefix (at most ``max_members`` + 1 keys), then watches it
    from the next revision.  A compacted or cancelled watch lists again;
    a failed call, an ended stream or a failed liveness check (every
    CHECK_EVERY seconds while watching) tries again after a back-off,
    the current owners staying meanwhile.  More owners than
    ``max_members``: the first ones by key are kept, one log line."""

    def __init__(self, source, upstreams, clock, client=None):
        self.source = source
        self.upstreams = upstreams
        self.clock = clock
        self.client = client or EtcdClient(clock, source.base, ETCD_TIMEOUT)
        self.name = source.where
        self.owners = {}  # owner id -> url
        self._retry = None
        self._watch = None
        self._check = None
        self._backoff = _Backoff()
        self._down = _DownLog(clock, f"owners from {source.where}", "the current owners stay; trying again")
        self._over = None  # the owner count last logged as over max_members
        self._bad_next = 0.0

    def startService(self):
        Service.startService(self)
        self._list()

    def stopService(self):
        Service.stopService(self)
        for call in (self._retry,):
            if call is not None and call.active():
                call.cancel()
        self._retry = None
        self._stop_watch()
        return self.client.close()

    # -- list, then watch -------------------------------------------------

    def _list(self):
        self._retry = None
        if not self.running:
            return
        d = self.client.range_prefix(self.source.owners, self.source.max_members + 1)
        d.addCallbacks(self._listed, self._failed)
        d.addErrback(lambda f: log.failure("etcd watch of {where}", f, where=self.name))

    def _listed(self, answer):
        revision, kvs, count = answer
        if not self.running:
            return
        self._down.ok()
        owners = {}
        for key, value in kvs:
            found = self._owner(key, value)
            if found is not None:
                owners[found[0]] = found[1]
        self.owners = self._capped(owners, count)
        self._apply()
        self._start_watch(revision + 1)

    def _start_watch(self, revision):
        body = {"create_request": {"key": _b64(self.source.owners),
                                   "range_end": _b64(_end(self.source.owners)),
                                   "start_revision": str(revision)}}
        self._watch = self.client.stream("/v3/watch", body, self._event)
        self._watch.addCallbacks(self._ended, self._failed)
        self._watch.addErrback(lambda f: log.failure("etcd watch of {where}", f, where=self.name))
        self._check = LoopingCall(self._alive)
        self._check.clock = self.clock
        self._check.start(CHECK_EVERY, now=False)

    def _stop_watch(self):
        check, self._check = self._check, None
        if check is not None and check.running:
            check.stop()
        watch, self._watch = self._watch, None
        if watch is not None and not watch.called:
            watch.cancel()

    def _alive(self):
        """A cheap call while watching: a silent etcd (or a silently lost
        connection) ends the watch, and we list again after a back-off."""
        watch = self._watch

        def dead(failure):
            if self._watch is watch and watch is not None and not watch.called:
                self._down.failed(failure.getErrorMessage())
                watch.cancel()
        self.client.call("/v3/kv/range", {"key": _b64(self.source.owners), "range_end": _b64(
            _end(self.source.owners)), "count_only": True}).addErrback(dead)

    def _event(self, result):
        if result.get("compact_revision") not in (None, "0", 0) or result.get("canceled"):
            raise _Relist(f"the watch was cancelled (compacted at revision "
                          f"{result.get('compact_revision')}); listing again")
        if result.get("created"):
            self._backoff.reset()
        changed = False
        for event in result.get("events") or ():
            kv = event.get("kv") or {}
            key = unb64(kv.get("key"))
            owner = key[len(self.source.owners):].decode("utf-8", "replace")
            if event.get("type") == "DELETE":
                if self.owners.pop(owner, None) is not None:
                    changed = True
                continue
            found = self._owner(key, unb64(kv.get("value")))
            if found is None:
                changed = self.owners.pop(owner, None) is not None or changed
                continue
            if found[0] not in self.owners and len(self.owners) >= self.source.max_members:
                self._capped(dict(self.owners, **{found[0]: found[1]}), len(self.owners) + 1)
                continue
            if self.owners.get(found[0]) != found[1]:
                self.owners[found[0]] = found[1]
                changed = True
        if changed:
            self._apply()

    def _ended(self, _):
        self._restart("the watch stream ended")

    def _failed(self, failure):
        self._restart(failure.getErrorMessage(), relist=failure.check(_Relist) is not None)

    def _restart(self, why, relist=False):
        self._stop_watch()
        if not self.running:
            return
        if relist:
            delay = RETRY_MIN
            log.info("{where}: {why}", where=self.name, why=why)
        else:
            self._down.failed(why)
            delay = self._backoff.next()
        if self._retry is None or not self._retry.active():
            self._retry = self.clock.callLater(delay, self._list)

    # -- owners -----------------------------------------------------------

    def _owner(self, key, value):
        """(owner id, upstream URL) of one key, or None (logged, at most once
        every DOWN_LOG_EVERY seconds)."""
        owner = key[len(self.source.owners):].decode("utf-8", "replace")
        try:
            data = json.loads(value)
        except ValueError:
            data = None
        url = owner_url(data.get("url")) if isinstance(data, dict) else None
        if (not is_owner_id(owner) or not isinstance(data, dict) or data.get("id") != owner
                or url is None):
            now = self.clock.seconds()
            if now >= self._bad_next:
                self._bad_next = now + DOWN_LOG_EVERY
                log.warn("{where}: ignored key {key!r}: expected the value "
                         '{{"id": "<owner id>", "url": "tcp://HOST:PORT"}} with the key\'s id',
                         where=self.name, key=key[:200].decode("utf-8", "replace"))
            return None
        if self.source.passed:
            url += "?" + urlencode(sorted(self.source.passed.items()))
        return owner, url

    def _capped(self, owners, count):
        limit = self.source.max_members
        if count <= limit:
            self._over = None
            return owners
        if self._over != count:
            self._over = count
            log.warn("{where} lists {count} owners; only the first {limit} are used (max_members=)",
                     where=self.name, count=count, limit=limit)
        return dict(sorted(owners.items())[:limit])

    def _apply(self):
        self.upstreams.set_source(self.name, sorted(set(self.owners.values())))


class EtcdRegistration(Service):
    """An owner's ``--register etcd://HOST:PORT/PREFIX``: the key
    ``PREFIX/owners/<owner id>`` = ``{"id": ..., "url": "tcp://HOST:PORT"}``
    under a lease of ``ttl`` seconds, kept alive every ttl/3.

    The key is claimed with a transaction that puts it only if it does not
    exist (``create_revision == 0``) or is this lease's: while another
    owner's lease is alive, the id is refused.  Refused before the first
    claim succeeded: one line on stderr and the process exits 1
    (``exit``); later (the lease was lost and another owner took the id
    meanwhile): a warning and a new try after a back-off.  etcd
    unreachable: a warning at most once a minute, tries again after a
    back-off (the proxy serves meanwhile).  On stop the lease is revoked,
    so fronts drop this owner at once.  ``advertise``: the URL fronts
    dial; None: ``listener()``'s interface and port (the first
    line-protocol listener)."""

    def __init__(self, source, owner_id, clock, listener=None, client=None, exit=None):
        self.source = source
        self.owner_id = owner_id
        self.clock = clock
        self.listener = listener
        self.client = client or EtcdClient(clock, source.base, ETCD_TIMEOUT)
        self.exit = exit or self._exit
        self.lease = None
        self.claimed_once = False
        self._waited = 0  # tries while the listener had no address
        self._retry = None
        self._loop = None
        self._backoff = _Backoff()
        self._down = _DownLog(clock, f"registration at {source.where}",
                              "this proxy serves on; trying again")

    def startService(self):
        Service.startService(self)
        self._retry = self.clock.callLater(0, self._register)

    def url(self):
        if self.source.advertise:
            return self.source.advertise
        host, port = self.listener() if self.listener is not None else (None, None)
        if port is None:
            return None
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        return f"tcp://{'[' + host + ']' if ':' in host else host}:{port}"

    def _register(self):
        self._retry = None
        if not self.running:
            return
        url = self.url()
        if url is None:  # not listening yet (or not on TCP: then advertise= is needed)
            self._waited += 1
            if self._waited == 50:
                log.warn("registration at {where}: no plain line-protocol listener (-p tcp:..., not "
                         "haproxy:, ssl: or mtls:) has a TCP address yet; give ?advertise=tcp://HOST:PORT "
                         "if it never will",
                         where=self.source.where)
            self._retry = self.clock.callLater(0.1 if self._waited < 50 else 5.0, self._register)
            return
        value = json.dumps({"id": self.owner_id, "url": url}).encode("utf-8")
        key = self.source.key(self.owner_id)
        d = self.client.grant(self.source.ttl)

        def granted(lease):
            self.lease = lease
            return self.client.claim(key, value, lease)

        def claimed(answer):
            ok, holder = answer
            if not self.running:
                return None
            self._down.ok()
            if ok:
                self._backoff.reset()
                self.claimed_once = True
                log.info("registered as owner {id} ({url}) at {where}, lease TTL {ttl} s",
                         id=self.owner_id, url=url, where=self.source.where, ttl=self.source.ttl)
                self._loop = LoopingCall(self._keepalive)
                self._loop.clock = self.clock
                self._loop.start(self.source.ttl / 3.0, now=False)
                return None
            lease, self.lease = self.lease, None
            self.client.revoke(lease).addErrback(lambda f: None)
            try:
                other = json.loads(holder).get("url")
            except (ValueError, AttributeError):
                other = None
            message = (f"--register {self.source.where}: owner id {self.owner_id!r} is held by "
                       f"another live owner ({other or 'unknown address'}); give this proxy "
                       "another --owner-id")
            if not self.claimed_once:
                self.exit(message)
                return None
            delay = self._backoff.next()
            log.warn("{message}; trying again in {delay:g} s", message=message, delay=delay)
            self._retry = self.clock.callLater(delay, self._register)
            return None

        def failed(failure):
            if not self.running:
                return
            self._down.failed(failure.getErrorMessage())
            self._retry = self.clock.callLater(self._backoff.next(), self._register)

        d.addCallback(granted).addCallbacks(claimed, failed)
        d.addErrback(lambda f: log.failure("registration at {where}", f, where=self.source.where))

    def _keepalive(self):
        lease = self.lease

        def kept(ttl):
            self._down.ok()
            if ttl > 0 or self.lease != lease or not self.running:
                return
            log.warn("registration at {where}: the lease of owner {id} expired (etcd unreachable "
                     "longer than its TTL?); registering again", where=self.source.where, id=self.owner_id)
            self._lost()

        def failed(failure):
            self._down.failed(failure.getErrorMessage())

        self.client.keepalive(lease).addCallbacks(kept, failed)

    def _lost(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self.lease = None
        if self.running and (self._retry is None or not self._retry.active()):
            self._retry = self.clock.callLater(0, self._register)

    def stopService(self):
        Service.stopService(self)
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        lease, self.lease = self.lease, None
        if lease is None:
            return self.client.close()
        d = self.client.revoke(lease)
        d.addCallback(lambda _: log.info("owner {id} left {where} (lease revoked)", id=self.owner_id,
                                         where=self.source.where))
        d.addErrback(lambda f: log.warn("registration at {where}: revoking the lease failed ({why}); "
                                        "fronts drop this owner after its TTL", where=self.source.where,
                                        why=f.getErrorMessage()))
        d.addBoth(lambda _: self.client.close())
        return d

    def _exit(self, message):
        """Refused at start: one line, then the process ends with status 1."""
        sys.stderr.write(f"twistd foxyproxy: {message}\n")
        sys.stderr.flush()
        log.error("{message}", message=message)
        self.clock.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        self.clock.stop()


def line_listener(top):
    """(host, port) of the first plain line-protocol listener (``--port``,
    then ``--listen``) of the service tree ``top`` once it listens on TCP,
    else (None, None).
    A ``haproxy:`` listener (it wants a PROXY header) and a TLS one are
    skipped: a front dials the registered ``tcp://`` URL in clear, with no
    header."""
    from .proxy_protocol import ProxyHeaderEndpoint
    from .tls import HalfClosingTLSEndpoint
    from .twisted_internals import listening_port

    from twisted.application.service import MultiService

    stack = list(top)
    while stack:
        service = stack.pop(0)
        if isinstance(service, MultiService):
            stack[:0] = list(service)
            continue
        if getattr(service, "option", None) in ("--port", "--listen"):
            if isinstance(getattr(service, "endpoint", None), (ProxyHeaderEndpoint, HalfClosingTLSEndpoint)):
                continue  # not what a front's tcp:// speaks
            port = listening_port(service)
            address = port.getHost() if port is not None else None
            if address is not None and hasattr(address, "port"):
                return address.host, address.port
            return None, None
    return None, None
